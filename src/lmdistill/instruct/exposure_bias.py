"""Exposure bias as ExAccErr (Arora et al., "Why Exposure Bias Matters: An Imitation Learning
Perspective of Error Accumulation in Language Generation", Findings of ACL 2022), the
measure MiniLLM (Sec. 4.4) and PromptKD (Sec. 5.3) plot.

The teacher p_T is the oracle. The error of the student q_S at a response position t with
prefix y_<t (prompt x omitted) is the oracle's per-step loss KL(p_T(. | y_<t) || q_S(. | y_<t)).
Accumulated up to length l:

    R(l) = E_{y ~ q_S} [ sum_{t <= min(l, |y|)} KL_t(y_<t) ]   free-running: the student's own prefixes
    E(l) = E_{y ~ p_T} [ sum_{t <= min(l, |y|)} KL_t(y_<t) ]   teacher-forced: the oracle's prefixes
    ExAccErr(l) = 100 * (R(l) - E(l)) / E(l)                 (%)

|y| counts the response up to and including its EOS; a finished response adds no error
after it. Expectations are over prompts from the data and samples (temperature 1, no
top-k/top-p, by default with PromptKD's `no_repeat_ngram_size` 6 in both rollouts) of
`samples` responses per prompt; E(l) > 0 unless student = teacher.

`averaging="running"` is PromptKD's script instead: each position's error is averaged over
the samples still running there before summing over positions; the two agree while no
sample has ended. `teacher_prefix` (a soft prompt) makes the prompted teacher p_T^P the
oracle and the teacher-forced generator, as PromptKD's analysis of its own method.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lmdistill.data import Batch, TokenizedExample, collate
from lmdistill.instruct.data import InstructionExample, prompt_ids
from lmdistill.losses import log_probs, token_forward_kl
from lmdistill.forward import response_logits
from lmdistill.sampling import sample_responses

Tensor = torch.Tensor


@torch.no_grad()
def position_errors(student, teacher, batch: Batch, teacher_prefix: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(KL(p_T || q_S) at every response position [B, R] (0 where masked), response mask [B, R]).
    With `teacher_prefix` [n, H] the oracle is the teacher with that soft prompt."""
    _, mask = batch.targets()
    student_logits, teacher_logits = response_logits(student, batch), response_logits(teacher, batch, teacher_prefix)
    rows = min(student_logits.shape[-1], teacher_logits.shape[-1])  # padded embedding matrices: the shared rows
    kl = token_forward_kl(log_probs(student_logits[..., :rows]), log_probs(teacher_logits[..., :rows]))
    return kl * mask, mask


def accumulated_error(errors: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """sum_{t <= l} error_t, averaged over rows (weighted by `weights` [B] if given): [B, R] -> [R]."""
    per_row = errors.double().cumsum(1)
    if weights is None:
        return per_row.mean(0)
    weights = weights.double().to(per_row.device)
    return (per_row * weights[:, None]).sum(0) / weights.sum()


def exacc_err(student_error: Sequence[float], teacher_error: Sequence[float]) -> list[float]:
    """100 (R(l) - E(l)) / E(l) for each l (NaN where E(l) = 0)."""
    return [100.0 * (r - e) / e if e > 0 else math.nan for r, e in zip(student_error, teacher_error)]


@dataclass
class ExposureBiasResult:
    """R(l), E(l) and ExAccErr(l) for l = 1..max_length."""

    student_error: list[float]
    teacher_error: list[float]
    exacc_err: list[float]
    prompts: int
    samples: int

    @property
    def max_length(self) -> int:
        return len(self.exacc_err)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, lengths: Optional[Sequence[int]] = None) -> str:
        """Markdown table of R, E and ExAccErr at selected lengths (default: about 8 of them)."""
        L = self.max_length
        lengths = lengths or sorted({max(1, round(L * k / 8)) for k in range(1, 9)})
        lines = ["| length l | R(l) free-running | E(l) teacher-forced | ExAccErr(l) % |", "|---|---|---|---|"]
        for l in lengths:
            lines.append(f"| {l} | {self.student_error[l - 1]:.4f} | {self.teacher_error[l - 1]:.4f} | "
                         f"{self.exacc_err[l - 1]:.1f} |")
        return "\n".join(lines)


