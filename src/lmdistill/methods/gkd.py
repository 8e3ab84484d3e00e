"""Generalized Knowledge Distillation (Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024).

GKD trains the student on a mixture of fixed data and its own generations, with the
generalized Jensen-Shannon divergence as the token-level divergence. For each
micro-batch of prompts x:

  1. With probability `lmbda` the responses are sampled from the student,
     y ~ q_S(. | x) (on-policy; no gradient through the sampling); otherwise the
     dataset responses are used.
  2. The student minimises, over the response positions t,
        L = (1/|y|) sum_t JSD_beta(p_T(. | y_<t, x), q_S(. | y_<t, x)),
        JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,
     with beta = 0 the forward KL and beta = 1 the reverse KL (the paper's limits).

The loss is computed from final hidden states in vocabulary chunks (`lmdistill.losses.chunked`);
off-policy runs (lmbda = 0) can read the teacher from its top-k cache (`teacher_cache`), and
any run from a served teacher (`teacher: openai:URL#MODEL`), which scores each step's
sequences, student samples included (top-k + rest, `lmdistill.teacher.served`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmdistill.config import TeacherCacheConfig, check, doc
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.targets import distill_loss


@dataclass
class GKDConfig(TeacherCacheConfig):
    """GKD: generalized JSD on a lmbda-mixture of student samples and dataset responses."""


    method: str = doc("Training method.", default="gkd")
    beta: float = doc("JSD interpolation beta in [0, 1]: 0 = forward KL(p_T || q_S), 1 = reverse KL(q_S || p_T).",
                      default=0.5)
    lmbda: float = doc("Probability that a micro-batch's responses are sampled from the student (on-policy fraction).",
                       default=0.5)
    temperature: float = doc("Sampling temperature of the student's responses (TRL's GKDConfig: 0.9); the "
                             "divergence itself is computed at temperature 1, as TRL's loss.", default=0.9)

    def validate(self) -> None:
        super().validate()
        check(
            self.teacher_cache is None or self.lmbda == 0.0,
            "teacher_cache",
            "no cache when lmbda > 0 (the cache holds the teacher on dataset responses only)",
            self.teacher_cache,
        )
        check(
            self.teacher_reuse_top_k == 0 or self.lmbda == 0.0,
            "teacher_reuse_top_k",
            "0 when lmbda > 0 (student samples are new every step: nothing to reuse)",
            self.teacher_reuse_top_k,
        )
        check(0.0 <= self.beta <= 1.0, "beta", "in [0, 1]", self.beta)
        check(0.0 <= self.lmbda <= 1.0, "lmbda", "in [0, 1]", self.lmbda)


class GKD(DistillationMethod):
    config_class = GKDConfig
    description = "generalized KD: JSD on the student's own samples (Agarwal et al., ICLR 2024)"
    turns = "last"  # it samples the student: chat data trains on the last assistant turn
    progress_key = "jsd"

    def prepare(self, batch, step):
        """Step 1: on-policy with probability lmbda, else the dataset responses."""
        if random.random() < self.config.lmbda:
            return self.sample_student(batch)
        return batch

    def loss(self, batch, step):
        c = self.config
        loss, _, _ = distill_loss(
            self.student, self.teacher_source, batch, "generalized_jsd", beta=c.beta
        )
        return loss, {"jsd": loss.item(), "response_tokens": float(batch.targets()[1].sum())}
