"""Triton kernels (through the interpreter on CPU, compiled on GPU) against float64 math.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and these run the
real kernels on CPU tensors. With CUDA, the same tests run compiled on the GPU.
"""

import contextlib
import gc
import warnings
import weakref

import pytest
import torch
from penalty_cases import (
    COORD_TOL,
    ELEM_COORD_TOL,
    ELEM_GRAD_TOL,
    GRAD_TOL,
    LOSS_TOL,
    case_seed,
    check_close,
    generator,
    make_inputs,
    max_rel_err,
    reference_loss_and_grad,
    rel_err,
)

import refusalguard_kernels as rg
from refusalguard_kernels.ops import triton_penalty
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
    inputs = make_inputs(lead, d, k, dtype, weights=weights, device=DEVICE)
    hidden, basis, anchors, weight = inputs
    grad_scale = 2.5  # grad_loss carries loss scaling: never assume 1
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, gram_coef, grad_scale)

    h = hidden.clone().requires_grad_(True)
    loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.3, gram_coef=gram_coef, backend=BACKEND)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (loss * grad_scale).backward()
    check_close(loss, ref_loss, LOSS_TOL[dtype], None, "loss", inputs.seed)
    assert h.grad.dtype == dtype and h.grad.shape == hidden.shape
    assert torch.isfinite(h.grad).all(), f"seed={inputs.seed}"
    check_close(h.grad, ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad", inputs.seed)


@pytest.mark.parametrize("case", GRID[::2], ids=[_ids(c) for c in GRID[::2]])
def test_guard_fused_backward(case):
    """grad_hidden == grad_hidden_out + grad_loss * dL/dH, for a non-unit grad_loss."""
    lead, d, k, dtype, weights = case
    inputs = make_inputs(lead, d, k, dtype, weights=weights, device=DEVICE)
    hidden, basis, anchors, weight = inputs
    grad_scale = 0.37
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 0.8, 1.1, grad_scale)
    # grad_out of the same size as the penalty's gradient, so neither can hide the other.
    gen = generator(inputs.seed + 1)
    grad_out = torch.randn(hidden.shape, dtype=torch.float64, generator=gen) * ref_grad.norm() / ref_grad.numel() ** 0.5
    grad_out = grad_out.to(dtype).to(DEVICE)

    h = hidden.clone().requires_grad_(True)
    out, loss = rg.guard(h, basis, anchors, weight, drift_coef=0.8, gram_coef=1.1, backend=BACKEND)
    assert torch.equal(out, hidden)
    torch.autograd.backward([out, loss], [grad_out, torch.tensor(grad_scale, device=DEVICE)])
    check_close(loss, ref_loss, LOSS_TOL[dtype], None, "loss", inputs.seed)
    want = grad_out.double().cpu() + ref_grad
    check_close(h.grad, want, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad", inputs.seed)


@pytest.mark.parametrize("case", GRID[1::3], ids=[_ids(c) for c in GRID[1::3]])
def test_project_and_its_gradient(case):
    lead, d, k, dtype, _ = case
    inputs = make_inputs(lead, d, k, dtype, device=DEVICE)
    hidden, basis, _, _ = inputs
    h = hidden.clone().requires_grad_(True)
    coords = rg.project(h, basis, backend=BACKEND)
    assert coords.shape == (*lead, k) and coords.dtype == torch.float32
    ref = hidden.double().cpu() @ basis.double().cpu()
    check_close(coords, ref, COORD_TOL[dtype], ELEM_COORD_TOL[dtype], "coords", inputs.seed)
    grad_coords = torch.randn(*lead, k, generator=generator(inputs.seed + 1)).to(DEVICE)
    coords.backward(grad_coords)
    want = grad_coords.double().cpu() @ basis.double().cpu().T
    check_close(h.grad, want, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad", inputs.seed)


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
    inputs = make_inputs((2, 70), 150, 8, dtype, weights="zeros_some", device=DEVICE)
    hidden, basis, _, weight = inputs
    anchors = rg.project(hidden, basis, backend=BACKEND)
    h = hidden.clone().requires_grad_(True)
    out, loss = rg.guard(h, basis, anchors, weight, drift_coef=1.0, gram_coef=5.0, backend=BACKEND)
    grad_out = torch.randn(hidden.shape, generator=generator(inputs.seed + 1)).to(dtype).to(DEVICE)
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


def _non_contiguous_views(dtype, gen):
    d = 90
    base = torch.randn(40, 3, d, generator=gen).to(dtype).to(DEVICE)
    yield "transposed_3d", base.transpose(0, 1)  # [3, 40, d] with row strides that no 2-D view describes
    wide = torch.randn(60, 2 * d, generator=gen).to(dtype).to(DEVICE)
    yield "column_stride_2", wide[:, ::2]
    yield "row_slice", wide[:, 5 : 5 + d]
    four = torch.randn(2, 3, 4, d, generator=gen).to(dtype).to(DEVICE)
    yield "permuted_4d", four.permute(2, 0, 1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_hidden(dtype):
    seed = case_seed("non_contiguous_hidden", str(dtype))
    gen = generator(seed)
    for name, hidden in _non_contiguous_views(dtype, gen):
        assert not hidden.is_contiguous(), name
        lead, d, k = hidden.shape[:-1], hidden.shape[-1], 5
        _, basis, anchors, weight = make_inputs(lead, d, k, dtype, weights="random", device=DEVICE, gen=gen)
        grad_out = torch.randn(hidden.shape, generator=gen).to(dtype).to(DEVICE).transpose(0, 1).contiguous()
        grad_out = grad_out.transpose(0, 1)
        ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.4, 1.7)
        h = hidden.detach().requires_grad_(True)
        out, loss = rg.guard(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.4, backend=BACKEND)
        torch.autograd.backward([out, loss], [grad_out, torch.tensor(1.7, device=DEVICE)])
        check_close(loss, ref_loss, LOSS_TOL[dtype], None, f"{name} loss", seed)
        want = grad_out.double().cpu() + ref_grad
        check_close(h.grad, want, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], f"{name} grad", seed)
        coords = rg.project(hidden, basis, backend=BACKEND)
        ref = hidden.double().cpu() @ basis.double().cpu()
        check_close(coords, ref, COORD_TOL[dtype], ELEM_COORD_TOL[dtype], f"{name} coords", seed)


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
    other = rg.orthonormalize_basis(torch.randn(96, 4, dtype=torch.float64, generator=generator(7))).to(DEVICE)
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


# ---------------------------------------------------------------- issue 10: the element-wise check


def test_element_check_catches_one_bad_element_the_norm_check_misses():
    """One element of a 256 x 512 bf16 gradient off by a typical gradient magnitude passes the
    norm-wise bound (it moves it by ~1/sqrt(N d)) but not the element-wise one."""
    dtype = torch.bfloat16
    inputs = make_inputs((256,), 512, 8, dtype, weights="zeros_some", device=DEVICE)
    hidden, basis, anchors, weight = inputs
    _, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.5)
    h = hidden.clone().requires_grad_(True)
    rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=BACKEND).backward()
    check_close(h.grad, ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad", inputs.seed)

    typical = ref_grad[ref_grad != 0].pow(2).mean().sqrt().item()  # rms over the weighted rows
    bad = h.grad.clone()
    bad.view(-1)[12345] += typical
    assert rel_err(bad, ref_grad) <= GRAD_TOL[dtype], "the norm check alone would catch it: test is moot"
    assert max_rel_err(bad, ref_grad) > 10 * ELEM_GRAD_TOL[dtype]
    with pytest.raises(AssertionError, match=r"max\|x - ref\| / max\|ref\|.*seed="):
        check_close(bad, ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad", inputs.seed)


def test_inputs_replay_from_their_seed():
    a = make_inputs((3, 5), 20, 2, torch.bfloat16, weights="zeros_some")
    b = make_inputs((3, 5), 20, 2, torch.bfloat16, weights="zeros_some")
    c = make_inputs((3, 5), 20, 2, torch.bfloat16, weights="zeros_some", seed=a.seed + 1)
    assert a.seed == b.seed == case_seed((3, 5), 20, 2, "torch.bfloat16", "zeros_some", 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------- issue 10: the basis is read, never cached


def _loss_and_grad(hidden, basis, anchors, weight):
    h = hidden.clone().requires_grad_(True)
    loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.6, backend=BACKEND)
    loss.backward()
    return loss.detach(), h.grad


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_contiguous_basis_matches_reference_and_nothing_accumulates(dtype):
    inputs = make_inputs((40,), 96, 4, dtype, weights="random", device=DEVICE)
    hidden, basis, anchors, weight = inputs
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.6)
    views = {
        "column_major": basis.t().contiguous().t(),  # what QR returns
        "column_stride_2": torch.stack([basis, torch.zeros_like(basis)], 2).flatten(1)[:, ::2],
    }
    _loss_and_grad(hidden, views["column_major"], anchors, weight)  # first-call state (compiled kernels) aside
    before = _live_tensors()
    for name, view in views.items():
        assert not view.is_contiguous() and torch.equal(view, basis), name
        for _ in range(3):  # a training run passes the same basis every step
            loss, grad = _loss_and_grad(hidden, view, anchors, weight)
            check_close(loss, ref_loss, LOSS_TOL[dtype], None, f"{name} loss", inputs.seed)
            check_close(grad, ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], f"{name} grad", inputs.seed)
    del loss, grad
    assert _live_tensors() == before, "tensors kept alive across calls (a cache that grows)"


