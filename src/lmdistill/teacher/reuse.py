"""A local teacher read densely the first time it sees a training example, and from its
remembered top-k after that (`teacher_reuse_top_k`).

Off-policy KD asks a frozen teacher about the same fixed sequences every epoch, so from the
second epoch on its forward pass recomputes answers it has already given. `ReusedTopKTeacher`
keeps, for every response position of every example it has answered, the teacher's k most likely
next tokens, their log-probabilities and the log of the remaining mass: the layout of a
`lmdistill cache-teacher` cache (`lmdistill.teacher.cache`), held in memory instead of on disk
(k * 8 + 4 bytes per position). A batch whose examples are all remembered is answered from
memory (`CachedTargets`, the loss over the k tokens + "the rest"), with no teacher forward; any
other batch gets the dense teacher (`DenseTargets`, exact) and its examples are remembered.

So epoch 1 trains on the dense teacher exactly as without the switch, and epochs >= 2 on the
top-k teacher as with a cache; the memory is per process (a resumed run re-reads the dense
teacher for the examples it meets before they are remembered again).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from lmdistill.data import Batch
from lmdistill.losses.chunked import CachedTargets, shared_rows
from lmdistill.teacher.cache import example_key, topk_of_hidden
from lmdistill.teacher.local import DenseTargets, LocalTeacher


class ReusedTopKTeacher:
    """`LocalTeacher(model)` on an example's first batch, its remembered top-`k` on later ones."""

    def __init__(self, teacher: LocalTeacher, k: int):
        if k <= 0:
            raise ValueError(f"teacher_reuse_top_k: expected > 0, got {k}")
        self.teacher, self.k = teacher, k
        self.student_rows: Optional[int] = None
        # example key -> (ids [n, k] int32, log-probs [n, k] float32, log of the rest [n] float32)
        self.remembered: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def vocab_size(self) -> int:
        """The rows the distributions are over: the teacher's, cut to the student's (as the dense path)."""
        rows = self.teacher.vocab_size
        return rows if self.student_rows is None else min(rows, self.student_rows)

    def check_vocabulary(self, student_rows: int) -> None:
        self.teacher.check_vocabulary(student_rows)
        self.student_rows = student_rows

    def targets(self, batch: Batch) -> Union[DenseTargets, CachedTargets]:
        sequences = batch.sequences()
        keys = [example_key(prompt + answer, len(prompt)) for prompt, answer in sequences]
        if all(key in self.remembered for key in keys):
            return self._recall(batch, keys)
        dense = self.teacher.targets(batch)
        self._remember(dense, [len(answer) for _, answer in sequences], keys)
        return dense

    @torch.inference_mode()
    def _remember(self, dense: DenseTargets, lengths: list[int], keys: list[bytes]) -> None:
        """Top-k of the dense teacher at each new example's response positions (row b's first n_b)."""
        new = [b for b, key in enumerate(keys) if key not in self.remembered]
        hidden = torch.cat([dense.hidden[b, : lengths[b]] for b in new])
        (weight, bias), = shared_rows(dense.head, rows=self.vocab_size)
        ids, values, rest = (x.cpu() for x in topk_of_hidden(hidden, weight, bias, min(self.k, weight.shape[0])))
        start = 0
        for b in new:
            rows = slice(start, start + lengths[b])
            self.remembered[keys[b]] = (ids[rows].to(torch.int32), values[rows], rest[rows])
            start = rows.stop

    def _recall(self, batch: Batch, keys: list[bytes]) -> CachedTargets:
        B, width = batch.input_ids.shape[0], batch.input_ids.shape[1] - batch.prompt_width
        k = next(iter(self.remembered.values()))[0].shape[1]
        ids = torch.zeros((B, width, k), dtype=torch.long)
        logprobs = torch.zeros((B, width, k), dtype=torch.float32)
        rest = torch.zeros((B, width), dtype=torch.float32)
        for b, key in enumerate(keys):
            top_ids, top_values, top_rest = self.remembered[key]
            n = top_ids.shape[0]
            ids[b, :n], logprobs[b, :n], rest[b, :n] = top_ids, top_values, top_rest
        device = batch.input_ids.device
        return CachedTargets(ids.to(device), logprobs.to(device), rest.to(device))
