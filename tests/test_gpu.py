"""GPU-only checks: 64-bit offsets on a real > 2^31-element tensor, CUDA-graph capture
(which fails on any host synchronisation), and the kernel backends against each other.
The shape/dtype grid itself runs compiled on the GPU through test_triton_penalty.py."""

import pytest
import torch
from penalty_cases import (
    ELEM_GRAD_TOL,
    GRAD_TOL,
    LOSS_TOL,
    ROUND_SLACK,
    check_close,
    make_inputs,
    max_rel_err,
    reference_loss_and_grad,
    rel_err,
    ulp,
)

import refusalguard_kernels as rg
from refusalguard_kernels import reference

pytestmark = pytest.mark.gpu

KERNEL_BACKENDS = [b for b in ("triton", "cuda") if b in rg.available_backends()]


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_more_than_2_pow_31_elements(backend):
    N, d, k = 2**20 + 3, 2112, 8  # N * d = 2.2e9 > 2^31
    gen = torch.Generator(device="cuda").manual_seed(1234)
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    basis = rg.orthonormalize_basis(torch.randn(d, k, dtype=torch.float64, device="cuda", generator=gen))
    coords64 = torch.cat([hidden[i : i + 65536].double() @ basis.double() for i in range(0, N, 65536)])
    anchors = (coords64 + 0.3 * torch.randn(N, k, device="cuda", dtype=torch.float64, generator=gen)).float()
    weight = torch.rand(N, device="cuda", generator=gen)

    # float64 loss and dL/dZ from the float64 coordinates (closed form, O(N k) memory).
    z, a, w = coords64, anchors.double(), weight.double()
    W = w.sum()
    gram_diff = ((z * w[:, None]).T @ z - (a * w[:, None]).T @ a) / W
    ref_loss = (w * ((z - a) ** 2).sum(1)).sum() / W + 0.5 * (gram_diff**2).sum()
    dz = reference.loss_grad_coords(z, a, w, drift_coef=1.0, gram_coef=0.5)

    h = hidden.requires_grad_(True)
    loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=backend, validate=False)
    loss.backward()
    assert rel_err(loss, ref_loss) <= LOSS_TOL[torch.bfloat16]
    err2 = ref2 = 0.0
    max_err = max_ref = excess = 0.0
    for i in range(0, N, 65536):
        ref_chunk = dz[i : i + 65536] @ basis.double().T
        got = h.grad[i : i + 65536].double()
        err2 += (got - ref_chunk).pow(2).sum().item()
        ref2 += ref_chunk.pow(2).sum().item()
        max_err = max(max_err, (got - ref_chunk).abs().max().item())
        max_ref = max(max_ref, ref_chunk.abs().max().item())
        half_ulp = 0.5 * ulp(torch.maximum(got.abs(), ref_chunk.abs()), torch.bfloat16)
        excess = max(excess, ((got - ref_chunk).abs() - half_ulp).max().item())
    assert (err2 / ref2) ** 0.5 <= GRAD_TOL[torch.bfloat16]
    assert max_err / max_ref <= ELEM_GRAD_TOL[torch.bfloat16]
    assert excess / max_ref <= ROUND_SLACK[torch.bfloat16], "an element is not the rounded-to-nearest gradient"
    # the last rows (beyond 2^31 elements) were written and are right
    tail_ref = dz[-3:] @ basis.double().T
    assert rel_err(h.grad[-3:], tail_ref) <= GRAD_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture_forward_and_backward(backend):
    """Capture fails on any host sync (.item(), tensor-valued Python branches)."""
    hidden, basis, anchors, weight = make_inputs((4, 512), 1024, 8, torch.bfloat16, weights="zeros_some", device="cuda")
    h = hidden.clone().requires_grad_(True)
    grad_out = torch.randn_like(hidden)

    def step():
        h.grad = None
        out, loss = rg.guard(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=backend, validate=False)
        torch.autograd.backward([out, loss], [grad_out, torch.full((), 2.0, device="cuda")])
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    eager_loss = step().detach().clone()
    eager_grad = h.grad.clone()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h.grad = None
        out, loss = rg.guard(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=backend, validate=False)
        torch.autograd.backward([out, loss], [grad_out, torch.full((), 2.0, device="cuda")])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, eager_loss)
    assert torch.equal(h.grad, eager_grad)


