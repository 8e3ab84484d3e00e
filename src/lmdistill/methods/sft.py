"""Supervised fine-tuning: cross-entropy on the dataset responses.

The starting point of every distillation recipe here (PromptKD starts teacher and
student from SFT checkpoints) and the plainest baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdistill.config import TrainConfig, doc
from lmdistill.losses import cross_entropy
from lmdistill.sampling import response_logits
from lmdistill.trainer import Method


@dataclass
class SFTConfig(TrainConfig):
    """SFT has no fields beyond the shared ones."""

    method: str = doc("Training method.", default="sft")


class SFT(Method):
    """Minimise -log q_S(y | x) over the dataset response tokens y."""

    config_class = SFTConfig

    def loss(self, name, batch, step):
        labels, mask = batch.targets()
        loss = cross_entropy(response_logits(self.student, batch), labels, mask)
        return loss, {"loss": loss.item()}
