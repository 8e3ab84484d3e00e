"""Training data in the one batch layout every method shares: token examples, batches, the
resumable batch order, strict JSONL reading, and pre-training corpus blocks.

Batches use one layout everywhere (as MiniLLM does): prompts left-padded to a common
width P, responses right-padded after column P. Generation from left-padded prompts
produces exactly this layout, so sampled and dataset responses share all the code.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch


class DataError(ValueError):
    """Bad input data: the message names the file, line and field, and what was expected."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield ('file:line', parsed JSON) for each non-blank line; bad JSON raises DataError."""
    path = Path(path)
    try:
        handle = path.open("rb")  # bytes: a bad byte is reported with its line number
    except OSError as e:
        raise DataError(f"{path}: cannot open data file: {e.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (bad byte at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, or nesting too deep
                raise DataError(f"{where}: malformed JSON ({type(e).__name__}: {str(e)[:80]})") from None
            yield where, record


def normalise_whitespace(text: str) -> str:
    """`text` with every run of whitespace one space and no leading or trailing space: how the
    contamination guard compares a training prompt with the evaluation prompts."""
    return " ".join(text.split())


@dataclass
class TokenizedExample:
    prompt: list[int]
    response: list[int]           # response tokens followed by EOS (may be truncated)
    references: list[str]
    id: str = ""
    response_mask: Optional[list[int]] = None  # 1 on the response tokens trained on (None: all; a
    # conversation's user turns inside the response block are 0)


@dataclass
class Batch:
    """Prompt-left-padded, response-right-padded token batch.

    input_ids [B, T]; attention_mask [B, T] (1 on real prompt and response tokens);
    response_mask [B, T] (1 on response tokens, including the final EOS);
    prompt_width P: every response starts at column P.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    references: list[list[str]] = field(default_factory=list)

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions that skip left padding, so padded and unpadded rows see the same inputs."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                     self.prompt_width, self.references)

    def prompts(self) -> "Batch":
        """The prompt part only (for sampling responses)."""
        P = self.prompt_width
        return Batch(
            self.input_ids[:, :P],
            self.attention_mask[:, :P],
            torch.zeros_like(self.input_ids[:, :P]),
            P,
            self.references,
        )

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """Per row, (prompt tokens, response tokens) without padding. The response is the whole
        attended block after the prompt (a conversation's user turns inside it included), so
        row b's position j of `targets()` is its response token j."""
        P = self.prompt_width
        ids, attention = self.input_ids.cpu(), self.attention_mask.cpu().bool()
        return [(ids[b, :P][attention[b, :P]].tolist(), ids[b, P:][attention[b, P:]].tolist())
                for b in range(ids.shape[0])]

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, mask) [B, T-P] for the logits that predict the response tokens."""
        P = self.prompt_width
        return self.input_ids[:, P:], self.response_mask[:, P:]


def collate(examples: Sequence[TokenizedExample], pad_id: int, with_responses: bool = True) -> Batch:
    """Build a Batch: prompts left-padded to the widest, responses right-padded."""
    P = max(len(e.prompt) for e in examples)
    R = max(len(e.response) for e in examples) if with_responses else 0
    B = len(examples)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    resp = torch.zeros((B, P + R), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, P - len(e.prompt) : P] = torch.tensor(e.prompt)
        attn[i, P - len(e.prompt) : P] = 1
        if with_responses:
            n = len(e.response)
            ids[i, P : P + n] = torch.tensor(e.response)
            attn[i, P : P + n] = 1
            resp[i, P : P + n] = 1 if e.response_mask is None else torch.tensor(e.response_mask)
    return Batch(ids, attn, resp, P, [e.references for e in examples])


class BatchOrder:
    """Deterministic, resumable order of global batches over the dataset.

    Each epoch is a seeded permutation; within windows of `group` batches, examples are
    sorted by length so that batches hold similar lengths (less padding) while the
    order stays random. `position` (batches consumed) is all that resume needs.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int, group: int = 16):
        if len(lengths) < global_batch:
            raise DataError(f"only {len(lengths)} training examples for a global batch of {global_batch}")
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.seed = seed
        self.group = group
        self.position = 0
        self._cached_epoch: tuple[int, list[list[int]]] = (-1, [])

    @property
    def batches_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        window = self.global_batch * self.group
        batches = []
        for start in range(0, self.batches_per_epoch * self.global_batch, window):
            chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i])
            chunk = chunk[: len(chunk) // self.global_batch * self.global_batch]
            group = [chunk[i : i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
            rng.shuffle(group)
            batches.extend(group)
        return batches

    def next(self) -> list[int]:
        epoch, index = divmod(self.position, self.batches_per_epoch)
        self.position += 1
        if self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, self._epoch_batches(epoch))
        return self._cached_epoch[1][index]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def read_corpus(path: str | os.PathLike) -> list[str]:
    """Documents of a pre-training corpus: a JSONL file's `text` fields, or a plain-text file's
    paragraphs (separated by blank lines)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        documents = []
        for where, record in read_jsonl(path):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{where}: expected an object with a string field 'text'")
            documents.append(record["text"])
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise DataError(f"{path}: cannot open corpus file: {e.strerror}") from None
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text") from None
        documents = [d.strip() for d in text.split("\n\n")]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"{path}: no text in the corpus")
    return documents


def corpus_blocks(documents: Sequence[str], tokenizer, block_length: int) -> list[TokenizedExample]:
    """The documents tokenised, joined with EOS and cut into blocks of `block_length` tokens (the
    last, shorter one dropped unless it is the only one), as MiniLLM prepares its pre-training data.
    Each block is an example whose first token is the 'prompt': the loss covers every later token."""
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    starts = range(0, max(len(stream) - block_length, 0) + 1, block_length)
    blocks = [stream[s : s + block_length] for s in starts]
    return [TokenizedExample(b[:1], b[1:], []) for b in blocks if len(b) > 1]
