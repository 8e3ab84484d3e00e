"""Accuracy of a student on the reasoning datasets (Distilling step-by-step's evaluation).

The student reads `label_prefix + input` and decodes greedily; only the label task runs,
so no rationale is needed at test time (`with_rationale` also decodes the rationale task,
for inspection; it does not change the accuracy). Scoring:

  * CQA, e-SNLI, ANLI (and JSONL by default): exact match of `normalize_label` texts
    (lower case, single spaces, no trailing period);
  * SVAMP (and JSONL with `metric="equation"`): both equations are evaluated by the safe
    evaluator in `lmdistill.reasoning.arithmetic` and compared with a relative tolerance of 1e-4;
    an equation that does not evaluate is wrong.

The teacher's accuracy on the same records (from its parsed labels; unparsed = wrong) is
reported beside the student's. A trained run folder's `student/reasoning_task.json`
says how that student's inputs were built (prefixes, prompt format); it is read here.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from lmdistill.reasoning.arithmetic import equations_match
from lmdistill.instruct.evaluate import GenerationSettings, generate_from_ids
from lmdistill.reasoning.data import ReasoningRecord, load_reasoning_dataset, normalize_label, reasoning_input_ids
from lmdistill.models import model_for_inference

TASK_FILE = "reasoning_task.json"


def is_correct(metric: str, predicted: Optional[str], gold: str) -> bool:
    """`metric`: `equation` (SVAMP) or `exact` (normalised label text)."""
    if predicted is None:
        return False
    if metric == "equation":
        return equations_match(predicted, gold)
    return normalize_label(predicted) == normalize_label(gold)


def metric_for(dataset: str, metric: Optional[str] = None) -> str:
    if metric is not None:
        if metric not in ("exact", "equation"):
            raise ValueError(f"metric: expected exact or equation, got {metric!r}")
        return metric
    return "equation" if dataset == "svamp" else "exact"


def read_task_file(model: str) -> dict:
    """The `reasoning_task.json` a step-by-step run saved with its student ({} if none)."""
    path = Path(model) / TASK_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@torch.no_grad()
def generate_texts(model, tokenizer, texts: Sequence[str], prompt_format: str = "auto", max_new_tokens: int = 64,
                   batch_size: int = 16) -> list[str]:
    """Greedy continuation of each input text (causal: through the prompt format;
    encoder-decoder: the text itself is the encoder input)."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    inputs = [reasoning_input_ids(t, tokenizer, prompt_format, seq2seq) for t in texts]  # as in training
    if not seq2seq:
        settings = GenerationSettings(
            greedy=True,
            no_repeat_ngram_size=0,
            max_length=1 << 20,
            max_prompt_length=1 << 20,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        return generate_from_ids(model, tokenizer, inputs, settings)
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer.pad({"input_ids": [inputs[i] for i in idx]}, return_tensors="pt").to(device)
        ids = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        for i, row in zip(idx, ids):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


@dataclass
class ReasoningResult:
    dataset: str
    split: str
    n: int
    accuracy: float  # percent
    teacher_accuracy: Optional[float]  # percent, None when the data has no teacher outputs
    teacher_unparsed: int = 0
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "n": self.n,
            "accuracy": self.accuracy,
            "teacher_accuracy": self.teacher_accuracy,
            "teacher_unparsed": self.teacher_unparsed,
            "samples": self.samples,
        }


def teacher_accuracy(records: Sequence[ReasoningRecord], metric: str) -> float:
    """Percent of records whose parsed teacher label is right (unparsed counts as wrong)."""
    return 100.0 * statistics.fmean(is_correct(metric, r.teacher_label, r.label) for r in records)


def evaluate_reasoning(
    model,
    dataset: str,
    split: str = "test",
    source: Optional[str] = None,
    tokenizer=None,
    max_examples: Optional[int] = None,
    label_prefix: Optional[str] = None,
    rationale_prefix: Optional[str] = None,
    prompt_format: Optional[str] = None,
    with_rationale: bool = False,
    max_new_tokens: int = 64,
    rationale_max_new_tokens: int = 128,
    batch_size: int = 16,
    metric: Optional[str] = None,
    keep_samples: int = 5,
    dtype: torch.dtype = torch.float32,
) -> ReasoningResult:
    """Accuracy of `model` (object, or folder / Hub id / alias, loaded in `dtype`) on `dataset`'s `split`.

    Prefixes and prompt format default to what the run saved with the student
    (`reasoning_task.json`), else the released code's `predict: ` / `explain: ` / `auto`.
    """
    saved = read_task_file(model) if isinstance(model, str) else {}
    label_prefix = label_prefix if label_prefix is not None else saved.get("label_prefix", "predict: ")
    rationale_prefix = rationale_prefix or saved.get("rationale_prefix") or "explain: "
    prompt_format = prompt_format or saved.get("prompt_format", "auto")
    model, tokenizer = model_for_inference(model, tokenizer, "evaluate_reasoning", dtype)
    data = load_reasoning_dataset(dataset, split, source)
    records = data.records[:max_examples] if max_examples else data.records
    metric = metric_for(dataset, metric)
    predictions = generate_texts(
        model, tokenizer, [label_prefix + r.input for r in records], prompt_format, max_new_tokens, batch_size
    )
    rationales = (
        generate_texts(
            model,
            tokenizer,
            [rationale_prefix + r.input for r in records],
            prompt_format,
            rationale_max_new_tokens,
            batch_size,
        )
        if with_rationale
        else None
    )
    correct = [is_correct(metric, p, r.label) for p, r in zip(predictions, records)]
    samples = []
    for i, (r, p, ok) in enumerate(zip(records, predictions, correct)):
        if i < keep_samples or with_rationale:
            sample = {"id": r.id, "input": r.input, "gold": r.label, "prediction": p, "correct": ok}
            if rationales is not None:
                sample["rationale"] = rationales[i]
            samples.append(sample)
    has_teacher = any(r.has_teacher_output for r in records)
    return ReasoningResult(
        dataset,
        split,
        len(records),
        100.0 * statistics.fmean(correct),
        teacher_accuracy(records, metric) if has_teacher else None,
        sum(r.has_teacher_output and r.teacher_label is None for r in records),
        samples,
    )


def format_reasoning_table(rows: dict[str, ReasoningResult]) -> str:
    """Markdown table: one row per model, with the teacher's accuracy on the same records."""
    lines = ["| model | dataset | split | n | accuracy (%) | teacher (%) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        teacher = f"{r.teacher_accuracy:.1f}" if r.teacher_accuracy is not None else "-"
        lines.append(f"| {name} | {r.dataset} | {r.split} | {r.n} | {r.accuracy:.1f} | {teacher} |")
    return "\n".join(lines)


def plot_accuracy_vs_fraction(
    curves: dict[str, list[tuple[float, float]]], out: str | Path, title: str, teacher: Optional[float] = None
) -> Path:
    """Data-efficiency plot: test accuracy (%) against train_fraction, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot([100 * x for x in xs], ys, marker="o", label=name)
    if teacher is not None:
        ax.axhline(teacher, color="grey", linestyle="--", label="PaLM-540B teacher (few-shot CoT)")
    ax.set_xlabel("training data used (% of train split)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
