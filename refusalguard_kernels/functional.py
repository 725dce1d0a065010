"""Public functional API: project, geometry_loss, guard.

Each call checks its inputs (shapes, dtypes and devices always; values unless
``validate=False``), picks a backend through ``backends.resolve_backend`` and runs
either the PyTorch reference or a kernel backend's torch.library ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from .backends import resolve_backend
from .validation import check_inputs, check_values

__all__ = ["project", "geometry_loss", "guard"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_DTYPES = _KERNEL_DTYPES + (torch.float64,)


_PENALTY = None


def _penalty():
    """ops.penalty, imported on first kernel use (importing it registers the torch.library ops,
    which the reference path never needs); kept here because an import statement per call
    costs about a microsecond."""
    global _PENALTY
    if _PENALTY is None:
        from .ops import penalty

        _PENALTY = penalty
    return _PENALTY


def _should_validate(validate: bool) -> bool:
    # Value checks read back to the host; under torch.compile that would break the graph.
    return validate and not torch.compiler.is_compiling()


def _check_coef(name: str, value: float) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python float; scale the returned loss to schedule it over training")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value


def _prepare(hidden, basis, anchors, weight, backend, validate):
    """Checks, then the backend name and the converted small tensors a kernel backend takes."""
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor; got {type(hidden).__name__}")
    name = resolve_backend(backend, hidden.device)
    check_inputs(
        hidden, basis, anchors, weight, allowed_hidden_dtypes=_REFERENCE_DTYPES if name == "torch" else _KERNEL_DTYPES
    )
    if math.prod(hidden.shape[:-1]) == 0:
        raise ValueError(f"hidden has no tokens (shape {tuple(hidden.shape)}); pass at least one row")
    if _should_validate(validate):
        check_values(basis, anchors, weight)
    if name == "torch":
        return name, basis, anchors, weight
    k = basis.shape[1]
    basis32 = _fp32(basis)
    anchors32 = None if anchors is None else _fp32(anchors if anchors.dim() == 2 else anchors.reshape(-1, k))
    weight32 = None if weight is None else _fp32(weight if weight.dim() == 1 else weight.reshape(-1))
    return name, basis32, anchors32, weight32


def _fp32(t: Tensor) -> Tensor:
    """``t.detach().to(float32).contiguous()`` without the calls that would return ``t`` unchanged:
    on the per-step path each one costs about a microsecond, and the tensors here usually are
    fp32, contiguous and without grad already."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _reference_loss(hidden, basis, anchors, weight, drift_coef: float, gram_coef: float) -> Tensor:
    # Anchors, weights and basis are constants of the penalty: no gradient flows into them.
    return reference.geometry_loss(
        hidden,
        basis.detach(),
        anchors.detach(),
        None if weight is None else weight.detach(),
        drift_coef=drift_coef,
        gram_coef=gram_coef,
    )


def project(hidden: Tensor, basis: Tensor, *, backend: str = "auto", validate: bool = True) -> Tensor:
    """Coordinates of ``hidden`` (..., d) in the orthonormal ``basis`` (d, k): a float32
    tensor (..., k), differentiable in ``hidden``.

    Its values are bitwise those the loss forward computes on the same backend, so
    anchors made with ``project`` on the unchanged model give exactly zero loss.
    """
    name, basis_c, _, _ = _prepare(hidden, basis, None, None, backend, validate)
    if name == "torch":
        return reference.project(hidden, basis_c.detach())
    pen = _penalty()
    if not (hidden.requires_grad and torch.is_grad_enabled()) and pen.plain_eager(hidden, basis_c):
        coords = pen.kernel_module(name).project(hidden, basis_c)  # anchors: no graph, skip the op's dispatch
    else:
        coords = pen.project_op(hidden, basis_c, name)
    return coords.view(*hidden.shape[:-1], basis.shape[1])


def geometry_loss(
    hidden: Tensor,
    basis: Tensor,
    anchors: Tensor,
    weight: Tensor | None = None,
    *,
    drift_coef: float = 1.0,
    gram_coef: float = 0.0,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """drift_coef * L_drift + gram_coef * L_gram as a 0-dim float32 tensor,
    differentiable in ``hidden`` (anchors, weight and basis get no gradient)."""
    drift_coef, gram_coef = _check_coef("drift_coef", drift_coef), _check_coef("gram_coef", gram_coef)
    name, basis_c, anchors_c, weight_c = _prepare(hidden, basis, anchors, weight, backend, validate)
    if name == "torch":
        return _reference_loss(hidden, basis_c, anchors_c, weight_c, drift_coef, gram_coef)
    pen = _penalty()
    if pen.plain_eager(hidden, basis_c, anchors_c, weight_c):
        # The same launches and gradient as the op's registered autograd, at GuardFunction's host cost.
        return pen.GuardFunction.apply(hidden, basis_c, anchors_c, weight_c, drift_coef, gram_coef, name)[1]
    _, loss, _ = pen.loss_forward_op(hidden, basis_c, anchors_c, weight_c, drift_coef, gram_coef, name)
    return loss


def guard(
    hidden: Tensor,
    basis: Tensor,
    anchors: Tensor,
    weight: Tensor | None = None,
    *,
    drift_coef: float = 1.0,
    gram_coef: float = 0.0,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """(hidden_out, loss): hidden_out equals hidden; the loss is ``geometry_loss``.

    Meant for a forward hook: the next layer consumes ``hidden_out`` and the trainer
    adds ``loss`` to its objective.  On the kernel backends the backward computes
    grad_hidden = grad_hidden_out + grad_loss * dL/dH in one fused pass (grad_loss
    carries loss scaling and accumulation factors, so it need not be 1).
    """
    drift_coef, gram_coef = _check_coef("drift_coef", drift_coef), _check_coef("gram_coef", gram_coef)
    name, basis_c, anchors_c, weight_c = _prepare(hidden, basis, anchors, weight, backend, validate)
    if name == "torch":
        return hidden, _reference_loss(hidden, basis_c, anchors_c, weight_c, drift_coef, gram_coef)
    return _penalty().GuardFunction.apply(hidden, basis_c, anchors_c, weight_c, drift_coef, gram_coef, name)