def test_launchers_keep_no_reference_to_the_basis():
    hidden, basis, anchors, weight = make_inputs((40,), 96, 4, torch.bfloat16, weights="random", device=DEVICE)
    b32 = basis.float().contiguous().clone()
    alive = weakref.ref(b32)
    coords = triton_penalty.project(hidden, b32)
    coords, _, state = triton_penalty.loss_forward(hidden, b32, anchors, weight, 1.0, 0.5)
    triton_penalty.loss_backward(None, torch.ones((), device=DEVICE), coords, anchors, weight, state, b32,
                                 list(hidden.shape), hidden.dtype, 0.5)  # fmt: skip
    del b32
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_basis_written_through_data_is_seen(dtype):
    """``.data`` writes (and raw kernels) do not bump the version counter: nothing may
    depend on it to notice that the basis changed."""
    inputs = make_inputs((40,), 96, 4, dtype, weights="random", device=DEVICE)
    hidden, basis, anchors, weight = inputs
    basis = basis.contiguous()  # fp32 row-major: what the kernels read in place, no per-call copy
    first = rg.project(hidden, basis, backend=BACKEND)
    _loss_and_grad(hidden, basis, anchors, weight)
    other = rg.orthonormalize_basis(torch.randn(96, 4, dtype=torch.float64, generator=generator(inputs.seed + 1)))
    version = basis._version
    basis.data.copy_(other.to(DEVICE))
    assert basis._version == version  # the write the version counter does not see
    second = rg.project(hidden, basis, backend=BACKEND)
    ref = hidden.double().cpu() @ other.double()
    check_close(second, ref, COORD_TOL[dtype], ELEM_COORD_TOL[dtype], "coords after .data write", inputs.seed)
    assert not torch.equal(first, second)
    loss, grad = _loss_and_grad(hidden, basis, anchors, weight)
    ref_loss, ref_grad = reference_loss_and_grad(hidden, other, anchors, weight, 1.0, 0.6)
    check_close(loss, ref_loss, LOSS_TOL[dtype], None, "loss after .data write", inputs.seed)
    check_close(grad, ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad after .data write", inputs.seed)


# ---------------------------------------------------------------- issue 10: launches on the tensors' device

KERNELS = ("_penalty_fwd_kernel", "_penalty_finalize_kernel", "_penalty_bwd_kernel")


class _RecordingKernel:
    """Stands in for a JIT kernel: records the device contexts open at each launch."""

    def __init__(self, kernel, name, open_contexts, launches):
        self.kernel, self.name, self.open_contexts, self.launches = kernel, name, open_contexts, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, list(self.open_contexts)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_every_launch_runs_inside_the_tensors_device_context(monkeypatch):
    open_contexts, launches = [], []
    real_context = triton_penalty._device_context

    @contextlib.contextmanager
    def recording_context(device):
        with real_context(device):
            open_contexts.append(device)
            try:
                yield
            finally:
                open_contexts.pop()

    monkeypatch.setattr(triton_penalty, "_device_context", recording_context)
    for name in KERNELS:
        monkeypatch.setattr(
            triton_penalty, name, _RecordingKernel(getattr(triton_penalty, name), name, open_contexts, launches)
        )
    hidden, basis, anchors, weight = make_inputs((2, 20), 64, 3, torch.bfloat16, weights="random", device=DEVICE)
    h = hidden.clone().requires_grad_(True)
    out, loss = rg.guard(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=BACKEND)
    torch.autograd.backward([out, loss], [torch.ones_like(hidden), torch.ones((), device=DEVICE)])
    rg.project(h, basis, backend=BACKEND).sum().backward()
    assert {name for name, _ in launches} == set(KERNELS)
    assert len(launches) == 5  # loss fwd + finalize + bwd, project fwd + bwd
    for name, contexts in launches:
        assert contexts == [hidden.device], f"{name} launched with device contexts {contexts} open"


def test_device_context_makes_a_cuda_tensors_device_current():
    ctx = triton_penalty._device_context(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(triton_penalty._device_context(torch.device("cpu")), contextlib.nullcontext)


# ---------------------------------------------------------------- issue 19: loops that one program per tile never runs

# More row blocks than programs (the forward's and backward's grid-stride loops) and more partial rows than
# the finalize program loads at once (its loop over tiles): on a GPU the grids are sized to the SM count,
# which no test shape reaches, and the interpreter's 3 programs cover the backward's 32-row blocks only.
LOOP_CASES = [
    ((1000,), 300, 8, torch.bfloat16, "zeros_some"),  # ragged rows and columns: the masked paths
    ((3, 256), 256, 8, torch.float32, "random"),  # whole tiles: the unmasked paths
    ((2, 500), 130, 64, torch.float16, None),  # the 8-warp forward config and its 2-chunk Gram
]


@pytest.fixture
def capped_programs(monkeypatch):
    """At most 3 programs per launch and one partial row per finalize tile; records (row blocks, programs)."""
    launches = []

    def programs(row_blocks, device, per_sm=2):
        launches.append((row_blocks, min(row_blocks, 3)))
        return min(row_blocks, 3)

    monkeypatch.setattr(triton_penalty, "persistent_programs", programs)
    monkeypatch.setattr(triton_penalty, "FINALIZE_TILE", 1)
    return launches


@pytest.mark.parametrize("case", LOOP_CASES, ids=[_ids(c) for c in LOOP_CASES])
def test_grid_stride_and_finalize_loops(case, capped_programs):
    lead, d, k, dtype, weights = case
    inputs = make_inputs(lead, d, k, dtype, weights=weights, device=DEVICE)
    hidden, basis, anchors, weight = inputs
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 0.9, 0.6, 1.5)
    grad_out = torch.randn(hidden.shape, generator=generator(inputs.seed + 1)).to(dtype).to(DEVICE)
    h = hidden.clone().requires_grad_(True)
    out, loss = rg.guard(h, basis, anchors, weight, drift_coef=0.9, gram_coef=0.6, backend=BACKEND)
    torch.autograd.backward([out, loss], [grad_out, torch.tensor(1.5, device=DEVICE)])
    check_close(loss, ref_loss, LOSS_TOL[dtype], None, "loss", inputs.seed)
    check_close(h.grad, grad_out.double().cpu() + ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad", inputs.seed)
    coords = rg.project(hidden, basis, backend=BACKEND)
    ref = hidden.double().cpu() @ basis.double().cpu()
    check_close(coords, ref, COORD_TOL[dtype], ELEM_COORD_TOL[dtype], "coords", inputs.seed)
    assert len(capped_programs) == 3  # loss forward, backward, project
    for row_blocks, programs in capped_programs:
        assert row_blocks >= 2 * programs, capped_programs  # every program loops (finalize: 3 partial rows, 1 a tile)


# ---------------------------------------------------------------- issue 19: the rounding of half gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_check_tells_nearest_from_truncation(dtype):
    """The half-gradient check accepts the correctly rounded reference and rejects the truncated one
    (both roundings, on a real case's float64 gradient)."""
    inputs = make_inputs((37,), 130, 8, dtype, weights="zeros_some")
    hidden, basis, anchors, weight = inputs
    _, ref = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, 0.7, 2.5)
    nearest = ref.to(dtype)  # torch rounds to nearest even
    bits = ref.float().view(torch.int32)
    drop = 16 if dtype == torch.bfloat16 else 13  # fp32 significand bits the half type lacks
    truncated = (bits & ~((1 << drop) - 1)).view(torch.float32).to(dtype)  # exact: only kept bits remain
    if dtype == torch.float16:  # fp16's exponent range is narrower: truncate within it
        truncated = torch.where(ref.abs() < torch.finfo(dtype).tiny, nearest, truncated)
    assert not torch.equal(nearest, truncated)
    check_close(nearest, ref, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "nearest", inputs.seed)
    with pytest.raises(AssertionError, match="not rounded to nearest"):
        check_close(truncated, ref, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "truncated", inputs.seed)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU rounds in hardware; this checks the interpreter's emulation")
def test_bf16_gradients_round_to_nearest(monkeypatch):
    """Without the backward's rounding emulation the interpreter truncates fp32 -> bf16: the element-wise
    bound alone lets that through on this case, the rounding check does not."""
    inputs = make_inputs((1,), 77, 3, torch.bfloat16, weights="random")
    hidden, basis, anchors, weight = inputs
    _, ref = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, 0.0, 2.5)

    def grad():
        h = hidden.clone().requires_grad_(True)
        (rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.3, backend=BACKEND) * 2.5).backward()
        return h.grad

    check_close(grad(), ref, GRAD_TOL[torch.bfloat16], ELEM_GRAD_TOL[torch.bfloat16], "grad", inputs.seed)
    monkeypatch.setattr(triton_penalty, "_interpreter_truncates", lambda dtype: False)
    truncated = grad()
    assert max_rel_err(truncated, ref) <= ELEM_GRAD_TOL[torch.bfloat16]  # what the old bound saw
    with pytest.raises(AssertionError, match="not rounded to nearest"):
        check_close(truncated, ref, GRAD_TOL[torch.bfloat16], ELEM_GRAD_TOL[torch.bfloat16], "grad", inputs.seed)


