"""Losses from final hidden states, projected to the vocabulary a chunk of rows at a time.

The largest tensors of a KD step are the logits: for SmolLM2 (V = 49,152) one float32
[4, 256, V] tensor is 200 MB, and a naive divergence keeps several (logits, log-softmax,
probabilities and their gradients) for the teacher and the student, at every position,
prompt included. Here a loss is computed from the models' final hidden states instead
(as Liger-Kernel's fused linear losses and TRL's DistillationTrainer do):

  1. keep only the rows that count (response positions where `mask` is set):
        h_s [N, H_s] (student), h_t [N, H_t] (teacher);
  2. for each chunk of n <= 256 rows (`rows_per_chunk`: fewer for large vocabularies):
        z_s = h_s W_s^T + b_s,  z_t = h_t W_t^T + b_t                         [n, V]
        l_s = log_softmax(float32(z_s)),  l_t = log_softmax(float32(z_t))
        L  += sum_rows token_loss(l_s, l_t)          (`losses.token_*`)
     and, in the same pass, dL/dz of this chunk alone (autograd on the chunk), pushed
     back through the projection at once:
        dh = dz W,   dW += dz^T h,   db += sum_rows dz;
  3. return L / N (0 when N = 0).

Backward only scales the stored gradients by the incoming one, so no vocabulary-sized
tensor outlives its chunk, in forward or backward: the extra memory is a few [n, V]
float32 tensors plus one [V, H] weight gradient. Values and gradients equal the naive
`lmdistill.losses` functions on full logits up to float rounding (tests/losses/test_chunked_losses.py).

Precision: the projection runs in the autocast dtype when autocast is on (bf16 student,
float32 master weights), otherwise in the weights' dtype (a bf16 teacher stays bf16);
log-softmax and every divergence are always float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmdistill import losses

Tensor = torch.Tensor
CHUNK_SIZE = 256  # the most rows projected to the vocabulary at once
# ... and fewer for large vocabularies: a divergence's autograd graph holds ~10 [rows, V]
# float32 tensors per chunk, so rows x V is kept near 4M (16 MB per tensor; 85 rows for
# SmolLM2's 49,152 tokens). Below ~64 rows the projection matmul would get inefficient.
CHUNK_ELEMENTS = 2**22


def rows_per_chunk(vocab_size: int, chunk_size: Optional[int] = None) -> int:
    """`chunk_size` if given, else min(CHUNK_SIZE, max(64, CHUNK_ELEMENTS // vocab_size))."""
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        return chunk_size
    return min(CHUNK_SIZE, max(64, CHUNK_ELEMENTS // vocab_size))

# Per-token divergences on float32 log-probs: (student [n, V], teacher [n, V]) -> [n].
TOKEN_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": losses.token_forward_kl,
    "reverse_kl": losses.token_reverse_kl,
    "generalized_jsd": losses.token_generalized_jsd,
    "skewed_forward_kl": losses.token_skewed_forward_kl,
    "skewed_reverse_kl": losses.token_skewed_reverse_kl,
    "total_variation": losses.token_total_variation,
    "tvd": losses.token_total_variation,
}


def token_divergence(name: str, **params) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-token form of `losses.<name>` with its parameters (beta, skew) bound.

    Defaults and range checks are those of the naive function, so `divergence="generalized_jsd"`
    means beta = 0.5 here exactly as it does in `losses.generalized_jsd`.
    """
    if name not in TOKEN_DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}: expected one of {sorted(TOKEN_DIVERGENCES)}")
    naive = losses.DIVERGENCES[name]
    defaults = {k: v.default for k, v in _parameters(naive).items()}
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"divergence {name!r} takes {sorted(defaults) or 'no parameters'}, got {sorted(unknown)}")
    bound = {**defaults, **params}
    tiny = torch.zeros(1, 1, 2)
    naive(tiny, tiny, torch.ones(1, 1), **bound)  # the naive function's own range checks
    token_fn = TOKEN_DIVERGENCES[name]
    return lambda s, t: token_fn(s, t, *bound.values())


def _parameters(fn) -> dict:
    import inspect

    return {k: v for k, v in list(inspect.signature(fn).parameters.items())[3:]}


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """bf16 under autocast (the student), else the weights' own dtype (e.g. a bf16 teacher)."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


# ----- per-chunk kernels: (z_s, z_t, rows, need_s, need_t) -> (loss [n], terms [n, m] | None, dz_s, dz_t) -----
# z_s, z_t: one chunk's logits [n, V] (bf16 or float32; z_t None without a dense teacher);
# rows: that chunk's row data; dz_*: d(sum of the chunk's loss)/dz, float32, or None if not needed.

def autograd_kernel(token_loss: Callable) -> Callable:
    """Any token loss on float32 log-probs, differentiated by autograd on the chunk alone."""
    def kernel(z_s, z_t, rows, need_s, need_t):
        z_s = z_s.float().requires_grad_(need_s)
        z_t = None if z_t is None else z_t.float().requires_grad_(need_t)
        with torch.enable_grad():
            out = token_loss(losses.log_probs(z_s), None if z_t is None else losses.log_probs(z_t), *rows)
            per_row, terms = out if isinstance(out, tuple) else (out, None)
            wanted = [z for z in (z_s, z_t) if z is not None and z.requires_grad]
            grads = iter(torch.autograd.grad(per_row.sum(), wanted)) if wanted else iter(())
        dz_s = next(grads) if z_s.requires_grad else None
        dz_t = next(grads) if z_t is not None and z_t.requires_grad else None
        return per_row.detach(), None if terms is None else terms.detach(), dz_s, dz_t
    return kernel


def _softmax_backward_(g: Tensor, probs: Tensor) -> Tensor:
    """dL/dz from dL/dlogp through log_softmax, in place on g: g - softmax(z) * sum(g)."""
    return g.addcmul_(probs, g.sum(-1, keepdim=True), value=-1.0)


def closed_form_kernel(divergence: str, beta: float = 0.5, ce_weight: float = 0.0, with_labels: bool = False):
    """(1 - ce_weight) D + ce_weight CE with analytic gradients, for D in forward_kl, reverse_kl,
    generalized_jsd, total_variation (= tvd): the same values and gradients as autograd on `losses.token_*` (tested),
    in a third of the [n, V] passes. With p = softmax(z_t), q = softmax(z_s), lowercase logs:
      forward KL  sum p (t - s):            dz_s = q sum(p) - p,   dz_t = g - p sum(g), g = p (t - s + 1)
      reverse KL  sum q (s - t):            dz_s = g - q sum(g), g = q (s - t + 1);  dz_t = -q + p sum(q)
      JSD_beta    beta sum p (t - m) + (1 - beta) sum q (s - m),  m = log(beta p + (1 - beta) q):
                  dz_s = g - q sum(g), g = (1 - beta) q (s - m);  dz_t likewise with g = beta p (t - m)
      TV          1/2 sum |p - q|:          dz_s = g - q sum(g), g = -q sign(p - q) / 2;  dz_t likewise,
                                            g = p sign(p - q) / 2
      CE          -s[y]:                    dz_s = q - onehot(y)
    Log-probs are floored at -1e4 as in `losses` (masked vocabularies: exp(-1e4) = 0).
    """
    if divergence == "generalized_jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    floor = losses._LOG_FLOOR

    def kernel(z_s, z_t, rows, need_s, need_t):
        s = torch.log_softmax(z_s, -1, dtype=torch.float32).clamp_(min=floor)
        t = torch.log_softmax(z_t, -1, dtype=torch.float32)
        # Only -inf (masked) entries fall below the floor; the clamp cuts their gradient.
        t_masked = t < floor if divergence == "reverse_kl" and need_t else None
        t.clamp_(min=floor)
        q, p = s.exp(), t.exp()
        nll = -s.gather(-1, rows[0].unsqueeze(-1)).squeeze(-1) if with_labels else None
        dz_s = dz_t = None
        if divergence == "forward_kl":
            g_t = (t - s).mul_(p)
            row = g_t.sum(-1)
            if need_s:
                dz_s = torch.mul(q, p.sum(-1, keepdim=True)).sub_(p)
            if need_t:
                dz_t = _softmax_backward_(g_t.add_(p), p)
        elif divergence == "reverse_kl":
            g_s = (s - t).mul_(q)
            row = g_s.sum(-1)
            if need_t:
                dz_t = _softmax_backward_((-q).masked_fill_(t_masked, 0.0), p)
            if need_s:
                dz_s = _softmax_backward_(g_s.add_(q), q)
        elif divergence in ("total_variation", "tvd"):
            diff = p - q
            row = diff.abs().sum(-1).mul_(0.5)
            half_sign = diff.sign_().mul_(0.5)  # dTV/dp; dTV/dq is its negative (sign(0) = 0, as autograd's abs)
            if need_t:
                dz_t = _softmax_backward_(p * half_sign, p)
            if need_s:
                dz_s = _softmax_backward_(half_sign.mul_(q).neg_(), q)
        else:  # generalized_jsd, 0 < beta < 1
            m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta)).clamp_(min=floor)
            g_t = t.sub_(m).mul_(p).mul_(beta)
            g_s = s.sub_(m).mul_(q).mul_(1.0 - beta)
            row = g_t.sum(-1) + g_s.sum(-1)
            if need_s:
                dz_s = _softmax_backward_(g_s, q)
            if need_t:
                dz_t = _softmax_backward_(g_t, p)
        if not with_labels:
            return row, row.unsqueeze(-1), dz_s, dz_t
        loss = (1.0 - ce_weight) * row + ce_weight * nll
        if dz_s is not None and ce_weight:
            dz_s.mul_(1.0 - ce_weight).add_(q, alpha=ce_weight)
            dz_s.scatter_add_(-1, rows[0].unsqueeze(-1), torch.full_like(nll, -ce_weight).unsqueeze(-1))
        if dz_t is not None:
            dz_t.mul_(1.0 - ce_weight)
        return loss, torch.stack([row, nll], dim=-1), dz_s, dz_t

    return kernel


CLOSED_FORM = ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "tvd")


