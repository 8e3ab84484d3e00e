"""Distillation across tokenizers: align two tokenizations of one text, compare their distributions.

When teacher and student tokenize differently, position t of one sequence does not predict the
same text as position t of the other, and vocabulary entry v means different strings. Following
ULD (Boizard et al. 2024) and TRL's GOLD (trl/experimental/gold/gold_trainer.py, TRL 1.16):

  1. `char_offsets`: the character span of every token, found by decoding growing prefixes.
  2. `align`: cut both token sequences wherever both have a token boundary at the same character
     position. Each `Span` is then a run of student tokens and a run of teacher tokens that spell
     the same text; `exact_matches` are the 1:1 spans (same string, one token each side).
  3. `merge_rows`: one distribution row per span for multi-token spans (TRL's merge strategies).
  4. `shared_vocabulary`: pairs of ids whose tokens are the same string in the two vocabularies.
  5. Losses on the aligned rows (float32 log-probs, a row mask, mean over valid rows):
     `uld_loss` compares sorted probability vectors, which needs no vocabulary mapping;
     `gold_loss` (TRL's hybrid) compares the shared sub-vocabulary entry by entry with the
     generalized JSD of `lmdistill.losses` and the rest with ULD. With one tokenizer on both
     sides the shared vocabulary is everything and `gold_loss` is the same-vocabulary divergence.

Both losses take `chunk_size`: rows are processed that many at a time under activation
checkpointing, so at most [chunk_size, V] vocabulary-sized tensors exist at once, forward or
backward. Gradients reach the student log-probs only; teacher inputs are detached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmdistill import losses

Tensor = torch.Tensor
Offsets = Sequence[tuple[int, int]]


# ----- 1. character spans -----

def char_offsets(tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = False) -> list[tuple[int, int]]:
    """Character span [start, end) of each token in `text = tokenizer.decode(ids, skip_special_tokens,
    clean_up_tokenization_spaces=False)`: list of len(ids) pairs.

    Reference method, independent of the tokenizer family (byte-level BPE, SentencePiece, ...):
    decode every prefix ids[:k]. A prefix that is a prefix of `text` ("clean") marks a boundary
    between whole characters at len(prefix). A prefix that is not clean ends inside a multi-byte
    character (the decoder shows U+FFFD for the incomplete bytes; HF's ByteLevel and ByteFallback
    decoders do) or in text a later token rewrites.

    Choice for tokens that split a character: a token's span is the smallest whole-character range
    holding its bytes. GPT-2's " 東" = 'Ġæ' 'Ŀ' '±' gets spans " 東", "東", "東": they overlap on 東,
    so no boundary falls inside a character, and the start of the next span is before the end of
    the previous one wherever a character is split. Characters are too coarse to say whether two
    tokenizers split a character's bytes in the same place, so `align` never cuts inside one.
    Other cases: special tokens get their literal text (or, with skip_special_tokens=True, an
    empty span where they stand, the text then having none of them); a token that adds no text
    (SentencePiece's bare '▁' at the start) gets an empty span. Cost: len(ids) decodes of up to
    len(ids) tokens, O(n^2); fine for training-length sequences.
    """
    ids = [int(i) for i in ids]

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    text = decode(ids)
    prefixes = [decode(ids[:k]) for k in range(len(ids) + 1)]
    clean = [text.startswith(p) for p in prefixes]

    # end_i: the first clean boundary at or after token i (ceil to a whole character); scanning
    # backwards with min also keeps the ends non-decreasing if a decoder is not prefix-monotone.
    ends, nxt = [0] * len(ids), len(text)
    for i in reversed(range(len(ids))):
        if clean[i + 1]:
            nxt = min(nxt, len(prefixes[i + 1]))
        ends[i] = nxt
    # start_i: the last clean character boundary at or before token i's first byte (floor). After
    # an unclean prefix that is where the common part with the text stops (the split character).
    spans, prev_start = [], 0
    for i in range(len(ids)):
        p = prefixes[i]
        start = len(p) if clean[i] else _common_prefix_len(p, text)
        if i > 0:
            start = min(start, ends[i - 1])  # never leave a gap after the previous token
        start = max(start, prev_start)
        spans.append((start, ends[i]))
        prev_start = start
    return spans


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ----- 2. alignment -----

@dataclass(frozen=True)
class Span:
    """Token index ranges [start, end) on both sides that spell the same text."""

    student: tuple[int, int]
    teacher: tuple[int, int]

    @property
    def is_exact(self) -> bool:
        """One student token <-> one teacher token."""
        return self.student[1] - self.student[0] == 1 and self.teacher[1] - self.teacher[0] == 1


def _cuts(offsets: Offsets, side: str) -> dict[int, list[int]]:
    """Character position -> the token indices k where one can cut (between tokens k-1 and k)."""
    for k, (a, b) in enumerate(offsets):
        if a > b or (k > 0 and (a < offsets[k - 1][0] or b < offsets[k - 1][1] or a > offsets[k - 1][1])):
            raise ValueError(f"align: {side} offsets must be ordered spans with no gap, bad token {k}: {(a, b)}")
    n = len(offsets)
    cuts: dict[int, list[int]] = {offsets[0][0]: [0]}
    for k in range(1, n + 1):
        end = offsets[k - 1][1]
        # A cut is clean where the next token starts exactly where this one ends; an overlap
        # means both tokens hold part of one character.
        if k == n or offsets[k][0] == end:
            cuts.setdefault(end, []).append(k)
    return cuts


def align(teacher_offsets: Offsets, student_offsets: Offsets) -> list[Span]:
    """Partition both token sequences into consecutive groups with coinciding character boundaries.

    A group ends at every character position c where both sides have a clean cut (a token ending
    at c and the next one starting at c): the finest partition in which each group holds the same
    text on both sides, so no group can be split further. Offsets are `char_offsets` of the same
    text (the caller decodes both to one string); both must cover the same range.

    Empty-span tokens (no text: skipped specials, SentencePiece's leading '▁') leave several cuts
    at one position. If both sides have the same number of them there, they are paired 1:1 (EOS
    with EOS, BOS with BOS); otherwise they join the neighbouring group: the preceding one, or the
    following one at the start of the text. Every group has at least one token on each side.

    Shapes: offsets lists of n_t and n_s (start, end) pairs -> list of Span, whose ranges tile
    [0, n_s) and [0, n_t) in order. Pure Python.
    """
    if not teacher_offsets or not student_offsets:
        if teacher_offsets or student_offsets:
            raise ValueError("align: one token sequence is empty and the other is not")
        return []
    t_cuts, s_cuts = _cuts(teacher_offsets, "teacher"), _cuts(student_offsets, "student")
    first, last = teacher_offsets[0][0], teacher_offsets[-1][1]
    if (student_offsets[0][0], student_offsets[-1][1]) != (first, last):
        raise ValueError(
            f"align: teacher covers characters [{first}, {last}), student "
            f"[{student_offsets[0][0]}, {student_offsets[-1][1]}): not the same text"
        )
    chosen: list[tuple[int, int]] = []  # (teacher cut, student cut), strictly increasing on both
    for c in sorted(t_cuts.keys() & s_cuts.keys()):
        a, b = t_cuts[c], s_cuts[c]
        if len(a) == len(b):
            chosen.extend(zip(a, b))
            continue
        if c == first:
            chosen.append((a[0], b[0]))
        if c != first or c == last:
            chosen.append((a[-1], b[-1]))
    return [Span(student=(s0, s1), teacher=(t0, t1)) for (t0, s0), (t1, s1) in zip(chosen, chosen[1:])]


def exact_matches(spans: Sequence[Span]) -> list[tuple[int, int]]:
    """(student index, teacher index) of every 1:1 span: the positions where both sides have one
    token with the same text, which token-level methods compare directly."""
    return [(sp.student[0], sp.teacher[0]) for sp in spans if sp.is_exact]


def merge_rows(logprobs: Tensor, token_ids: Sequence[int] | Tensor, groups: Sequence[tuple[int, int]],
               strategy: str = "observed") -> Tensor:
    """One log-distribution row per group of consecutive tokens: [L, V], [L], G ranges -> [G, V].

    Row k of `logprobs` is read with token_ids[k]; for a group [a, b) (TRL's
    `_merge_probabilities_with_alignment_groups`, gold_trainer.py:555-623, in log space):
      "observed" (TRL's default, gold_config.py:278): logprobs[a] + sum_{a<k<b} logprobs[k, ids[k]]
      "bayesian":                                     logprobs[b-1] + sum_{a<=k<b-1} logprobs[k, ids[k]]
    With rows that predict token k (logits shifted by one, TRL's "bayesian" slicing,
    gold_trainer.py:463) "bayesian" is the chain rule: P(actual tokens a..b-2, then v). TRL slices
    unshifted logits for "observed" (gold_trainer.py:466); pass such rows to reproduce it.
    The rows are not renormalised (as in TRL). A one-token group is its row unchanged. TRL clamps
    each scalar probability at 1e-8 (gold_trainer.py:611); log space needs no clamp.
    """
    if strategy not in ("observed", "bayesian"):
        raise ValueError(f"merge_rows: strategy must be 'observed' or 'bayesian', got {strategy!r}")
    ids = torch.as_tensor(token_ids, device=logprobs.device, dtype=torch.long)
    picked = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [L]: log-prob of the actual token
    rows = []
    for a, b in groups:
        if b <= a:
            raise ValueError(f"merge_rows: empty group {(a, b)}")
        base, rest = (a, slice(a + 1, b)) if strategy == "observed" else (b - 1, slice(a, b - 1))
        rows.append(logprobs[base] + picked[rest].sum() if b - a > 1 else logprobs[a])
    return torch.stack(rows) if rows else logprobs.new_zeros((0, logprobs.size(-1)))


# ----- 3. shared vocabulary -----

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE writes token bytes with it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _vocab_keys(tokenizer) -> dict[int, tuple[str, bytes, str, bool]]:
    """id -> (namespace, key bytes, raw token string, is a byte-fallback token)."""
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))  # added tokens are stored as literal text
    plain = [t for i, t in enumerate(tokens) if t is not None and i not in added]
    # Convention by majority of word-initial markers: 'Ġ' (byte-level BPE) or '▁' (SentencePiece).
    byte_level = sum(t.startswith("Ġ") for t in plain) > sum(t.startswith("▁") for t in plain)
    keys = {}
    for i, tok in enumerate(tokens):
        if tok is None:
            continue
        fallback = False
        if i in special:
            keys[i] = ("special", tok.encode(), tok, False)
            continue
        if i in added:
            key = tok.encode()
        elif byte_level and all(c in _BYTE_DECODER for c in tok):
            key = bytes(_BYTE_DECODER[c] for c in tok)
        elif not byte_level and (m := _BYTE_FALLBACK.fullmatch(tok)):
            key, fallback = bytes([int(m.group(1), 16)]), True
        else:
            key = tok.replace("▁", " ").encode() if not byte_level else tok.encode()
        keys[i] = ("text", key, tok, fallback)
    return keys


def shared_vocabulary(teacher_tokenizer, student_tokenizer) -> tuple[Tensor, Tensor]:
    """Pairs of ids that are the same string in both vocabularies: (teacher_ids, student_ids), LongTensor[M] each,
    sorted by teacher id, each id at most once per side.

    A token's string is its bytes: byte-level BPE tokens are mapped back through GPT-2's byte table
    ('Ġworld' -> b' world'), SentencePiece pieces have '▁' read as a space ('▁world' -> b' world') and
    byte-fallback pieces '<0xE6>' read as that byte; added tokens are their literal text. The convention is
    detected per tokenizer (more tokens starting with 'Ġ' than with '▁' means byte-level). Special tokens
    match only special tokens, by literal text, except that the two EOS tokens are always paired (the
    probability of stopping is the same event in both vocabularies).

    Ambiguities (several ids of one tokenizer with the same string, e.g. '▁' and '<0x20>'): within a
    string, ids whose raw token strings are identical on both sides are paired first (so one tokenizer
    against itself gives the identity), then the best remaining id of each side: not a byte-fallback
    piece, then the lowest id. TRL (gold_trainer.py:350-380) pairs only identical raw `get_vocab()`
    strings, so 'Ġworld' and '▁world' do not match there; they do here.
    """
    t_keys, s_keys = _vocab_keys(teacher_tokenizer), _vocab_keys(student_tokenizer)
    pairs: list[tuple[int, int]] = []
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if t_eos is not None and s_eos is not None and t_eos in t_keys and s_eos in s_keys:
        pairs.append((t_eos, s_eos))
        del t_keys[t_eos], s_keys[s_eos]

    def by_key(keys):
        groups: dict[tuple[str, bytes], list[tuple[bool, int, str]]] = {}
        for i, (space, key, raw, fallback) in keys.items():
            groups.setdefault((space, key), []).append((fallback, i, raw))
        return {k: sorted(v) for k, v in groups.items()}  # best first: not byte-fallback, then lowest id

    t_groups, s_groups = by_key(t_keys), by_key(s_keys)
    for key in t_groups.keys() & s_groups.keys():
        t_cands, s_cands = t_groups[key], s_groups[key]
        s_by_raw = {raw: i for _, i, raw in s_cands}
        used_t, used_s = set(), set()
        for _, i, raw in t_cands:
            if raw in s_by_raw:
                pairs.append((i, s_by_raw[raw]))
                used_t.add(i)
                used_s.add(s_by_raw[raw])
        t_rest = [i for _, i, _ in t_cands if i not in used_t]
        s_rest = [i for _, i, _ in s_cands if i not in used_s]
        if t_rest and s_rest:
            pairs.append((t_rest[0], s_rest[0]))
    pairs.sort()
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


# ----- 4. losses on aligned rows -----

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


__all__ = [
    "Span", "align", "aligned_loss", "char_offsets", "exact_matches", "gold_loss", "gold_row_loss", "merge_rows",
    "shared_vocabulary", "token_uld", "uld_loss",
]
