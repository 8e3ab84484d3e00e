"""Supervised fine-tuning: cross-entropy on the dataset responses.

The starting point of every distillation recipe here (PromptKD starts teacher and
student from SFT checkpoints) and the plainest baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdistill.config import TrainConfig, doc
from lmdistill.chunked import chunked_cross_entropy
from lmdistill.sampling import output_head, response_hidden
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
        # = losses.cross_entropy(response_logits(...)), projected to the vocabulary in chunks
        loss = chunked_cross_entropy(response_hidden(self.student, batch), output_head(self.student), labels, mask)
        return loss, {"loss": loss.item()}
