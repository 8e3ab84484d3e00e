"""MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024).

MiniLLM minimises the sequence-level reverse KL, KL(q_S || p_T) over whole responses, by
policy gradient, with the per-token reward r_t = log p_T(y_t | y_<t, x) - log q_S(y_t | y_<t, x).
Each rollout (every `ppo_epochs` steps, for each micro-batch of prompts x):

  1. Teacher-mixed sampling: each token is drawn from
        p~(. | y_<t, x) = alpha p_T(. | y_<t, x) + (1 - alpha) q_S(. | y_<t, x)      (alpha = 0.2)
     which keeps the student from being rewarded for degenerate text; the per-token
     importance weight w_t = q_S(y_t | .) / p~(y_t | .) corrects for it (the paper's
     single-step approximation of the product of ratios).
  2. Frozen at rollout time: old log-probs log q_old(y_t), rewards r_t, and the advantage A_t
     of each token, by default as the released code computes it (`advantage: reference`,
     minillm/losses.py and utils.whiten in microsoft/LMOps):
        r'_t = clip(r_t / reward_scaling, -reward_clip, reward_clip)
        G_t  = r'_t + gamma G_{t+1}                      (the return includes the current reward)
        A_t  = G_t / (T - t + 1)                         (length-normalised: tokens t..T)
        A   <- (A - mean A) / std A                      (whitened over the step's response tokens: every
                                                          micro-batch of every process, statistics all-reduced)
     or as the paper writes it (`advantage: paper`): A_t = R_{t+1} = 1/(T - t) sum_{t' > t} r_t'.
  3. The student then minimises, for `ppo_epochs` steps on that rollout,
        L = L_long + L_single
        L_long   = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),
                   rho_t = w_t q_S(y_t) / q_old(y_t)                                  (PPO-style clipping)
        L_single = mean_t KL(q_S(. | y_<t, x) || p_T(. | y_<t, x))
     L_single is the single-step decomposition: the expected immediate reward at each
     position, computed exactly over the vocabulary instead of from the sampled token.

With a pre-training corpus (`lm_data`), the loss adds lm_coef x L_PT on its blocks, where the
released code mixes the teacher in: L_PT = (1 - lm_kd_ratio) CE + lm_kd_ratio KL(p_T || q_S).

A served teacher (`teacher: openai:URL#MODEL`; not in the paper) scores each rollout's
finished samples once, giving its top k per position and the mass of the rest. It cannot
join the sampling (step 1 needs p_T at every decoding step), so `teacher_mix` must be 0.
A token outside the top k has no log-prob of its own; the teacher is read as
p^_T(y) = p_T(rest) q_S(y) / q_S(rest) there (its top k, its tail shaped as the student's),
which makes every quantity the (k+1)-outcome one the other served losses use:
r_t = log p~_T(o_t) - log q~_S(o_t) for y_t's outcome o_t (itself if in the top k, else
"any other token"), and L_single = KL(q~_S || p~_T) over the k + 1 outcomes; the
importance ratio rho_t stays the token's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lmdistill.config import SamplingConfig, ServedTeacherConfig, check, doc
from lmdistill.data import Batch
from lmdistill.forward import cache_keyword, output_cache, output_head, response_hidden
from lmdistill.losses.chunked import (
    CachedTargets,
    chunked_loss,
    chunked_token_logprobs,
    coarsen,
    outcome_logprobs,
    shared_rows,
    token_divergence,
)
from lmdistill.methods.base import DistillationMethod
from lmdistill.methods.targets import distill_loss, teacher_targets
from lmdistill.teacher.local import DenseTargets

Tensor = torch.Tensor


@dataclass
class MiniLLMConfig(ServedTeacherConfig, SamplingConfig):
    """MiniLLM: policy-gradient reverse KL with teacher-mixed sampling and PPO-style clipping."""

    method: str = doc("Training method.", default="minillm")
    teacher_mix: float = doc("alpha: the teacher's share of the sampling distribution.", default=0.2)
    clip_range: float = doc("PPO clipping epsilon of the probability ratio.", default=0.2)
    ppo_epochs: int = doc("Optimiser steps taken on each rollout before sampling a new one.", default=4)
    single_step_weight: float = doc("Weight of the single-step term L_single (1 as in the paper; 0 drops it).",
                                    default=1.0)
    advantage: str = doc("`reference`: discounted, length-normalised, whitened returns as the released code; "
                         "`paper`: the paper's undiscounted mean of the future rewards R_{t+1}.", default="reference")
    gamma: float = doc("Discount of the reference advantage (the released code: 0.95).", default=0.95)
    reward_scaling: float = doc("Rewards are divided by this before the reference advantage (its GPT-2 scripts: "
                                "0.5).", default=0.5)
    reward_clip: float = doc("Scaled rewards are clipped to [-reward_clip, reward_clip] (its scripts: 100).",
                             default=100.0)
    whiten: bool = doc("Whiten the reference advantages over the response tokens of the whole step (every "
                       "micro-batch of every process, as the released code's distributed `whiten`).", default=True)
    adam_betas: list[float] = doc(
        "AdamW betas (the released trainer: 0.9, 0.95).", default_factory=lambda: [0.9, 0.95]
    )
    weight_decay: float = doc("AdamW weight decay (the released trainer: 1e-6).", default=1e-6)
    lr_schedule: str = doc("Learning-rate schedule after warm-up (the released code: constant).", default="constant")
    warmup_steps: int = doc("Linear warm-up steps (the released scripts: 100).", default=100)
    lm_kd_ratio: float = doc(
        "On `lm_data` blocks: L_PT = (1 - r) CE + r KL(p_T || q_S) (the released code's "
        "`kd_ratio` there: 0.5; 0: plain language modelling).",
        default=0.5,
    )

    def validate(self) -> None:
        super().validate()
        check(self.teacher is not None, "teacher", "a teacher model for MiniLLM", self.teacher)
        check(0.0 <= self.teacher_mix < 1.0, "teacher_mix", "in [0, 1)", self.teacher_mix)
        check(self.clip_range > 0, "clip_range", "> 0", self.clip_range)
        check(self.ppo_epochs > 0, "ppo_epochs", "> 0", self.ppo_epochs)
        check(self.single_step_weight >= 0, "single_step_weight", ">= 0", self.single_step_weight)
        check(self.advantage in ("reference", "paper"), "advantage", "reference or paper", self.advantage)
        check(0.0 <= self.gamma <= 1.0, "gamma", "in [0, 1]", self.gamma)
        check(self.reward_scaling > 0, "reward_scaling", "> 0", self.reward_scaling)
        check(self.reward_clip > 0, "reward_clip", "> 0", self.reward_clip)
        check(0.0 <= self.lm_kd_ratio <= 1.0, "lm_kd_ratio", "in [0, 1]", self.lm_kd_ratio)
        check(self.top_p == 1.0, "top_p", "1.0 (MiniLLM samples from the full teacher-student mixture)", self.top_p)
        check(not self.served or self.teacher_mix == 0.0, "teacher_mix",
              "0 with a served teacher (the mixture needs the teacher's distribution at every decoding step; "
              "a server scores finished samples only)", self.teacher_mix)


class TeacherMixture:
    """Step 1's sampling distribution p~ = alpha p_T + (1 - alpha) q_S, for `Method.sample_student`:
    runs the teacher beside the student's decoding (its own KV cache, same temperature) and
    records log w_t = log q_S(y_t) - log p~(y_t) of each drawn token."""

    def __init__(self, teacher, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.cache = None
        self.step_log_w: Optional[Tensor] = None  # [B, V] at the current step
        self.log_weights: list[Tensor] = []  # [B] per step

    def __call__(self, logprobs, input_ids, attention_mask, position_ids):
        if self.alpha == 0.0:  # the student's own distribution: no teacher pass, w = 1
            self.step_log_w = torch.zeros_like(logprobs)
            return logprobs
        out = self.teacher(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword(self.teacher): self.cache},  # the name the installed transformers takes
        )
        self.cache = output_cache(out)
        # The rows both vocabularies have (padded embedding matrices differ only past them).
        teacher = torch.log_softmax(out.logits[:, -1, :logprobs.shape[-1]].float() / self.temperature, dim=-1)
        mixture = torch.logaddexp(teacher + math.log(self.alpha), logprobs + math.log1p(-self.alpha))
        self.step_log_w = logprobs - mixture
        return mixture

    def chosen(self, token):
        self.log_weights.append(self.step_log_w.gather(-1, token[:, None]).squeeze(1))

    def weights(self, samples: Batch) -> Tensor:
        """log w [B, R] of the sampled responses, 0 after each response's end."""
        log_w = torch.stack(self.log_weights, 1)
        return log_w * samples.response_mask[:, samples.prompt_width :]