def cross_entropy_kernel(z_s, z_t, rows, need_s, need_t):
    """CE -s[y] with dz_s = softmax(z_s) - onehot(y)."""
    s = torch.log_softmax(z_s, -1, dtype=torch.float32)
    labels = rows[0].unsqueeze(-1)
    nll = -s.gather(-1, labels).squeeze(-1)
    dz_s = None
    if need_s:
        dz_s = s.exp_().scatter_add_(-1, labels, torch.full_like(labels, -1.0, dtype=torch.float32))
    return nll, None, dz_s, None


class _ChunkedLoss(torch.autograd.Function):
    """mean over rows of kernel(h_s W_s^T + b_s, h_t W_t^T + b_t, row_data) (see the kernels above).

    The teacher side (h_t, w_t, b_t) may be None (cross-entropy, cached teacher). `row_data`
    are row-aligned tensors without gradient (labels, cached top-k ids and log-probs),
    sliced with the rows. Returns (mean loss, mean of the reported terms or an empty tensor).
    """

    @staticmethod
    def forward(ctx, kernel, chunk_size, row_data, h_s, w_s, b_s, h_t, w_t, b_t):
        sides = [(h_s, w_s, b_s), (h_t, w_t, b_t)]
        needs = ctx.needs_input_grad[3:]
        # Weights in the projection dtype (bf16 under autocast), cast once per call, not per chunk.
        projections = [None if h is None else (w.to(_compute_dtype(w)), None if b is None else b.to(_compute_dtype(w)))
                       for h, w, b in sides]
        # Gradients are kept in the projection dtype; autograd casts them to the inputs' dtypes.
        # (A bf16 weight gradient summed over chunks, each chunk's matmul accumulating in float32:
        # adding into a float32 buffer instead costs a [V, H] conversion per chunk.)
        grads = []
        for side, (h, w, b) in enumerate(sides):
            dtype = None if h is None else projections[side][0].dtype
            grads += [torch.zeros_like(x, dtype=dtype) if x is not None and need else None
                      for x, need in zip((h, w, b), needs[3 * side:3 * side + 3])]
        n_rows = h_s.shape[0]
        scale = 1.0 / max(n_rows, 1)  # the mean over rows, folded into each chunk's dL/dz
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        terms_total = None  # per-row values the loss only reports (e.g. its CE and KL parts)
        for start in range(0, max(n_rows, 1), chunk_size):  # an empty batch still runs once: 0 and term shapes
            rows = slice(start, start + chunk_size)
            logits, inputs = [], []
            for h, _, _ in sides:
                w, b = projections[len(logits)] or (None, None)
                inputs.append(None if h is None else h[rows].to(w.dtype))
                logits.append(None if h is None else F.linear(inputs[-1], w, b))
            per_row, terms, *dz = kernel(logits[0], logits[1], [d[rows] for d in row_data],
                                         any(needs[0:3]), any(needs[3:6]))
            total += per_row.sum()
            if terms is not None:
                terms = terms.sum(0)
                terms_total = terms if terms_total is None else terms_total + terms
            for side, dz_side in enumerate(dz):
                if dz_side is None:
                    continue
                w, _ = projections[side]
                g_h, g_w, g_b = grads[3 * side:3 * side + 3]
                dz_c = torch.mul(dz_side, scale, out=torch.empty_like(dz_side, dtype=w.dtype))
                if g_h is not None:
                    g_h[rows] = dz_c @ w
                if g_w is not None:
                    g_w.addmm_(dz_c.T, inputs[side])
                if g_b is not None:
                    g_b += dz_c.sum(0)
        ctx.grads = grads
        terms_mean = total.new_zeros(0) if terms_total is None else terms_total * scale
        ctx.mark_non_differentiable(terms_mean)
        return total * scale, terms_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        out = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return (None, None, None, *out)