# ---------------------------------------------------------------- issue 19: per-architecture tile configs

ARCH_CASES = [
    ((2, 41), 257, 8, torch.float32, "random"),  # sm_80/86: 32 fp32 columns per forward tile
    # The wide forward (8 warps, 64 columns, Gram in chunks: 2 on sm_90/86, 4 on sm_80) and the wide
    # backward (sm_86: 64 half columns, to fit in 99 KB of shared memory).
    ((130,), 300, 33, torch.bfloat16, "zeros_some"),
    ((200,), 129, 64, torch.float32, "random"),  # wide, fp32: 32 columns forward and backward
]
# One capability per tile family (89 shares 86's; test_each_architecture_has_its_family checks that).
ARCH_CAPABILITIES = [80, 86, 90]


def test_every_tile_config_runs_in_the_interpreter():
    """Each config any architecture uses is the one some test_tile_configs_of_each_architecture case runs."""
    run = {(triton_penalty.fwd_config(c[2], cap), "fwd") for c in ARCH_CASES for cap in ARCH_CAPABILITIES}
    run |= {(triton_penalty.bwd_config(c[2], cap), "bwd") for c in ARCH_CASES for cap in ARCH_CAPABILITIES}
    used = set()
    for family in triton_penalty._families().values():
        used |= {(family.fwd, "fwd"), (family.fwd_wide, "fwd"), (family.bwd, "bwd"), (family.bwd_wide, "bwd")}
    assert used <= run, used - run
    assert {triton_penalty.ARCH_FAMILY[cap] for cap in ARCH_CAPABILITIES} == set(triton_penalty._families())


