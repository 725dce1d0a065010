"""Input checks for the penalty ops, and the basis helper.

Shape, dtype and device checks are free and always run.  The value checks
(orthonormal basis, finite basis and anchors, non-negative finite weights) read
values back to the host, which costs a device synchronisation; they run by
default in the functional API and are skipped with ``validate=False`` (and while
``torch.compile`` traces, where a host read would break the graph).  Callers
that check their data once where it enters -- ``RefusalGuard`` validates the
basis when it is loaded and the anchors when they are made -- call the ops with
``validate=False`` on the hot path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ORTHONORMAL_ATOL", "orthonormalize_basis", "check_inputs", "check_values"]

#: max |B^T B - I| accepted for a basis (float32 QR lands near 1e-6).
ORTHONORMAL_ATOL = 1e-4

HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def orthonormalize_basis(basis: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return an orthonormal basis (d x k) spanning the columns of ``basis``.

    QR in float64; the signs are fixed so each output column keeps a positive
    dot product with the input column it came from (a direction stays a direction).
    Raises ValueError when the columns are (numerically) linearly dependent.
    """
    if basis.dim() == 1:
        basis = basis[:, None]
    if basis.dim() != 2:
        raise ValueError(f"basis must be d x k (or a single direction of size d); got shape {tuple(basis.shape)}")
    if not basis.is_floating_point():
        raise TypeError(f"basis must be a floating-point tensor; got {basis.dtype}")
    b = basis.detach().to(torch.float64)
    if not torch.isfinite(b).all():
        raise ValueError("basis contains NaN or Inf; fix the directions before orthonormalizing")
    d, k = b.shape
    if k > d:
        raise ValueError(f"basis has k={k} columns but only d={d} rows; at most d directions can be orthonormal")
    q, r = torch.linalg.qr(b)
    diag = torch.diagonal(r)
    scale = b.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    if (diag.abs() / scale < 1e-6).any():
        raise ValueError("basis columns are linearly dependent (or zero); drop the redundant directions")
    q = q * torch.sign(diag)[None, :]
    # QR returns Q column-major; the kernels take a row-major (d, k) basis, and a
    # non-contiguous one would be copied on every call.
    return q.to(dtype).contiguous()


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_inputs(
    hidden: Tensor,
    basis: Tensor,
    anchors: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    allowed_hidden_dtypes: tuple[torch.dtype, ...] = HIDDEN_DTYPES,
) -> None:
    """Free checks: types, ranks, sizes, dtypes, devices. Raises TypeError/ValueError."""
    for name, t in (("hidden", hidden), ("basis", basis), ("anchors", anchors), ("weight", weight)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (..., d); got a 0-dim tensor")
    if hidden.dtype not in allowed_hidden_dtypes:
        names = ", ".join(str(dt).replace("torch.", "") for dt in allowed_hidden_dtypes)
        raise TypeError(f"hidden has dtype {hidden.dtype}; this backend takes {names} (use backend='torch' for others)")
    if basis.dim() != 2:
        raise ValueError(
            f"basis must be 2-D (d x k); got shape {_shape(basis)}. For a single direction use basis[:, None]."
        )
    d, k = basis.shape
    if hidden.shape[-1] != d:
        raise ValueError(
            f"hidden's last dim is {hidden.shape[-1]} but basis has d={d} rows; "
            "the basis must come from a model with the same hidden size"
        )
    if not 1 <= k <= 64:
        raise ValueError(f"basis must have 1 to 64 columns (k); got k={k}")
    if not basis.is_floating_point():
        raise TypeError(f"basis must be floating point (float32 recommended); got {basis.dtype}")
    if basis.device != hidden.device:
        raise ValueError(
            f"basis is on {basis.device} but hidden is on {hidden.device}; move it with basis.to(hidden.device)"
        )
    lead = _shape(hidden)[:-1]
    if anchors is not None:
        if not anchors.is_floating_point():
            raise TypeError(f"anchors must be floating point; got {anchors.dtype}")
        if _shape(anchors) != lead + (k,):
            raise ValueError(
                f"anchors must have shape {lead + (k,)} (hidden's leading dims, then k); got {_shape(anchors)}. "
                "Make them with project(frozen_hidden, basis)."
            )
        if anchors.device != hidden.device:
            raise ValueError(
                f"anchors are on {anchors.device} but hidden is on {hidden.device}; move them to the same device"
            )
    if weight is not None:
        if weight.is_complex():
            raise TypeError(f"weight must be a real tensor; got {weight.dtype}")
        if _shape(weight) != lead:
            raise ValueError(
                f"weight must have shape {lead} (hidden's leading dims, one weight per token); got {_shape(weight)}"
            )
        if weight.device != hidden.device:
            raise ValueError(
                f"weight is on {weight.device} but hidden is on {hidden.device}; move it to the same device"
            )


def check_values(basis: Tensor, anchors: Tensor | None = None, weight: Tensor | None = None) -> None:
    """Value checks (one host synchronisation for all of them). Raises ValueError."""
    b = basis.detach().to(torch.float32)
    k = b.shape[1]
    flags = [~torch.isfinite(b).all()]
    eye = torch.eye(k, dtype=torch.float32, device=b.device)
    with torch.autocast(b.device.type, enabled=False):  # a bf16 autocast matmul would misjudge orthonormality
        ortho_err = (b.T @ b - eye).abs().max()
    flags.append(ortho_err)
    if anchors is not None:
        flags.append(~torch.isfinite(anchors.detach()).all())
    if weight is not None:
        w = weight.detach().to(torch.float32)
        flags.append(~torch.isfinite(w).all())
        flags.append((w < 0).any())
    values = torch.stack([f.to(torch.float32) for f in flags]).tolist()
    if values[0]:
        raise ValueError("basis contains NaN or Inf; rebuild it (e.g. extract_refusal_basis) or fix the source")
    if not values[1] <= ORTHONORMAL_ATOL:
        raise ValueError(
            f"basis columns are not orthonormal: max |B^T B - I| = {values[1]:.2e} > {ORTHONORMAL_ATOL:.0e}. "
            "Pass it through refusalguard_kernels.orthonormalize_basis(basis) first."
        )
    i = 2
    if anchors is not None:
        if values[i]:
            raise ValueError("anchors contain NaN or Inf; recompute them with project() on the frozen model")
        i += 1
    if weight is not None:
        if values[i]:
            raise ValueError("weight contains NaN or Inf; weights must be finite and >= 0")
        if values[i + 1]:
            raise ValueError("weight has negative entries; weights must be >= 0 (use 0 to exclude a token)")
