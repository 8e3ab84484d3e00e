import json

import pytest

from lmdistill.instruct.evaluate import EvalResult, GenerationSettings, evaluate, format_table, rouge_l


def test_rouge_l_uses_stemming_and_max_over_references():
    assert rouge_l("the cats are running", ["the cat is running"]) == pytest.approx(100 * 0.75)
    assert rouge_l("a b c", ["x y z", "a b c"]) == pytest.approx(100.0)
    assert rouge_l("", ["a"]) == 0.0


def test_evaluate_generates_and_scores_each_seed(tiny_llama, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "output": ["hello there", w]}) + "\n"
                            for w in ["one", "two", "three"]))
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    results = evaluate(
        str(tiny_llama), str(data), seeds=[1, 2], settings=settings, prompt_format="alpaca", progress=False
    )
    r = results["eval.jsonl"] if "eval.jsonl" in results else next(iter(results.values()))
    assert r.n == 3 and len(r.per_seed) == 2 and all(0.0 <= s <= 100.0 for s in r.per_seed)
    # Greedy decoding is deterministic: two seeds give the same score.
    greedy = evaluate(
        str(tiny_llama),
        str(data),
        seeds=[1, 2],
        prompt_format="alpaca",
        progress=False,
        settings=GenerationSettings(max_new_tokens=6, greedy=True),
    )
    g = next(iter(greedy.values()))
    assert g.per_seed[0] == g.per_seed[1] and g.std == 0.0


def test_format_table_mean_and_std():
    r = EvalResult("dolly", 10, [1, 2], [20.0, 30.0])
    table = format_table({"student": {"dolly": r}})
    assert "| student | 25.00 ± 5.00 |" in table
    single = format_table({"student": {"dolly": EvalResult("dolly", 10, [1], [20.0])}})
    assert "| student | 20.00 |" in single  # one seed: no spread to report


def test_long_prompts_are_cut_to_their_first_tokens_and_responses_capped(tiny_llama, tmp_path, monkeypatch):
    """As MiniLLM/PromptKD evaluate: prompts keep their first max_prompt_length tokens (none is dropped),
    at most max_new_tokens are generated."""
    import lmdistill.instruct.evaluate as ev
    from lmdistill.instruct.data import InstructionExample
    from lmdistill.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    long = InstructionExample("word " * 300, "word " * 300, ["x"])
    short = InstructionExample("hello", "hello", ["x"])
    seen = []
    real = ev.sample_responses

    def spy(model, batch, eos, pad, room, *args, **kwargs):
        seen.append((batch.prompt_width, room))
        return real(model, batch, eos, pad, room, *args, **kwargs)

    monkeypatch.setattr(ev, "sample_responses", spy)
    settings = GenerationSettings(max_prompt_length=20, max_new_tokens=5, batch_size=1)
    out = ev.generate_responses(model, tokenizer, [long, short], "alpaca", settings)
    assert len(out) == 2 and len(seen) == 2
    assert max(width for width, _ in seen) == 20 and all(room == 5 for _, room in seen)
    assert GenerationSettings().max_prompt_length == 256 and GenerationSettings().max_new_tokens == 256


def test_a_spec_is_evaluated_in_the_dtype_asked_for(tiny_llama, tmp_path, monkeypatch):
    """`dtype` is the precision the weights decode in (fp32 unless asked)."""
    import torch

    import lmdistill.instruct.evaluate as ev

    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "Say one.", "output": ["one"]}) + "\n")
    seen = []
    real = ev.generate_responses

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ev, "generate_responses", spy)
    settings = GenerationSettings(max_new_tokens=3)
    for dtype in (torch.bfloat16, None):
        kwargs = {"dtype": dtype} if dtype else {}
        r = next(iter(evaluate(str(tiny_llama), str(data), seeds=[1], settings=settings, prompt_format="alpaca",
                               progress=False, **kwargs).values()))
        assert r.n == 1 and 0.0 <= r.mean <= 100.0
    assert seen == [torch.bfloat16, torch.float32]