def _head(head) -> tuple[Tensor, Optional[Tensor]]:
    """(weight [V, H], bias [V] or None) of an output layer (nn.Linear or a (weight, bias) pair)."""
    if isinstance(head, nn.Module):
        return head.weight, getattr(head, "bias", None)
    weight, bias = head
    return weight, bias


def shared_rows(*heads, rows: Optional[int] = None) -> list[tuple[Tensor, Optional[Tensor]]]:
    """The heads cut to the vocabulary rows they all have (and to `rows`, e.g. a teacher cache's
    vocabulary, when given). One tokenizer's embedding matrices are often padded to different
    sizes (Qwen2.5: 151,936 and 152,064 rows for 151,665 tokens); the padding rows sit at the
    end, so the first min(rows) rows are the shared vocabulary."""
    pairs = [_head(h) for h in heads]
    rows = min([w.shape[0] for w, _ in pairs] + ([rows] if rows is not None else []))
    # A head that already has `rows` rows is returned as it is: a full-length slice would still add
    # a SliceBackward node, which zero-fills and copies a whole [V, H] weight gradient every step
    # (21% of the Qwen pair's KD step in fill_ alone: bench/results/vs_trl-profile-qwen-coder-*).
    return [(w, b) if w.shape[0] == rows else (w[:rows], None if b is None else b[:rows]) for w, b in pairs]


