"""ExAccErr against brute-force enumeration on tiny models with a 4-token vocabulary."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmdistill.data import TokenizedExample, collate
from lmdistill.instruct.exposure_bias import accumulated_error, exacc_err, measure_exposure_bias, position_errors

EOS = 3  # tokens 0, 1, 2 are words; 3 ends a response (and pads)
L = 4
PROMPTS = [[0, 1], [2]]  # different lengths: left padding must not change anything


def vocab4_model(seed: int, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=EOS, pad_token_id=EOS, initializer_range=0.6, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models():
    return vocab4_model(seed=1), vocab4_model(seed=2, layers=2)  # student, teacher


@pytest.fixture(scope="module")
def brute(models):
    return BruteForce(*models)


class BruteForce:
    """Exact expectations by enumerating every response of length <= L (one unpadded forward per prefix)."""

    def __init__(self, student, teacher):
        self.student, self.teacher, self.cache = student, teacher, {}

    def next_log_probs(self, model, ids):
        key = (id(model), tuple(ids))
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        return self.cache[key]

    def kl(self, ids):  # KL(p_T || q_S) of the next-token distributions after `ids`
        p, q = self.next_log_probs(self.teacher, ids), self.next_log_probs(self.student, ids)
        return float((p.exp() * (p - q)).sum())

    def responses(self, generator, prompt):
        """(response, probability under `generator`) for every response ending at EOS or at length L."""
        stack = [((), 1.0)]
        while stack:
            response, prob = stack.pop()
            if len(response) == L or (response and response[-1] == EOS):
                yield response, prob
                continue
            logp = self.next_log_probs(generator, prompt + list(response))
            stack.extend((response + (v,), prob * math.exp(float(logp[v]))) for v in range(4))

    def accumulated(self, response, prompt):
        """[sum_{t <= l} KL_t for l = 1..L] along one response (no error after its EOS)."""
        out, total = [], 0.0
        for t in range(L):
            if t < len(response):
                total += self.kl(prompt + list(response[:t]))
            out.append(total)
        return out

    def expectation(self, generator):
        """(E[sum_{t<=l} KL_t], Var[...]) per l, averaged over PROMPTS."""
        mean, second = [0.0] * L, [0.0] * L
        for prompt in PROMPTS:
            for response, prob in self.responses(generator, prompt):
                acc = self.accumulated(response, prompt)
                for l in range(L):
                    mean[l] += prob * acc[l] / len(PROMPTS)
                    second[l] += prob * acc[l] ** 2 / len(PROMPTS)
        return mean, [s - m * m for s, m in zip(second, mean)]


def test_probabilities_of_enumerated_responses_sum_to_one(models, brute):
    for prompt in PROMPTS:
        assert sum(p for _, p in brute.responses(models[0], prompt)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("generator", ["student", "teacher"])
def test_batched_errors_weighted_by_probability_equal_exact_expectation(models, brute, generator):
    student, teacher = models
    gen = student if generator == "student" else teacher
    examples, weights = [], []
    for prompt in PROMPTS:
        for response, prob in brute.responses(gen, prompt):
            examples.append(TokenizedExample(prompt, list(response), []))
            weights.append(prob / len(PROMPTS))
    batch = collate(examples, pad_id=EOS)  # prompts left-padded, responses right-padded, all in one batch
    errors, mask = position_errors(student, teacher, batch)
    got = accumulated_error(errors, torch.tensor(weights))
    exact, _ = brute.expectation(gen)
    assert got.tolist() == pytest.approx(exact, rel=1e-4, abs=1e-6)
    assert exact[-1] > exact[0] > 0  # errors accumulate


def test_monte_carlo_exacc_err_matches_exact_values(models, brute):
    student, teacher = models
    n = 800  # rows per prompt; each row is an independent sample
    prompts = [p for p in PROMPTS for _ in range(n)]
    result = measure_exposure_bias(student, teacher, prompts, EOS, EOS, max_length=L, samples=1, seed=0,
                                   batch_size=len(prompts), no_repeat_ngram_size=0)
    R, var_R = brute.expectation(student)
    E, var_E = brute.expectation(teacher)
    rows = len(prompts)
    for l in range(L):  # within 4 standard errors of the exact expectation
        assert abs(result.student_error[l] - R[l]) < 4 * math.sqrt(var_R[l] / rows) + 1e-9, (
            l,
            result.student_error,
            R,
        )
        assert abs(result.teacher_error[l] - E[l]) < 4 * math.sqrt(var_E[l] / rows) + 1e-9, (
            l,
            result.teacher_error,
            E,
        )
    exact = exacc_err(R, E)
    assert result.exacc_err[-1] == pytest.approx(exact[-1], abs=0.25 * abs(exact[-1]) + 5)
    assert result.prompts == rows and result.max_length == L


def test_exacc_err_formula_by_hand():
    assert exacc_err([2.0, 3.0, 1.0], [1.0, 3.0, 4.0]) == [100.0, 0.0, -75.0]
    assert math.isnan(exacc_err([1.0], [0.0])[0])


def test_student_equal_to_teacher_has_no_error(models):
    student, _ = models
    batch = collate([TokenizedExample([0, 1], [2, 2, EOS], []), TokenizedExample([2], [1], [])], pad_id=EOS)
    errors, mask = position_errors(student, student, batch)
    assert torch.all(errors.abs() < 1e-6)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_cli_writes_table_and_plot(tiny_llama, tiny_llama_student, instruct_file, tmp_path, capsys):
    from lmdistill.cli import main

    out = tmp_path / "eb"
    code = main(
        [
            "exposure-bias",
            "--model",
            str(tiny_llama_student),
            "--teacher",
            str(tiny_llama),
            "--data",
            str(instruct_file),
            "--max-examples",
            "3",
            "--max-length",
            "4",
            "--prompt-format",
            "alpaca",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    import json

    data = json.loads((out / "exposure_bias.json").read_text())
    assert len(data["exacc_err"]) == 4 and data["prompts"] == 3
    assert all(e > 0 for e in data["teacher_error"])
    assert "ExAccErr" in (out / "exposure_bias.md").read_text()
    assert (out / "exposure_bias.png").stat().st_size > 1000
    assert (
        main(
            [
                "exposure-bias",
                "--model",
                str(tiny_llama_student),
                "--teacher",
                str(tiny_llama),
                "--data",
                str(instruct_file),
                "--max-length",
                "0",
            ]
        )
        == 2
    )
    assert "--max-length: expected > 0" in capsys.readouterr().err


def test_running_averaging_matches_its_exact_value(models, brute):
    """PromptKD's script: each position averaged over the samples still running there, then summed."""
    student, teacher = models
    n = 800
    prompts = [p for p in PROMPTS for _ in range(n)]
    result = measure_exposure_bias(
        student,
        teacher,
        prompts,
        EOS,
        EOS,
        max_length=L,
        seed=0,
        batch_size=len(prompts),
        no_repeat_ngram_size=0,
        averaging="running",
    )
    for name, generator in (("student", student), ("teacher", teacher)):
        num, den = [0.0] * L, [0.0] * L
        for prompt in PROMPTS:
            for response, prob in brute.responses(generator, prompt):
                for t in range(len(response)):
                    num[t] += prob * brute.kl(prompt + list(response[:t]))
                    den[t] += prob
        exact = list(itertools.accumulate(a / b for a, b in zip(num, den)))
        got = getattr(result, f"{name}_error")
        assert got == pytest.approx(exact, rel=0.1, abs=1e-3), (name, got, exact)
    # It differs from the expectation once samples end (EOS is likely with these models).
    plain = measure_exposure_bias(
        student, teacher, prompts, EOS, EOS, max_length=L, seed=0, batch_size=len(prompts), no_repeat_ngram_size=0
    )
    assert result.student_error[-1] > plain.student_error[-1]


