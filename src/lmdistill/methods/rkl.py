"""Reverse-KL distillation on dataset responses: the `RKL` baseline of MiniLLM (Gu et al.,
"MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024, Table 1 / App.) and
DistiLLM (Ko et al., ICML 2024), i.e. word-level KD with the divergence reversed.

On the dataset responses y of a batch of prompts x (teacher forcing, no sampling):

    L = (1/|y|) sum_t KL(q_S(. | y_<t, x) || p_T(. | y_<t, x))

The reverse KL is mode-seeking: the student is not pushed to cover every teacher mode.
MiniLLM instead estimates the sequence-level reverse KL on the student's own samples
(see `minillm.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdistill.config import ServedTeacherConfig, check, doc
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.targets import distill_loss


@dataclass
class RKLConfig(ServedTeacherConfig):
    """Token-level reverse KL KL(q_S || p_T) on the dataset responses."""

    method: str = doc("Training method.", default="rkl")

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for RKL", self.teacher)


class RKL(DistillationMethod):
    config_class = RKLConfig
    description = "token-level reverse KL to the teacher"
    progress_key = "reverse_kl"

    def loss(self, batch, step):
        # KL(q_S || p_T), chunked (served: over the teacher's top k + the rest)
        loss, _, _ = distill_loss(self.student, self.teacher_source, batch, "reverse_kl")
        return loss, {"reverse_kl": loss.item()}
