"""The offline teacher read in training: its top-k next-token log-probabilities for a
dataset, memory-mapped (built by `lmdistill cache-teacher`, `lmdistill/cache_teacher.py`).

Off-policy methods (`kd`, `seqkd`, `gkd` with lmbda = 0) only ever ask the teacher about
fixed sequences, so its answers can be computed once and the teacher need not be loaded
while training. A cache folder holds, for every response position of the recipe's
training data,

    ids      [N, k] int32    the teacher's k most likely next tokens (descending),
    logprobs [N, k] float32  their log-probabilities log p_T(v),
    rest     [N]    float32  log of the mass outside them, log(1 - sum_k p_T(v)),

as .npy files (read with `np.load(mmap_mode="r")`: nothing is read until used), plus the
token ids of every example, so that a batch finds its rows by content.

The missing mass is kept as one extra outcome, "any other token": the teacher's
distribution becomes the (k+1)-way p~ = (p_1..p_k, p_rest), the student's is coarsened
the same way, q~ = (q_1..q_k, 1 - sum_k q) (computed from the student's full softmax),
and the loss is the chosen divergence D(p~, q~). Nothing is renormalised, so the k kept
probabilities keep their values; by the data-processing inequality D(p~, q~) <= D(p, q)
for every divergence here (all f-divergences), with equality when the teacher's tail is
empty (k = V gives the dense loss exactly; tested). `bench/vs_trl.py --topk-vs-dense`
measures what k = 64 costs in final loss against dense KD.

A cache built with `--responses teacher` holds the teacher's sampled responses as its
sequences; SeqKD trains on them (`examples()`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lmdistill.config import expand_path
from lmdistill.data import Batch, DataError, TokenizedExample
from lmdistill.losses import log_probs
from lmdistill.losses.chunked import CachedTargets, rows_per_chunk

FORMAT = "lmdistill-teacher-cache"
VERSION = 1
ARRAYS = ("ids", "logprobs", "rest", "tokens", "token_offsets", "prompt_lengths", "row_offsets")


def topk_rows(teacher_logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs [n, k] and the log of the remaining mass [n] of float32 log-probs [n, V]."""
    values, ids = teacher_logprobs.topk(k, dim=-1)
    rest = teacher_logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, rest


def topk_of_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias, k: int):
    """`topk_rows` of the teacher's log-probs at final hidden states `hidden` [n, H] through its head
    (`weight` [V, H], `bias`), projected a few rows at a time (`rows_per_chunk`): ids, log-probs [n, k],
    log of the rest [n]."""
    step = rows_per_chunk(weight.shape[0])
    parts = [topk_rows(log_probs(F.linear(hidden[c : c + step], weight, bias)), k)
             for c in range(0, hidden.shape[0], step)]
    return tuple(torch.cat(column) for column in zip(*parts))


class TeacherCache:
    """A cache folder written by `build_cache`; look batches up with `targets(batch)`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise DataError(
                f"{self.folder}: not a teacher cache (no meta.json); build one with `lmdistill cache-teacher`"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise DataError(
                f"{meta_path}: expected {FORMAT} version {VERSION}, got "
                f"{self.meta.get('format')!r} version {self.meta.get('version')!r}"
            )
        self.arrays = {}
        for name in ARRAYS:
            path = self.folder / f"{name}.npy"
            try:
                self.arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot read cache array: {e}") from None
        self.top_k = int(self.meta["top_k"])
        tokens, offsets, prompts = (self.arrays[k] for k in ("tokens", "token_offsets", "prompt_lengths"))
        self._index = {}
        for e in range(len(prompts)):
            self._index[example_key(tokens[offsets[e] : offsets[e + 1]], int(prompts[e]))] = e

    def __len__(self) -> int:
        return len(self.arrays["prompt_lengths"])

    def examples(self) -> list[TokenizedExample]:
        """The cached sequences as training examples (the teacher's responses when it generated them)."""
        tokens, offsets, prompts = (self.arrays[k] for k in ("tokens", "token_offsets", "prompt_lengths"))
        out = []
        for e in range(len(self)):
            seq = tokens[offsets[e] : offsets[e + 1]].tolist()
            out.append(TokenizedExample(seq[: prompts[e]], seq[prompts[e] :], []))
        return out

    @property
    def vocab_size(self) -> int:
        """The vocabulary rows the cached distributions are over (teacher and student rows shared)."""
        return int(self.meta["vocab_size"])

    def check_vocabulary(self, student_rows: int) -> None:
        """Refuse a student whose output layer lacks rows the cache covers. A student with more
        rows (the same tokenizer, padded further) is fine: its extra rows are padding."""
        if student_rows < self.vocab_size:
            raise DataError(
                f"{self.folder}: teacher cache built over {self.vocab_size} vocabulary rows; the student "
                f"has only {student_rows}: rebuild it with `lmdistill cache-teacher` for this student"
            )

    def targets(self, batch: Batch) -> CachedTargets:
        """The cached top-k teacher for every row of `batch` (looked up by prompt + response tokens)."""
        B, width = batch.input_ids.shape[0], batch.input_ids.shape[1] - batch.prompt_width
        k = self.top_k
        ids = np.zeros((B, width, k), dtype=np.int64)
        logprobs = np.zeros((B, width, k), dtype=np.float32)
        rest = np.zeros((B, width), dtype=np.float32)
        row_offsets = self.arrays["row_offsets"]
        for b, (prompt, answer) in enumerate(batch.sequences()):
            e = self._index.get(example_key(prompt + answer, len(prompt)))
            if e is None:
                raise DataError(
                    f"{self.folder}: a training example (prompt of {len(prompt)} tokens, response of {len(answer)}) "
                    "is not in this teacher cache; it was built from other data or settings (prompt_format, "
                    "max_length, max_prompt_length): rebuild it with `lmdistill cache-teacher`"
                )
            rows = slice(int(row_offsets[e]), int(row_offsets[e + 1]))
            n = rows.stop - rows.start
            ids[b, :n] = self.arrays["ids"][rows]
            logprobs[b, :n] = self.arrays["logprobs"][rows]
            rest[b, :n] = self.arrays["rest"][rows]
        device = batch.input_ids.device
        return CachedTargets(
            torch.from_numpy(ids).to(device), torch.from_numpy(logprobs).to(device), torch.from_numpy(rest).to(device)
        )


@functools.lru_cache(maxsize=4)
def open_cache(folder: str) -> TeacherCache:
    """The cache at `folder` (`~` and `${LMDISTILL_DATA_DIR}` expanded), opened once per process."""

    return TeacherCache(expand_path(folder))


def example_key(tokens, prompt_length: int) -> bytes:
    """An example's identity in a cache: its prompt length and all its token ids."""
    return int(prompt_length).to_bytes(4, "little") + np.asarray(tokens, dtype=np.int32).tobytes()
