"""On-policy distillation with the sampled-token reverse KL (Thinking Machines, "On-Policy
Distillation", 2025, as `tinker_cookbook/distillation/train_on_policy.py` runs it; TRL's MiniLLM
trainer has the same advantage as `rkl_advantage`; the recipe behind the Qwen3 small models).

For each micro-batch of prompts x (cited in docs/fidelity.md):

  1. The sampler -- the student as it was at the start of this rollout -- draws one response
     y ~ q_old(. | x) at `temperature`; its log-probs log q_old(y_t | y_<t, x) are kept.
  2. The teacher scores only the sampled tokens, log p_T(y_t | y_<t, x), and each token gets
        r_t = log p_T(y_t) - log q_old(y_t)          (minus the per-token reverse KL estimate)
        A_t = kl_coef * sum_{t' >= t} discount^(t' - t) r_t'
     (`discount` 0, the reference's default: A_t = kl_coef r_t, each token answers for itself;
     `discount` 1: the undiscounted return, whose policy gradient is exactly the gradient of the
     sequence-level reverse KL KL(q_S(y | x) || p_T(y | x)) -- tested by exact enumeration).
     A_t is frozen: no gradient flows through the advantage or the teacher.
  3. The student minimises the importance-sampling policy-gradient loss of the reference
     (Tinker's `importance_sampling`, unclipped), summed over each response's tokens and
     averaged over the responses:
        L = -(1/B) sum_b sum_t rho_t A_t,     rho_t = q_S(y_t | y_<t, x) / q_old(y_t | y_<t, x)
     whose gradient at rho = 1 is -(1/B) sum A_t grad log q_S(y_t).

`substeps` (Tinker's `num_substeps`): one rollout's samples feed that many optimiser steps, so
the sampler is refreshed every `substeps` steps and rho corrects for the policy having moved
since (a copy of the student's weights is kept for sampling when substeps > 1).

The teacher is a local model, or a server that scores given tokens (`teacher: openai:URL#MODEL`):
vLLM gives every sampled token's log-prob (`prompt_logprobs: 0`); llama.cpp only its top
`teacher_top_k`, so a sampled token outside them has no log-prob of its own. `missing_token`
says what then happens: `tail` (default) reads the teacher's tail as shaped like the sampler's,
log p^_T(y) = log p_T(rest) + log q_old(y) - log q_old(rest), so r_t = log p_T(rest) - log q_old(rest)
(the (k + 1)-outcome reward MiniLLM's served path uses); `drop` leaves the token out of the loss
(no gradient, no reward). A top-k teacher cache cannot serve: see `OPDConfig.validate`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from lmdistill.config import SamplingConfig, ServedTeacherConfig, check, doc
from lmdistill.data import Batch
from lmdistill.forward import output_head, response_hidden
from lmdistill.losses.chunked import CachedTargets, chunked_loss, chunked_token_logprobs, shared_rows
from lmdistill.methods.base import DistillationMethod
from lmdistill.sampling import sample_responses
from lmdistill.teacher.local import DenseTargets
from lmdistill.teacher.served import ServedTeacher

Tensor = torch.Tensor


@dataclass
class OPDConfig(ServedTeacherConfig, SamplingConfig):
    """On-policy distillation: policy gradient on the student's samples with the per-token advantage
    log p_T(y_t) - log q_S(y_t) (sampled-token reverse KL)."""

    method: str = doc("Training method.", default="opd")
    kl_coef: float = doc("Scale of the advantage, A_t = kl_coef * (discounted) (log p_T - log q_old) (the "
                         "reference's kl_penalty_coef: 1).", default=1.0)
    discount: float = doc("Discount of the future rewards in A_t, in [0, 1]: 0 (the reference's "
                          "kl_discount_factor) scores each token by its own reward; 1 is the undiscounted "
                          "return, the exact policy gradient of the sequence-level reverse KL.", default=0.0)
    substeps: int = doc("Optimiser steps per rollout (the reference's num_substeps: 1). With more, the student "
                        "samples from a copy of itself refreshed every `substeps` steps and the importance ratio "
                        "q_S / q_old corrects for the policy having moved.", default=1)
    missing_token: str = doc("Served llama.cpp teacher, a sampled token outside its top `teacher_top_k`: `tail` "
                             "reads the teacher's tail as shaped like the sampler's (reward log p_T(rest) - "
                             "log q_old(rest)); `drop` leaves the token out of the loss.", default="tail")
    teacher_cache: Optional[str] = doc("Not supported (must stay unset): a top-k cache holds the teacher on "
                                       "sequences fixed before training, and OPD's are sampled during it.",
                                       default=None)
    adam_betas: list[float] = doc("AdamW betas (the reference's train_step: 0.9, 0.95).",
                                  default_factory=lambda: [0.9, 0.95])
    lr_schedule: str = doc("Learning-rate schedule after warm-up (the reference: constant).", default="constant")

    def validate(self) -> None:
        super().validate()
        check(self.teacher_cache is None, "teacher_cache",
              "unset: on-policy distillation scores the student's own samples, drawn during training, and a "
              "top-k cache only holds the teacher on sequences fixed before training (the dataset's or the "
              "teacher's responses); use a local teacher or a server (teacher: openai:URL#MODEL)",
              self.teacher_cache)
        check(self.teacher is not None, "teacher", "a teacher model (local or openai:URL#MODEL) for OPD", self.teacher)
        check(self.kl_coef > 0, "kl_coef", "> 0", self.kl_coef)
        check(0.0 <= self.discount <= 1.0, "discount", "in [0, 1]", self.discount)
        check(self.substeps > 0, "substeps", "> 0", self.substeps)
        check(self.missing_token in ("tail", "drop"), "missing_token", "tail or drop", self.missing_token)


def discounted_returns(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """G_t = sum_{t' >= t} discount^(t' - t) r_t' over each row's valid positions; 0 on padding.
    discount 0 gives the rewards themselves. rewards, mask: [B, R] -> [B, R] (float32)."""
    mask = mask.float()
    rewards = rewards.float() * mask
    if discount == 0.0:
        return rewards
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + discount * running
        returns[:, t] = running
    return returns * mask


def opd_token_loss(logprobs: Tensor, labels: Tensor, old_logprobs: Tensor, advantages: Tensor) -> Tensor:
    """-rho_t A_t per token, rho_t = exp(log q(y_t) - log q_old(y_t)); A_t and log q_old are constants.
    logprobs [n, V] (float32, the student now), labels, old_logprobs, advantages [n] -> [n]."""
    now = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -torch.exp(now - old_logprobs.detach()) * advantages.detach()


@dataclass
class Rollout:
    """Steps 1-2, frozen: the samples, the sampler's log-probs, rewards and advantages [B, R], and
    `mask` [B, R]: the response tokens that count (a served teacher's missing ones may leave)."""

    samples: Batch
    old_log_probs: Tensor
    rewards: Tensor
    advantages: Tensor
    mask: Tensor
    missing: float = 0.0  # share of response tokens the served teacher gave no log-prob for

    @property
    def num_tokens(self) -> int:
        return self.samples.num_tokens


class OPD(DistillationMethod):
    config_class = OPDConfig
    description = "on-policy distillation: policy gradient with the sampled-token reverse KL (Thinking Machines 2025)"
    turns = "last"  # it samples the student: chat data trains on the last assistant turn
    progress_key = "reverse_kl"

    def __init__(self, config: OPDConfig, context):
        super().__init__(config, context)
        self.sampler = None  # the student as of the last rollout (substeps > 1 only)

    def begin_step(self, step):
        """Every `substeps` steps the sampler becomes the current student (a copy of its weights)."""
        if self.config.substeps > 1 and (step % self.config.substeps == 0 or self.sampler is None):
            self.sampler = copy.deepcopy(self.unwrapped_student).eval().requires_grad_(False)

    def sampling_model(self):
        return self.unwrapped_student if self.sampler is None else self.sampler

    @torch.no_grad()
    def prepare(self, batch: Batch, step: int) -> Rollout:
        """Steps 1-2: the sampler's responses, their log-probs, the teacher's, the advantages."""
        c = self.config
        sampler = self.sampling_model()
        room = max(1, min(c.max_new_tokens, c.max_length - batch.prompt_width))
        samples = sample_responses(sampler, batch.prompts(), self.eos_ids, self.tokenizer.pad_token_id, room,
                                   c.temperature, c.top_p, vocab_size=len(self.tokenizer))
        return self.score(samples)

    @torch.no_grad()
    def score(self, samples: Batch) -> Rollout:
        """Step 2 on given samples: sampler and teacher log-probs of each token, rewards, advantages."""
        c = self.config
        labels, mask = samples.targets()
        sampler = self.sampling_model()
        head = output_head(sampler)
        hidden = response_hidden(sampler, samples)
        missing = 0.0
        if not isinstance(self.teacher_source, ServedTeacher):
            targets = self.teacher_source.targets(samples)
            assert isinstance(targets, DenseTargets), "a top-k cache cannot score samples (OPDConfig.validate)"
            head, teacher_head = shared_rows(head, targets.head)
            old = chunked_token_logprobs(hidden, head, labels, mask)
            teacher = chunked_token_logprobs(targets.hidden, teacher_head, labels, mask)
        else:  # served: the log-prob of each sampled token, where the server gives it
            self.teacher_source.check_vocabulary(head.weight.shape[0])
            (head,) = shared_rows(head, rows=self.teacher_source.vocab_size)
            old = chunked_token_logprobs(hidden, head, labels, mask)
            teacher, found, top_k = self.teacher_source.sampled_token_logprobs(samples)
            absent = mask.bool() & ~found
            missing = float(absent.sum()) / max(1, int(mask.sum()))
            if top_k is not None and c.missing_token == "tail":
                teacher, mask = self.tail_logprobs(teacher, found, top_k, hidden, head, labels, old, mask)
            else:
                mask = mask * found.to(mask.dtype)
        rewards = (teacher - old) * mask
        advantages = c.kl_coef * discounted_returns(rewards, mask, c.discount)
        return Rollout(samples, old * mask, rewards, advantages, mask, missing)

    @staticmethod
    def tail_logprobs(teacher: Tensor, found: Tensor, top_k: CachedTargets, hidden: Tensor, head, labels: Tensor,
                      old: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """A missing token's teacher log-prob as the tail shaped like the sampler's:
        log p_T(rest) + log q_old(y) - log q_old(rest), "rest" being the tokens outside the teacher's top k.
        Positions the server gave no distribution at all over (`known` false) leave the mask."""
        if top_k.known is not None:
            mask = mask * top_k.known.to(mask.dtype)
        outcome = chunked_token_logprobs(hidden, head, labels, mask, outcomes=top_k.ids)  # log q_old(rest) there
        tail = top_k.rest + old - outcome
        return torch.where(found, teacher, tail) * mask, mask

    def loss(self, work: Rollout, step):
        labels = work.samples.targets()[0]
        mask = work.mask
        head = output_head(self.student)
        if isinstance(self.teacher_source, ServedTeacher):
            (head,) = shared_rows(head, rows=self.teacher_source.vocab_size)
        mean = chunked_loss(lambda s, _no_teacher, *rows: opd_token_loss(s, *rows),
                            response_hidden(self.student, work.samples), head, mask,
                            row_data=(labels, work.old_log_probs, work.advantages))
        # chunked_loss averages over the tokens; the reference sums them: sum over tokens / responses
        tokens, responses = float(mask.sum()), work.samples.input_ids.shape[0]
        loss = mean * (tokens / responses)
        reverse_kl = -float(work.rewards.sum()) / max(tokens, 1.0)
        logs = {"loss": loss.item(), "reverse_kl": reverse_kl,
                "advantage": float(work.advantages.sum()) / max(tokens, 1.0), "response_tokens": tokens}
        if self.config.served:
            logs["teacher_missing"] = work.missing
        return loss, logs

    # The sampler copy is not saved: a run resumed between two rollouts (substeps > 1) samples from
    # the resumed student until the next refresh.