def test_each_architecture_has_its_family():
    """sm_86 and sm_89 (99 KB of shared memory per block) share tiles of their own; sm_80 and sm_90 keep theirs."""
    f = triton_penalty._families()
    for k in (1, 8, 16, 33, 64):
        assert triton_penalty.fwd_config(k, 90) == (
            triton_penalty.FWD_WIDE_CONFIG if k > 16 else triton_penalty.FWD_CONFIG
        )
        assert triton_penalty.bwd_config(k, 90) == (
            triton_penalty.BWD_WIDE_CONFIG if k > 32 else triton_penalty.BWD_CONFIG
        )
        assert triton_penalty.fwd_config(k, 80) == (f["sm80"].fwd_wide if k > 16 else f["sm80"].fwd)
        for cap in (86, 89):
            assert triton_penalty.fwd_config(k, cap) == (f["sm86"].fwd_wide if k > 16 else f["sm86"].fwd)
            assert triton_penalty.bwd_config(k, cap) == (f["sm86"].bwd_wide if k > 32 else f["sm86"].bwd)
    assert f["sm86"].shared_bytes <= 99 * 1024 < f["sm80"].shared_bytes


@pytest.mark.parametrize("capability", ARCH_CAPABILITIES)
@pytest.mark.parametrize("case", ARCH_CASES, ids=[_ids(c) for c in ARCH_CASES])
def test_tile_configs_of_each_architecture(case, capability, monkeypatch):
    """The launchers pick tiles by the device's compute capability; every config meets the contract
    (on CPU the interpreter runs whichever config the launcher picked)."""
    lead, d, k, dtype, weights = case
    monkeypatch.setattr(triton_penalty, "device_capability", lambda device: capability)
    cfg = triton_penalty.fwd_config(k, capability)
    assert (cfg.block_d_fp32 == 32) == (capability < 90 or k > 16)
    inputs = make_inputs(lead, d, k, dtype, weights=weights, device=DEVICE)
    hidden, basis, anchors, weight = inputs
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, 0.7, 2.5)
    h = hidden.clone().requires_grad_(True)
    loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.3, gram_coef=0.7, backend=BACKEND)
    (loss * 2.5).backward()
    check_close(loss, ref_loss, LOSS_TOL[dtype], None, "loss", inputs.seed)
    check_close(h.grad, ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], "grad", inputs.seed)
    coords = rg.project(hidden, basis, backend=BACKEND)
    coords_fwd, _, _ = loss_forward_op(hidden, basis.float().contiguous(), anchors.reshape(-1, k).contiguous(),
                                       weight.reshape(-1), 1.0, 1.0, BACKEND)  # fmt: skip
    assert torch.equal(coords.reshape(-1, k), coords_fwd)  # anchors made with project give a zero loss


