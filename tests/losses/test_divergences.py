"""Each loss against a naive float64 reference, plus the identities the formulas imply."""

import math

import pytest
import torch

from lmdistill import losses


def naive(name, s_logits, t_logits, mask, **kw):
    """Loop-over-tokens float64 reference, written straight from the formulas."""
    s_logits, t_logits = s_logits.double(), t_logits.double()
    total, count = 0.0, 0
    B, T, V = s_logits.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            q = torch.softmax(s_logits[b, t], -1)
            p = torch.softmax(t_logits[b, t], -1)

            def kl(a, c):
                return float((a * (a.log() - c.log())).sum())

            if name == "forward_kl":
                v = kl(p, q)
            elif name == "reverse_kl":
                v = kl(q, p)
            elif name == "generalized_jsd":
                beta = kw["beta"]
                m = beta * p + (1 - beta) * q
                v = beta * kl(p, m) + (1 - beta) * kl(q, m)
            elif name == "skewed_forward_kl":
                v = kl(p, kw["skew"] * p + (1 - kw["skew"]) * q)
            elif name == "skewed_reverse_kl":
                v = kl(q, kw["skew"] * q + (1 - kw["skew"]) * p)
            elif name == "total_variation":
                v = 0.5 * float((p - q).abs().sum())
            total += v
            count += 1
    return total / count if count else 0.0


CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5}), ("generalized_jsd", {"beta": 0.1}),
    ("skewed_forward_kl", {"skew": 0.1}), ("skewed_reverse_kl", {"skew": 0.1}), ("total_variation", {}),
]


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g) * 2
    t = torch.randn(3, 5, 11, generator=g) * 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_naive_float64_reference(inputs, name, kw):
    s, t, mask = inputs
    got = losses.DIVERGENCES[name](s, t, mask, **kw)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive(name, s, t, mask, **kw), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name,kw", CASES)
def test_divergence_of_a_distribution_from_itself_is_zero(inputs, name, kw):
    s, _, mask = inputs
    assert losses.DIVERGENCES[name](s, s.clone(), mask, **kw).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name,kw", CASES)
def test_all_masked_batch_gives_zero_not_nan(inputs, name, kw):
    s, t, mask = inputs
    out = losses.DIVERGENCES[name](s, t, torch.zeros_like(mask), **kw)
    assert out.item() == 0.0
    s = s.clone().requires_grad_(True)
    losses.DIVERGENCES[name](s, t, torch.zeros_like(mask), **kw).backward()
    assert torch.isfinite(s.grad).all()


def test_jsd_endpoints_are_the_two_kls(inputs):
    s, t, mask = inputs
    assert losses.generalized_jsd(s, t, mask, beta=0.0).item() == pytest.approx(losses.forward_kl(s, t, mask).item())
    assert losses.generalized_jsd(s, t, mask, beta=1.0).item() == pytest.approx(losses.reverse_kl(s, t, mask).item())


def test_skew_zero_is_plain_kl(inputs):
    s, t, mask = inputs
    assert losses.skewed_forward_kl(s, t, mask, skew=0.0).item() == pytest.approx(losses.forward_kl(s, t, mask).item())
    assert losses.skewed_reverse_kl(s, t, mask, skew=0.0).item() == pytest.approx(losses.reverse_kl(s, t, mask).item())


def test_masked_positions_do_not_matter(inputs):
    s, t, mask = inputs
    s2 = torch.where(mask.unsqueeze(-1), s, torch.randn_like(s) * 50)
    for name, kw in CASES:
        f = losses.DIVERGENCES[name]
        assert f(s2, t, mask, **kw).item() == pytest.approx(f(s, t, mask, **kw).item(), rel=1e-6)


def test_minus_inf_logits_give_finite_values_and_gradients():
    s = torch.randn(1, 2, 6, requires_grad=True)
    t = torch.randn(1, 2, 6)
    t[..., :2] = -math.inf  # a teacher that rules tokens out (top-k / vocabulary masks)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = losses.forward_kl(s, t, mask) + losses.generalized_jsd(s, t, mask, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_cross_entropy_matches_manual(inputs):
    s, _, mask = inputs
    labels = torch.randint(0, 11, mask.shape)
    logp = torch.log_softmax(s.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected = -(logp[mask]).mean().item()
    assert losses.cross_entropy(s, labels, mask).item() == pytest.approx(expected, rel=1e-5)


def test_invalid_beta_and_skew_are_rejected(inputs):
    s, t, mask = inputs
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(s, t, mask, beta=1.5)
    with pytest.raises(ValueError, match="skew"):
        losses.skewed_forward_kl(s, t, mask, skew=1.0)
