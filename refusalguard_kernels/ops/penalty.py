"""torch.library ops for the kernel backends, and the autograd that ties them together.

The ops are opaque to ``torch.compile`` (it traces through them without graph
breaks, using the fake implementations for shapes) and take the backend name as
an argument, so "triton" and "cuda" share one autograd wiring.  Inputs arrive
checked and converted by ``functional.py``: basis fp32 (d, k) contiguous,
anchors fp32 (N, k) contiguous, weight fp32 (N,) contiguous or None.

Nothing of size N x d is saved for backward: only Z (N x k), the anchors, the
weights, the basis and the (2 + k*k) state written by the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import kernel_module

_NS = "refusalguard"


def _coords_shape(hidden: Tensor, basis: Tensor) -> tuple[int, int]:
    rows = 1
    for s in hidden.shape[:-1]:
        rows = rows * s
    return (rows, basis.shape[1])


# ---------------------------------------------------------------- project


@torch.library.custom_op(f"{_NS}::project", mutates_args=())
def project_op(hidden: Tensor, basis: Tensor, backend: str) -> Tensor:
    """Z = H B as an (N, k) float32 tensor."""
    return kernel_module(backend).project(hidden, basis)


@project_op.register_fake
def _(hidden, basis, backend):
    return hidden.new_empty(_coords_shape(hidden, basis), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::project_backward", mutates_args=())
def project_backward_op(
    grad_coords: Tensor, basis: Tensor, hidden_shape: list[int], hidden_dtype: torch.dtype, backend: str
) -> Tensor:
    return kernel_module(backend).project_backward(grad_coords, basis, hidden_shape, hidden_dtype)


@project_backward_op.register_fake
def _(grad_coords, basis, hidden_shape, hidden_dtype, backend):
    return grad_coords.new_empty(hidden_shape, dtype=hidden_dtype)


def _project_setup(ctx, inputs, output):
    hidden, basis, backend = inputs
    ctx.save_for_backward(basis)
    ctx.hidden_shape = list(hidden.shape)
    ctx.hidden_dtype = hidden.dtype
    ctx.backend = backend


def _project_backward(ctx, grad_coords):
    (basis,) = ctx.saved_tensors
    grad_hidden = project_backward_op(
        grad_coords.to(torch.float32).contiguous(), basis, ctx.hidden_shape, ctx.hidden_dtype, ctx.backend
    )
    return grad_hidden, None, None


project_op.register_autograd(_project_backward, setup_context=_project_setup)


# ---------------------------------------------------------------- loss


@torch.library.custom_op(f"{_NS}::loss_forward", mutates_args=())
def loss_forward_op(
    hidden: Tensor,
    basis: Tensor,
    anchors: Tensor,
    weight: Tensor | None,
    drift_coef: float,
    gram_coef: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (coords (N, k) fp32, loss () fp32, state (2 + k*k or 2,) fp32)."""
    return kernel_module(backend).loss_forward(hidden, basis, anchors, weight, drift_coef, gram_coef)