def fixed(head) -> tuple[Tensor, Optional[Tensor]]:
    """An output layer as a fixed target: its (weight, bias) detached, so that a loss through it
    gives the layer no gradient (e.g. the student's head inside PromptKD's prompt update)."""
    weight, bias = _head(head)
    return weight.detach(), None if bias is None else bias.detach()


def chunked_loss(
    token_loss: Callable[..., Tensor],
    student_hidden: Tensor,
    student_head,
    mask: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_head=None,
    row_data: Sequence[Tensor] = (),
    chunk_size: Optional[int] = None,
    kernel: Optional[Callable] = None,
) -> Tensor:
    """Mean over the rows where `mask` is set of `token_loss(student_logprobs, teacher_logprobs, *row_data)`.

    Shapes: student_hidden [B, T, H_s], teacher_hidden [B, T, H_t] or None, mask [B, T],
    each of row_data [B, T, ...]; heads are the models' output layers (`lm_head`).
    The token loss takes float32 log-probs [n, V] and returns [n], or a pair
    ([n] loss, [n, m] terms to report): then the result is (loss, [m] term means).
    `kernel` (a closed-form kernel above) replaces autograd on `token_loss`.
    """
    mask = mask.bool()
    if student_hidden.shape[:-1] != mask.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} does not match mask {tuple(mask.shape)}")
    h_s = student_hidden[mask]
    w_s, b_s = _head(student_head)
    h_t = w_t = b_t = None
    if teacher_hidden is not None:
        if teacher_hidden.shape[:-1] != mask.shape:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} does not match mask {tuple(mask.shape)}")
        h_t = teacher_hidden[mask]
        w_t, b_t = _head(teacher_head)
        (w_s, b_s), (w_t, b_t) = shared_rows((w_s, b_s), (w_t, b_t))
    rows = tuple(d[mask] for d in row_data)
    chunk_size = rows_per_chunk(w_s.shape[0], chunk_size)
    kernel = kernel or autograd_kernel(token_loss)
    loss, terms = _ChunkedLoss.apply(kernel, chunk_size, rows, h_s, w_s, b_s, h_t, w_t, b_t)
    return (loss, terms) if terms.numel() else loss


