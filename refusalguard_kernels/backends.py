"""The one dispatch point: which backend runs an op.

* ``"torch"``  -- the PyTorch reference (any device, any float dtype).
* ``"triton"`` -- fused Triton kernels on CUDA tensors (on CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how CI runs them).
* ``"cuda"``   -- the CUDA C++ extension from ``csrc/`` (when it is built).
* ``"auto"``   -- the best available for the tensor's device: on CPU the
  reference; on CUDA the fused kernels (see ``_AUTO_ORDER``), skipping Triton on a GPU
  whose shared memory per block fits none of its tile configs (T4-class, 64 KB).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import versions

__all__ = ["available_backends", "resolve_backend", "kernel_module", "refresh", "BACKENDS"]

BACKENDS = ("torch", "triton", "cuda")
# On CUDA tensors "auto" takes the first kernel backend that is available.
_AUTO_ORDER = ("triton", "cuda")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


def _cuda_extension_error() -> str | None:
    """None when the csrc extension is loadable, else why not (cuda_penalty caches the answer and
    refreshes it after a just-in-time build, so nothing here needs telling)."""
    try:
        mod = importlib.import_module("refusalguard_kernels.ops.cuda_penalty")
    except ImportError as exc:  # the csrc backend is not part of this build
        return f"the CUDA C++ backend is not part of this install ({exc})"
    return mod.load_error()


def available_backends() -> list[str]:
    """Backends that can run here: "torch" always; "triton" with a GPU (or under
    TRITON_INTERPRET=1); "cuda" when the csrc extension is built and a GPU is present."""
    return list(_available(_interpreting()))


def _available(interpreting: bool) -> tuple[str, ...]:
    names = _python_backends(interpreting)
    if _cuda_device() and _cuda_extension_error() is None:  # cuda_penalty caches its own answer
        names += ("cuda",)
    return names


@functools.cache
def _cuda_device() -> bool:
    return torch.cuda.is_available()


@functools.cache
def _python_backends(interpreting: bool) -> tuple[str, ...]:
    # Probing the triton import costs ~100 us and "auto" asks on every call, so it is cached.
    names = ("torch",)
    if _triton_importable() and (_cuda_device() or interpreting):
        names += ("triton",)
    return names


def refresh() -> None:
    """Forget the cached probes (after installing triton, or when CUDA_VISIBLE_DEVICES changed)."""
    _python_backends.cache_clear()
    _cuda_device.cache_clear()
    _tiles_fit.cache_clear()
    _RESOLVED.clear()


# Successful resolutions, keyed by everything they depend on that can change while the
# process runs (TRITON_INTERPRET is read per call; the probes are cleared by refresh()).
# Every guard call resolves its backend, and the probes below cost several microseconds.
# Failures are not cached, so their errors are raised afresh, unchanged.
_RESOLVED: dict[tuple[str, str, int | None, str | None], str] = {}


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user's choice to the backend that will run; a clear error when it cannot."""
    # The device index is in the key: "auto" asks whether the Triton tiles fit that GPU.
    key = (backend, device.type, device.index, os.environ.get("TRITON_INTERPRET"))
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    name = _resolve_backend(backend, device)
    if not (backend == "auto" and name == "torch"):  # "auto" may find a kernel backend once one is built
        _RESOLVED[key] = name
    return name


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', 'torch', 'triton', 'cuda'")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        available = _available(_interpreting())
        for name in _AUTO_ORDER:
            if name == "triton" and name in available and not _triton_fits(device):
                continue
            if name in available:
                return name
        return "torch"
    if backend == "triton":
        if not _triton_importable():
            raise ValueError("backend='triton' needs the triton package: pip install 'triton>=3.6'")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' runs on CUDA tensors; these are on {device}. Move them to a GPU, use "
                "backend='torch', or set TRITON_INTERPRET=1 before importing triton (slow; meant for tests)."
            )
        if device.type != "cuda":  # the interpreter: it has its own version conflicts
            versions.require("triton-interpreter")
    if backend == "cuda":
        why = _cuda_extension_error()
        if why is not None:
            raise ValueError(f"backend='cuda' is not available: {why}")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors; these are on {device}. Use backend='torch' on CPU.")
    return backend


def _triton_fits(device: torch.device) -> bool:
    """Whether some Triton tile family fits this GPU's shared memory per block.  Checked
    architectures always fit; an unknown one takes the family its opt-in limit allows (with
    triton_penalty's one-time warning) or none, and then "auto" moves on to the next backend
    rather than failing at the first launch."""
    from .ops.layout import device_capability, shared_memory_per_block

    return _tiles_fit(device_capability(device), shared_memory_per_block(device))


@functools.cache  # "auto" resolving to torch is not cached above, so this may be asked on every call
def _tiles_fit(capability: int, shared_memory_per_block: int | None) -> bool:
    from .ops.triton_penalty import tile_family

    try:
        tile_family(capability, shared_memory_per_block)
    except RuntimeError:
        return False
    return True


@functools.cache  # import_module costs a microsecond or two, and this runs per launch
def kernel_module(backend: str) -> ModuleType:
    """The launcher module of a kernel backend (same functions in each)."""
    if backend == "triton":
        return importlib.import_module("refusalguard_kernels.ops.triton_penalty")
    if backend == "cuda":
        return importlib.import_module("refusalguard_kernels.ops.cuda_penalty")
    raise ValueError(f"{backend!r} is not a kernel backend")
