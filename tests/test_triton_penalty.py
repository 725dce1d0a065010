"""Triton kernels (through the interpreter on CPU, compiled on GPU) against float64 math.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and these run the
real kernels on CPU tensors. With CUDA, the same tests run compiled on the GPU.
"""

import pytest
import torch
from penalty_cases import (
    COORD_TOL,
    GRAD_TOL,
    LOSS_TOL,
    make_inputs,
    reference_loss_and_grad,
    rel_err,
)

import refusalguard_kernels as rg
from refusalguard_kernels.ops.penalty import loss_forward_op, project_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "triton"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer the launchers allocate starts as NaN."""
    monkeypatch.setenv("REFUSALGUARD_POISON", "1")


# (lead dims, d, k, dtype, weights): N includes 1; d not a multiple of the block; k in 1, 3, 8, 16, 33.
GRID = [
    ((1,), 200, 1, torch.float32, None),
    ((1,), 77, 3, torch.bfloat16, "random"),
    ((37,), 100, 3, torch.float32, "zeros_some"),
    ((37,), 130, 8, torch.bfloat16, "zeros_some"),
    ((2, 41), 257, 8, torch.float32, "random"),
    ((2, 41), 257, 16, torch.bfloat16, None),
    ((3, 50), 96, 16, torch.float16, "zeros_some"),
    ((130,), 65, 33, torch.float32, "random"),
    ((130,), 300, 33, torch.bfloat16, "zeros_some"),
    ((200,), 129, 64, torch.float16, "random"),
    ((5, 40), 64, 1, torch.float16, None),
    # Row and column counts that divide the tiles exactly (the unmasked EVEN_N / EVEN_D paths).
    ((256,), 512, 8, torch.bfloat16, "zeros_some"),
    ((2, 128), 256, 16, torch.float32, "random"),
    ((64,), 256, 3, torch.float16, None),
]


def _ids(case):
    lead, d, k, dtype, weights = case
    return f"N{'x'.join(map(str, lead))}-d{d}-k{k}-{str(dtype)[6:]}-w{weights}"


@pytest.mark.parametrize("case", GRID, ids=[_ids(c) for c in GRID])
@pytest.mark.parametrize("gram_coef", [0.0, 0.7])
def test_loss_and_gradient_match_float64(case, gram_coef):
    lead, d, k, dtype, weights = case
    hidden, basis, anchors, weight = make_inputs(lead, d, k, dtype, weights=weights, device=DEVICE)
    grad_scale = 2.5  # grad_loss carries loss scaling: never assume 1
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, gram_coef, grad_scale)

    h = hidden.clone().requires_grad_(True)
    loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.3, gram_coef=gram_coef, backend=BACKEND)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (loss * grad_scale).backward()
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype]
    assert h.grad.dtype == dtype and h.grad.shape == hidden.shape
    assert torch.isfinite(h.grad).all()
    assert rel_err(h.grad, ref_grad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("case", GRID[::2], ids=[_ids(c) for c in GRID[::2]])
def test_guard_fused_backward(case):
    """grad_hidden == grad_hidden_out + grad_loss * dL/dH, for a non-unit grad_loss."""
    lead, d, k, dtype, weights = case
    hidden, basis, anchors, weight = make_inputs(lead, d, k, dtype, weights=weights, device=DEVICE)
    grad_scale = 0.37
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 0.8, 1.1, grad_scale)
    # grad_out of the same size as the penalty's gradient, so neither can hide the other.
    grad_out = (torch.randn(hidden.shape, dtype=torch.float64) * ref_grad.norm() / ref_grad.numel() ** 0.5).to(dtype)
    grad_out = grad_out.to(DEVICE)

    h = hidden.clone().requires_grad_(True)
    out, loss = rg.guard(h, basis, anchors, weight, drift_coef=0.8, gram_coef=1.1, backend=BACKEND)
    assert torch.equal(out, hidden)
    torch.autograd.backward([out, loss], [grad_out, torch.tensor(grad_scale, device=DEVICE)])
    assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype]
    assert rel_err(h.grad, grad_out.double().cpu() + ref_grad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("case", GRID[1::3], ids=[_ids(c) for c in GRID[1::3]])
def test_project_and_its_gradient(case):
    lead, d, k, dtype, _ = case
    hidden, basis, _, _ = make_inputs(lead, d, k, dtype, device=DEVICE)
    h = hidden.clone().requires_grad_(True)
    coords = rg.project(h, basis, backend=BACKEND)
    assert coords.shape == (*lead, k) and coords.dtype == torch.float32
    ref = hidden.double().cpu() @ basis.double().cpu()
    assert rel_err(coords, ref) <= COORD_TOL[dtype]
    grad_coords = torch.randn(*lead, k, device=DEVICE)
    coords.backward(grad_coords)
    assert rel_err(h.grad, grad_coords.double().cpu() @ basis.double().cpu().T) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_zero_weights_give_zero_loss_and_gradient(dtype):
    hidden, basis, anchors, weight = make_inputs((33,), 70, 5, dtype, weights="all_zero", device=DEVICE)
    h = hidden.clone().requires_grad_(True)
    loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.0, gram_coef=1.0, backend=BACKEND)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_is_bitwise_the_loss_forward_coords(dtype):
    hidden, basis, anchors, weight = make_inputs((3, 45), 170, 6, dtype, weights="random", device=DEVICE)
    basis32 = basis.float().contiguous()
    coords = project_op(hidden, basis32, BACKEND)
    coords_fwd, _, _ = loss_forward_op(
        hidden, basis32, anchors.reshape(-1, 6).contiguous(), weight.reshape(-1), 1.0, 1.0, BACKEND
    )
    assert torch.equal(coords, coords_fwd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_step_zero_is_exactly_zero(dtype):
    """Anchors made with project() on the same hidden: loss 0, gradient 0, guard passes grad_out through."""
    hidden, basis, _, weight = make_inputs((2, 70), 150, 8, dtype, weights="zeros_some", device=DEVICE)
    anchors = rg.project(hidden, basis, backend=BACKEND)
    h = hidden.clone().requires_grad_(True)
    out, loss = rg.guard(h, basis, anchors, weight, drift_coef=1.0, gram_coef=5.0, backend=BACKEND)
    grad_out = torch.randn_like(hidden, dtype=torch.float32).to(dtype)
    torch.autograd.backward([out, loss], [grad_out, torch.tensor(3.0, device=DEVICE)])
    assert loss.item() == 0.0
    assert torch.equal(h.grad, grad_out)


def test_runs_are_bitwise_identical():
    hidden, basis, anchors, weight = make_inputs((300,), 200, 12, torch.bfloat16, weights="random", device=DEVICE)
    results = []
    for _ in range(2):
        h = hidden.clone().requires_grad_(True)
        loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=BACKEND)
        loss.backward()
        results.append((loss.detach().clone(), h.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def _non_contiguous_views(dtype):
    d = 90
    base = torch.randn(40, 3, d).to(dtype).to(DEVICE)
    yield "transposed_3d", base.transpose(0, 1)  # [3, 40, d] with row strides that no 2-D view describes
    wide = torch.randn(60, 2 * d).to(dtype).to(DEVICE)
    yield "column_stride_2", wide[:, ::2]
    yield "row_slice", wide[:, 5 : 5 + d]
    four = torch.randn(2, 3, 4, d).to(dtype).to(DEVICE)
    yield "permuted_4d", four.permute(2, 0, 1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_hidden(dtype):
    for name, hidden in _non_contiguous_views(dtype):
        assert not hidden.is_contiguous(), name
        lead, d, k = hidden.shape[:-1], hidden.shape[-1], 5
        _, basis, anchors, weight = make_inputs(lead, d, k, dtype, weights="random", device=DEVICE)
        grad_out = (
            torch.randn(hidden.shape).to(dtype).to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
            if hidden.dim() >= 2
            else torch.randn_like(hidden)
        )
        ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.4, 1.7)
        h = hidden.detach().requires_grad_(True)
        out, loss = rg.guard(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.4, backend=BACKEND)
        torch.autograd.backward([out, loss], [grad_out, torch.tensor(1.7, device=DEVICE)])
        assert rel_err(loss, ref_loss) <= LOSS_TOL[dtype], name
        assert rel_err(h.grad, grad_out.double().cpu() + ref_grad) <= GRAD_TOL[dtype], name
        coords = rg.project(hidden, basis, backend=BACKEND)
        assert rel_err(coords, hidden.double().cpu() @ basis.double().cpu()) <= COORD_TOL[dtype], name


def test_nan_in_hidden_propagates():
    hidden, basis, anchors, weight = make_inputs((20,), 64, 4, torch.float32, device=DEVICE)
    hidden[7, 3] = float("nan")
    loss = rg.geometry_loss(hidden, basis, anchors, weight, backend=BACKEND)
    assert torch.isnan(loss)


def test_backend_auto_on_cpu_is_the_reference():
    if DEVICE == "cuda":
        pytest.skip("CPU-only behaviour")
    hidden, basis, anchors, weight = make_inputs((10,), 32, 2, torch.float32)
    a = rg.geometry_loss(hidden, basis, anchors, weight, backend="auto")
    b = rg.geometry_loss(hidden, basis, anchors, weight, backend="torch")
    assert torch.equal(a, b)


def test_basis_changed_in_place_is_not_served_from_cache():
    """The launchers cache the split basis; an in-place update must be seen."""
    hidden, basis, anchors, weight = make_inputs((40,), 96, 4, torch.bfloat16, weights="random", device=DEVICE)
    first = rg.project(hidden, basis, backend=BACKEND)
    other = rg.orthonormalize_basis(torch.randn(96, 4, dtype=torch.float64)).to(DEVICE)
    basis.copy_(other)
    second = rg.project(hidden, basis, backend=BACKEND)
    assert rel_err(second, hidden.double().cpu() @ other.double().cpu()) <= COORD_TOL[torch.bfloat16]
    assert not torch.equal(first, second)
    h = hidden.clone().requires_grad_(True)
    loss = rg.geometry_loss(h, basis, anchors, weight, backend=BACKEND)
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(hidden, other, anchors, weight, 1.0, 0.0)
    assert rel_err(loss, ref_loss) <= LOSS_TOL[torch.bfloat16]
    assert rel_err(h.grad, ref_grad) <= GRAD_TOL[torch.bfloat16]
