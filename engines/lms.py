"""Linearised multi-sampling: bilinear sampling whose grid gradient survives strong zoom.

Jiang et al. (ICCV 2019) observed that the gradient of bilinear sampling with respect to the
sampling grid only sees the four input pixels around each sample. When a spatial transformer
zooms in strongly, neighbouring output pixels fall inside the same input cell and that local
gradient says nothing about content one pixel further away, so the transformer stops learning.

``lms_grid_sample`` keeps the bilinear forward pass (identical output) and replaces the grid
gradient: around every sampling location p it also samples ``samples`` jittered locations
p + d_k (d_k uniform in +-``radius`` input pixels per axis, drawn from torch's global RNG so a
seeded run repeats) and fits, by least squares, the linear model

    I(p + d_k) - I(p) ~= J(p) d_k        (one 2-vector J per channel)

J is the image slope seen at the scale of the jitter. The grid gradient is then
``sum_c grad_out_c * J_c``, converted from pixel to normalised [-1, 1] units. The gradient
with respect to the image is the ordinary bilinear one.

Conventions match ``F.grid_sample(mode="bilinear", padding_mode="border",
align_corners=False)``, which is what ``engines.sampling.crop`` uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SAMPLES = 7
DEFAULT_RADIUS = 1.0  # input pixels
# Keeps the 2x2 normal equations solvable when random offsets happen to be nearly collinear.
_RIDGE = 1e-4


def _bilinear(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _LinearisedMultiSampling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, grid: torch.Tensor, samples: int, radius: float) -> torch.Tensor:
        out = _bilinear(image, grid)
        ctx.save_for_backward(image, grid, out)
        ctx.samples = samples
        ctx.radius = radius
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        image, grid, out = ctx.saved_tensors
        grad_image = grad_grid = None
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                img = image.detach().requires_grad_(True)
                (grad_image,) = torch.autograd.grad(_bilinear(img, grid.detach()), img, grad_out)
        if ctx.needs_input_grad[1]:
            grad_grid = _least_squares_grid_grad(image, grid, out, grad_out, ctx.samples, ctx.radius)
        return grad_image, grad_grid, None, None


@torch.no_grad()
def _least_squares_grid_grad(
    image: torch.Tensor,
    grid: torch.Tensor,
    centre: torch.Tensor,
    grad_out: torch.Tensor,
    samples: int,
    radius: float,
) -> torch.Tensor:
    h, w = image.shape[-2:]
    # One input pixel in normalised units (align_corners=False): 2 / size.
    px_to_norm = grid.new_tensor([2.0 / w, 2.0 / h])
    offsets = (torch.rand((samples, *grid.shape), dtype=grid.dtype, device=grid.device) * 2 - 1) * radius
    # Only the projection of each intensity difference on grad_out matters, so reduce the
    # channels first: r_k = <grad_out, I(p + d_k) - I(p)> per output pixel.
    proj = []
    for k in range(samples):
        shifted = _bilinear(image, grid + offsets[k] * px_to_norm)
        proj.append(((shifted - centre) * grad_out).sum(1))
    r = torch.stack(proj)  # (K, N, Ho, Wo)
    dx, dy = offsets[..., 0], offsets[..., 1]
    a11 = (dx * dx).sum(0) + _RIDGE
    a12 = (dx * dy).sum(0)
    a22 = (dy * dy).sum(0) + _RIDGE
    b1 = (dx * r).sum(0)
    b2 = (dy * r).sum(0)
    det = a11 * a22 - a12 * a12
    gx = (a22 * b1 - a12 * b2) / det
    gy = (a11 * b2 - a12 * b1) / det
    # Slope per input pixel -> slope per normalised unit.
    return torch.stack([gx, gy], -1) / px_to_norm


def lms_grid_sample(
    image: torch.Tensor,
    grid: torch.Tensor,
    samples: int = DEFAULT_SAMPLES,
    radius: float = DEFAULT_RADIUS,
) -> torch.Tensor:
    """Bilinear ``grid_sample`` (border padding, align_corners=False) of ``image`` (N, C, H, W)
    at ``grid`` (N, Ho, Wo, 2), with the linearised multi-sampling gradient for ``grid``."""
    if image.dim() != 4 or grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError("lms_grid_sample needs image (N, C, H, W) and grid (N, Ho, Wo, 2)")
    if image.shape[0] != grid.shape[0]:
        raise ValueError(f"image and grid batch sizes differ ({image.shape[0]} vs {grid.shape[0]})")
    if samples < 2:
        raise ValueError("lms_grid_sample needs at least 2 jittered samples for a 2-d fit")
    if not radius > 0:
        raise ValueError("the jitter radius must be positive")
    return _LinearisedMultiSampling.apply(image, grid, int(samples), float(radius))
