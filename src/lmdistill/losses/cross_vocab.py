"""Losses between the aligned rows of two tokenizations (ULD, GOLD): float32 log-probs, a row mask,
mean over the valid rows. The alignment that makes the rows is `lmdistill.cross_tokenizer`.

- `uld_loss` (Boizard et al. 2024) compares sorted probability vectors, which needs no vocabulary mapping;
- `gold_loss` (TRL's GOLD, trl/experimental/gold/gold_trainer.py, TRL 1.16) compares the shared
  sub-vocabulary (`cross_tokenizer.shared_vocabulary`) entry by entry with the generalized JSD of
  `lmdistill.losses` and the rest with ULD. With one tokenizer on both sides the shared vocabulary is
  everything and `gold_loss` is the same-vocabulary divergence;
- `aligned_loss` projects aligned hidden states to both vocabularies a chunk of rows at a time.

Both row losses take `chunk_size`: rows are processed that many at a time under activation
checkpointing, so at most [chunk_size, V] vocabulary-sized tensors exist at once, forward or
backward. Gradients reach the student log-probs only; teacher inputs are detached.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmdistill import losses

Tensor = torch.Tensor


def token_uld(s: Tensor, t: Tensor, top_k: Optional[int] = None) -> Tensor:
    """ULD per row: sum_i |sort(q)_i - sort(p)_i|, probabilities sorted descending, the shorter
    vector padded with zeros. (student_logprobs [n, V_s], teacher_logprobs [n, V_t]) -> [n].

    top_k: keep only the k largest probabilities of each side (not in TRL; for large vocabularies,
    where the tail is tiny and sorting it costs time). None sorts everything, as TRL does.
    """
    q, p = s.exp(), t.exp()
    if top_k is None:
        q, p = q.sort(-1, descending=True).values, p.sort(-1, descending=True).values
    else:
        q = q.topk(min(top_k, q.size(-1)), dim=-1).values
        p = p.topk(min(top_k, p.size(-1)), dim=-1).values
    width = max(q.size(-1), p.size(-1))
    q, p = F.pad(q, (0, width - q.size(-1))), F.pad(p, (0, width - p.size(-1)))
    return (q - p).abs().sum(-1)


def _chunk_sum(row_fn: Callable[[Tensor, Tensor], Tensor], s: Tensor, t: Tensor, rows: Tensor) -> Tensor:
    return row_fn(s.index_select(0, rows), t.index_select(0, rows)).sum()


def _mean_over_rows(row_fn, s: Tensor, t: Tensor, mask: Tensor, chunk_size: Optional[int]) -> Tensor:
    """mean over rows with mask set of row_fn(s_rows, t_rows), `chunk_size` rows at a time."""
    if s.shape[:-1] != t.shape[:-1] or tuple(mask.shape) != tuple(s.shape[:-1]):
        raise ValueError(
            f"shapes disagree: student {tuple(s.shape)}, teacher {tuple(t.shape)}, mask {tuple(mask.shape)}"
        )
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    s, t = s.reshape(-1, s.size(-1)), t.detach().reshape(-1, t.size(-1))
    rows = mask.reshape(-1).to(s.device).bool().nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        return s[:0].sum()  # 0, still attached to the graph (as losses.masked_mean)
    step = n if chunk_size is None else chunk_size
    # Checkpointing recomputes a chunk's [chunk, V] intermediates in backward instead of keeping
    # every chunk's until the end, so chunking bounds memory in backward too.
    recompute = chunk_size is not None and torch.is_grad_enabled() and s.requires_grad
    total = s.new_zeros(())
    for a in range(0, n, step):
        idx = rows[a:a + step]
        if recompute:
            total = total + checkpoint(_chunk_sum, row_fn, s, t, idx, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + _chunk_sum(row_fn, s, t, idx)
    return total / n


def uld_loss(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, *,
             top_k: Optional[int] = None, chunk_size: Optional[int] = None) -> Tensor:
    """Universal Logit Distillation loss (Boizard et al. 2024): [..., V_s], [..., V_t], mask [...] -> [].

        ULD = mean over rows with mask set of  sum_i |sort(q)_i - sort(p)_i|

    q = exp(student_logprobs), p = exp(teacher_logprobs), both sorted descending, the shorter padded
    with zeros (`token_uld`). This is TRL's ULDLoss without hybrid (gold_trainer.py:508-523): L1 with
    reduction="sum" over the aligned rows of a sequence, divided by their number. TRL then averages
    the per-sequence values (gold_trainer.py:526); here the mean is over all valid rows (the
    `lmdistill.losses` convention; the same when sequences have equally many rows). Temperatures
    (TRL's uld_*_temperature, default 1.0) belong in the caller's log-softmax. Teacher detached;
    0 when no row is valid.
    """
    return _mean_over_rows(lambda s, t: token_uld(s, t, top_k), student_logprobs, teacher_logprobs, mask, chunk_size)


def _complement(ids: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


def gold_loss(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor,
              shared_ids: tuple[Tensor, Tensor], *, beta: float = 0.5,
              matched_weight: Optional[float] = None, unmatched_weight: Optional[float] = None,
              top_k: Optional[int] = None, chunk_size: Optional[int] = None) -> Tensor:
    """TRL GOLD's hybrid ULD loss: [..., V_s], [..., V_t], mask [...], (teacher_ids [M], student_ids [M]) -> [].

    What TRL 1.16 does (trl/experimental/gold/gold_trainer.py, `ULDLoss._compute_hybrid_uld_loss`,
    lines 625-722, used when GOLDConfig.uld_use_hybrid_loss=True, default False, gold_config.py:305):
    on EVERY aligned row (merged multi-token groups included, not only 1:1 positions) it splits the
    vocabulary, not the positions:
      matched   = generalized JSD_beta over the shared sub-vocabulary (lines 656-668, 724-751), on the
                  gathered probabilities NOT renormalised (log of p.clamp_min(1e-8), line 2283-2284);
                  beta = GOLDConfig.beta, default 0.5 (gold_config.py:206-207; beta 0 = KL(p||q),
                  1 = KL(q||p), lines 2293-2317); mean over the sequence's rows (line 2335-2336);
      unmatched = ULD (sort, pad, L1 summed) over the remaining entries of each side, per-row mean
                  (lines 671-704), computed only if both sides have remaining entries (line 681);
      loss      = w_m * matched + w_u * unmatched, with w_m = M / V_t and w_u = 1 - w_m by default
                  (uld_hybrid_*_weight None, lines 706-716), V_t the teacher's vocabulary width.
    Here, per row, with (student, teacher) shared columns S_s, S_t and the rest R_s, R_t:
        row  = w_m * losses.token_generalized_jsd(s[S_s], t[S_t], beta) + w_u * token_uld(s[R_s], t[R_t])
        loss = mean over rows with mask set
    Differences from TRL: log-probs are used as given (no 1e-8 clamp); the ULD part is also computed when
    one side has no remaining entry (the other's remaining mass padded against zeros; TRL gives 0); the
    mean is over all valid rows, not per sequence then over sequences. A caller that wants a KL on 1:1
    positions only and ULD elsewhere can split the rows with `exact_matches` and call the two losses.

    One tokenizer on both sides: shared_vocabulary gives every id paired with itself, so M = V_t,
    w_m = 1, w_u = 0, and the loss is `lmdistill.losses.generalized_jsd(beta)` (beta=0: forward_kl), the same
    per-row formula on the same columns, equal up to float rounding (the valid rows are summed in another order).
    top_k applies to the ULD part (see `token_uld`). Teacher detached; 0 when no row is valid.
    """
    row_loss = gold_row_loss(shared_ids, student_logprobs.size(-1), teacher_logprobs.size(-1), beta=beta,
                             matched_weight=matched_weight, unmatched_weight=unmatched_weight, top_k=top_k)
    return _mean_over_rows(row_loss, student_logprobs, teacher_logprobs, mask, chunk_size)


def gold_row_loss(shared_ids: tuple[Tensor, Tensor], v_s: int, v_t: int, *, beta: float = 0.5,
                  matched_weight: Optional[float] = None, unmatched_weight: Optional[float] = None,
                  top_k: Optional[int] = None) -> Callable[[Tensor, Tensor], Tensor]:
    """`gold_loss`'s per-row loss for vocabularies of v_s (student) and v_t (teacher) entries:
    (student_logprobs [n, v_s], teacher_logprobs [n, v_t]) -> [n]."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gold_loss: beta must be in [0, 1], got {beta}")
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError("gold_loss: set both matched_weight and unmatched_weight, or neither")
    t_ids, s_ids = (torch.as_tensor(x, dtype=torch.long) for x in shared_ids)
    if t_ids.shape != s_ids.shape or t_ids.dim() != 1:
        raise ValueError(f"gold_loss: shared ids must be two [M] tensors, got {list(t_ids.shape)} {list(s_ids.shape)}")
    if t_ids.numel() and (int(t_ids.max()) >= v_t or int(s_ids.max()) >= v_s):
        raise ValueError("gold_loss: a shared id is outside the vocabulary")
    if matched_weight is None:
        matched_weight = t_ids.numel() / max(1, v_t)
        unmatched_weight = 1.0 - matched_weight
    s_rest, t_rest = _complement(s_ids, v_s), _complement(t_ids, v_t)

    def rows(s: Tensor, t: Tensor) -> Tensor:
        out = s.new_zeros(s.shape[:-1])
        if matched_weight:  # a weight of 0 skips its term (one tokenizer: no remaining entries at all)
            jsd = losses.token_generalized_jsd(s.index_select(-1, s_ids.to(s.device)),
                                               t.index_select(-1, t_ids.to(t.device)), beta)
            out = matched_weight * jsd
        if unmatched_weight:
            out = out + unmatched_weight * token_uld(s.index_select(-1, s_rest.to(s.device)),
                                                     t.index_select(-1, t_rest.to(t.device)), top_k)
        return out

    return rows


def _projected_chunk(row_loss, h_s: Tensor, h_t: Tensor, weights: Tensor, w_s: Tensor, b_s: Optional[Tensor],
                     w_t: Tensor, b_t: Optional[Tensor]) -> Tensor:
    s = torch.log_softmax(F.linear(h_s.to(w_s.dtype), w_s, b_s).float(), dim=-1)
    t = torch.log_softmax(F.linear(h_t.to(w_t.dtype), w_t, b_t).float(), dim=-1)
    return (row_loss(s, t) * weights).sum()


def aligned_loss(row_loss: Callable[[Tensor, Tensor], Tensor], student_hidden: Tensor, student_head,
                 teacher_hidden: Tensor, teacher_head, weights: Tensor, chunk_size: int = 64) -> Tensor:
    """sum_i weights_i row_loss(log_softmax(h_s,i W_s^T + b_s), log_softmax(h_t,i W_t^T + b_t)), from hidden
    states: student_hidden [N, H_s], teacher_hidden [N, H_t] (no gradient), weights [N] -> [].

    Heads are (weight [V, H], bias or None) pairs or linear layers. The rows are projected to the
    vocabularies `chunk_size` at a time under activation checkpointing, so at most [chunk_size, V]
    logits exist, forward or backward (the same-vocabulary losses' memory bound). Gradients reach
    the student's hidden states and head only."""
    def head(h):
        return (h.weight, getattr(h, "bias", None)) if isinstance(h, torch.nn.Module) else h

    (w_s, b_s), (w_t, b_t) = head(student_head), head(teacher_head)
    w_t, b_t = w_t.detach(), None if b_t is None else b_t.detach()
    teacher_hidden = teacher_hidden.detach()
    total = student_hidden.new_zeros((), dtype=torch.float32)
    if student_hidden.shape[0] == 0:
        return total + 0.0 * student_hidden.sum()
    for a in range(0, student_hidden.shape[0], chunk_size):
        rows = slice(a, a + chunk_size)
        args = (row_loss, student_hidden[rows], teacher_hidden[rows], weights[rows].float(), w_s, b_s, w_t, b_t)
        if torch.is_grad_enabled() and (student_hidden.requires_grad or w_s.requires_grad):
            total = total + checkpoint(_projected_chunk, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + _projected_chunk(*args)
    return total
