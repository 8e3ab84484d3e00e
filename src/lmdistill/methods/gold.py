"""GOLD: on-policy distillation across tokenizers, as TRL's GOLDTrainer does it
(trl/experimental/gold/gold_trainer.py, TRL 1.16; its hybrid ULD loss).

GKD's recipe (a `lmbda` share of micro-batches answered by the student's own samples, the rest
by the dataset) with a teacher whose vocabulary differs. The responses are re-tokenized for the
teacher and the two tokenizations aligned by text (`lmdistill.teacher.cross`); on the first
row of each aligned span the vocabularies are split (TRL's `_compute_hybrid_uld_loss`):

    row = w_m JSD_beta(p_T[shared], q_S[shared]) + w_u ULD(p_T[rest], q_S[rest])
    L   = mean over the aligned rows

`shared` pairs the token ids whose strings are equal in both vocabularies
(`cross_tokenizer.shared_vocabulary`; the probabilities as they are, not renormalised, as TRL),
`rest` is everything else, compared by sorted probabilities (ULD); w_m = |shared| / V_T and
w_u = 1 - w_m by default (TRL's uld_hybrid_*_weight None). JSD_beta is GKD's divergence
(beta 0: forward KL, 1: reverse KL). With one tokenizer on both sides every span is one token,
shared is the whole vocabulary (w_u = 0), and the loss is GKD's exactly (tested).

Differences from TRL, each a choice stated here: the hybrid loss is on by default (TRL's
`uld_use_hybrid_loss` defaults to False, i.e. pure ULD: set `hybrid: false`); a multi-token
span is compared on its first rows (TRL merges the span's rows, "observed" strategy); the
mean is over all aligned rows (TRL: per sequence, then over sequences).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from lmdistill.config import SamplingConfig, check, doc
from lmdistill.cross_tokenizer import shared_vocabulary
from lmdistill.losses.cross_vocab import gold_row_loss, token_uld
from lmdistill.methods.uld import ULD


@dataclass
class GOLDConfig(SamplingConfig):
    """GOLD: GKD across tokenizers, JSD on the shared vocabulary + ULD on the rest."""

    method: str = doc("Training method.", default="gold")
    beta: float = doc("JSD interpolation beta on the shared vocabulary (TRL's GOLDConfig: 0.5; 0 = forward KL).",
                      default=0.5)
    lmbda: float = doc("Probability that a micro-batch's responses are sampled from the student (TRL: 0.5).",
                       default=0.5)
    temperature: float = doc("Sampling temperature of the student's responses (TRL: 0.9).", default=0.9)
    hybrid: bool = doc("JSD on the shared vocabulary + ULD on the rest; false: ULD on everything (TRL's default).",
                       default=True)
    matched_weight: Optional[float] = doc("Weight of the shared-vocabulary JSD (null: |shared| / teacher vocabulary, "
                                          "as TRL).", default=None)
    unmatched_weight: Optional[float] = doc("Weight of the ULD on the rest (null: 1 - the matched weight).",
                                            default=None)

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for GOLD", self.teacher)
        check(0.0 <= self.beta <= 1.0, "beta", "in [0, 1]", self.beta)
        check(0.0 <= self.lmbda <= 1.0, "lmbda", "in [0, 1]", self.lmbda)
        check((self.matched_weight is None) == (self.unmatched_weight is None), "matched_weight",
              "set together with unmatched_weight, or both null", self.matched_weight)


class GOLD(ULD):
    config_class = GOLDConfig
    description = "GOLD: GKD across tokenizers, JSD on the shared vocabulary and ULD on the rest (TRL)"
    progress_key = "gold"

    def __init__(self, config: GOLDConfig, context):
        super().__init__(config, context)
        shared = shared_vocabulary(self.cross.teacher_tokenizer, self.tokenizer)
        self.row_loss = token_uld
        if config.hybrid:
            self.row_loss = gold_row_loss(shared, len(self.tokenizer), self.cross.vocab_size, beta=config.beta,
                                          matched_weight=config.matched_weight,
                                          unmatched_weight=config.unmatched_weight)

    def prepare(self, batch, step):
        if random.random() < self.config.lmbda:
            return self.sample_student(batch)
        return batch

    def loss(self, batch, step):
        loss, _, pairs, unaligned = self.cross_loss(batch, self.row_loss, "spans", per_sequence=False)
        return loss, {"gold": loss.item(), "aligned_rows": float(pairs), "unaligned_rows": float(unaligned)}
