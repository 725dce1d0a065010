"""The CUDA C++ backend (csrc/): loading the extension, and its launchers.

The launchers take and return exactly what ``triton_penalty``'s do, so the
torch.library ops in ``penalty.py`` drive either backend.  They call the
``torch.ops.refusalguard_cuda`` ops that ``csrc/bindings.cpp`` registers:

* ``project``          Z = H B (N x k, fp32), bitwise the Z of ``loss_forward``;
* ``loss_forward``     Z, the loss and the backward's state, one read of H;
* ``loss_backward``    grad_in + grad_loss * dL/dZ B^T in one pass (grad_loss read on the device);
* ``project_backward`` dZ B^T.

The extension comes from one of:

1. ``refusalguard_kernels._cuda``, compiled at install time:
   ``REFUSALGUARD_BUILD_CUDA=1 pip install --no-build-isolation -e .``;
2. a just-in-time build of the same sources with ``torch.utils.cpp_extension.load``:
   call :func:`build_jit`, or set ``REFUSALGUARD_CUDA_JIT=1`` to build on first use
   (compiled once, then cached by torch under ``TORCH_EXTENSIONS_DIR``).

:func:`load_error` says why neither is available (``None`` when the ops are ready);
importing this module never touches CUDA, so it is safe on CPU-only machines.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

from .layout import row_layout

__all__ = ["load_error", "build_jit", "project", "loss_forward", "loss_backward", "project_backward"]

JIT_ENV = "REFUSALGUARD_CUDA_JIT"
JIT_NAME = "refusalguard_cuda_jit"
_SOURCES = ("refusalguard_penalty.cu", "bindings.cpp")

BUILD_HINT = (
    "Build it at install time with `REFUSALGUARD_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "(needs a CUDA build of torch and a CUDA toolkit whose nvcc matches torch.version.cuda), or just in time "
    'with `python -c "import refusalguard_kernels.ops.cuda_penalty as c; c.build_jit()"` '
    f"(or set {JIT_ENV}=1 to build on first use)."
)

# Tests set this to allocate every output and workspace filled with NaN, which proves
# the kernels write each element (the default allocates uninitialised memory).
_poison_outputs = False

_lock = threading.Lock()
_UNSET = object()
_load_state: object = _UNSET  # None when loaded, else the reason it is not


def _ops_registered() -> bool:
    try:
        torch.ops.refusalguard_cuda.loss_forward  # noqa: B018 -- raises when the library is not loaded
    except (AttributeError, RuntimeError):
        return False
    return True


def csrc_dir() -> Path | None:
    """The folder holding the C++/CUDA sources: csrc/ of a source checkout (editable
    install) or one shipped inside the package; None when neither exists."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    return None


def _try_load() -> str | None:
    if _ops_registered():
        return None
    if not torch.version.cuda:
        return (
            f"the CUDA extension needs a CUDA build of torch; this torch ({torch.__version__}) is CPU-only. "
            "Install a CUDA wheel of torch, then build the extension. " + BUILD_HINT
        )
    try:
        importlib.import_module("refusalguard_kernels._cuda")
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "refusalguard_kernels._cuda"
        if not missing:
            # Present but unloadable (ABI mismatch after a torch upgrade, missing libs).
            return f"the CUDA extension refusalguard_kernels._cuda failed to load ({exc}); rebuild it. " + BUILD_HINT
        if os.environ.get(JIT_ENV, "0") not in ("", "0"):
            try:
                _build_jit_locked(verbose=False)
            except RuntimeError as jit_exc:
                return str(jit_exc)
            return None
        return "the CUDA extension (refusalguard_kernels._cuda) is not built. " + BUILD_HINT
    if not _ops_registered():
        return "refusalguard_kernels._cuda loaded but registered no refusalguard_cuda ops; rebuild it. " + BUILD_HINT
    return None


def load_error() -> str | None:
    """None when the CUDA ops are loaded (loading them on first call), else why not and how to build them.
    The answer is cached; :func:`build_jit` refreshes it."""
    global _load_state
    if _load_state is _UNSET:
        with _lock:
            if _load_state is _UNSET:
                _load_state = _try_load()
    return _load_state  # type: ignore[return-value]


