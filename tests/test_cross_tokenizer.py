"""Cross-tokenizer building blocks: offsets and alignment on the real GPT-2 and T5 tokenizers and on
hand-written offsets, the losses against naive float64 loops, and the one-tokenizer identity."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill import losses
from lmdistill.cross_tokenizer import Span, align, char_offsets, exact_matches, merge_rows, shared_vocabulary
from lmdistill.losses.cross_vocab import gold_loss, uld_loss

TOKENIZERS = Path(os.environ["LMDISTILL_DATA_DIR"]) / "tokenizers"


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2TokenizerFast

    # The gpt2 folder holds only vocab.json + merges.txt, which AutoTokenizer cannot place.
    return GPT2TokenizerFast.from_pretrained(str(TOKENIZERS / "gpt2"))


@pytest.fixture(scope="module")
def t5():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / "t5"))


_SHARED = {}


def shared_with_itself(tok):
    """shared_vocabulary(tok, tok), computed once per tokenizer (about a second each)."""
    if tok.name_or_path not in _SHARED:
        _SHARED[tok.name_or_path] = shared_vocabulary(tok, tok)
    return _SHARED[tok.name_or_path]


def decode(tok, ids, skip=False):
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


# ----- independent references for what a token spells -----

def gpt2_token_bytes(tok, ids, skip=False):
    """Bytes of each GPT-2 token, from transformers' own byte table (specials: literal or nothing)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    back = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for i, piece in zip(ids, tok.convert_ids_to_tokens(ids)):
        if i in tok.all_special_ids:
            out.append(b"" if skip else piece.encode())
        else:
            out.append(bytes(back[c] for c in piece))
    return out


def t5_piece_texts(tok, ids, skip=False):
    """Text of each T5 piece: '▁' is a space, specials literal (or nothing); the decoder drops the
    text's leading space, taken here from the first piece that has one."""
    out = []
    for i, piece in zip(ids, tok.convert_ids_to_tokens(ids)):
        out.append(("" if skip else piece) if i in tok.all_special_ids else piece.replace("▁", " "))
    for k, p in enumerate(out):
        if p:
            if p.startswith(" "):
                out[k] = p[1:]
            break
    return out


def spans_from_pieces(text, pieces):
    """Expected char_offsets from per-token byte strings: the smallest whole-character range
    containing each token's bytes."""
    bounds = [len(text[:c].encode()) for c in range(len(text) + 1)]  # byte position of each char boundary
    spans, pos = [], 0
    for piece in pieces:
        b0, b1 = pos, pos + len(piece)
        start = max(c for c, b in enumerate(bounds) if b <= b0)
        end = min(c for c, b in enumerate(bounds) if b >= b1)
        spans.append((start, end))
        pos = b1
    assert pos == bounds[-1]
    return spans


def check_partition(spans, n_teacher, n_student, t_off, s_off):
    """Spans tile both sequences in order, each side non-empty, with equal character ranges."""
    t_pos = s_pos = 0
    for sp in spans:
        assert sp.teacher[0] == t_pos and sp.student[0] == s_pos
        assert sp.teacher[1] > sp.teacher[0] and sp.student[1] > sp.student[0]
        t_pos, s_pos = sp.teacher[1], sp.student[1]
        assert t_off[sp.teacher[0]][0] == s_off[sp.student[0]][0]
        assert t_off[sp.teacher[1] - 1][1] == s_off[sp.student[1] - 1][1]
    assert (t_pos, s_pos) == (n_teacher, n_student)


# ----- alignment on hand-written offsets -----

