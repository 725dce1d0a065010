"""Shared input builders and error measures for the penalty-op tests."""

from __future__ import annotations

import torch

import refusalguard_kernels as rg
from refusalguard_kernels import reference

# ||x - ref|| / ||ref|| bounds against float64 math on the same rounded inputs (issue 2).
LOSS_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3}
COORD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    if denom == 0:
        return float("inf") if (x - ref).norm() > 0 else 0.0
    return ((x - ref).norm() / denom).item()


def make_inputs(lead, d, k, dtype, *, weights="random", device="cpu", gen=None, anchor_noise=0.5):
    """Fresh random hidden/basis/anchors/weight. Anchors sit near the true coordinates,
    as they do in training, plus noise so the drift term is far from zero."""
    gen = gen or torch.Generator().manual_seed(torch.seed() % (2**31))
    hidden = torch.randn(*lead, d, generator=gen).to(dtype)
    basis = rg.orthonormalize_basis(torch.randn(d, k, generator=gen, dtype=torch.float64))
    # Scale so that coords are O(1): hidden rows have norm ~sqrt(d), B columns norm 1.
    coords = hidden.double() @ basis.double()
    anchors = (
        coords + anchor_noise * coords.pow(2).mean().sqrt() * torch.randn(*lead, k, generator=gen, dtype=torch.float64)
    ).float()
    if weights is None:
        weight = None
    elif weights == "random":
        weight = torch.rand(*lead, generator=gen) * 2
    elif weights == "zeros_some":
        weight = torch.rand(*lead, generator=gen) * 2
        weight = torch.where(torch.rand(*lead, generator=gen) < 0.4, torch.zeros_like(weight), weight)
    elif weights == "all_zero":
        weight = torch.zeros(*lead)
    else:
        raise ValueError(weights)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(hidden), move(basis), move(anchors), move(weight)


def reference_loss_and_grad(hidden, basis, anchors, weight, drift_coef, gram_coef, grad_scale=1.0):
    """float64 loss and grad_scale * dL/dH on the same (rounded) inputs."""
    h64 = hidden.detach().double().cpu().requires_grad_(True)
    loss = reference.geometry_loss(
        h64,
        basis.double().cpu(),
        anchors.double().cpu(),
        None if weight is None else weight.double().cpu(),
        drift_coef=drift_coef,
        gram_coef=gram_coef,
    )
    (loss * grad_scale).backward()
    return loss.detach(), h64.grad