def _build_jit_locked(verbose: bool) -> None:
    if _ops_registered():
        return
    if not torch.version.cuda:
        raise RuntimeError(
            f"cannot build the CUDA extension: this torch ({torch.__version__}) is CPU-only "
            "(torch.version.cuda is None). Install a CUDA wheel of torch first."
        )
    from torch.utils import cpp_extension

    if not cpp_extension.CUDA_HOME:
        raise RuntimeError(
            "cannot build the CUDA extension: no CUDA toolkit found. Install one whose major version matches "
            f"torch.version.cuda ({torch.version.cuda}) and set CUDA_HOME or put nvcc on PATH."
        )
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(
            "cannot build the CUDA extension just in time: torch.utils.cpp_extension.load needs ninja "
            "(pip install ninja), or build at install time: "
            "REFUSALGUARD_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    src = csrc_dir()
    if src is None:
        raise RuntimeError(
            "cannot build the CUDA extension just in time: the csrc/ sources are not installed with this package. "
            "Use a source checkout (pip install -e .) or build at install time: "
            "REFUSALGUARD_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src / name) for name in _SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],  # arch: TORCH_CUDA_ARCH_LIST, else the visible GPUs'
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler / linker errors arrive as RuntimeError, OSError, ...
        raise RuntimeError(
            f"building the CUDA extension just in time failed ({type(exc).__name__}: {exc}). "
            "Rerun build_jit(verbose=True) to see the compiler output."
        ) from exc
    if not _ops_registered():
        raise RuntimeError("the just-in-time CUDA extension loaded but registered no refusalguard_cuda ops")


def build_jit(verbose: bool = False) -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load and register the ``refusalguard_cuda`` ops.

    Takes a minute or two the first time; torch caches the build.  Raises RuntimeError
    with the reason when it cannot build (CPU-only torch, no CUDA toolkit, no sources,
    compiler error).  A no-op when the ops are already loaded."""
    global _load_state
    with _lock:
        _build_jit_locked(verbose)
        _load_state = None  # available_backends() reads this state, so it sees the new build


def _ops():
    why = load_error()
    if why is not None:
        raise RuntimeError(f"backend='cuda' is not available: {why}")
    return torch.ops.refusalguard_cuda


# ----------------------------------------------------------------------------------------------
# Launchers (same signatures and results as triton_penalty's).  Inputs arrive checked and
# converted by the functional layer: basis fp32 (d, k); anchors fp32 contiguous (N, k);
# weight fp32 contiguous (N,) or None.  Hidden states and incoming gradients are read in
# place through row_layout (any 2-D view, any 3-D strides).


def project(hidden: Tensor, basis: Tensor) -> Tensor:
    return _ops().project(row_layout(hidden).tensor, basis, _poison_outputs)


def loss_forward(hidden: Tensor, basis: Tensor, anchors: Tensor, weight, drift_coef: float, gram_coef: float):
    return _ops().loss_forward(
        row_layout(hidden).tensor, basis, anchors, weight, float(drift_coef), float(gram_coef), _poison_outputs
    )


def loss_backward(grad_in, grad_loss, coords, anchors, weight, state, basis, hidden_shape, hidden_dtype, gram_coef):
    # The forward sized `state` by gram_coef != 0; the kernel reads the gram flag from its size.
    gin = None if grad_in is None else row_layout(grad_in).tensor
    return _ops().loss_backward(
        gin, grad_loss, coords, anchors, weight, state, basis, list(hidden_shape), hidden_dtype, _poison_outputs
    )


def project_backward(grad_coords: Tensor, basis: Tensor, hidden_shape, hidden_dtype) -> Tensor:
    return _ops().project_backward(grad_coords, basis, list(hidden_shape), hidden_dtype, _poison_outputs)


def is_usable(device: torch.device) -> bool:
    return device.type == "cuda" and load_error() is None