def chunked_divergence(
    student_hidden: Tensor,
    student_head,
    teacher_hidden: Tensor,
    teacher_head,
    mask: Tensor,
    divergence: str = "forward_kl",
    chunk_size: Optional[int] = None,
    **params,
) -> Tensor:
    """`losses.<divergence>(student_head(student_hidden), teacher_head(teacher_hidden), mask, **params)`
    without full logits. Shapes: [B, T, H_s], [B, T, H_t], [B, T] -> []."""
    per_token = token_divergence(divergence, **params)  # validates the parameters
    kernel = closed_form_kernel(divergence, **params) if divergence in CLOSED_FORM else None
    out = chunked_loss(per_token, student_hidden, student_head, mask, teacher_hidden, teacher_head,
                       chunk_size=chunk_size, kernel=kernel)
    return out[0] if isinstance(out, tuple) else out


def chunked_cross_entropy(hidden: Tensor, head, labels: Tensor, mask: Tensor,
                          chunk_size: Optional[int] = None) -> Tensor:
    """`losses.cross_entropy(head(hidden), labels, mask)` without full logits.
    Shapes: hidden [B, T, H], labels [B, T], mask [B, T] -> []."""
    return chunked_loss(
        None, hidden, head, mask, row_data=(labels,), chunk_size=chunk_size, kernel=cross_entropy_kernel
    )


@dataclass
class CachedTargets:
    """A cached teacher (`lmdistill.teacher.cache`) for a batch, aligned with `batch.targets()`:
    its top-k token ids [B, T, k], their log-probs [B, T, k], and the log of the mass
    outside them [B, T] (`-inf` when k = V: nothing is outside). `known` [B, T] (bool, or
    None for all): positions whose teacher distribution is known; the others leave the loss
    (a served teacher gives none over some tokens, `lmdistill.teacher.served`)."""

    ids: Tensor
    logprobs: Tensor
    rest: Tensor
    known: Optional[Tensor] = None


def coarsen(logprobs: Tensor, ids: Tensor) -> Tensor:
    """Log-probs of the k tokens `ids` and of "any other token": [n, V], [n, k] -> [n, k+1].
    An id of -1 is an empty slot (a row with fewer than k known tokens): log-prob -inf on both
    sides, so it adds nothing to any divergence, and "any other token" stays the complement."""
    valid = ids >= 0
    safe = ids.clamp(min=0)
    kept = logprobs.gather(-1, safe).masked_fill(~valid, float("-inf"))
    if bool(valid.all()):
        rest = logprobs.scatter(-1, ids, float("-inf"))
    else:  # mark the valid ids only (a duplicate index with two values would make scatter undefined)
        taken = torch.zeros_like(logprobs).scatter_reduce(-1, safe, valid.to(logprobs.dtype), reduce="amax")
        rest = logprobs.masked_fill(taken.bool(), float("-inf"))
    return torch.cat([kept, rest.logsumexp(-1, keepdim=True)], dim=-1)


def outcome_logprobs(cached: CachedTargets, labels: Tensor) -> Tensor:
    """The teacher's log-prob of each label's outcome among its k + 1 (the label itself when in
    its top k, else "any other token"): [B, T, k] top-k + [B, T] labels -> [B, T]."""
    among = cached.ids == labels.unsqueeze(-1)
    picked = cached.logprobs.gather(-1, among.float().argmax(-1, keepdim=True)).squeeze(-1)
    return torch.where(among.any(-1), picked, cached.rest)


