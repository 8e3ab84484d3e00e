"""Distillation across tokenizers: align two tokenizations of one text.

When teacher and student tokenize differently, position t of one sequence does not predict the
same text as position t of the other, and vocabulary entry v means different strings. Following
ULD (Boizard et al. 2024) and TRL's GOLD (trl/experimental/gold/gold_trainer.py, TRL 1.16):

  1. `char_offsets`: the character span of every token, found by decoding growing prefixes.
  2. `align`: cut both token sequences wherever both have a token boundary at the same character
     position. Each `Span` is then a run of student tokens and a run of teacher tokens that spell
     the same text; `exact_matches` are the 1:1 spans (same string, one token each side).
  3. `merge_rows`: one distribution row per span for multi-token spans (TRL's merge strategies).
  4. `shared_vocabulary`: pairs of ids whose tokens are the same string in the two vocabularies.

The losses on the aligned rows (ULD, GOLD) are `lmdistill.losses.cross_vocab`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

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


__all__ = ["Span", "align", "char_offsets", "exact_matches", "merge_rows", "shared_vocabulary"]
