"""The step every teacher-reading method shares: ask the teacher for its targets on a batch, and
compute a divergence from them and the student's hidden states.

The losses (`lmdistill.losses.chunked`) take tensors; this module runs the models. A teacher is a
model (read densely) or any `lmdistill.teacher.local.Teacher`: a local model (`DenseTargets`), a
top-k cache or a served teacher (`CachedTargets`, over the teacher's k tokens and "the rest").
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from lmdistill.data import Batch
from lmdistill.forward import output_head, response_hidden
from lmdistill.losses.chunked import CachedTargets, chunked_kd_loss, shared_rows
from lmdistill.teacher.local import DenseTargets, LocalTeacher, Teacher

Tensor = torch.Tensor


def teacher_targets(student_head, teacher: Union[nn.Module, Teacher], batch: Batch):
    """(student head, targets, mask) for `batch`: the teacher's targets at the response positions
    (`batch.targets()` layout), the student's output layer cut to the vocabulary rows the teacher's
    distributions are over (padding rows past them stay out of the softmax, as in the dense
    path), and the response mask without the positions the teacher gave no distribution over
    (a served teacher's `known`). A model teacher runs under `torch.inference_mode`."""
    _, mask = batch.targets()
    if isinstance(teacher, nn.Module):
        teacher = LocalTeacher(teacher)
    teacher.check_vocabulary(student_head.weight.shape[0])
    (student_head,) = shared_rows(student_head, rows=teacher.vocab_size)
    targets = teacher.targets(batch)
    if isinstance(targets, CachedTargets) and targets.known is not None:
        mask = mask * targets.known.to(mask.dtype)
    return student_head, targets, mask


def distill_loss(
    student,
    teacher: Union[nn.Module, Teacher],
    batch: Batch,
    divergence: str = "forward_kl",
    ce_weight: float = 0.0,
    report_ce: bool = False,
    chunk_size: Optional[int] = None,
    **params,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """`chunked_kd_loss` of the student on a Batch: (loss, divergence, cross-entropy; None unless
    ce_weight or report_ce).

    Dense, the value equals `(1 - ce_weight) * losses.<divergence>(response_logits(student, batch),
    response_logits(teacher, batch), mask) + ce_weight * losses.cross_entropy(...)`, without full logits.
    """
    labels, _ = batch.targets()
    student_head, targets, mask = teacher_targets(output_head(student), teacher, batch)
    if isinstance(targets, DenseTargets):
        teacher_side = {"teacher_hidden": targets.hidden, "teacher_head": targets.head}
    else:
        teacher_side = {"cached": targets}
    return chunked_kd_loss(
        response_hidden(student, batch),
        student_head,
        mask,
        **teacher_side,
        divergence=divergence,
        labels=labels if ce_weight or report_ce else None,
        ce_weight=ce_weight,
        chunk_size=chunk_size,
        **params,
    )
