"""Public API: dispatch, bad input, torch.compile."""

import pytest
import torch
from penalty_cases import make_inputs, rel_err

import refusalguard_kernels as rg
from refusalguard_kernels import reference
from refusalguard_kernels.backends import resolve_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKENDS = ["torch", "triton"]


def test_available_backends():
    names = rg.available_backends()
    assert names[0] == "torch"
    assert "triton" in names  # CUDA present, or TRITON_INTERPRET=1 set by conftest
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_unknown_backend_is_a_clear_error():
    hidden, basis, anchors, _ = make_inputs((4,), 8, 2, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        rg.geometry_loss(hidden, basis, anchors, backend="fast")


def test_cuda_backend_missing_is_a_clear_error():
    if "cuda" in rg.available_backends():
        pytest.skip("the CUDA extension is built here")
    hidden, basis, anchors, _ = make_inputs((4,), 8, 2, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda' is not available"):
        rg.geometry_loss(hidden, basis, anchors, backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def test_auto_skips_triton_on_a_gpu_its_tiles_do_not_fit(monkeypatch):
    """ "auto" on a GPU whose shared memory per block fits no Triton tile family (T4-class, 64 KB) takes the next
    backend instead of failing at the first launch; where a family fits, or the architecture is checked, Triton.
    Fake devices: the capability and limit are what the launchers would read."""
    from refusalguard_kernels import backends
    from refusalguard_kernels.ops import layout, triton_penalty

    # triton_penalty binds layout's functions at import: imported above, before they are faked, it keeps the real ones.
    monkeypatch.setattr(backends, "_available", lambda interpreting: ("torch", "triton"))
    monkeypatch.setattr(layout, "device_capability", lambda device: 77)
    backends.refresh()
    try:
        monkeypatch.setattr(layout, "shared_memory_per_block", lambda device: 64 * 1024)
        assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"
        with pytest.raises(RuntimeError, match="allows 64 KB"):  # asked for by name, the launch says why
            triton_penalty.tile_family(77, 64 * 1024)
        backends.refresh()
        monkeypatch.setattr(layout, "shared_memory_per_block", lambda device: 101 * 1024)
        with pytest.warns(RuntimeWarning, match="no tile configs checked for sm_77"):
            assert resolve_backend("auto", torch.device("cuda", 1)) == "triton"
        monkeypatch.setattr(layout, "device_capability", lambda device: 90)
        monkeypatch.setattr(layout, "shared_memory_per_block", lambda device: 64 * 1024)  # never asked for sm_90
        assert resolve_backend("auto", torch.device("cuda", 2)) == "triton"
    finally:
        backends.refresh()


# ------------------------------------------------------------------ bad input


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    return request.param


def _good(lead=(3, 5), d=16, k=3):
    return make_inputs(lead, d, k, torch.float32, weights="random", device=DEVICE)


def test_rank_and_size_errors(backend):
    hidden, basis, anchors, weight = _good()
    with pytest.raises(ValueError, match="basis must be 2-D"):
        rg.geometry_loss(hidden, basis[:, 0], anchors, weight, backend=backend)
    with pytest.raises(ValueError, match="hidden's last dim is 16 but basis has d=17"):
        rg.geometry_loss(hidden, torch.zeros(17, 3, device=DEVICE), anchors, weight, backend=backend)
    with pytest.raises(ValueError, match=r"anchors must have shape \(3, 5, 3\)"):
        rg.geometry_loss(hidden, basis, anchors[:, :4], weight, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(3, 5\)"):
        rg.geometry_loss(hidden, basis, anchors, weight.reshape(-1), backend=backend)
    with pytest.raises(ValueError, match="1 to 64 columns"):
        rg.project(torch.randn(4, 80, device=DEVICE), torch.randn(80, 65, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="at least one dimension"):
        rg.project(torch.tensor(1.0, device=DEVICE), basis, backend=backend)
    with pytest.raises(ValueError, match="no tokens"):
        rg.project(torch.randn(0, 16, device=DEVICE), basis, backend=backend)


def test_dtype_errors(backend):
    hidden, basis, anchors, weight = _good()
    with pytest.raises(TypeError, match="hidden has dtype torch.int64"):
        rg.project(hidden.long(), basis, backend=backend)
    with pytest.raises(TypeError, match="basis must be floating point"):
        rg.project(hidden, basis.long(), backend=backend)
    with pytest.raises(TypeError, match="anchors must be floating point"):
        rg.geometry_loss(hidden, basis, anchors.long(), backend=backend)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        rg.project(hidden.tolist(), basis, backend=backend)


def test_float64_hidden_needs_the_reference():
    hidden, basis, anchors, _ = _good()
    with pytest.raises(TypeError, match="use backend='torch'"):
        rg.geometry_loss(hidden.double(), basis, anchors, backend="triton")
    rg.geometry_loss(hidden.double(), basis, anchors, backend="torch")  # fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices (CPU and CUDA)")
def test_device_mismatch():
    hidden, basis, anchors, weight = _good()
    with pytest.raises(ValueError, match="basis is on cpu but hidden is on cuda"):
        rg.project(hidden, basis.cpu())
    with pytest.raises(ValueError, match="anchors are on cpu"):
        rg.geometry_loss(hidden, basis, anchors.cpu())
    with pytest.raises(ValueError, match="weight is on cpu"):
        rg.geometry_loss(hidden, basis, anchors, weight.cpu())


def test_device_mismatch_cpu_meta():
    hidden, basis, anchors, _ = make_inputs((3,), 8, 2, torch.float32)
    with pytest.raises(ValueError, match="basis is on meta but hidden is on cpu"):
        rg.project(hidden, basis.to("meta"), backend="torch")


def test_value_errors(backend):
    hidden, basis, anchors, weight = _good()
    not_ortho = basis * 1.01
    with pytest.raises(ValueError, match="not orthonormal.*orthonormalize_basis"):
        rg.geometry_loss(hidden, not_ortho, anchors, weight, backend=backend)
    nan_basis = basis.clone()
    nan_basis[2, 1] = float("nan")
    with pytest.raises(ValueError, match="basis contains NaN or Inf"):
        rg.project(hidden, nan_basis, backend=backend)
    inf_anchors = anchors.clone()
    inf_anchors[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="anchors contain NaN or Inf"):
        rg.geometry_loss(hidden, basis, inf_anchors, weight, backend=backend)
    neg = weight.clone()
    neg[0, 0] = -0.5
    with pytest.raises(ValueError, match="negative entries"):
        rg.guard(hidden, basis, anchors, neg, backend=backend)
    nan_w = weight.clone()
    nan_w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        rg.geometry_loss(hidden, basis, anchors, nan_w, backend=backend)
    with pytest.raises(ValueError, match="drift_coef must be a finite number >= 0"):
        rg.geometry_loss(hidden, basis, anchors, drift_coef=-1.0, backend=backend)
    with pytest.raises(ValueError, match="gram_coef must be a finite number >= 0"):
        rg.geometry_loss(hidden, basis, anchors, gram_coef=float("inf"), backend=backend)


def test_validate_false_skips_value_checks(backend):
    """The caller vouches for its data: a non-orthonormal basis is used as given."""
    hidden, basis, anchors, weight = _good()
    scaled = basis * 2.0
    loss = rg.geometry_loss(hidden, scaled, anchors, weight, backend=backend, validate=False)
    want = reference.geometry_loss(hidden.double(), scaled.double(), anchors.double(), weight.double())
    assert rel_err(loss, want) <= 1e-4


def test_orthonormalize_basis():
    gen = torch.Generator().manual_seed(145)
    raw = torch.randn(30, 4, dtype=torch.float64, generator=gen)
    basis = rg.orthonormalize_basis(raw)
    assert basis.dtype == torch.float32 and basis.shape == (30, 4)
    # row-major, as the kernels read it (QR's Q is column-major: a copy on every call otherwise)
    assert basis.is_contiguous() and rg.orthonormalize_basis(raw, dtype=torch.float64).is_contiguous()
    assert (basis.double().T @ basis.double() - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-6
    # each column keeps the sense of its source direction
    assert ((basis.double() * raw).sum(0) > 0).all()
    single = rg.orthonormalize_basis(torch.randn(12, generator=gen))
    assert single.shape == (12, 1) and abs(single.norm().item() - 1) < 1e-6
    with pytest.raises(ValueError, match="linearly dependent"):
        rg.orthonormalize_basis(torch.stack([raw[:, 0], 2 * raw[:, 0]], 1))
    with pytest.raises(ValueError, match="at most d directions"):
        rg.orthonormalize_basis(torch.randn(3, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        rg.orthonormalize_basis(torch.full((5, 2), float("nan")))


# ------------------------------------------------------------------ torch.compile


def _step(hidden, basis, anchors, weight, backend):
    coords = rg.project(hidden, basis, backend=backend, validate=False)
    loss = rg.geometry_loss(
        hidden, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=backend, validate=False
    )
    out, guard_loss = rg.guard(
        hidden, basis, anchors, weight, drift_coef=0.3, gram_coef=0.2, backend=backend, validate=False
    )
    return (out * 2).sum() + coords.sum() + loss * 3 + guard_loss


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_traces_without_graph_breaks(backend):
    """fullgraph=True turns any graph break into an error."""
    torch._dynamo.reset()
    compiler = "inductor" if DEVICE == "cuda" else "aot_eager"
    hidden, basis, anchors, weight = make_inputs((2, 9), 40, 3, torch.float32, device=DEVICE)
    results = []
    for fn in (_step, torch.compile(_step, fullgraph=True, backend=compiler)):
        h = hidden.clone().requires_grad_(True)
        value = fn(h, basis, anchors, weight, backend)
        value.backward()
        results.append((value.detach(), h.grad))
    assert rel_err(results[1][0], results[0][0]) <= 1e-6
    assert rel_err(results[1][1], results[0][1]) <= 1e-6


def test_autocast_does_not_lower_the_reference_precision():
    """Inside a bf16 autocast region the contract still holds: fp32 coordinates, and an
    orthonormal basis is still accepted."""
    hidden, basis, anchors, weight = make_inputs((30,), 64, 4, torch.float32)
    want_coords = hidden.double() @ basis.double()
    want_loss = reference.geometry_loss(hidden.double(), basis.double(), anchors.double(), weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coords = rg.project(hidden, basis, backend="torch")
        loss = rg.geometry_loss(hidden, basis, anchors, weight, backend="torch")
    assert coords.dtype == torch.float32 and rel_err(coords, want_coords) <= 1e-6
    assert rel_err(loss, want_loss) <= 1e-5