def length_normalised_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """R_{t+1} = 1/(T - t) sum_{t' > t} r_t' over the valid positions after t; 0 where none.

    rewards, mask: [B, R] (mask 1 on the response tokens, a prefix of each row) -> [B, R].
    """
    mask = mask.float()
    rewards = rewards.float() * mask
    future_sum = rewards.flip(1).cumsum(1).flip(1) - rewards  # sum over t' > t
    future_count = mask.flip(1).cumsum(1).flip(1) - mask  # T - t
    return torch.where(future_count > 0, future_sum / future_count.clamp(min=1), torch.zeros_like(future_sum)) * mask


def reference_advantages(
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    reward_scaling: float = 1.0,
    reward_clip: float = math.inf,
    whiten: bool = True,
) -> Tensor:
    """The released code's advantages: A_t = G_t / (tokens from t to the end), G_t = r'_t + gamma G_{t+1},
    r'_t = clip(r_t / reward_scaling, +-reward_clip); with `whiten`, whitened over these response
    tokens alone (`whiten_advantages`; the method whitens over the whole step instead). 0 on padding.

    rewards, mask: [B, R] (mask 1 on the response tokens, a prefix of each row) -> [B, R].
    """
    mask = mask.float()
    scaled = (rewards.float() / reward_scaling).clamp(-reward_clip, reward_clip) * mask
    returns = torch.zeros_like(scaled)
    running = torch.zeros_like(scaled[:, 0])
    for t in reversed(range(scaled.shape[1])):  # G_t = r_t + gamma G_{t+1}
        running = scaled[:, t] + gamma * running
        returns[:, t] = running
    remaining = mask.flip(1).cumsum(1).flip(1).clamp(min=1)  # tokens t..T
    advantages = returns / remaining * mask
    return whiten_advantages([advantages], [mask])[0] if whiten else advantages


