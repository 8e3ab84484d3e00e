"""The teacher's own responses to training prompts: the one function SeqKD's training data and
`lmdistill cache-teacher --responses teacher` are generated with."""

from __future__ import annotations

from typing import Sequence

import torch

from lmdistill.data import TokenizedExample, collate
from lmdistill.sampling import eos_token_ids, sample_responses


@torch.inference_mode()
def teacher_responses(teacher, tokenizer, examples: Sequence[TokenizedExample], batch_size: int, max_new_tokens: int,
                      max_length: int, temperature: float = 1.0, top_p: float = 1.0,
                      do_sample: bool = True) -> list[list[int]]:
    """Response token ids per example, up to and including the first EOS (an immediate EOS gives
    [eos]), generated in order in batches of `batch_size`: each at most `max_new_tokens`, and
    within `max_length` with its batch's prompt width. Seed torch's generator first for
    reproducible samples."""
    device = next(teacher.parameters()).device
    eos = eos_token_ids(teacher, tokenizer)
    responses = []
    for start in range(0, len(examples), batch_size):
        prompts = collate(examples[start:start + batch_size], tokenizer.pad_token_id, with_responses=False).to(device)
        room = max(1, min(max_new_tokens, max_length - prompts.prompt_width))
        out = sample_responses(teacher, prompts, eos, tokenizer.pad_token_id, room, temperature, top_p,
                               do_sample=do_sample, vocab_size=len(tokenizer))
        P = out.prompt_width
        responses += [row[P:][mask[P:].bool()].tolist() for row, mask in zip(out.input_ids, out.response_mask)]
    return responses
