"""Distillation losses as pure functions.

Every divergence has the signature `f(student_logits, teacher_logits, mask, ...) -> scalar`:

- `student_logits`, `teacher_logits`: [B, T, V] (any float dtype; computed in float32),
  aligned so that position t of both predicts the same next token;
- `mask`: [B, T], 1 (or True) where position t is a response token that counts;
- the result is the per-token divergence averaged over the valid tokens. A batch with
  no valid token gives 0 (not NaN), so an empty micro-batch cannot poison a step.

Notation: p = softmax(teacher_logits), q = softmax(student_logits), sums over the
vocabulary. Each divergence is also exposed per token (`token_*`, taking float32
log-probabilities [..., V] and returning [...]) so that the chunked projection in
`lmdistill.losses.chunked` computes exactly the same values without full logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def log_probs(logits: Tensor) -> Tensor:
    """float32 log-softmax over the vocabulary: [..., V] -> [..., V]."""
    return torch.log_softmax(logits.float(), dim=-1)


def masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of `per_token` [B, T] over positions where `mask` [B, T] is set; 0 if none."""
    mask = mask.bool()
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total / mask.sum().clamp(min=1)


# exp(-1e4) is exactly 0 in float32 and float64, so flooring log-probs there changes no
# value, yet keeps -inf entries (masked vocabularies) from turning 0 * inf into NaN
# in the forward pass or the gradient.
_LOG_FLOOR = -1e4


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) = sum a (log a - log b), with 0 log 0 = 0: [..., V] -> [...]."""
    logp_a, logp_b = logp_a.clamp(min=_LOG_FLOOR), logp_b.clamp(min=_LOG_FLOOR)
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def _mix(logp_a: Tensor, logp_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed stably in log space."""
    return torch.logsumexp(
        torch.stack([logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a)]), dim=0
    )


# ----- per-token divergences: (student_logprobs, teacher_logprobs) [..., V] -> [...] -----

def token_forward_kl(s: Tensor, t: Tensor) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    return _kl(t, s)


def token_reverse_kl(s: Tensor, t: Tensor) -> Tensor:
    """KL(q || p) = sum_v q_v (log q_v - log p_v)."""
    return _kl(s, t)


def token_generalized_jsd(s: Tensor, t: Tensor, beta: float) -> Tensor:
    """JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    At the end points the mixture collapses, so (as in GKD and TRL) beta = 0 is defined
    as the forward KL(p || q) and beta = 1 as the reverse KL(q || p).
    """
    if beta == 0.0:
        return token_forward_kl(s, t)
    if beta == 1.0:
        return token_reverse_kl(s, t)
    m = _mix(t, s, beta)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def token_skewed_forward_kl(s: Tensor, t: Tensor, skew: float) -> Tensor:
    """SKL_lambda(p, q) = KL(p || lambda p + (1 - lambda) q) (DistiLLM)."""
    return _kl(t, _mix(t, s, skew)) if skew > 0 else token_forward_kl(s, t)


def token_skewed_reverse_kl(s: Tensor, t: Tensor, skew: float) -> Tensor:
    """SRKL_lambda(q, p) = KL(q || lambda q + (1 - lambda) p) (DistiLLM)."""
    return _kl(s, _mix(s, t, skew)) if skew > 0 else token_reverse_kl(s, t)


def token_total_variation(s: Tensor, t: Tensor) -> Tensor:
    """TV(p, q) = 1/2 sum_v |p_v - q_v|."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


# ----- batch losses: (student_logits, teacher_logits, mask) -> scalar -----

def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Forward KL, mean over valid tokens of KL(p || q). Shapes: [B,T,V], [B,T,V], [B,T] -> []."""
    return masked_mean(token_forward_kl(log_probs(student_logits), log_probs(teacher_logits)), mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Reverse KL, mean over valid tokens of KL(q || p). Shapes: [B,T,V], [B,T,V], [B,T] -> []."""
    return masked_mean(token_reverse_kl(log_probs(student_logits), log_probs(teacher_logits)), mask)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD (GKD), mean over valid tokens of
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
    beta = 0 is KL(p || q), beta = 1 is KL(q || p). Shapes: [B,T,V], [B,T,V], [B,T] -> []."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    return masked_mean(token_generalized_jsd(log_probs(student_logits), log_probs(teacher_logits), beta), mask)


def skewed_forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, skew: float = 0.1) -> Tensor:
    """Skewed forward KL (DistiLLM), mean over valid tokens of KL(p || skew p + (1 - skew) q).
    Shapes: [B,T,V], [B,T,V], [B,T] -> []."""
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skewed_forward_kl: skew must be in [0, 1), got {skew}")
    return masked_mean(token_skewed_forward_kl(log_probs(student_logits), log_probs(teacher_logits), skew), mask)


def skewed_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, skew: float = 0.1) -> Tensor:
    """Skewed reverse KL (DistiLLM), mean over valid tokens of KL(q || skew q + (1 - skew) p).
    Shapes: [B,T,V], [B,T,V], [B,T] -> []."""
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skewed_reverse_kl: skew must be in [0, 1), got {skew}")
    return masked_mean(token_skewed_reverse_kl(log_probs(student_logits), log_probs(teacher_logits), skew), mask)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Total variation distance (`tvd`), mean over valid tokens of 1/2 sum |p - q|. 1 - TV(p, q) =
    sum_v min(p_v, q_v) is the probability that a token drafted from q is accepted by speculative
    sampling against p (Leviathan et al. 2023), so lowering it raises a draft's acceptance (DistillSpec).
    Shapes: [B,T,V], [B,T,V], [B,T] -> []."""
    return masked_mean(token_total_variation(log_probs(student_logits), log_probs(teacher_logits)), mask)


def cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood of `labels` [B,T] under `logits` [B,T,V], mean over valid tokens."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    return masked_mean(nll, mask)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skewed_forward_kl": skewed_forward_kl,
    "skewed_reverse_kl": skewed_reverse_kl,
    "total_variation": total_variation,
    "tvd": total_variation,  # DistillSpec's name (Zhou et al. 2023): the objective that raises draft acceptance
}
