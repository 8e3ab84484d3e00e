"""A student as its teacher's speculative-decoding draft (`lmdistill draft-eval`): alpha against a naive
per-position loop, alpha = 1 for a model drafting for itself, the tokens-per-call formula, the measured
assisted-generation run, the CLI's report and errors, and the model card."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd_testing import make_trainer
from lmdistill.cli import main
from lmdistill.data import collate
from lmdistill.draft import draft_eval, expected_tokens_per_call, measure_assisted, position_overlap
from lmdistill.instruct.data import load_instruction_data, tokenize_examples
from lmdistill.models import load_tokenizer


def naive_alpha(target, draft, examples, temperature=1.0) -> float:
    """Each example alone, unpadded, full logits (float32), a loop over its response positions."""
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.prompt + e.response])
        with torch.no_grad():
            p = torch.softmax(target(ids).logits[0].float() / temperature, -1)
            q = torch.softmax(draft(ids).logits[0].float() / temperature, -1)
        for t in range(len(e.prompt), len(e.prompt) + len(e.response)):
            total += float(torch.minimum(p[t - 1], q[t - 1]).sum())
            count += 1
    return total / count


@pytest.fixture(scope="module")
def pair(tiny_llama, tiny_llama_student):
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    return load(tiny_llama), load(tiny_llama_student)


def held_out(model_path, instruct_file, n=3):
    tokenizer = load_tokenizer(str(model_path))
    examples, _ = tokenize_examples(load_instruction_data(str(instruct_file), limit=n), tokenizer, "alpaca", 128, 40)
    return examples, tokenizer


def test_expected_tokens_per_call_is_the_geometric_sum():
    assert expected_tokens_per_call(0.0, 4) == 1.0
    assert expected_tokens_per_call(1.0, 4) == 5.0
    assert expected_tokens_per_call(0.5, 3) == pytest.approx(1.875)
    for alpha in (0.1, 0.62, 0.97):
        for gamma in (0, 1, 5):
            assert expected_tokens_per_call(alpha, gamma) == pytest.approx(sum(alpha ** k for k in range(gamma + 1)))
    with pytest.raises(ValueError):
        expected_tokens_per_call(0.5, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_alpha_equals_a_naive_per_position_loop(pair, tiny_llama, instruct_file, temperature):
    target, draft = pair
    examples, tokenizer = held_out(tiny_llama, instruct_file)
    want = naive_alpha(target, draft, examples, temperature)
    for batch_size, chunk in ((1, None), (3, 5)):  # padded batches, several vocabulary chunks
        overlaps = [position_overlap(target, draft, collate(examples[i:i + batch_size], tokenizer.pad_token_id),
                                     temperature, chunk_size=chunk)[0] for i in range(0, len(examples), batch_size)]
        got = torch.cat(overlaps)
        assert got.numel() == sum(len(e.response) for e in examples)
        assert float(got.double().mean()) == pytest.approx(want, abs=1e-5)
    assert 0.0 < want < 1.0


def test_a_model_drafting_for_itself_is_always_accepted(pair, tiny_llama, instruct_file):
    target, _ = pair
    report = draft_eval(str(tiny_llama), str(tiny_llama), str(instruct_file), max_examples=3, prompt_format="alpaca",
                        max_length=40, measure_prompts=2, gamma=3, max_new_tokens=8, target=target, draft=target)
    assert report.alpha == pytest.approx(1.0, abs=1e-6) and report.alpha_greedy == 1.0
    # alpha is a float32 sum of probabilities: 1 to within rounding, so gamma + 1 to within rounding
    assert report.expected_tokens_per_call == pytest.approx({"1": 2.0, "3": 4.0, "5": 6.0}, abs=1e-5)
    for run in report.measured:  # sampling too: min(1, p / q) = 1 when p = q
        assert run["observed_acceptance"] == 1.0 and run["rejections"] == 0 and run["drafted"] > 0, run
    greedy = report.measured[0]
    assert greedy["mode"] == "greedy" and greedy["same_output"] == 2


def test_measured_run_counts_drafted_and_accepted_tokens(pair, tiny_llama, instruct_file):
    target, draft = pair
    examples, tokenizer = held_out(tiny_llama, instruct_file, n=2)
    runs = measure_assisted(target, draft, [e.prompt for e in examples], [tokenizer.eos_token_id],
                            tokenizer.pad_token_id, gamma=2, max_new_tokens=6, temperature=1.0)
    for run in (r.summary() for r in runs):
        assert run["assisted_tokens"] > 0 and run["target_tokens"] > 0
        assert 0 <= run["accepted"] <= run["drafted"] <= 2 * run["verify_calls"]
        assert run["rejections"] <= run["verify_calls"] and 0 <= run["observed_acceptance"] <= 1
        assert run["observed_acceptance"] >= run["accepted_per_drafted"]
        # every verification step yields its accepted tokens + one from the target (the last may be cut)
        assert run["assisted_tokens"] <= run["accepted"] + run["verify_calls"]
        assert run["speedup"] > 0
    assert runs[0].same_output == 2  # greedy assisted decoding is the target's own greedy output


def test_cli_writes_the_report_and_the_students_model_card_shows_alpha(tiny_llama, tiny_llama_student,
                                                                        instruct_file, tmp_path, capsys):
    run = make_trainer("kd", tiny_llama, tiny_llama_student, instruct_file, tmp_path / "run", steps=1).train()
    out = run / "draft_eval.json"
    code = main(["draft-eval", "--target", str(tiny_llama), "--draft", str(run / "student"), "--data",
                 str(instruct_file), "--max-examples", "2", "--prompt-format", "alpaca", "--max-length", "40",
                 "--measure-prompts", "1", "--gamma", "2", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert 0 < report["alpha"] < 1 and report["positions"] > 0 and len(report["measured"]) == 2
    assert f"alpha {report['alpha']:.4f}" in capsys.readouterr().out
    card = (run / "student" / "README.md").read_text()
    assert f"token acceptance rate alpha {report['alpha']:.4f}" in card and str(tiny_llama) in card


@pytest.mark.parametrize("flag,value,message", [("--gamma", "0", "--gamma: expected > 0"),
                                                ("--gammas", "1,x", "--gammas: expected comma-separated"),
                                                ("--temperature", "0", "--temperature: expected > 0")])
def test_cli_bad_flags_are_one_error_line(flag, value, message, tiny_llama, instruct_file, capsys):
    code = main(["draft-eval", "--target", str(tiny_llama), "--draft", str(tiny_llama), "--data", str(instruct_file),
                 flag, value])
    err = capsys.readouterr().err
    assert code == 2 and f"lmdistill draft-eval: error: {message}" in err and "Traceback" not in err


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama, tiny_t5, instruct_file, capsys):
    code = main(["draft-eval", "--target", str(tiny_llama), "--draft", str(tiny_t5), "--data", str(instruct_file)])
    err = capsys.readouterr().err
    assert code == 2 and "its tokenizer differs from the target" in err