@pytest.mark.parametrize("teacher, student, expected", [
    # "abcdefghi": teacher abc|de|fghi, student ab|cde|fg|hi -> common cuts at 5 and 9
    ([(0, 3), (3, 5), (5, 9)], [(0, 2), (2, 5), (5, 7), (7, 9)],
     [Span(student=(0, 2), teacher=(0, 2)), Span(student=(2, 4), teacher=(2, 3))]),
    # one side's empties: the leading one joins the following group, the trailing one the preceding
    ([(0, 0), (0, 2), (2, 4), (4, 4)], [(0, 1), (1, 2), (2, 4)],
     [Span(student=(0, 2), teacher=(0, 2)), Span(student=(2, 3), teacher=(2, 4))]),
    # as many empties on both sides at one position: paired 1:1 (BOS<->BOS, EOS<->EOS)
    ([(0, 0), (0, 2), (2, 2)], [(0, 0), (0, 1), (1, 2), (2, 2)],
     [Span(student=(0, 1), teacher=(0, 1)), Span(student=(1, 3), teacher=(1, 2)),
      Span(student=(3, 4), teacher=(2, 3))]),
    # teacher splits character 1 across two tokens (overlapping spans): no cut inside it
    ([(0, 2), (1, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)],
     [Span(student=(0, 2), teacher=(0, 2)), Span(student=(2, 3), teacher=(2, 3))]),
    # identical offsets: all 1:1
    ([(0, 1), (1, 3)], [(0, 1), (1, 3)], [Span(student=(0, 1), teacher=(0, 1)), Span(student=(1, 2), teacher=(1, 2))]),
])
def test_align_hand_written(teacher, student, expected):
    assert align(teacher, student) == expected
    assert exact_matches(expected) == [sp.student[0:1] + sp.teacher[0:1] for sp in expected if sp.is_exact]


def test_align_rejects_bad_offsets():
    with pytest.raises(ValueError, match="not the same text"):
        align([(0, 3)], [(0, 2)])
    with pytest.raises(ValueError, match="gap"):
        align([(0, 1), (2, 3)], [(0, 3)])
    with pytest.raises(ValueError, match="empty"):
        align([], [(0, 1)])
    assert align([], []) == []


def random_tiling(rng, length):
    cuts = sorted(rng.sample(range(1, length), rng.randint(0, length - 1))) if length > 1 else []
    bounds = [0] + cuts + [length]
    spans = []
    for a, b in zip(bounds, bounds[1:]):
        spans += [(a, a)] * (rng.random() < 0.2) + [(a, b)]
    return spans + [(length, length)] * (rng.random() < 0.3)


def clean_cuts(offsets):
    return {offsets[k][0] for k in range(1, len(offsets)) if offsets[k][0] == offsets[k - 1][1]}


@pytest.mark.parametrize("seed", range(40))
def test_align_random_tilings(seed):
    """Partition, coinciding boundaries, and finest: no group holds a position where both sides
    could be cut."""
    rng = random.Random(seed)
    length = rng.randint(1, 12)
    t_off, s_off = random_tiling(rng, length), random_tiling(rng, length)
    spans = align(t_off, s_off)
    check_partition(spans, len(t_off), len(s_off), t_off, s_off)
    for sp in spans:
        lo, hi = t_off[sp.teacher[0]][0], t_off[sp.teacher[1] - 1][1]
        inner = clean_cuts(t_off[sp.teacher[0]:sp.teacher[1]]) & clean_cuts(s_off[sp.student[0]:sp.student[1]])
        assert not {c for c in inner if lo < c < hi}
    assert align(t_off, t_off) == [Span(student=(k, k + 1), teacher=(k, k + 1)) for k in range(len(t_off))]


# ----- char_offsets on the real tokenizers -----

TEXTS = ["naïve café 東京 🙂", "a  b\n\n c", "Hello world, café 12345!", "(x) = y;\tz  "]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_char_offsets_gpt2_against_bytes(gpt2, text, skip):
    ids = gpt2.encode(text) + [gpt2.eos_token_id]
    decoded = decode(gpt2, ids, skip)
    assert decoded == text + ("" if skip else gpt2.eos_token)
    assert char_offsets(gpt2, ids, skip_special_tokens=skip) == spans_from_pieces(
        decoded, gpt2_token_bytes(gpt2, ids, skip)
    )


def test_char_offsets_gpt2_splits_characters(gpt2):
    """東京 and 🙂 are split across byte tokens: those tokens share the character's span."""
    ids = gpt2.encode("東京🙂")
    off = char_offsets(gpt2, ids)
    assert len(ids) > 3 and off[0][0] == 0 and off[-1][1] == 3
    assert any(off[k][0] < off[k - 1][1] for k in range(1, len(off)))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_char_offsets_t5_against_pieces(t5, text, skip):
    ids = t5.encode(text)  # ends with </s>; T5 folds whitespace and has <unk> for 東, 京, 🙂, ï
    pieces = t5_piece_texts(t5, ids, skip)
    decoded = decode(t5, ids, skip)
    assert decoded == "".join(pieces)
    assert char_offsets(t5, ids, skip_special_tokens=skip) == spans_from_pieces(decoded, [p.encode() for p in pieces])


