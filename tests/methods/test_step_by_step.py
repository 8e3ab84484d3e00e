"""Distilling step-by-step, finetune and distill: data use, the multi-task loss against a
naive per-example reference, and real training steps on causal and seq2seq students."""

import json

import pytest
import torch

from lmdistill.config import ConfigError
from lmdistill.methods import load_config
from lmdistill.trainer import Trainer

SVAMP = "${LMDISTILL_DATA_DIR}/step_by_step/svamp"


def make_config(student, tmp_path, method="step_by_step", **overrides):
    values = {"method": method, "student": str(student), "train_data": SVAMP, "output_dir": str(tmp_path / method),
              "steps": 2, "batch_size": 4, "progress": False, "max_prompt_length": 192, "max_length": 320,
              "max_target_length": 48, "lr": 1e-3, "lr_schedule": "constant", "precision": "fp32", **overrides}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


# ----- data use -----

def test_examples_per_method_leave_unparsed_teacher_outputs_out(tiny_llama_student, tmp_path):
    counts = {}
    for method in ("step_by_step", "finetune", "distill"):
        trainer = Trainer(make_config(tiny_llama_student, tmp_path, method))
        counts[method] = len(trainer.examples)
        example = trainer.examples[0]
        text = trainer.tokenizer.decode(example.label_prompt)
        if method == "step_by_step":
            assert "predict: " in text and "explain: " in trainer.tokenizer.decode(example.rationale_prompt)
            assert example.rationale_target[-1] == trainer.tokenizer.eos_token_id
        else:
            assert "predict:" not in text and example.rationale_target == []
    # 720 training rows after the 10% hold-out; 12 of their teacher outputs do not parse.
    assert counts == {"step_by_step": 708, "finetune": 720, "distill": 708}


def test_targets_cut_to_the_length_limit_are_counted(tiny_llama_student, tmp_path, caplog):
    with caplog.at_level("INFO", logger="lmdistill"):
        trainer = Trainer(make_config(tiny_llama_student, tmp_path, max_target_length=8))
    eos = trainer.tokenizer.eos_token_id
    labels = sum(e.label_target[-1] != eos for e in trainer.examples)
    rationales = sum(e.rationale_target[-1] != eos for e in trainer.examples)
    assert 0 < labels < rationales <= len(trainer.examples)  # equations are short, rationales long
    assert all(len(e.rationale_target) == 8 for e in trainer.examples if e.rationale_target[-1] != eos)
    assert f"max_target_length=8: {labels} labels, {rationales} rationales" in caplog.text


def test_label_sources(tiny_llama_student, tmp_path):
    tok = None
    targets = {}
    for source in ("gold", "teacher"):
        trainer = Trainer(make_config(tiny_llama_student, tmp_path, label_source=source))
        tok = trainer.tokenizer
        targets[source] = tok.decode(trainer.examples[0].label_target[:-1])
    assert targets == {"gold": "( 84.0 / 2.0 )", "teacher": "(84 / 2)"}  # the first training row


@pytest.mark.parametrize("overrides, key", [
    ({"method": "finetune", "label_source": "teacher"}, "label_source"),
    ({"method": "distill", "label_source": "gold"}, "label_source"),
    ({"multitask_forward": "both"}, "multitask_forward"),
    ({"dataset": "gsm8k"}, "dataset"),
    ({"train_fraction": 0}, "train_fraction"),
    ({"rationale_weight": -1}, "rationale_weight"),
    ({"rationale_prefix": "predict: "}, "rationale_prefix"),
    ({"alpha": 1.5}, "alpha"),
])
def test_config_errors_name_the_key(overrides, key, tmp_path):
    values = {"method": "step_by_step", "student": "x", "train_data": "y.jsonl", **overrides}
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [f"{k}={v}" for k, v in values.items()])


# ----- the multi-task loss equals the hand-computed weighted sum -----

def naive_mean_nll(model, pairs, seq2seq):
    """Mean target-token NLL over all (input ids, target ids) pairs, one unpadded example at a time."""
    total, count = 0.0, 0
    for prompt, target in pairs:
        if seq2seq:  # Hugging Face's own shifted-label loss, as an independent reference
            loss = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([target])).loss
            total, count = total + loss * len(target), count + len(target)
        else:
            ids = torch.tensor([prompt + target])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for k, token in enumerate(target):
                total = total - logp[len(prompt) - 1 + k, token]
            count += len(target)
    return total / count


