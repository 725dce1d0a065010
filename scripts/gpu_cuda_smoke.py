#!/usr/bin/env python
"""GPU smoke test of the CUDA C++ backend: build (just in time unless installed), then a
pass/fail table against the float64 reference, step-0 exactness, determinism, poisoned
outputs, agreement with the Triton backend, and a few informational timings.

    python scripts/gpu_cuda_smoke.py            # exit status 0 when every row passes
    python scripts/gpu_cuda_smoke.py --verbose  # show the compiler output of the JIT build

Tolerances are the contract's (issue 2): ||x - ref|| / ||ref|| against float64 math on
the same rounded inputs -- loss 1e-4 (fp32) / 1e-3 (fp16, bf16); gradient 1e-4 (fp32),
1e-3 (fp16), 5e-3 (bf16).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import refusalguard_kernels as rk
from refusalguard_kernels import reference
from refusalguard_kernels.ops import cuda_penalty, penalty

LOSS_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 5e-3}
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel(x, ref) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def inputs(n, d, k, dtype, weight_kind="zeros", transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:
        hidden = torch.randn(4, n // 4, d, generator=g).to(dtype).cuda().transpose(0, 1)
    else:
        hidden = torch.randn(n, d, generator=g).to(dtype).cuda()
    lead = hidden.shape[:-1]
    basis = rk.orthonormalize_basis(torch.randn(d, k, generator=g, dtype=torch.float64)).cuda()
    z = hidden.double() @ basis.double()
    anchors = (z + 0.5 * torch.randn(z.shape, generator=g, dtype=torch.float64).cuda()).float()
    weight = None
    if weight_kind is not None:
        weight = torch.rand(lead, generator=g).cuda()
        if weight_kind == "zeros":
            weight[..., ::3] = 0
        elif weight_kind == "allzero":
            weight.zero_()
    return hidden, basis, anchors, weight


def loss_and_grad(backend, hidden, basis, anchors, weight, gram_coef, s=0.37):
    h = hidden.detach().requires_grad_(True)
    loss = rk.geometry_loss(h, basis, anchors, weight, drift_coef=1.3, gram_coef=gram_coef, backend=backend)
    (grad,) = torch.autograd.grad(loss, h, grad_outputs=torch.tensor(s, device="cuda"))
    return loss.detach(), grad


def ref_loss_and_grad(hidden, basis, anchors, weight, gram_coef, s=0.37):
    h, b, a = hidden.double(), basis.double(), anchors.double()
    w = None if weight is None else weight.double()
    loss = reference.geometry_loss(h, b, a, w, drift_coef=1.3, gram_coef=gram_coef)
    dz = reference.loss_grad_coords(reference.project(h, b), a, w, drift_coef=1.3, gram_coef=gram_coef)
    return loss, s * (dz @ b.T).reshape(hidden.shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to smoke-test")
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__} (CUDA {torch.version.cuda})")
    start = time.perf_counter()
    if cuda_penalty.load_error() is not None:
        print("extension not installed: building just in time ...", flush=True)
        cuda_penalty.build_jit(verbose=args.verbose)
    print(f"extension ready in {time.perf_counter() - start:.1f} s; backends: {rk.available_backends()}")
    cuda_penalty._poison_outputs = True  # every output starts as NaN: an unwritten element fails its row

    rows, failed = [], 0

    def record(name, ok, detail):
        nonlocal failed
        failed += not ok
        rows.append((name, "PASS" if ok else "FAIL", detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<44} {detail}", flush=True)

    for n, d, k, transposed in [
        (1, 1000, 3, False),
        (1000, 4099, 1, True),
        (1000, 1000, 8, False),
        (256, 4099, 16, True),
        (1000, 1000, 33, False),
        (1000, 4099, 64, True),
    ]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for gram in (0.0, 0.7):
                hidden, basis, anchors, weight = inputs(n, d, k, dtype, "zeros", transposed)
                loss, grad = loss_and_grad("cuda", hidden, basis, anchors, weight, gram)
                rl, rg = ref_loss_and_grad(hidden, basis, anchors, weight, gram)
                el, eg = rel(loss, rl), rel(grad, rg)
                ok = el <= LOSS_TOL[dtype] and eg <= GRAD_TOL[dtype]
                name = f"ref N={n} d={d} k={k} {DT[dtype]} gram={gram}{' 3-D' if transposed else ''}"
                record(name, ok, f"loss {el:.1e}  grad {eg:.1e}")

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        hidden, basis, _, weight = inputs(1000, 4099, 16, dtype, "zeros", True)
        anchors = rk.project(hidden, basis, backend="cuda")
        h = hidden.detach().requires_grad_(True)
        out, loss = rk.guard(h, basis, anchors, weight, gram_coef=0.9, backend="cuda")
        g_out = torch.randn(h.shape, device="cuda").to(dtype)
        gh = torch.autograd.grad((out, loss), h, grad_outputs=(g_out, torch.tensor(3.0, device="cuda")))[0]
        record(
            f"step 0 exact zero {DT[dtype]}", loss.item() == 0.0 and torch.equal(gh, g_out), f"loss {loss.item():.3g}"
        )

        hidden, basis, anchors, weight = inputs(1000, 4099, 16, dtype, "zeros", True)
        h = hidden.detach().requires_grad_(True)
        out, loss = rk.guard(h, basis, anchors, weight, drift_coef=1.3, gram_coef=0.25, backend="cuda")
        g_out = torch.randn(h.shape, device="cuda").to(dtype) * 1e-3
        gh = torch.autograd.grad((out, loss), h, grad_outputs=(g_out, torch.tensor(0.61, device="cuda")))[0]
        _, rg = ref_loss_and_grad(hidden, basis, anchors, weight, 0.25, s=0.61)
        e = rel(gh, g_out.double() + rg)
        record(f"guard fused backward s=0.61 {DT[dtype]}", e <= GRAD_TOL[dtype], f"grad {e:.1e}")

        b, a, w = basis.float().contiguous(), anchors.reshape(-1, 16).contiguous(), weight.reshape(-1).contiguous()
        coords, _, _ = penalty.loss_forward_op(hidden, b, a, w, 1.0, 0.5, "cuda")
        record(
            f"project == loss-forward Z bitwise {DT[dtype]}",
            torch.equal(coords, penalty.project_op(hidden, b, "cuda")),
            "",
        )
        first = loss_and_grad("cuda", hidden, basis, anchors, weight, 0.5)
        same = all(
            torch.equal(x, y)
            for _ in range(3)
            for x, y in zip(loss_and_grad("cuda", hidden, basis, anchors, weight, 0.5), first)
        )
        record(f"run-to-run bitwise {DT[dtype]}", same, "")

        if "triton" in rk.available_backends():
            lt, gt = loss_and_grad("triton", hidden, basis, anchors, weight, 0.5)
            el, eg = rel(first[0], lt), rel(first[1], gt)
            record(
                f"cuda vs triton {DT[dtype]}",
                el <= 2 * LOSS_TOL[dtype] and eg <= 2 * GRAD_TOL[dtype],
                f"loss {el:.1e}  grad {eg:.1e}",
            )

    print("\ntimings (informational; median of 20, forward + backward of geometry_loss):")
    for n, d, k in [(16384, 4096, 8), (16384, 4096, 64), (32768, 8192, 16)]:
        hidden, basis, anchors, weight = inputs(n, d, k, torch.bfloat16, "rand")
        line = f"  N={n} d={d} k={k} bf16:"
        for backend in [b for b in ("cuda", "triton") if b in rk.available_backends()]:
            times = []
            for _ in range(23):
                h = hidden.detach().requires_grad_(True)
                start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start_ev.record()
                loss = rk.geometry_loss(h, basis, anchors, weight, gram_coef=0.5, backend=backend, validate=False)
                loss.backward()
                end_ev.record()
                torch.cuda.synchronize()
                times.append(start_ev.elapsed_time(end_ev))
            ms = sorted(times[3:])[len(times[3:]) // 2]
            gbps = 3 * hidden.numel() * hidden.element_size() / ms / 1e6
            line += f"  {backend} {ms:.3f} ms ({gbps:.0f} GB/s of H + grad traffic)"
        print(line)

    print(f"\n{len(rows) - failed}/{len(rows)} passed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