# ----- alignment on the real tokenizers -----

@pytest.mark.parametrize("text", ["Hello world, café 12345!", "(x) = y; the naive approach 3.14"])
def test_align_gpt2_t5(gpt2, t5, text):
    g_ids, t_ids = gpt2.encode(text) + [gpt2.eos_token_id], t5.encode(text)
    assert decode(gpt2, g_ids, True) == decode(t5, t_ids, True) == text  # precondition: one text
    g_off = char_offsets(gpt2, g_ids, skip_special_tokens=True)
    t_off = char_offsets(t5, t_ids, skip_special_tokens=True)
    spans = align(g_off, t_off)  # teacher GPT-2, student T5
    check_partition(spans, len(g_ids), len(t_ids), g_off, t_off)
    g_bytes, t_texts = gpt2_token_bytes(gpt2, g_ids, True), t5_piece_texts(t5, t_ids, True)
    for sp in spans:
        piece = text[g_off[sp.teacher[0]][0]:g_off[sp.teacher[1] - 1][1]]
        assert b"".join(g_bytes[sp.teacher[0]:sp.teacher[1]]) == piece.encode()
        assert "".join(t_texts[sp.student[0]:sp.student[1]]) == piece
    matches = exact_matches(spans)
    assert (len(t_ids) - 1, len(g_ids) - 1) in matches  # EOS <-> EOS
    assert any(not sp.is_exact for sp in spans)  # e.g. ' 123' vs '▁' '123': the test is not trivial
    for s, t in matches:
        assert g_bytes[t] == t_texts[s].encode() or (s == 0 and g_bytes[t] == b" " + t_texts[s].encode())


def bytewise_ids(tok, ids, every=1):
    """The same text with every `every`-th GPT-2 token spelt one byte per token (byte tokens are all in the vocab)."""
    out = []
    for k, (i, piece) in enumerate(zip(ids, tok.convert_ids_to_tokens(ids))):
        out += [tok.convert_tokens_to_ids(ch) for ch in piece] if k % every == 0 else [i]
    return out


def check_byte_exact(tok, teacher_ids, student_ids):
    text = decode(tok, teacher_ids)
    assert decode(tok, student_ids) == text
    t_off, s_off = char_offsets(tok, teacher_ids), char_offsets(tok, student_ids)
    spans = align(t_off, s_off)
    check_partition(spans, len(teacher_ids), len(student_ids), t_off, s_off)
    t_bytes, s_bytes = gpt2_token_bytes(tok, teacher_ids), gpt2_token_bytes(tok, student_ids)
    for sp in spans:  # a cut inside a character would give different bytes on the two sides
        assert b"".join(t_bytes[slice(*sp.teacher)]) == b"".join(s_bytes[slice(*sp.student)])
    return spans


def test_align_split_characters(gpt2):
    ids = gpt2.encode("naïve café 東京 🙂 and more")
    check_byte_exact(gpt2, ids, bytewise_ids(gpt2, ids))
    spans = check_byte_exact(gpt2, ids, bytewise_ids(gpt2, ids, every=2))
    assert any(sp.is_exact for sp in spans) and any(not sp.is_exact for sp in spans)


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="ab ïé東京🙂\n", min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_align_resegmented_gpt2(gpt2, text, rnd):
    """GPT-2 against itself on a re-segmented text (pieces encoded separately): byte-exact groups."""
    cuts = sorted(rnd.sample(range(1, len(text)), rnd.randint(0, len(text) - 1))) if len(text) > 1 else []
    parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    student = [i for p in parts for i in gpt2.encode(p)]
    check_byte_exact(gpt2, gpt2.encode(text), student)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
