"""pytest-benchmark microbenchmarks of the guard op (forward, backward, both).

    pytest benchmarks/test_bench_penalty.py --benchmark-json=out.json

On a GPU: the target shape (N=16384, d=4096, k=8, bf16) for each available variant.
On CPU: a small shape with the reference only (proves the harness runs; not a speed
measurement).  Every timed call ends with a device synchronisation, so the numbers are
wall time per call including launch overhead; the device-time table with % of copy
bandwidth comes from benchmarks/run_penalty_bench.py.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import penalty_bench as pb  # noqa: E402

import refusalguard_kernels as rg  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = (16384, 4096, 8) if CUDA else (512, 256, 8)
VARIANTS = (
    ["eager", "compiled"] + [b for b in ("triton", "cuda") if b in rg.available_backends()] if CUDA else ["eager"]
)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def inputs():
    N, d, k = SHAPE
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(N, d, device=DEVICE, generator=gen).to(torch.bfloat16).requires_grad_(True)
    basis = rg.orthonormalize_basis(torch.randn(d, k, device=DEVICE, dtype=torch.float64, generator=gen))
    anchors = hidden.detach().float() @ basis + 0.1 * torch.randn(N, k, device=DEVICE, generator=gen)
    weight = torch.rand(N, device=DEVICE, generator=gen)
    grad_out = torch.randn(N, d, device=DEVICE, generator=gen).to(torch.bfloat16)
    return hidden, basis, anchors, weight, grad_out


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwdbwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_guard(benchmark, inputs, variant, mode):
    hidden, basis, anchors, weight, grad_out = inputs
    fn = pb.variant_fn(variant)
    s = torch.ones((), device=DEVICE)
    benchmark.extra_info.update(dict(zip(("N", "d", "k"), SHAPE), dtype="bfloat16", device=DEVICE, variant=variant))

    if mode == "fwd":

        def call():
            out = fn(hidden, basis, anchors, weight, 1.0, 0.1)
            _sync()
            return out
    elif mode == "bwd":
        out, loss = fn(hidden, basis, anchors, weight, 1.0, 0.1)

        def call():
            hidden.grad = None
            torch.autograd.backward([out, loss], [grad_out, s], retain_graph=True)
            _sync()
    else:

        def call():
            hidden.grad = None
            out, loss = fn(hidden, basis, anchors, weight, 1.0, 0.1)
            torch.autograd.backward([out, loss], [grad_out, s])
            _sync()

    benchmark.pedantic(call, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1)


def test_compiled_backward_only_replay_cpu():
    """What the backward-only timing does to the compiled variant: one forward, then backward
    twice with retain_graph=True.  With donated buffers the second backward raises; the
    harness turns them off before compiling (tiny shapes, CPU: a check, not a timing)."""
    fn = pb.variant_fn("compiled")
    gen = torch.Generator().manual_seed(0)
    basis = rg.orthonormalize_basis(torch.randn(32, 4, dtype=torch.float64, generator=gen)).float()
    hidden = torch.randn(16, 32, generator=gen).requires_grad_(True)
    anchors = torch.randn(16, 4, generator=gen)
    weight = torch.rand(16, generator=gen)
    grad_out, s = torch.randn(16, 32, generator=gen), torch.ones(())
    out, loss = fn(hidden, basis, anchors, weight, 1.0, 0.1)
    grads = []
    for _ in range(2):
        hidden.grad = None
        torch.autograd.backward([out, loss], [grad_out, s], retain_graph=True)
        grads.append(hidden.grad.clone())
    assert torch.equal(grads[0], grads[1])
