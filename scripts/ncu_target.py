"""One guard forward+backward at the benchmark's target shape, for `ncu` (see scripts/gpu_check.sh)."""

import torch

import refusalguard_kernels as rg

N, d, k = 16384, 4096, 8
hidden = torch.randn(N, d, device="cuda").bfloat16().requires_grad_(True)
basis = rg.orthonormalize_basis(torch.randn(d, k, device="cuda", dtype=torch.float64))
anchors = (hidden.detach().float() @ basis) + 0.1 * torch.randn(N, k, device="cuda")
weight = torch.rand(N, device="cuda")
grad_out = torch.randn_like(hidden)
for _ in range(4):
    hidden.grad = None
    out, loss = rg.guard(
        hidden, basis, anchors, weight, drift_coef=1.0, gram_coef=0.1, backend="triton", validate=False
    )
    torch.autograd.backward([out, loss], [grad_out, torch.ones((), device="cuda")])
torch.cuda.synchronize()
