"""The contract, in code: the subspace-projection penalty in plain PyTorch.

Leading dims are flattened: hidden H is N x d, basis B is d x k (orthonormal
columns), anchors A is N x k, weight w is N (w >= 0; None means all ones).

    Z      = H B                                   (accumulated in float32 or wider)
    W      = sum_t w_t                             (W == 0: loss 0, every gradient 0)
    drift  = (1/W) sum_t w_t ||Z_t - A_t||^2
    G      = (1/W) sum_t w_t Z_t Z_t^T,  G_A likewise from A          (k x k)
    gram   = ||G - G_A||_F^2
    loss   = drift_coef * drift + gram_coef * gram

    dL/dZ_t = drift_coef * (2 w_t / W)(Z_t - A_t) + gram_coef * (4 w_t / W)(G - G_A) Z_t
    dL/dH   = dL/dZ B^T

Every backend is tested against these functions evaluated in float64.  They
compute in float32 for half inputs (and in the input precision otherwise) and
are differentiable in ``hidden`` through ordinary autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project", "geometry_loss", "loss_grad_coords"]


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def project(hidden: Tensor, basis: Tensor) -> Tensor:
    """Z = H B with float32 (or float64) accumulation; shape (..., k)."""
    dtype = _compute_dtype(hidden)
    # An enclosing autocast region would run this matmul in bf16/fp16: the contract says fp32.
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.to(dtype) @ basis.to(dtype)


def _stats(coords: Tensor, anchors: Tensor, weight: Tensor | None):
    k = coords.shape[-1]
    z = coords.reshape(-1, k)
    a = anchors.reshape(-1, k).to(z.dtype)
    w = torch.ones(z.shape[0], dtype=z.dtype, device=z.device) if weight is None else weight.reshape(-1).to(z.dtype)
    total = w.sum()
    # W == 0 must give 0, not 0/0: divide by 1 instead and let the zero weights do the rest.
    inv_total = torch.where(
        total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total)
    )
    # G - G_A as one difference of weighted sums, so Z == A gives exactly zero.
    with torch.autocast(z.device.type, enabled=False):
        gram_diff = ((z * w[:, None]).T @ z - (a * w[:, None]).T @ a) * inv_total
    return z, a, w, inv_total, gram_diff


def geometry_loss(
    hidden: Tensor,
    basis: Tensor,
    anchors: Tensor,
    weight: Tensor | None = None,
    *,
    drift_coef: float = 1.0,
    gram_coef: float = 0.0,
) -> Tensor:
    """L = drift_coef * L_drift + gram_coef * L_gram (0-dim, float32 or float64)."""
    z, a, w, inv_total, gram_diff = _stats(project(hidden, basis), anchors, weight)
    drift = (w * ((z - a) ** 2).sum(-1)).sum() * inv_total
    gram = (gram_diff**2).sum()
    return drift_coef * drift + gram_coef * gram


def loss_grad_coords(
    coords: Tensor,
    anchors: Tensor,
    weight: Tensor | None = None,
    *,
    drift_coef: float = 1.0,
    gram_coef: float = 0.0,
) -> Tensor:
    """dL/dZ in closed form (N x k); dL/dH is this times B^T."""
    z, a, w, inv_total, gram_diff = _stats(coords, anchors, weight)
    scale = w[:, None] * inv_total
    with torch.autocast(z.device.type, enabled=False):
        return drift_coef * 2 * scale * (z - a) + gram_coef * 4 * scale * (z @ gram_diff)