def whiten_advantages(advantages: list[Tensor], masks: list[Tensor], reduce=None) -> list[Tensor]:
    """(A - mean) / sqrt(var + 1e-8) over the masked tokens of all the [B, R] tensors together, 0 on padding.

    `reduce(tensor) -> tensor` sums statistics across processes (None: this process alone), so every
    process whitens with the same mean and (population) variance, as the released code's
    distributed `whiten` (trlx's `get_global_statistics`: sum, count, then the squared deviations)."""
    reduce = reduce or (lambda t: t)
    masks = [m.float() for m in masks]
    total = reduce(torch.stack([sum((a * m).sum() for a, m in zip(advantages, masks)),
                                sum(m.sum() for m in masks)]).double())
    if total[1] < 2:
        return advantages
    mean = total[0] / total[1]
    variance = reduce(sum((((a.double() - mean) * m) ** 2).sum() for a, m in zip(advantages, masks))) / total[1]
    scale = torch.rsqrt(variance + 1e-8)
    return [((a.double() - mean) * scale * m).to(a.dtype) for a, m in zip(advantages, masks)]


def token_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels]: [B, R, V], [B, R] -> [B, R] (float32)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@dataclass
class Rollout:
    """Step 2's frozen quantities for one micro-batch of samples."""

    samples: Batch
    old_log_probs: Tensor  # [B, R] log q_old(y_t)
    log_weights: Tensor  # [B, R] log w_t
    returns: Tensor  # [B, R] advantages A_t (step 2)
    rewards: Tensor  # [B, R] r_t
    served: Optional[CachedTargets] = None  # a served teacher's top-k of the samples (asked once per rollout)
    mask: Optional[Tensor] = None  # [B, R] the response tokens the rewards and advantages cover

    @property
    def num_tokens(self) -> int:
        return self.samples.num_tokens


