"""ImitKD (Lin et al., "Autoregressive Knowledge Distillation through Imitation Learning",
EMNLP 2020), as the MiniLLM / DistiLLM baseline scripts run it (`--type mixed-fkl`,
`--mixed-alpha 1.0`, `--kd-ratio 1.0`).

ImitKD treats distillation as imitation learning: the student is trained on the states it
visits itself, with the teacher as the oracle, so that training and generation see the
same prefixes. For each micro-batch of prompts x:

  1. Each row's response is, with probability `student_ratio`, sampled from the student,
     y ~ q_S(. | x) (no gradient through the sampling); otherwise it is the dataset
     response. (With the baselines' ratio 1.0 every response is the student's own.)
  2. The student minimises the forward KL to the teacher on those responses:
        L = (1/|y|) sum_t KL(p_T(. | y_<t, x) || q_S(. | y_<t, x)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmdistill.config import TrainConfig, check, doc
from lmdistill.data import Batch
from lmdistill.chunked import distill_loss
from lmdistill.methods.gkd import sample_student
from lmdistill.methods.base import DistillationMethod


@dataclass
class ImitKDConfig(TrainConfig):
    """ImitKD: forward KL on a per-row mix of student samples and dataset responses."""

    method: str = doc("Training method.", default="imitkd")
    student_ratio: float = doc("Probability that a row's response is sampled from the student instead of "
                               "taken from the data (DistiLLM's baseline scripts: 1.0).", default=1.0)

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for ImitKD", self.teacher)
        check(0.0 <= self.student_ratio <= 1.0, "student_ratio", "in [0, 1]", self.student_ratio)


def _pad_responses(batch: Batch, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask) with the response part right-padded to `width`."""
    extra = width - (batch.input_ids.shape[1] - batch.prompt_width)
    return (F.pad(batch.input_ids, (0, extra), value=pad_id), F.pad(batch.attention_mask, (0, extra)),
            F.pad(batch.response_mask, (0, extra)))


def mix_rows(data: Batch, sampled: Batch, take_sample: torch.Tensor, pad_id: int) -> Batch:
    """Row i from `sampled` where take_sample[i], else from `data`; both share the same prompts."""
    if data.prompt_width != sampled.prompt_width:
        raise ValueError("mix_rows: the two batches must share their prompts (same prompt width)")
    width = max(b.input_ids.shape[1] - b.prompt_width for b in (data, sampled))
    rows = take_sample.view(-1, 1).to(data.input_ids.device)
    parts = [torch.where(rows, s, d) for d, s in zip(_pad_responses(data, width, pad_id),
                                                     _pad_responses(sampled, width, pad_id))]
    return Batch(*parts, prompt_width=data.prompt_width, references=data.references)


class ImitKD(DistillationMethod):
    config_class = ImitKDConfig
    progress_key = "forward_kl"

    def prepare(self, batch, step):
        """Step 1: each row on-policy with probability student_ratio."""
        take_sample = torch.rand(batch.input_ids.shape[0]) < self.config.student_ratio
        if not take_sample.any():
            return batch
        return mix_rows(batch, sample_student(self, batch), take_sample, self.tokenizer.pad_token_id)

    def loss(self, batch, step):
        _, mask = batch.targets()
        loss, _, _ = distill_loss(self.student, self.teacher, batch, "forward_kl")  # KL(p_T || q_S), chunked
        return loss, {"forward_kl": loss.item(), "response_tokens": float(mask.sum())}