@pytest.mark.parametrize("text", TEXTS + ["Hi there"])
def test_align_same_tokenizer(request, name, text):
    """One tokenizer on both sides: every span covers the same tokens on both sides, and is 1:1 unless
    it holds a character split across tokens (characters cannot show whether two splits agree)."""
    tok = request.getfixturevalue(name)
    ids = tok.encode(text) + ([tok.eos_token_id] if name == "gpt2" else [])
    off = char_offsets(tok, ids)
    spans = align(off, off)
    check_partition(spans, len(ids), len(ids), off, off)
    for sp in spans:
        assert sp.student == sp.teacher
        split = any(off[k][0] < off[k - 1][1] for k in range(sp.teacher[0] + 1, sp.teacher[1]))
        assert sp.is_exact != split
    if name == "t5" or text.isascii():
        assert all(sp.is_exact for sp in spans)


# ----- shared vocabulary -----

def test_shared_vocabulary_same_tokenizer(gpt2, t5):
    for tok in (gpt2, t5):
        t_ids, s_ids = shared_with_itself(tok)
        assert torch.equal(t_ids, torch.arange(len(tok))) and torch.equal(s_ids, t_ids)


def test_shared_vocabulary_gpt2_t5(gpt2, t5):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    back = {c: b for b, c in bytes_to_unicode().items()}
    t_ids, s_ids = shared_vocabulary(gpt2, t5)
    assert len(set(t_ids.tolist())) == len(t_ids) == len(set(s_ids.tolist())) > 10_000
    g_tokens, t_tokens = gpt2.convert_ids_to_tokens(t_ids.tolist()), t5.convert_ids_to_tokens(s_ids.tolist())
    for g, s, gt, tt in zip(t_ids.tolist(), s_ids.tolist(), g_tokens, t_tokens):
        if g == gpt2.eos_token_id:
            assert s == t5.eos_token_id
        else:
            assert bytes(back[c] for c in gt) == tt.replace("▁", " ").encode()
    pairs = set(zip(t_ids.tolist(), s_ids.tolist()))
    for g, s in [("Ġworld", "▁world"), ("ĠcafÃ©", "▁café"), (",", ",")]:  # TRL's raw-string match has only ','
        assert (gpt2.convert_tokens_to_ids(g), t5.convert_tokens_to_ids(s)) in pairs


class StubTokenizer:
    """Just what shared_vocabulary reads: a token list, special ids and the EOS id."""

    def __init__(self, tokens, special, eos):
        self.tokens, self.all_special_ids, self.eos_token_id = tokens, special, eos
        self.added_tokens_decoder = {i: tokens[i] for i in special}

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def test_shared_vocabulary_ambiguities():
    """Several ids spelling one string ('▁' and '<0x20>' are both b' '): identity against itself, else
    identical raw strings first, then not byte-fallback."""
    sp = StubTokenizer(["<pad>", "</s>", "<0x20>", "▁", "▁a", "a", "<0x61>"], special=[0, 1], eos=1)
    bl = StubTokenizer(["Ġ", "a", "Ġa", "<|endoftext|>"], special=[3], eos=3)
    t_ids, s_ids = shared_vocabulary(sp, sp)
    assert t_ids.tolist() == s_ids.tolist() == list(range(7))
    t_ids, s_ids = shared_vocabulary(sp, bl)
    assert list(zip(t_ids.tolist(), s_ids.tolist())) == [(1, 3), (3, 0), (4, 2), (5, 1)]


# ----- losses -----

def naive_uld_row(q, p, top_k=None):
    q, p = np.sort(q)[::-1], np.sort(p)[::-1]
    if top_k is not None:
        q, p = q[:top_k], p[:top_k]
    width = max(len(q), len(p))
    q, p = np.pad(q, (0, width - len(q))), np.pad(p, (0, width - len(p)))
    return np.abs(q - p).sum()


def naive_jsd(a, b, beta):
    """Generalized JSD of unnormalised student a, teacher b (float64 numpy), as TRL's generalized_jsd_loss."""
    def kl(x, y):
        return float((x * (np.log(x) - np.log(y))).sum())
    if beta == 0:
        return kl(b, a)
    if beta == 1:
        return kl(a, b)
    m = beta * b + (1 - beta) * a
    return beta * kl(b, m) + (1 - beta) * kl(a, m)


def naive_loss(s, t, mask, row):
    s = s.detach().double().exp().reshape(-1, s.size(-1)).numpy()
    t = t.detach().double().exp().reshape(-1, t.size(-1)).numpy()
    vals = [row(q, p) for q, p, m in zip(s, t, mask.reshape(-1).tolist()) if m]
    return sum(vals) / max(1, len(vals))