class MiniLLM(DistillationMethod):
    config_class = MiniLLMConfig
    description = "MiniLLM: policy-gradient sequence-level reverse KL (Gu et al., ICLR 2024)"
    turns = "last"  # it samples the student: chat data trains on the last assistant turn
    progress_key = "reverse_kl"

    def __init__(self, config: MiniLLMConfig, context):
        super().__init__(config, context)
        self.rollouts: list[Rollout] = []  # the current rollout, one entry per micro-batch
        self.fresh = True  # whether this step samples a new rollout
        self.whitened = True  # whether the rollout's advantages are whitened (`whiten_step`)
        self.reuse_index = 0

    @torch.no_grad()
    def rollout(self, batch: Batch) -> Rollout:
        """Steps 1-2: teacher-mixed samples and their frozen log-probs, rewards and returns."""
        c = self.config
        mixture = TeacherMixture(self.teacher, c.teacher_mix, c.temperature)
        samples = self.sample_student(batch, mixture)
        log_w = mixture.weights(samples)
        labels, sampled = samples.targets()
        hidden = response_hidden(self.unwrapped_student, samples)
        student_head, targets, mask = teacher_targets(output_head(self.unwrapped_student), self.teacher_source,
                                                      samples)
        # log q_old of every sampled token, the positions the teacher gave no distribution over included
        old = chunked_token_logprobs(hidden, student_head, labels, sampled)
        if isinstance(targets, DenseTargets):
            teacher_head = shared_rows(student_head, targets.head)[1]
            teacher = chunked_token_logprobs(targets.hidden, teacher_head, labels, mask)
            rewards, served = (teacher - old) * mask, None
        else:  # served: rewards of the k + 1 outcomes (module docstring)
            student_outcome = chunked_token_logprobs(hidden, student_head, labels, mask, outcomes=targets.ids)
            rewards, served = (outcome_logprobs(targets, labels) - student_outcome) * mask, targets
        if c.advantage == "paper":
            advantages = length_normalised_returns(rewards, mask)
        else:  # whitened once the whole step is sampled (`whiten_step`)
            advantages = reference_advantages(rewards, mask, c.gamma, c.reward_scaling, c.reward_clip, whiten=False)
        return Rollout(samples, old, log_w, advantages, rewards, served, mask)

    def whiten_step(self) -> None:
        """Whiten the reference advantages of the step's rollout over every micro-batch of every process
        (called before the first update reads them, when all micro-batches are sampled)."""
        if self.whitened:
            return
        self.whitened = True
        if self.config.advantage != "reference" or not self.config.whiten:
            return
        masks = [r.mask if r.mask is not None else r.samples.targets()[1] for r in self.rollouts]
        distributed = self.accelerator.num_processes > 1
        whitened = whiten_advantages([r.returns for r in self.rollouts], masks,
                                     (lambda t: self.accelerator.reduce(t, "sum")) if distributed else None)
        for rollout, advantages in zip(self.rollouts, whitened):
            rollout.returns = advantages

    def begin_step(self, step):
        """A fresh rollout every ppo_epochs steps; in between, the stored one is reused."""
        self.fresh = step % self.config.ppo_epochs == 0 or not self.rollouts
        if self.fresh:
            self.rollouts = []
            self.whitened = False
        self.reuse_index = 0

    def prepare(self, batch, step):
        if self.fresh:
            self.rollouts.append(self.rollout(batch))
            return self.rollouts[-1]
        work = self.rollouts[self.reuse_index % len(self.rollouts)]
        self.reuse_index += 1
        return work

    # The stored rollout is part of the run's state: a resumed run reuses the same samples
    # for the rest of its PPO epochs, as the uninterrupted run does.
    def state_dict(self) -> dict:
        rollouts = [
            {
                "input_ids": r.samples.input_ids,
                "attention_mask": r.samples.attention_mask,
                "response_mask": r.samples.response_mask,
                "prompt_width": r.samples.prompt_width,
                "old_log_probs": r.old_log_probs,
                "log_weights": r.log_weights,
                "returns": r.returns,
                "rewards": r.rewards,
                "served": None if r.served is None else vars(r.served),
                "mask": r.mask,
            }
            for r in self.rollouts
        ]
        return {"rollouts": rollouts}

    def load_state_dict(self, state: dict) -> None:
        def to(tensor):
            return tensor.to(self.device)

        self.rollouts = [
            Rollout(
                Batch(to(r["input_ids"]), to(r["attention_mask"]), to(r["response_mask"]), int(r["prompt_width"])),
                to(r["old_log_probs"]),
                to(r["log_weights"]),
                to(r["returns"]),
                to(r["rewards"]),
                None if r.get("served") is None else CachedTargets(
                    **{k: None if v is None else to(v) for k, v in r["served"].items()}),
                None if r.get("mask") is None else to(r["mask"]),
            )
            for r in state["rollouts"]
        ]
        self.whitened = True  # a checkpoint is written after the step's updates read them

    def lm_loss(self, batch):
        """L_PT on pre-training blocks: (1 - lm_kd_ratio) CE + lm_kd_ratio KL(p_T || q_S), chunked."""
        loss, _, _ = distill_loss(
            self.student, self.teacher_source, batch, "forward_kl", ce_weight=1.0 - self.config.lm_kd_ratio
        )
        return loss

    def loss(self, work: Rollout, step):
        c = self.config
        self.whiten_step()
        labels, mask = work.samples.targets()
        reverse_kl = token_divergence("reverse_kl")

        def token_loss(s, t, label, old, log_w, returns, *served):  # per response position, float32 log-probs [n, V]
            ratio = torch.exp(s.gather(-1, label.unsqueeze(-1)).squeeze(-1) - old + log_w)
            clipped = ratio.clamp(1.0 - c.clip_range, 1.0 + c.clip_range)
            long_term = torch.max(-returns * ratio, -returns * clipped)
            if served:  # KL(q~_S || p~_T) over the teacher's top k + the rest
                ids, top, rest = served
                single_step = reverse_kl(coarsen(s, ids), torch.cat([top, rest.unsqueeze(-1)], -1))
            else:
                single_step = reverse_kl(s, t)  # KL(q_S || p_T) per position
            clipped_now = ((ratio - clipped).abs() > 0).float()
            return long_term + c.single_step_weight * single_step, torch.stack(
                [long_term, single_step, clipped_now], -1
            )

        # Both terms are means over the response positions, so their sum is one chunked pass.
        row_data = (labels, work.old_log_probs, work.log_weights, work.returns)
        student_head = output_head(self.student)
        if work.served is None:
            with torch.inference_mode():
                teacher = {"teacher_hidden": response_hidden(self.teacher, work.samples),
                           "teacher_head": output_head(self.teacher)}
        else:
            teacher = {}
            (student_head,) = shared_rows(student_head, rows=self.teacher_source.vocab_size)
            row_data += (work.served.ids, work.served.logprobs, work.served.rest)
            if work.served.known is not None:
                mask = mask * work.served.known.to(mask.dtype)
        loss, (long_term, single_step, clip_fraction) = chunked_loss(
            token_loss, response_hidden(self.student, work.samples), student_head, mask, **teacher, row_data=row_data
        )
        lengths = mask.sum(1).float().clamp(min=1)
        return loss, {
            "loss": loss.item(),
            "pg_loss": long_term.item(),
            "reverse_kl": single_step.item(),
            "reward": float(((work.rewards.sum(1)) / lengths).mean()),
            "clip_fraction": clip_fraction.item(),
            "response_tokens": float(mask.sum()),
        }