@pytest.mark.parametrize("student,weighting,expected", [
    ("tiny_llama_student", {"alpha": 0.3}, (0.3, 0.7)),             # the released code: alpha, 1 - alpha
    ("tiny_t5", {}, (0.5, 0.5)),                                    # its default alpha = 0.5
    ("tiny_llama_student", {"rationale_weight": 0.3}, (1.0, 0.3)),  # the paper's L_label + lambda L_rationale
])
def test_multitask_loss_is_the_weighted_sum(student, weighting, expected, tmp_path, request):
    folder = request.getfixturevalue(student)
    trainer = Trainer(make_config(folder, tmp_path, train_fraction=0.05, **weighting))
    method, examples = trainer.method, trainer.examples[:3]
    method.student.eval()  # T5 dropout off (the tiny T5 has none, but be explicit)
    with torch.no_grad():
        model, seq2seq = method.unwrapped_student, method.seq2seq
        label = naive_mean_nll(model, [(e.label_prompt, e.label_target) for e in examples], seq2seq)
        rationale = naive_mean_nll(model, [(e.rationale_prompt, e.rationale_target) for e in examples], seq2seq)
        for forward in ("separate", "concat"):  # two forward passes, or one joint padded batch
            method.config.multitask_forward = forward
            batch = method.collate(examples)
            assert set(batch.parts) == ({"label", "rationale"} if forward == "separate" else {"joint"})
            loss, logs = method.loss(batch, 0)
            assert logs["label_loss"] == pytest.approx(float(label), rel=1e-5)
            assert logs["rationale_loss"] == pytest.approx(float(rationale), rel=1e-5)
            assert float(loss) == pytest.approx(float(expected[0] * label + expected[1] * rationale), rel=1e-5)


def test_baseline_loss_is_the_label_loss_only(tiny_llama_student, tmp_path):
    trainer = Trainer(make_config(tiny_llama_student, tmp_path, "distill", train_fraction=0.05))
    method, examples = trainer.method, trainer.examples[:3]
    with torch.no_grad():
        loss, logs = method.loss(method.collate(examples), 0)
        pairs = [(e.label_prompt, e.label_target) for e in examples]
        expected = naive_mean_nll(method.unwrapped_student, pairs, False)
    assert "rationale_loss" not in logs and float(loss) == pytest.approx(float(expected), rel=1e-5)


# ----- training: the objective falls on a fixed batch -----


def losses_of_run(run_dir, key="loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows]


@pytest.mark.parametrize("student, method", [("tiny_llama_student", "step_by_step"), ("tiny_t5", "step_by_step")])
def test_training_lowers_the_loss(student, method, tmp_path, request):
    folder = request.getfixturevalue(student)
    # max_train_examples = batch_size: every step sees the same 4 examples.
    config = make_config(
        folder, tmp_path, method, steps=8, lr=1e-2, max_train_examples=4, max_target_length=16, train_fraction=0.05
    )
    run = Trainer(config).train()
    losses = losses_of_run(run)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    for term in ("label_loss", "rationale_loss"):  # both tasks learn
        assert losses_of_run(run, term)[-1] < 0.9 * losses_of_run(run, term)[0]
    saved = json.loads((run / "student" / "reasoning_task.json").read_text())
    assert saved["dataset"] == "svamp" and saved["method"] == method


def test_trains_on_a_generic_jsonl_file(tiny_llama_student, tmp_path):
    """A file in the teacher-generation layout (input, label, rationale, id) trains directly."""
    path = tmp_path / "teacher.jsonl"
    rows = [
        {
            "id": str(i),
            "input": f"Tom has {i} apples and buys {i + 1} more. How many now?",
            "label": f"({i} + {i + 1})",
            "rationale": f"{i} + {i + 1} = {2 * i + 1}.",
        }
        for i in range(6)
    ]
    rows.append({"id": "bad", "input": "no rationale parsed", "label": "(1)", "rationale": ""})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(make_config(tiny_llama_student, tmp_path, train_data=str(path), steps=3))
    assert len(trainer.examples) == 6 and trainer.config.dataset_name == "jsonl"
    run = trainer.train()
    assert len(losses_of_run(run)) == 3
