"""A teacher with another tokenizer: its prompts in its own format, the student's responses
re-tokenized for it, and the alignment of the two tokenizations (`lmdistill.cross_tokenizer`).

For every row of a student batch (dataset responses or the student's samples):

  1. the teacher's prompt is the same example rendered by the teacher's tokenizer (its chat
     template or the Alpaca text), looked up by the student's prompt tokens;
  2. the response text (the student's tokens decoded, its end-of-turn token apart) is
     tokenized by the teacher, and its end-of-turn token appended when the student's response
     had one;
  3. `align` pairs the two tokenizations by character offsets, the two end-of-turn tokens
     paired last. A text the teacher's tokenizer does not decode back to itself cannot be
     aligned by characters: that row leaves the loss and is counted (`unaligned`).

`teacher_hidden` runs the teacher on the re-tokenized rows (inference mode); the methods
(`uld`, `gold`) choose which pairs of positions they compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmdistill.cross_tokenizer import Span, align, char_offsets
from lmdistill.data import Batch, TokenizedExample, collate
from lmdistill.forward import output_head, response_hidden
from lmdistill.instruct.data import InstructionExample, prompt_ids


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template (e.g. <|im_end|>,
    <end_of_turn>), found by rendering one; the EOS token without a template."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        marker = "XYZZY-response"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
        after = text[text.index(marker) + len(marker):]
        for token in tokenizer.all_special_tokens:
            if token and after.lstrip().startswith(token):
                return tokenizer.convert_tokens_to_ids(token)
    return tokenizer.eos_token_id


@dataclass
class CrossBatch:
    """A student batch re-tokenized for the teacher: `teacher_batch` (teacher prompts + responses),
    per row the alignment of the response tokens (student and teacher indices into the
    response blocks), and how many rows could not be aligned (no spans: out of the loss)."""

    teacher_batch: Batch
    spans: list[list[Span]]
    unaligned: int = 0
    lengths: list[tuple[int, int]] = field(default_factory=list)  # (student, teacher) response tokens


class CrossTokenizerTeacher:
    """The frozen teacher model and both tokenizers; `retokenize(batch)` and `teacher_hidden`."""

    def __init__(self, model: nn.Module, teacher_tokenizer, student_tokenizer, student_eos: list[int]):
        self.model, self.teacher_tokenizer, self.student_tokenizer = model, teacher_tokenizer, student_tokenizer
        self.student_eos = set(student_eos)
        self.teacher_eos = end_of_turn_id(teacher_tokenizer)
        self.prompts: dict[tuple[int, ...], list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """The teacher's real vocabulary (rows of a padded output layer past it are never used)."""
        return min(len(self.teacher_tokenizer), output_head(self.model).weight.shape[0])

    def add_prompts(self, examples: list[InstructionExample], prompt_format: str) -> None:
        """Remember each example's teacher prompt under its student prompt tokens."""
        teacher_format = "auto" if prompt_format != "alpaca" else "alpaca"
        for example in examples:
            student = tuple(prompt_ids(example, self.student_tokenizer, prompt_format))
            self.prompts[student] = prompt_ids(example, self.teacher_tokenizer, teacher_format)

    def retokenize(self, batch: Batch) -> CrossBatch:
        rows, spans, lengths, unaligned = [], [], [], 0
        for prompt, answer in batch.sequences():
            prompt = tuple(prompt)
            if prompt not in self.prompts:
                raise KeyError("a batch prompt was not registered with add_prompts (its teacher prompt is unknown)")
            ended = bool(answer) and answer[-1] in self.student_eos
            body = answer[:-1] if ended else answer
            text = self.student_tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            teacher_body = self.teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
            row_spans: list[Span] = []
            decoded = self.teacher_tokenizer.decode(teacher_body, skip_special_tokens=False,
                                                    clean_up_tokenization_spaces=False)
            if decoded != text or (bool(body) != bool(teacher_body)):
                unaligned += 1  # e.g. a normalising tokenizer: characters do not line up
            else:
                if body:
                    row_spans = align(char_offsets(self.teacher_tokenizer, teacher_body),
                                      char_offsets(self.student_tokenizer, body))
                if ended:
                    row_spans.append(Span((len(body), len(body) + 1), (len(teacher_body), len(teacher_body) + 1)))
            teacher_answer = teacher_body + ([self.teacher_eos] if ended else [])
            rows.append(TokenizedExample(self.prompts[prompt], teacher_answer or [self.teacher_eos], []))
            spans.append(row_spans)
            lengths.append((len(answer), len(teacher_answer)))
        pad = self.teacher_tokenizer.pad_token_id
        teacher_batch = collate(rows, pad if pad is not None else self.teacher_eos).to(batch.input_ids.device)
        return CrossBatch(teacher_batch, spans, unaligned, lengths)

    @torch.inference_mode()
    def teacher_hidden(self, cross: CrossBatch) -> torch.Tensor:
        """[B, R_t, H_t]: the teacher's final hidden states that predict its response tokens."""
        return response_hidden(self.model, cross.teacher_batch)

