"""One teacher interface, three teachers.

A loss asks its teacher one thing: for a batch, its next-token distribution at every
response position (`Teacher.targets`). Three implementations answer it:

- `LocalTeacher`: a model in this process; dense and exact (`DenseTargets`: its final hidden
  states, projected to the vocabulary a chunk at a time by the loss);
- `lmdistill.teacher.cache.TeacherCache`: the top-k of `lmdistill cache-teacher`, read from disk;
- `lmdistill.teacher.served.ServedTeacher`: the top-k of a model behind a server
  (`teacher: openai:URL#MODEL`), asked each step.

The last two answer `CachedTargets` (k ids, their log-probs, the log of the rest), and the
losses read them over k + 1 outcomes. `lmdistill.methods.targets.teacher_targets` asks any of the three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Union

import torch
from torch import nn

from lmdistill.config import is_served
from lmdistill.data import Batch
from lmdistill.forward import output_head, response_hidden
from lmdistill.losses.chunked import CachedTargets


@dataclass
class DenseTargets:
    """A teacher model's answer for a batch: its final hidden states at the response positions
    [B, T, H_t] (no graph) and its output layer; the loss projects them to the vocabulary a chunk
    at a time, as the student's."""

    hidden: torch.Tensor
    head: nn.Module


class Teacher(Protocol):
    """What a loss reads a teacher through."""

    @property
    def vocab_size(self) -> int:
        """The vocabulary rows its distributions are over."""

    def check_vocabulary(self, student_rows: int) -> None:
        """Raise (naming both sizes) when a student with `student_rows` output rows cannot be
        compared with this teacher."""

    def targets(self, batch: Batch) -> Union[DenseTargets, CachedTargets]:
        """Its distribution at every response position of `batch` (the layout of `batch.targets()`)."""


class LocalTeacher:
    """A teacher model in this process, read densely (exact)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def vocab_size(self) -> int:
        return output_head(self.model).weight.shape[0]

    def check_vocabulary(self, student_rows: int) -> None:
        """Any size: a padded matrix differs from the other only past the rows both have, which
        are all the losses compare (`losses.chunked.shared_rows`)."""

    @torch.inference_mode()
    def targets(self, batch: Batch) -> DenseTargets:
        return DenseTargets(response_hidden(self.model, batch), output_head(self.model))


def teacher_for(config, tokenizer, model: Optional[nn.Module]) -> Optional[Teacher]:
    """The recipe's teacher as a `Teacher`: its top-k cache (`teacher_cache`), its server
    (`teacher: openai:...`), else the loaded `model` (None when the method loads none)."""
    if getattr(config, "teacher_cache", None):
        from lmdistill.teacher.cache import open_cache

        return open_cache(config.teacher_cache)
    if is_served(config.teacher):
        from lmdistill.teacher.served import served_teacher

        return served_teacher(config, tokenizer)
    return None if model is None else LocalTeacher(model)