# ---------------------------------------------------------------- an architecture without checked tiles


@pytest.fixture
def fresh_family_choice():
    """The unknown-architecture choice (and its one-time warning) is cached per (capability, limit)."""
    triton_penalty._unknown_arch_family.cache_clear()
    yield
    triton_penalty._unknown_arch_family.cache_clear()


@pytest.mark.parametrize(
    "capability, shared_kb, family",
    [
        (100, 227, "sm90"),  # B200-like: the Hopper tiles fit
        (120, 99, "sm86"),  # RTX 50xx-like: 99 KB per block, as on sm_86/89
        (87, 163, "sm80"),  # Jetson Orin: sm_80's shared memory
        (75, 99, "sm86"),  # below sm_80, never the sm_90 tiles
    ],
)
def test_unknown_architecture_takes_tiles_that_fit(capability, shared_kb, family, fresh_family_choice):
    with pytest.warns(RuntimeWarning, match=f"no tile configs checked for sm_{capability}; using the {family} tiles"):
        assert triton_penalty.tile_family(capability, shared_kb * 1024) == family
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        assert triton_penalty.tile_family(capability, shared_kb * 1024) == family
    assert triton_penalty._families()[family].shared_bytes <= shared_kb * 1024


def test_unknown_architecture_without_a_limit_takes_the_smallest(fresh_family_choice):
    with pytest.warns(RuntimeWarning, match="the smallest"):
        assert triton_penalty.fwd_config(8, 100) == triton_penalty._families()["sm86"].fwd