def chunked_kd_loss(
    student_hidden: Tensor,
    student_head,
    mask: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_head=None,
    cached: Optional[CachedTargets] = None,
    divergence: str = "forward_kl",
    labels: Optional[Tensor] = None,
    ce_weight: float = 0.0,
    chunk_size: Optional[int] = None,
    **params,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(loss, divergence, cross-entropy) of  L = (1 - ce_weight) D(p_T, q_S) + ce_weight CE(labels; q_S),
    each a mean over the response rows, in one chunked pass over the student's vocabulary.

    The teacher is either dense (`teacher_hidden` [B, T, H_t] + `teacher_head`) or a top-k
    cache (`cached`): then D is taken between the (k+1)-way coarsened distributions
    (the k cached tokens and "any other token"), see `lmdistill.teacher.cache`.
    Shapes: student_hidden [B, T, H_s], mask [B, T], labels [B, T] -> [], [], [] or None.
    """
    if (teacher_hidden is None) == (cached is None):
        raise ValueError("chunked_kd_loss: give exactly one of teacher_hidden (dense teacher) or cached (top-k cache)")
    if ce_weight and labels is None:
        raise ValueError("chunked_kd_loss: ce_weight > 0 needs labels")
    per_token = token_divergence(divergence, **params)
    row_data = ([] if labels is None else [labels]) + (
        [] if cached is None else [cached.ids, cached.logprobs, cached.rest]
    )

    def token_loss(s, t, *rows):
        rows = list(rows)
        target = rows.pop(0) if labels is not None else None
        if cached is None:
            d = per_token(s, t)
        elif rows[0].shape[-1] == s.shape[-1] and bool((rows[0] >= 0).all()):  # k = V: the dense teacher
            d = per_token(s.gather(-1, rows[0]), rows[1])
        else:
            ids, top, rest = rows
            d = per_token(coarsen(s, ids), torch.cat([top, rest.unsqueeze(-1)], dim=-1))
        if target is None:
            return d, d.unsqueeze(-1)
        nll = -s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (1.0 - ce_weight) * d + ce_weight * nll, torch.stack([d, nll], dim=-1)

    kernel = None
    if cached is None and divergence in CLOSED_FORM:
        kernel = closed_form_kernel(divergence, ce_weight=ce_weight, with_labels=labels is not None, **params)
    loss, terms = chunked_loss(
        token_loss,
        student_hidden,
        student_head,
        mask,
        teacher_hidden,
        teacher_head,
        row_data,
        chunk_size,
        kernel=kernel,
    )
    return loss, terms[0], (terms[1] if labels is not None else None)


@torch.no_grad()
def chunked_token_logprobs(
    hidden: Tensor, head, labels: Tensor, mask: Tensor, chunk_size: Optional[int] = None,
    outcomes: Optional[Tensor] = None,
) -> Tensor:
    """log softmax(head(hidden))[labels] where `mask` is set, 0 elsewhere; no gradient.
    With `outcomes` (top-k ids [B, T, k], -1 empty), the log-prob of each label's outcome among
    the k + 1 of `coarsen`: the label itself when among them, else "any other token".
    Shapes: hidden [B, T, H], labels [B, T], mask [B, T] -> [B, T] (float32)."""
    mask = mask.bool()
    weight, bias = _head(head)
    chunk_size = rows_per_chunk(weight.shape[0], chunk_size)
    rows, targets = hidden[mask], labels[mask]
    kept = None if outcomes is None else outcomes[mask]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    picked = []
    for i in range(0, len(rows), chunk_size):
        logprobs = losses.log_probs(F.linear(rows[i : i + chunk_size].to(weight.dtype), weight, bias))
        target = targets[i : i + chunk_size].unsqueeze(-1)
        if kept is None:
            picked.append(logprobs.gather(-1, target).squeeze(-1))
            continue
        ids = kept[i : i + chunk_size]
        coarse = coarsen(logprobs, ids)  # [n, k + 1]: the k tokens, then "any other token"
        picked.append(outcome_logprobs(CachedTargets(ids, coarse[:, :-1], coarse[:, -1]), target.squeeze(-1)))
    if picked:
        out[mask] = torch.cat(picked)
    return out