@pytest.mark.skipif(len(KERNEL_BACKENDS) < 2, reason="needs both triton and cuda backends")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_and_triton_agree(dtype):
    """Each backend against the float64 contract (norm-wise, element-wise, rounding), then the two
    against each other: losses within twice the contract bound, gradients element by element within
    one ulp of the reference (each is within half an ulp plus the slack of it)."""
    inputs = make_inputs((3, 700), 2050, 12, dtype, weights="zeros_some", device="cuda")
    hidden, basis, anchors, weight = inputs
    # fp16 trains under a loss scale (GradScaler): unscaled, these gradients sit in fp16's subnormals.
    grad_scale = 1024.0 if dtype == torch.float16 else 1.0
    ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.3, grad_scale)
    results = {}
    for backend in KERNEL_BACKENDS:
        h = hidden.clone().requires_grad_(True)
        loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.3, backend=backend)
        (loss * grad_scale).backward()
        check_close(loss, ref_loss, LOSS_TOL[dtype], None, f"{backend} loss", inputs.seed)
        check_close(h.grad, ref_grad, GRAD_TOL[dtype], ELEM_GRAD_TOL[dtype], f"{backend} grad", inputs.seed)
        results[backend] = (loss.detach(), h.grad)
    (loss_t, grad_t), (loss_c, grad_c) = results["triton"], results["cuda"]
    assert rel_err(loss_t, loss_c) <= 2 * LOSS_TOL[dtype], f"seed={inputs.seed}"
    assert max_rel_err(grad_t, grad_c) <= 2 * ELEM_GRAD_TOL[dtype], f"seed={inputs.seed}"
    if dtype in ROUND_SLACK:
        # |t - c| <= |t - ref| + |ref - c| <= one ulp + 2 slack max|ref|: the same value or neighbours.
        t, c = grad_t.double().cpu(), grad_c.double().cpu()
        largest = torch.maximum(torch.maximum(t.abs(), c.abs()), ref_grad.abs())
        bound = ulp(largest, dtype) + 2 * ROUND_SLACK[dtype] * ref_grad.abs().max()
        assert ((t - c).abs() <= bound).all(), f"seed={inputs.seed}"


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs two GPUs: with one, the tensors' device is always the current one and nothing is tested "
    "(tests/test_triton_penalty.py checks on CPU that every launch runs inside the device context)",
)
def test_triton_launches_on_the_tensors_device(monkeypatch):
    """Every Triton launch runs with the tensors' device current, whichever device was current
    before (a model split over GPUs), and the caller's current device is restored."""
    from refusalguard_kernels.ops import triton_penalty as tp

    current_at_launch = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                current_at_launch.append(torch.cuda.current_device())
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name in ("_penalty_fwd_kernel", "_penalty_finalize_kernel", "_penalty_bwd_kernel"):
        monkeypatch.setattr(tp, name, Recording(getattr(tp, name)))
    n = torch.cuda.device_count()
    for dev in range(n):
        inputs = make_inputs((2, 300), 512, 8, torch.bfloat16, weights="random", device=f"cuda:{dev}")
        hidden, basis, anchors, weight = inputs
        ref_loss, ref_grad = reference_loss_and_grad(hidden, basis, anchors, weight, 1.0, 0.5)
        for current in range(n):
            current_at_launch.clear()
            with torch.cuda.device(current):
                h = hidden.clone().requires_grad_(True)
                loss = rg.geometry_loss(h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend="triton")
                loss.backward()
                rg.project(hidden, basis, backend="triton")
                assert torch.cuda.current_device() == current
            torch.cuda.synchronize(dev)
            assert len(current_at_launch) == 4, current_at_launch  # fwd, finalize, bwd, project
            assert set(current_at_launch) == {dev}, f"tensors on cuda:{dev}, launched on {current_at_launch}"
            check_close(loss, ref_loss, LOSS_TOL[torch.bfloat16], None, "loss", inputs.seed)
            check_close(h.grad, ref_grad, GRAD_TOL[torch.bfloat16], ELEM_GRAD_TOL[torch.bfloat16], "grad", inputs.seed)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_replay_reads_the_current_basis(backend):
    """A captured step reads the basis' memory at replay: a new basis written in place (as
    ``.data`` or a raw kernel would) is used by the next replay, with nothing split or cached
    at capture time."""
    inputs = make_inputs((4, 256), 1024, 8, torch.bfloat16, weights="random", device="cuda")
    hidden, basis, anchors, weight = inputs
    basis = basis.contiguous()
    h = hidden.clone().requires_grad_(True)

    def step():
        h.grad = None
        loss = rg.geometry_loss(
            h, basis, anchors, weight, drift_coef=1.0, gram_coef=0.5, backend=backend, validate=False
        )
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    gen = torch.Generator().manual_seed(inputs.seed + 1)
    other = rg.orthonormalize_basis(torch.randn(1024, 8, dtype=torch.float64, generator=gen)).cuda()
    for want_basis in (basis.clone(), other):
        basis.data.copy_(want_basis)
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_grad = reference_loss_and_grad(hidden, want_basis, anchors, weight, 1.0, 0.5)
        check_close(loss, ref_loss, LOSS_TOL[torch.bfloat16], None, "loss", inputs.seed)
        check_close(h.grad, ref_grad, GRAD_TOL[torch.bfloat16], ELEM_GRAD_TOL[torch.bfloat16], "grad", inputs.seed)
