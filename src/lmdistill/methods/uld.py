"""Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs", 2024): a teacher with any vocabulary.

Two distributions over different vocabularies cannot be compared entry by entry, but their
sorted probability vectors can: ULD is the L1 distance between them (the 1-D Wasserstein
distance under the paper's uniform cost), the shorter vector padded with zeros. For each
micro-batch of prompts x with responses y (the dataset's, or with probability `lmbda` the
student's own samples, re-tokenized for the teacher: `lmdistill.teacher.cross`):

    L = ce_weight CE(y; q_S) + uld_weight mean_sequences mean_i sum_v |sort(q_S,i)_v - sort(p_T,i)_v|

where i runs over the compared pairs of positions (`alignment`):
  positions  the i-th response token of the student against the i-th of the teacher, up to
             the shorter response (the released code: llm-recipes, models/distillation_model.py,
             DistillationLoss.forward, which truncates to min(answer sizes));
  spans      the first token of each span where the two tokenizations' character boundaries
             coincide (`lmdistill.cross_tokenizer.align`), so both rows predict the start of the
             same text.
CE is on dataset responses only (on a student's own sample it would teach it its mistakes).
The teacher runs on its own prompt format and never receives a gradient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from lmdistill.config import SamplingConfig, check, doc
from lmdistill.data import Batch
from lmdistill.forward import output_head, response_hidden
from lmdistill.instruct.data import load_training_data
from lmdistill.losses.chunked import chunked_cross_entropy
from lmdistill.losses.cross_vocab import aligned_loss, token_uld
from lmdistill.methods.base import DistillationMethod
from lmdistill.teacher.cross import CrossTokenizerTeacher


@dataclass
class ULDConfig(SamplingConfig):
    """ULD: sorted-probability L1 to a teacher with any tokenizer, plus cross-entropy on the data."""

    method: str = doc("Training method.", default="uld")
    uld_weight: float = doc("Weight of the ULD term (the released code's distillation_weight: 1).", default=1.0)
    ce_weight: float = doc("Weight of the cross-entropy on dataset responses (its crossentropy_weight: 1).",
                           default=1.0)
    alignment: str = doc("`positions`: i-th response token against i-th, up to the shorter (the released code); "
                         "`spans`: the first token of each text-aligned span.", default="positions")
    lmbda: float = doc("Probability that a micro-batch's responses are the student's own samples (0: the paper's "
                       "off-policy training).", default=0.0)
    top_k: Optional[int] = doc("Sort only the k largest probabilities of each side (null: all, as the paper).",
                               default=None)

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for ULD", self.teacher)
        check(self.uld_weight >= 0 and self.ce_weight >= 0, "uld_weight", ">= 0 (and ce_weight >= 0)",
              (self.uld_weight, self.ce_weight))
        check(self.alignment in ("positions", "spans"), "alignment", "positions or spans", self.alignment)
        check(0.0 <= self.lmbda <= 1.0, "lmbda", "in [0, 1]", self.lmbda)
        check(self.top_k is None or self.top_k > 0, "top_k", "> 0 or null", self.top_k)


@dataclass
class Work:
    batch: Batch
    sampled: bool  # the student's own responses (no cross-entropy on them)

    @property
    def num_tokens(self) -> int:  # for the loop's tokens and tokens_per_s
        return self.batch.num_tokens


def vocabulary_head(head, rows: int):
    """(weight, bias) of an output layer cut to the first `rows` entries: the tokenizer's own
    vocabulary (rows of a padded matrix past it are never real tokens)."""
    bias = getattr(head, "bias", None)
    return head.weight[:rows], None if bias is None else bias[:rows]


def pairs_and_weights(spans, lengths, alignment: str, R_s: int, R_t: int):
    """Flat indices into the [B, R_s] / [B, R_t] response positions of the compared pairs, and
    weights giving each sequence's mean, averaged over the sequences that have pairs."""
    rows = []
    for b, (row_spans, (n_s, n_t)) in enumerate(zip(spans, lengths)):
        if alignment == "positions":
            pairs = [(j, j) for j in range(min(n_s, n_t))]
        else:
            pairs = [(span.student[0], span.teacher[0]) for span in row_spans]
        rows.append([(b * R_s + s, b * R_t + t) for s, t in pairs])
    used = [r for r in rows if r]
    student = [s for r in used for s, _ in r]
    teacher = [t for r in used for _, t in r]
    weights = [1.0 / (len(r) * len(used)) for r in used for _ in r]
    return torch.tensor(student, dtype=torch.long), torch.tensor(teacher, dtype=torch.long), torch.tensor(weights)


class ULD(DistillationMethod):
    config_class = ULDConfig
    description = "ULD: cross-entropy + L1 distance of sorted probabilities, across tokenizers (Boizard et al. 2024)"
    cross_tokenizer = True  # the loop loads a teacher with any tokenizer
    turns = "last"  # it can sample the student: chat data trains on the last assistant turn
    progress_key = "uld"

    def __init__(self, config: ULDConfig, context):
        super().__init__(config, context)
        self.cross = CrossTokenizerTeacher(self.teacher, context.teacher_tokenizer or self.tokenizer,
                                           self.tokenizer, self.eos_ids)

    def load_examples(self):
        raw = load_training_data(self.config)
        self.cross.add_prompts(raw, self.config.prompt_format)  # each prompt in the teacher's own format
        return self.tokenize(raw)

    def prepare(self, batch, step):
        if random.random() < self.config.lmbda:
            return Work(self.sample_student(batch), True)
        return Work(batch, False)

    def cross_loss(self, batch: Batch, row_loss, alignment: str, per_sequence: bool):
        """(row_loss over the aligned pairs of positions, the student's response hidden states,
        the number of pairs, the rows left unaligned): the responses re-tokenized for the teacher,
        both models run, the pairs of `alignment` compared; averaged per sequence then over the
        sequences (`per_sequence`), or over all pairs."""
        cross = self.cross.retokenize(batch)
        teacher_hidden = self.cross.teacher_hidden(cross)
        student_hidden = response_hidden(self.student, batch)
        (B, R_s, H_s), R_t = student_hidden.shape, teacher_hidden.shape[1]
        s_idx, t_idx, weights = pairs_and_weights(cross.spans, cross.lengths, alignment, R_s, R_t)
        if not per_sequence:
            weights = torch.full((len(s_idx),), 1.0 / max(1, len(s_idx)))
        loss = aligned_loss(row_loss, student_hidden.reshape(-1, H_s)[s_idx],
                            vocabulary_head(output_head(self.student), len(self.tokenizer)),
                            teacher_hidden.reshape(B * R_t, -1)[t_idx],
                            vocabulary_head(output_head(self.teacher), self.cross.vocab_size),
                            weights.to(student_hidden.device))
        return loss, student_hidden, len(s_idx), cross.unaligned

    def loss(self, work: Work, step):
        c, batch = self.config, work.batch
        # the released code: a mean over each sequence's compared positions, then over sequences
        uld, student_hidden, _, unaligned = self.cross_loss(batch, lambda s, t: token_uld(s, t, c.top_k),
                                                              c.alignment, per_sequence=True)
        loss, logs = c.uld_weight * uld, {"uld": uld.item(), "unaligned_rows": float(unaligned)}
        if c.ce_weight and not work.sampled:
            labels, mask = batch.targets()
            ce = chunked_cross_entropy(student_hidden, output_head(self.student), labels, mask)
            loss, logs["ce"] = loss + c.ce_weight * ce, ce.item()
        logs["loss"] = loss.item()
        return loss, logs