@loss_forward_op.register_fake
def _(hidden, basis, anchors, weight, drift_coef, gram_coef, backend):
    k = basis.shape[1]
    width = 2 + (k * k if gram_coef != 0.0 else 0)
    coords = hidden.new_empty(_coords_shape(hidden, basis), dtype=torch.float32)
    return coords, hidden.new_empty((), dtype=torch.float32), hidden.new_empty((width,), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::loss_backward", mutates_args=())
def loss_backward_op(
    grad_in: Tensor | None,
    grad_loss: Tensor,
    coords: Tensor,
    anchors: Tensor,
    weight: Tensor | None,
    state: Tensor,
    basis: Tensor,
    hidden_shape: list[int],
    hidden_dtype: torch.dtype,
    gram_coef: float,
    backend: str,
) -> Tensor:
    """grad_in + grad_loss * dL/dH in one pass (grad_in may be None)."""
    return kernel_module(backend).loss_backward(
        grad_in, grad_loss, coords, anchors, weight, state, basis, hidden_shape, hidden_dtype, gram_coef
    )


@loss_backward_op.register_fake
def _(grad_in, grad_loss, coords, anchors, weight, state, basis, hidden_shape, hidden_dtype, gram_coef, backend):
    return coords.new_empty(hidden_shape, dtype=hidden_dtype)


def _loss_setup(ctx, inputs, output):
    hidden, basis, anchors, weight, drift_coef, gram_coef, backend = inputs
    coords, _, state = output
    ctx.mark_non_differentiable(coords, state)
    ctx.save_for_backward(coords, anchors, weight, state, basis)
    ctx.hidden_shape = list(hidden.shape)
    ctx.hidden_dtype = hidden.dtype
    ctx.gram_coef = gram_coef
    ctx.backend = backend


def _loss_backward(ctx, grad_coords, grad_loss, grad_state):
    coords, anchors, weight, state, basis = ctx.saved_tensors
    grad_hidden = loss_backward_op(
        None,
        grad_loss,
        coords,
        anchors,
        weight,
        state,
        basis,
        ctx.hidden_shape,
        ctx.hidden_dtype,
        ctx.gram_coef,
        ctx.backend,
    )
    return grad_hidden, None, None, None, None, None, None


loss_forward_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# ---------------------------------------------------------------- guard


def plain_eager(*tensors) -> bool:
    """True when calling a launcher directly is indistinguishable from calling its op.

    Inside ``GuardFunction`` the ops' own autograd layer has nothing to do (grad mode is
    off in forward and backward), yet the torch.library dispatch around it costs about
    20 us of host time per op call on a small CPU.  So eager calls on plain tensors skip
    it; anything that must see the op -- torch.compile tracing, a dispatch or function
    mode (FakeTensorMode, FlopCounterMode, ``with torch.device``), functorch transforms,
    tensor subclasses -- still goes through the registered op.
    """
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and type(t) is not Tensor:
            return False
    return not (
        torch._C._len_torch_dispatch_stack()
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_torch_function_mode_enabled()
    )


class GuardFunction(torch.autograd.Function):
    """(hidden, ...) -> (hidden_out == hidden, loss); backward fuses
    grad_hidden = grad_hidden_out + grad_loss * dL/dH into one kernel pass."""

    @staticmethod
    def forward(ctx, hidden, basis, anchors, weight, drift_coef, gram_coef, backend):
        if plain_eager(hidden, basis, anchors, weight):
            coords, loss, state = kernel_module(backend).loss_forward(
                hidden, basis, anchors, weight, drift_coef, gram_coef
            )
        else:
            coords, loss, state = loss_forward_op(hidden, basis, anchors, weight, drift_coef, gram_coef, backend)
        ctx.save_for_backward(coords, anchors, weight, state, basis)
        ctx.hidden_shape = list(hidden.shape)
        ctx.hidden_dtype = hidden.dtype
        ctx.gram_coef = gram_coef
        ctx.backend = backend
        ctx.set_materialize_grads(False)  # a missing grad must not cost an N x d zero buffer
        return hidden.view_as(hidden), loss

    @staticmethod
    def backward(ctx, grad_out, grad_loss):
        if grad_loss is None:
            return grad_out, None, None, None, None, None, None
        coords, anchors, weight, state, basis = ctx.saved_tensors
        args = (grad_out, grad_loss, coords, anchors, weight, state, basis, ctx.hidden_shape, ctx.hidden_dtype)
        if plain_eager(grad_out, grad_loss, coords):
            grad_hidden = kernel_module(ctx.backend).loss_backward(*args, ctx.gram_coef)
        else:
            grad_hidden = loss_backward_op(*args, ctx.gram_coef, ctx.backend)
        return grad_hidden, None, None, None, None, None, None