def test_unknown_architecture_runs_the_chosen_tiles(monkeypatch, fresh_family_choice):
    """The launchers ask the device for its limit (fake properties here) and the kernels meet the contract
    on the tiles chosen; too little shared memory is a clear error before any launch."""
    monkeypatch.setattr(triton_penalty, "device_capability", lambda device: 120)
    monkeypatch.setattr(triton_penalty, "shared_memory_per_block", lambda device: 99 * 1024)
    chosen = []
    real = triton_penalty.bwd_config
    monkeypatch.setattr(triton_penalty, "bwd_config", lambda *a: chosen.append(real(*a)) or chosen[-1])
    inputs = make_inputs((130,), 300, 33, torch.bfloat16, weights="zeros_some", device=DEVICE)
    hidden, basis, anchors, weight = inputs
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.3, 0.7, 2.5)
    h = hidden.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="sm_120; using the sm86 tiles"):
        loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.3, gram_coef=0.7, backend=BACKEND)
    (loss * 2.5).backward()
    assert chosen == [triton_penalty.BWD_WIDE_CONFIG_SM86]
    check_close(loss, ref_loss, LOSS_TOL[torch.bfloat16], None, "loss", inputs.seed)
    check_close(h.grad, ref_grad, GRAD_TOL[torch.bfloat16], ELEM_GRAD_TOL[torch.bfloat16], "grad", inputs.seed)

    monkeypatch.setattr(triton_penalty, "shared_memory_per_block", lambda device: 64 * 1024)  # T4-like
    with pytest.raises(RuntimeError, match=r"need at least \d+ KB of shared memory per block.*allows 64 KB.*torch"):
        rg.geometry_loss(hidden, basis, anchors, weight, gram_coef=0.7, backend=BACKEND)
