import json

import pytest

from lmdistill.evaluate import EvalResult, GenerationSettings, evaluate, format_table, rouge_l


def test_rouge_l_uses_stemming_and_max_over_references():
    assert rouge_l("the cats are running", ["the cat is running"]) == pytest.approx(100 * 0.75)
    assert rouge_l("a b c", ["x y z", "a b c"]) == pytest.approx(100.0)
    assert rouge_l("", ["a"]) == 0.0


def test_evaluate_generates_and_scores_each_seed(tiny_llama, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "output": ["hello there", w]}) + "\n"
                            for w in ["one", "two", "three"]))
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    results = evaluate(str(tiny_llama), str(data), seeds=[1, 2], settings=settings, prompt_format="alpaca", progress=False)
    r = results["eval.jsonl"] if "eval.jsonl" in results else next(iter(results.values()))
    assert r.n == 3 and len(r.per_seed) == 2 and all(0.0 <= s <= 100.0 for s in r.per_seed)
    # Greedy decoding is deterministic: two seeds give the same score.
    greedy = evaluate(str(tiny_llama), str(data), seeds=[1, 2], prompt_format="alpaca", progress=False,
                      settings=GenerationSettings(max_new_tokens=6, greedy=True))
    g = next(iter(greedy.values()))
    assert g.per_seed[0] == g.per_seed[1] and g.std == 0.0


def test_format_table_mean_and_std():
    r = EvalResult("dolly", 10, [1, 2], [20.0, 30.0])
    table = format_table({"student": {"dolly": r}})
    assert "| student | 25.00 ± 5.00 |" in table
    single = format_table({"student": {"dolly": EvalResult("dolly", 10, [1], [20.0])}})
    assert "| student | 20.00 |" in single  # one seed: no spread to report