def _pad_to(errors: Tensor, width: int) -> Tensor:
    return F.pad(errors, (0, width - errors.shape[1])) if errors.shape[1] < width else errors[:, :width]


def tokenized_prompts(examples: Sequence[InstructionExample], tokenizer, prompt_format: str = "auto",
                      max_prompt_length: int = 256) -> list[list[int]]:
    """Prompt token ids of the examples, leaving out prompts longer than max_prompt_length."""
    prompts = [p for p in (prompt_ids(ex, tokenizer, prompt_format) for ex in examples) if len(p) <= max_prompt_length]
    if not prompts:
        raise ValueError(f"exposure bias: no prompt of at most {max_prompt_length} tokens")
    return prompts


@torch.no_grad()
def measure_exposure_bias(student, teacher, prompts: Sequence[Sequence[int]], eos_token_id: int | Sequence[int],
                          pad_token_id: int, max_length: int = 32, samples: int = 1, seed: int = 0,
                          batch_size: int = 8, no_repeat_ngram_size: int = 6, averaging: str = "expectation",
                          teacher_prefix: Optional[Tensor] = None) -> ExposureBiasResult:
    """Monte-Carlo R(l), E(l), ExAccErr(l) for l <= max_length over `prompts` (token id lists)."""
    if averaging not in ("expectation", "running"):
        raise ValueError(f"averaging: expected 'expectation' or 'running', got {averaging!r}")
    device = next(student.parameters()).device
    shared_vocab = min(m.get_output_embeddings().weight.shape[0] for m in (student, teacher))  # padded matrices
    torch.manual_seed(seed)
    sums = {name: torch.zeros(max_length, dtype=torch.float64) for name in ("student", "teacher")}
    running = {name: torch.zeros(max_length, dtype=torch.float64) for name in ("student", "teacher")}
    rows = 0
    for start in range(0, len(prompts), batch_size):
        chunk = collate([TokenizedExample(list(p), [], []) for p in prompts[start:start + batch_size]],
                        pad_token_id, with_responses=False).to(device)
        for _ in range(samples):
            for name, generator, prefix in (("student", student, None), ("teacher", teacher, teacher_prefix)):
                generated = sample_responses(generator, chunk, eos_token_id, pad_token_id, max_length, temperature=1.0,
                                             top_p=1.0, no_repeat_ngram_size=no_repeat_ngram_size, prefix=prefix,
                                             vocab_size=shared_vocab)
                errors, mask = position_errors(student, teacher, generated, teacher_prefix)
                if averaging == "expectation":
                    sums[name] += accumulated_error(_pad_to(errors, max_length)).cpu() * errors.shape[0]
                else:  # per position: the error summed over rows, and how many rows are still running
                    sums[name] += _pad_to(errors, max_length).double().sum(0).cpu()
                    running[name] += _pad_to(mask, max_length).double().sum(0).cpu()
            rows += chunk.input_ids.shape[0]
    if averaging == "expectation":
        student_error = (sums["student"] / rows).tolist()
        teacher_error = (sums["teacher"] / rows).tolist()
    else:
        student_error, teacher_error = (
            (sums[name] / running[name].clamp(min=1)).cumsum(0).tolist() for name in ("student", "teacher"))
    return ExposureBiasResult(student_error, teacher_error, exacc_err(student_error, teacher_error),
                              len(prompts), samples)


def plot_exacc_err(results: dict[str, ExposureBiasResult], path: str | Path, title: str = "Exposure bias") -> None:
    """ExAccErr(l) against the generation length l, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        ax.plot(range(1, result.max_length + 1), result.exacc_err, label=name)
    ax.set_xlabel("generation length l")
    ax.set_ylabel("ExAccErr(l) (%)")
    ax.set_title(title)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: ExposureBiasResult, out_dir: str | Path, name: str, header: str = "") -> Path:
    """exposure_bias.json / .md / .png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exposure_bias.json").write_text(json.dumps(result.to_dict(), indent=2))
    text = (f"# Exposure bias (ExAccErr) of {name}\n\n{header}"
            f"{result.prompts} prompts x {result.samples} samples, lengths up to {result.max_length}.\n\n"
            f"{result.table()}\n")
    (out / "exposure_bias.md").write_text(text)
    plot_exacc_err({name: result}, out / "exposure_bias.png", title=f"ExAccErr of {name}")
    return out
