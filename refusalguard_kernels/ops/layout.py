"""Host-side helpers shared by the kernel backends (Triton and CUDA)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowLayout:
    """A (..., d) tensor seen as N rows without copying.

    Row r starts at element (r // n1) * stride0 + (r % n1) * stride1 of ``tensor``;
    columns are ``stride_col`` apart.  Covers every 2-D view and every 3-D tensor
    (e.g. a transposed [seq, batch, d] activation), so non-contiguous hidden states
    are read in place.
    """

    tensor: Tensor
    rows: int
    n1: int
    stride0: int
    stride1: int
    stride_col: int


def row_layout(t: Tensor) -> RowLayout:
    d = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    try:
        v = t.view(rows, d)
        return RowLayout(v, rows, 1, v.stride(0), 0, v.stride(1))
    except RuntimeError:
        pass
    if t.dim() == 3:
        return RowLayout(t, rows, t.shape[1], t.stride(0), t.stride(1), t.stride(2))
    # Four or more leading dims that no two strides describe: one copy, still correct.
    v = t.reshape(rows, d)
    return RowLayout(v, rows, 1, v.stride(0), 0, v.stride(1))


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised output buffer; NaN-filled when REFUSALGUARD_POISON=1 (tests),
    so an element a kernel forgets to write cannot pass as a plausible value."""
    if os.environ.get("REFUSALGUARD_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def padded_k(k: int) -> int:
    """Tensor-core dots need every dim >= 16 and a power of two."""
    return max(16, 1 << (k - 1).bit_length())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@cache
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def device_capability(device: torch.device) -> int:
    """10 * major + minor of a CUDA device, for per-architecture tile configs; 90 elsewhere (the
    interpreter runs the sm_90 configs)."""
    if device.type != "cuda":
        return 90
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _shared_memory_optin(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin)


def shared_memory_per_block(device: torch.device) -> int | None:
    """The most shared memory one block may use on a CUDA device (bytes, opt-in limit); None elsewhere."""
    if device.type != "cuda":
        return None
    return _shared_memory_optin(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(row_blocks: int, device: torch.device, per_sm: int = 2) -> int:
    """Programs for a grid-stride launch: enough to fill the chip, no more.

    The count depends only on the shape and the device, so the order of every
    reduction -- and so every result -- is the same run to run.
    """
    if device.type == "cuda":
        cap = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    else:
        cap = 3  # the interpreter runs programs one after another; 3 still exercises the grid-stride loop
    return max(1, min(row_blocks, cap))
