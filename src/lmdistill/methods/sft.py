"""Supervised fine-tuning: cross-entropy on the dataset responses.

The starting point of every distillation recipe here (PromptKD starts teacher and
student from SFT checkpoints) and the plainest baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdistill.config import TrainConfig, doc
from lmdistill.forward import output_head, response_hidden
from lmdistill.losses.chunked import chunked_cross_entropy
from lmdistill.methods.base import Method


@dataclass
class SFTConfig(TrainConfig):
    """SFT has no fields beyond the shared ones."""

    method: str = doc("Training method.", default="sft")


def sft_loss(student, batch):
    """-(1/|y|) log q_S(y | x) over the batch's response tokens (= losses.cross_entropy of the
    response logits, projected to the vocabulary in chunks)."""
    labels, mask = batch.targets()
    return chunked_cross_entropy(response_hidden(student, batch), output_head(student), labels, mask)


class SFT(Method):
    """Minimise -log q_S(y | x) over the dataset response tokens y."""

    config_class = SFTConfig
    description = "supervised fine-tuning on the dataset responses"

    def loss(self, batch, step):
        loss = sft_loss(self.student, batch)
        return loss, {"loss": loss.item()}
