"""The reference (reference.py) against the contract written out independently in float64."""

import pytest
import torch
from penalty_cases import make_inputs

from refusalguard_kernels import reference


def contract_loss(hidden, basis, anchors, weight, drift_coef, gram_coef):
    """The issue's formulas, token by token, in float64 (slow and obvious)."""
    H = hidden.reshape(-1, hidden.shape[-1]).double()
    B = basis.double()
    A = anchors.reshape(-1, basis.shape[1]).double()
    w = torch.ones(H.shape[0], dtype=torch.float64) if weight is None else weight.reshape(-1).double()
    W = w.sum()
    if W == 0:
        return torch.zeros((), dtype=torch.float64)
    Z = H @ B
    drift = sum(w[t] * ((Z[t] - A[t]) ** 2).sum() for t in range(H.shape[0])) / W
    G = sum(w[t] * torch.outer(Z[t], Z[t]) for t in range(H.shape[0])) / W
    GA = sum(w[t] * torch.outer(A[t], A[t]) for t in range(H.shape[0])) / W
    return drift_coef * drift + gram_coef * ((G - GA) ** 2).sum()


@pytest.mark.parametrize("weights", [None, "random", "zeros_some"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_reference_matches_contract(k, weights):
    hidden, basis, anchors, weight = make_inputs((2, 7), 19, k, torch.float64, weights=weights)
    got = reference.geometry_loss(hidden, basis, anchors, weight, drift_coef=0.7, gram_coef=1.3)
    want = contract_loss(hidden, basis, anchors, weight, 0.7, 1.3)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_closed_form_gradient_matches_autograd():
    hidden, basis, anchors, weight = make_inputs((3, 5), 23, 4, torch.float64, weights="zeros_some")
    hidden.requires_grad_(True)
    loss = reference.geometry_loss(hidden, basis, anchors, weight, drift_coef=0.9, gram_coef=2.1)
    (grad,) = torch.autograd.grad(loss, hidden)
    coords = reference.project(hidden.detach(), basis)
    closed = reference.loss_grad_coords(coords, anchors, weight, drift_coef=0.9, gram_coef=2.1) @ basis.double().T
    assert torch.allclose(grad.reshape(-1, 23), closed, rtol=1e-10, atol=1e-14)


def test_gradcheck():
    hidden, basis, anchors, weight = make_inputs((6,), 9, 3, torch.float64, weights="random")
    hidden.requires_grad_(True)
    fn = lambda h: reference.geometry_loss(h, basis, anchors, weight, drift_coef=1.1, gram_coef=0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden,))


def test_all_zero_weights_give_zero_loss_and_gradient():
    hidden, basis, anchors, weight = make_inputs((5,), 8, 2, torch.float64, weights="all_zero")
    hidden.requires_grad_(True)
    loss = reference.geometry_loss(hidden, basis, anchors, weight, drift_coef=1.0, gram_coef=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_anchors_from_project_give_exact_zero():
    hidden, basis, _, _ = make_inputs((4, 6), 16, 5, torch.float32)
    anchors = reference.project(hidden, basis)
    hidden.requires_grad_(True)
    loss = reference.geometry_loss(hidden, basis, anchors, drift_coef=1.0, gram_coef=3.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0