def test_prompted_teacher_oracle_reads_the_teacher_through_its_soft_prompt(models):
    """A prefix made of real tokens' embeddings = the teacher reading those tokens before the prompt."""
    student, teacher = models
    prefix_ids = [2, 0]
    prefix = teacher.get_input_embeddings().weight[prefix_ids].detach()
    plain = collate([TokenizedExample([0, 1], [2, 1, EOS], []), TokenizedExample([2], [1], [])], pad_id=EOS)
    spelled = collate(
        [TokenizedExample(prefix_ids + [0, 1], [2, 1, EOS], []), TokenizedExample(prefix_ids + [2], [1], [])],
        pad_id=EOS,
    )
    errors, mask = position_errors(student, teacher, plain, teacher_prefix=prefix)
    with torch.no_grad():
        from lmdistill.losses import log_probs, token_forward_kl
        from lmdistill.forward import response_logits

        expected = (
            token_forward_kl(log_probs(response_logits(student, plain)), log_probs(response_logits(teacher, spelled)))
            * mask
        )
    torch.testing.assert_close(errors, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(errors, position_errors(student, teacher, plain)[0])
    result = measure_exposure_bias(student, teacher, [[0, 1], [2]], EOS, EOS, max_length=L, teacher_prefix=prefix)
    assert all(e > 0 for e in result.teacher_error)
