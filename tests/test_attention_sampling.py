"""Attention sampling: draws follow the attention; estimates and their gradients are unbiased."""
from __future__ import annotations

import itertools

import pytest
import torch

from engines import attention_sampling as ats


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _problem(n: int = 6, d: int = 3, seed: int = 0):
    """A small attention map (softmax of fixed logits), fixed features and an upstream
    gradient direction v (the loss is <v, estimate>)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g)
    feats = torch.randn(n, d, generator=g)
    v = torch.randn(d, generator=g)
    return logits, feats, v


def _exact(logits, feats, v):
    """Value and gradients (wrt attention and features) of <v, sum_i a_i f_i>."""
    a = torch.softmax(logits, 0)
    value = (a[:, None] * feats).sum(0)
    return value, feats @ v, a[:, None] * v[None, :]


def _leaves(logits, feats):
    a = torch.softmax(logits, 0).detach().requires_grad_(True)
    f = feats.clone().requires_grad_(True)
    return a, f


def _monte_carlo(estimator, sampler, logits, feats, v, k, draws, seed):
    """Average value and gradients of ``estimator`` over ``draws`` seeded samples."""
    a, f = _leaves(logits, feats)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(feats.shape[1])
    for _ in range(draws):
        idx = sampler(a, k, g)
        total = total + estimator(a, idx, f[idx])
    total = total / draws
    (total @ v).backward()
    return total.detach(), a.grad, f.grad


def _inclusive_variant(attention, indices, features):
    """The bug of two public ports: p from an inclusive cumsum with a_s added back. The
    forward equals the exclusive estimator; a_s leaks gradient into its own weight."""
    a = attention[indices]
    weighted = a[:, None] * features
    seen = torch.cumsum(weighted, 0) - weighted
    left = 1.0 - torch.cumsum(a, 0).detach() + a
    steps = seen + (left * a / a.detach())[:, None] * features
    return steps.mean(0)


def _enumerate_without_replacement(estimator, logits, feats, v, k):
    """Exact expectation (over every ordered draw of k distinct items) of the value and of
    the gradients of <v, estimate>."""
    a, f = _leaves(logits, feats)
    p = a.detach()
    total = torch.zeros(feats.shape[1])
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= float(p[i]) / left
            left -= float(p[i])
        idx = torch.tensor(seq)
        total = total + prob * estimator(a, idx, f[idx])
    (total @ v).backward()
    return total.detach(), a.grad, f.grad


# -- exact expectations (enumeration): tight checks -----------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_without_replacement_is_exactly_unbiased_with_unbiased_gradients(k):
    logits, feats, v = _problem(n=5, seed=1)
    value, ga, gf = _enumerate_without_replacement(
        ats.expectation_without_replacement, logits, feats, v, k)
    want, want_ga, want_gf = _exact(logits, feats, v)
    assert torch.allclose(value, want, atol=1e-5)
    assert torch.allclose(ga, want_ga, atol=1e-4)
    assert torch.allclose(gf, want_gf, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_inclusive_cumsum_variant_fails_the_same_gradient_check(k):
    logits, feats, v = _problem(n=5, seed=1)
    value, ga, _ = _enumerate_without_replacement(_inclusive_variant, logits, feats, v, k)
    want, want_ga, _ = _exact(logits, feats, v)
    assert torch.allclose(value, want, atol=1e-5)  # the forward cannot tell them apart
    assert (ga - want_ga).abs().max() > 0.1  # the gradient can


def test_with_replacement_single_draw_is_exactly_unbiased():
    logits, feats, v = _problem(n=5, seed=2)
    a, f = _leaves(logits, feats)
    p = a.detach()
    total = torch.zeros(feats.shape[1])
    for i in range(5):
        idx = torch.tensor([i])
        total = total + p[i] * ats.expectation_with_replacement(a, idx, f[idx])
    (total @ v).backward()
    want, want_ga, want_gf = _exact(logits, feats, v)
    assert torch.allclose(total.detach(), want, atol=1e-5)
    assert torch.allclose(a.grad, want_ga, atol=1e-4)
    assert torch.allclose(f.grad, want_gf, atol=1e-5)


# -- Monte Carlo over seeded draws ------------------------------------------------------------
def _rel_err(got, want) -> float:
    return float((got - want).norm() / want.norm())


def test_monte_carlo_with_replacement_matches_exact_expectation():
    logits, feats, v = _problem(n=6, seed=3)
    value, ga, gf = _monte_carlo(ats.expectation_with_replacement, ats.sample_with_replacement,
                                 logits, feats, v, k=4, draws=1500, seed=0)
    want, want_ga, want_gf = _exact(logits, feats, v)
    assert _rel_err(value, want) < 0.05
    assert _rel_err(ga, want_ga) < 0.1  # 1/a weights: the noisiest of the three
    assert _rel_err(gf, want_gf) < 0.05


def test_monte_carlo_without_replacement_matches_exact_expectation():
    logits, feats, v = _problem(n=6, seed=3)
    value, ga, gf = _monte_carlo(ats.expectation_without_replacement, ats.sample_without_replacement,
                                 logits, feats, v, k=3, draws=1500, seed=0)
    want, want_ga, want_gf = _exact(logits, feats, v)
    assert _rel_err(value, want) < 0.05
    assert _rel_err(ga, want_ga) < 0.07
    assert _rel_err(gf, want_gf) < 0.05
    # The buggy variant, fed the very same draws, misses the attention gradient.
    _, bad_ga, _ = _monte_carlo(_inclusive_variant, ats.sample_without_replacement,
                                logits, feats, v, k=3, draws=1500, seed=0)
    assert _rel_err(bad_ga, want_ga) > 0.09


def test_prefix_of_draws_is_a_valid_running_estimate():
    logits, feats, v = _problem(n=5, seed=4)
    one, _, _ = _enumerate_without_replacement(
        lambda a, i, f: ats.expectation_without_replacement(a, i[:1], f[:1]), logits, feats, v, 3)
    assert torch.allclose(one, _exact(logits, feats, v)[0], atol=1e-5)


# -- draws ------------------------------------------------------------------------------------
def test_draws_follow_the_attention_and_repeat_under_a_seed():
    a = torch.tensor([0.6, 0.25, 0.15, 0.0])
    g = torch.Generator().manual_seed(5)
    iid = ats.sample_with_replacement(a, 4000, g)
    freq = torch.bincount(iid, minlength=4).float() / 4000
    assert torch.allclose(freq, a, atol=0.03)
    firsts = torch.stack([ats.sample_without_replacement(a, 2, g)[0] for _ in range(1500)])
    assert torch.allclose(torch.bincount(firsts, minlength=4).float() / 1500, a, atol=0.04)
    # Zero-attention items are never drawn; k is clipped to the support; no repeats.
    idx = ats.sample_without_replacement(a, 10, g)
    assert sorted(idx.tolist()) == [0, 1, 2]
    s1 = ats.sample_without_replacement(a, 3, torch.Generator().manual_seed(9))
    s2 = ats.sample_without_replacement(a, 3, torch.Generator().manual_seed(9))
    assert torch.equal(s1, s2)
    torch.manual_seed(3)
    r1 = ats.sample_with_replacement(a, 5)
    torch.manual_seed(3)
    assert torch.equal(r1, ats.sample_with_replacement(a, 5))


def test_bad_input_is_refused_with_a_clear_message():
    a = torch.tensor([0.5, 0.5])
    f = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sum to 1"):
        ats.sample_with_replacement(torch.tensor([0.5, 0.6]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        ats.sample_without_replacement(torch.tensor([1.5, -0.5]), 1)
    with pytest.raises(ValueError, match="1-D"):
        ats.sample_with_replacement(torch.ones(2, 2) / 4, 1)
    with pytest.raises(ValueError, match="positive integer"):
        ats.sample_with_replacement(a, 0)
    with pytest.raises(ValueError, match=r"\(k, D\)"):
        ats.expectation_with_replacement(a, torch.tensor([0, 1]), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="lie in"):
        ats.expectation_with_replacement(a, torch.tensor([0, 2]), f)
    with pytest.raises(ValueError, match="distinct"):
        ats.expectation_without_replacement(a, torch.tensor([1, 1]), f)