def naive_gold(s, t, mask, t_ids, s_ids, beta, w_m=None, w_u=None):
    t_ids, s_ids = t_ids.tolist(), s_ids.tolist()
    s_rest = [i for i in range(s.size(-1)) if i not in set(s_ids)]
    t_rest = [i for i in range(t.size(-1)) if i not in set(t_ids)]
    if w_m is None:
        w_m = len(t_ids) / t.size(-1)
        w_u = 1 - w_m
    return naive_loss(s, t, mask, lambda q, p: w_m * naive_jsd(q[s_ids], p[t_ids], beta)
                      + w_u * naive_uld_row(q[s_rest], p[t_rest]))


def rand_logprobs(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 2, -1).to(dtype)


MASK = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
T_IDS, S_IDS = torch.tensor([0, 2, 3, 5, 8]), torch.tensor([4, 0, 1, 6, 2])  # shared pairs, V_t = 11, V_s = 7


@pytest.mark.parametrize("top_k", [None, 3, 9, 100])
@pytest.mark.parametrize("v_s, v_t", [(7, 11), (11, 7), (6, 6)])
def test_uld_against_naive(v_s, v_t, top_k):
    s, t = rand_logprobs(2, 5, v_s, seed=1), rand_logprobs(2, 5, v_t, seed=2)
    got = uld_loss(s, t, MASK, top_k=top_k)
    assert got.item() == pytest.approx(naive_loss(s, t, MASK, lambda q, p: naive_uld_row(q, p, top_k)), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.2)])
def test_gold_against_naive(beta, weights):
    s, t = rand_logprobs(2, 5, 7, seed=3), rand_logprobs(2, 5, 11, seed=4)
    got = gold_loss(s, t, MASK, (T_IDS, S_IDS), beta=beta, matched_weight=weights[0], unmatched_weight=weights[1])
    want = naive_gold(s, t, MASK, T_IDS, S_IDS, beta, *weights)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_gradcheck():
    s, t = rand_logprobs(2, 5, 7, dtype=torch.float64, seed=5), rand_logprobs(2, 5, 11, dtype=torch.float64, seed=6)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, t, MASK), (s,))
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, t, MASK, top_k=4, chunk_size=3), (s,))
    for beta in (0.0, 0.5, 1.0):
        assert torch.autograd.gradcheck(lambda x: gold_loss(x, t, MASK, (T_IDS, S_IDS), beta=beta), (s,))
    assert torch.autograd.gradcheck(lambda x: gold_loss(x, t, MASK, (T_IDS, S_IDS), chunk_size=2), (s,))


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_gold_same_tokenizer_is_same_vocabulary_divergence(request, name):
    """One tokenizer: gold_loss equals lmdistill.losses' divergence on the same rows, values and gradients."""
    tok = request.getfixturevalue(name)
    shared = shared_with_itself(tok)
    g = torch.Generator().manual_seed(7)
    s_logits = (torch.randn(2, 3, len(tok), generator=g) * 3).requires_grad_(True)
    t_logits = torch.randn(2, 3, len(tok), generator=g) * 3
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    for beta, same_vocab in [(0.0, losses.forward_kl), (1.0, losses.reverse_kl),
                             (0.5, lambda s, t, m: losses.generalized_jsd(s, t, m, beta=0.5))]:
        ours = gold_loss(losses.log_probs(s_logits), losses.log_probs(t_logits), mask, shared, beta=beta, chunk_size=2)
        ref = same_vocab(s_logits, t_logits, mask)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
        (g_ours,), (g_ref,) = torch.autograd.grad(ours, s_logits), torch.autograd.grad(ref, s_logits)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-9)


def test_same_tokenizer_pipeline(gpt2):
    """Text -> offsets -> align -> merge_rows -> gold_loss equals forward KL over the tokens."""
    ids = gpt2.encode("Hello world, café 12345!")
    off = char_offsets(gpt2, ids)
    spans = align(off, off)
    s, t = rand_logprobs(len(ids), len(gpt2), seed=8), rand_logprobs(len(ids), len(gpt2), seed=9)
    s_rows = merge_rows(s, ids, [sp.student for sp in spans])
    t_rows = merge_rows(t, ids, [sp.teacher for sp in spans])
    mask = torch.ones(len(spans), dtype=torch.bool)
    ours = gold_loss(s_rows, t_rows, mask, shared_with_itself(gpt2), beta=0.0)
    torch.testing.assert_close(ours, losses.masked_mean(losses.token_forward_kl(s, t), torch.ones(len(ids))))


