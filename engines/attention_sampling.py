"""Attention sampling: draw patches from an attention distribution and aggregate their
features by expectation with unbiased gradients (Katharopoulos & Fleuret, ICML 2019).

The exact attention-weighted feature ``sum_i a_i f_i`` needs every patch's feature. These
helpers estimate it from k drawn patches only, so that both the value *and* its gradients
with respect to the attention ``a`` and the drawn features are unbiased:

* with replacement: k iid draws ``i_s ~ a``; estimate ``mean_s f_{i_s}``; attention gets
  ``(1/k) sum_s [i_s = i] <g, f_i> / a_i``, whose expectation is ``<g, f_i>``.
* without replacement (Gumbel-top-k draws, in draw order): step s estimates
  ``F_s = sum_{j<s} a_{i_j} f_{i_j} + p_s f_{i_s}`` with ``p_s = 1 - sum_{j<s} a_{i_j}`` (an
  *exclusive* cumulative sum: the mass left before draw s); the estimate is ``mean_s F_s``.
  ``p_s`` is treated as a constant and ``f_{i_s}`` carries ``a_{i_s} / a_{i_s}`` (value 1,
  gradient ``1 / a_{i_s}``), so the expected gradient is again ``<g, f_i>``.

Both take 1-D attention over N items (already normalised, e.g. a softmax), the drawn indices
and the features of the drawn items only, shape (k, D). Torch only; no Qt, no slides.
"""
from __future__ import annotations

import torch

__all__ = [
    "sample_with_replacement",
    "sample_without_replacement",
    "expectation_with_replacement",
    "expectation_without_replacement",
]

# A distribution must sum to one within this (float32 softmax over many cells stays far below).
SUM_TOLERANCE = 1e-3


def _check_attention(attention: torch.Tensor) -> torch.Tensor:
    if not isinstance(attention, torch.Tensor) or attention.dim() != 1 or attention.numel() == 0:
        raise ValueError("attention must be a non-empty 1-D tensor of probabilities")
    a = attention.detach()
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError("attention must hold finite, non-negative probabilities")
    total = float(a.sum())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"attention must sum to 1 (it sums to {total:.6g}); normalise it first")
    return a


def _check_draws(attention: torch.Tensor, indices: torch.Tensor, features: torch.Tensor) -> None:
    _check_attention(attention)
    integer = indices.dtype in (torch.int64, torch.int32)
    if indices.dim() != 1 or indices.numel() == 0 or not integer:
        raise ValueError("indices must be a non-empty 1-D integer tensor")
    if features.dim() != 2 or features.shape[0] != indices.numel():
        raise ValueError(
            f"features must be (k, D) with k = {indices.numel()} drawn items, got {tuple(features.shape)}"
        )
    if int(indices.min()) < 0 or int(indices.max()) >= attention.numel():
        raise ValueError(f"indices must lie in [0, {attention.numel()})")


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {k!r}")
    return k


def sample_with_replacement(attention: torch.Tensor, k: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """(k,) int64: k independent draws from the distribution ``attention`` (1-D, sums to 1).

    Uses ``generator``, else torch's global RNG, so seeded runs repeat."""
    a = _check_attention(attention)
    k = _check_k(k)
    return torch.multinomial(a.float(), k, replacement=True, generator=generator)


def sample_without_replacement(attention: torch.Tensor, k: int,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """(min(k, support),) int64: distinct draws in draw order, by Gumbel-top-k.

    The top-k of ``log a_i + Gumbel noise`` is distributed as k successive draws without
    replacement; items with zero attention are never drawn, so k is clipped to the number of
    items with positive attention."""
    a = _check_attention(attention)
    k = min(_check_k(k), int((a > 0).sum()))
    u = torch.rand(a.shape, generator=generator, dtype=torch.float64, device=a.device)
    u = u.clamp(1e-300, 1.0 - 1e-16)  # keep both logs finite
    keys = torch.log(a.double()) - torch.log(-torch.log(u))
    return torch.topk(keys, k).indices  # sorted by key: the draw order


def _unit_with_inverse_grad(values: torch.Tensor) -> torch.Tensor:
    """Ones whose gradient with respect to ``values`` is ``1 / values`` (the detach trick)."""
    return values / values.detach().clamp_min(torch.finfo(values.dtype).tiny)


def expectation_with_replacement(attention: torch.Tensor, indices: torch.Tensor,
                                 features: torch.Tensor) -> torch.Tensor:
    """(D,) estimate of ``sum_i a_i f_i`` from iid draws ``indices`` (k,) and the drawn
    items' ``features`` (k, D): the mean of the features; gradients as in the module doc."""
    _check_draws(attention, indices, features)
    weight = _unit_with_inverse_grad(attention[indices]).to(features.dtype)
    return (weight[:, None] * features).mean(0)


def expectation_without_replacement(attention: torch.Tensor, indices: torch.Tensor,
                                    features: torch.Tensor) -> torch.Tensor:
    """(D,) estimate of ``sum_i a_i f_i`` from distinct draws ``indices`` (k,) *in draw
    order* (as ``sample_without_replacement`` returns them) and the drawn items'
    ``features`` (k, D). Any prefix of the draws is itself a valid sample, so calling this on
    ``indices[:s]`` gives the running estimate after s draws."""
    _check_draws(attention, indices, features)
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError("draws without replacement must be distinct")
    a = attention[indices].to(features.dtype)
    weighted = a[:, None] * features
    # Exclusive cumulative sums: what the draws *before* s contribute.
    seen = torch.cumsum(weighted, 0) - weighted
    left = (1.0 - (torch.cumsum(a, 0) - a)).detach().clamp_min(0.0)
    steps = seen + (left * _unit_with_inverse_grad(a))[:, None] * features
    return steps.mean(0)