@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
def test_merge_rows_against_naive(strategy):
    lp = rand_logprobs(6, 5, seed=10)
    ids, groups = [3, 1, 4, 1, 0, 2], [(0, 1), (1, 3), (3, 6)]
    got = merge_rows(lp, ids, groups, strategy)
    for row, (a, b) in zip(got, groups):
        base = a if strategy == "observed" else b - 1
        scalars = sum(float(lp[k, ids[k]]) for k in range(a, b) if k != base)
        torch.testing.assert_close(row, lp[base] + scalars)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_chunked_equals_unchunked_and_teacher_gets_no_gradient(loss):
    def run(chunk_size):
        s = rand_logprobs(2, 5, 7, seed=11).requires_grad_(True)
        t = rand_logprobs(2, 5, 11, seed=12).requires_grad_(True)
        if loss == "uld":
            val = uld_loss(s, t, MASK, chunk_size=chunk_size)
        else:
            val = gold_loss(s, t, MASK, (T_IDS, S_IDS), chunk_size=chunk_size)
        val.backward()
        assert t.grad is None and s.grad.abs().sum() > 0
        assert s.grad[~MASK.bool()].abs().sum() == 0  # masked rows get nothing
        return val.detach(), s.grad

    ref_val, ref_grad = run(None)
    for chunk_size in (1, 2, 4, 100):
        val, grad = run(chunk_size)
        torch.testing.assert_close(val, ref_val)
        torch.testing.assert_close(grad, ref_grad)


def test_empty_mask_gives_zero_with_a_graph():
    s = rand_logprobs(2, 5, 7).requires_grad_(True)
    t = rand_logprobs(2, 5, 11)
    for val in (uld_loss(s, t, torch.zeros(2, 5)), gold_loss(s, t, torch.zeros(2, 5), (T_IDS, S_IDS))):
        assert val.item() == 0.0
        val.backward()
    with pytest.raises(ValueError):
        uld_loss(s, t, torch.ones(2, 4))
    with pytest.raises(ValueError):
        gold_loss(s, t, MASK, (T_IDS, S_IDS[:3]))


def test_aligned_loss_from_hidden_states_equals_the_row_loss_on_projected_rows_in_any_chunking():
    from lmdistill.losses.cross_vocab import aligned_loss, gold_row_loss, token_uld

    g = torch.Generator().manual_seed(11)
    n, h_s, h_t, v_s, v_t = 10, 6, 5, 17, 23
    hidden_s = torch.randn(n, h_s, generator=g, requires_grad=True)
    hidden_t = torch.randn(n, h_t, generator=g)
    w_s = torch.randn(v_s, h_s, generator=g, requires_grad=True)
    b_s = torch.randn(v_s, generator=g, requires_grad=True)
    w_t = torch.randn(v_t, h_t, generator=g, requires_grad=True)  # must receive no gradient
    weights = torch.rand(n, generator=g)
    shared = (torch.tensor([0, 3, 5, 7]), torch.tensor([1, 3, 4, 9]))
    for row_loss in (token_uld, gold_row_loss(shared, v_s, v_t, beta=0.3)):
        s = torch.log_softmax(hidden_s @ w_s.T + b_s, -1)
        t = torch.log_softmax(hidden_t @ w_t.T, -1).detach()
        want = (row_loss(s, t) * weights).sum()
        grads_want = torch.autograd.grad(want, (hidden_s, w_s, b_s))
        for chunk in (1, 3, 64):
            got = aligned_loss(row_loss, hidden_s, (w_s, b_s), hidden_t, (w_t, None), weights, chunk_size=chunk)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            grads = torch.autograd.grad(got, (hidden_s, w_s, b_s, w_t), allow_unused=True)
            for a, b in zip(grads[:3], grads_want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            assert grads[3] is None  # the teacher's head is a fixed target
