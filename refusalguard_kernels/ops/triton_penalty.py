"""Triton kernels for the subspace-projection penalty, and their launchers.

Three kernels, two passes over the N x d data:

* ``_penalty_fwd_kernel``: one read of H.  Z = H B (fp32 accumulate), written as
  N x k, and -- when a loss is wanted -- each program's partial sums of W, of
  w_t ||Z_t - A_t||^2 and of w_t (Z_t Z_t^T - A_t A_t^T), the last one computed as
  sym(E^T W P) with E = Z - A, P = Z + A (one k x k product, not two, and no cancellation
  between two large Gram sums when Z is near A).
* ``_penalty_finalize_kernel``: one program adds the partials in a fixed order
  (deterministic, no atomics) and writes the loss plus the k x k "state" the
  backward needs: [2 drift_coef / W, 4 gram_coef / W, (G - G_A)].
* ``_penalty_bwd_kernel``: dL/dZ from the saved Z, A, w and state, in registers,
  then one read of the incoming gradient and one write of
  grad_in + grad_loss * dL/dZ B^T.

Precision of the dots (tl.dot accumulates in fp32 in every case):
* fp32 hidden: ``input_precision="ieee"`` -- true fp32 FMAs, no tf32 rounding.
* fp16/bf16 hidden, forward: H is exact in its own dtype; each fp32 basis tile is split,
  in registers as it is loaded, into hi + lo parts in that dtype and both are multiplied, into two independent
  accumulators added at the end (about 16 mantissa bits of B, error ~1e-5 relative).
* fp16/bf16 hidden, backward: dL/dZ and B are both split into bf16 hi + lo and
  the three leading products are summed (bf16 keeps fp32's range, so tiny
  1/W-scaled gradients do not underflow as they would in fp16).
* The k x k products (Gram partials, Z (G - G_A)) are ieee fp32.  The Gram partial reduces
  over the tile's rows as GRAM_CHUNKS batched dots of BLOCK_N / GRAM_CHUNKS rows, summed: a
  single fp32 dot over all BLOCK_N rows holds whole operand rows per thread and spilled
  (scripts/kernel_resources.py); the batched one spreads the chunks over the warps.  The
  chunk count is part of the tile config (TileConfig.gram_chunks).

Register budget (static, from ``scripts/kernel_resources.py``; benchmarks/NOTES.md has the
table): k is a constexpr, so every row stride of B, Z and A and the k mask are known at
compile time -- vector loads and no runtime mask arithmetic; with a runtime k the forward ran
out of registers and the bf16 backward needed twice as many.  The forward takes 8 warps from a
padded k of 32 on (FWD_WIDE_CONFIG), where two 128 x k fp32 accumulators do not fit in the
registers of 4 warps (see the tile configs below for the rest).  One compile per distinct k; a
training run uses one k.

The basis is split inside the kernels, not once per call into cached halves: an fp32
tile is as many bytes as its bf16 hi + lo, and a cache keyed on the tensor can serve
stale halves after writes that do not bump the version counter (``.data``, other
kernels), misses on every copied basis, and is filled only at replay under CUDA-graph
capture.  The split is the same elementwise rounding the cached one was, so Z is
bitwise unchanged.

Every launcher runs its kernels inside the device context of its tensors
(``_device_context``): Triton launches on the *current* CUDA device, which for a model
split over GPUs is not necessarily the one holding the hooked layer.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import (
    device_capability,
    interpreting,
    new_output,
    padded_k,
    persistent_programs,
    row_layout,
    shared_memory_per_block,
)


class TileConfig(NamedTuple):
    block_n: int  # rows per tile
    block_d_half: int  # columns per tile for 2-byte hidden
    block_d_fp32: int  # columns per tile for fp32 hidden
    num_warps: int
    num_stages: int  # software-pipelining depth of the loop over d
    programs_per_sm: int  # persistent grid: programs per SM
    gram_chunks: int = 4  # forward only: row chunks of the Gram partial's batched dot (see the module docstring)

    def block_d(self, dtype: torch.dtype) -> int:
        return self.block_d_fp32 if dtype == torch.float32 else self.block_d_half


# Tile configs.  FWD_CONFIG and BWD_CONFIG were chosen by benchmarks/tune_triton.py on an H100 (bf16,
# N=16384, d=4096, k=8; benchmarks/NOTES.md).  The others keep every launch free of register spills where
# the tuned ones spill, and within each architecture's shared memory, measured statically
# (scripts/kernel_resources.py: sm_90, sm_80, sm_86 and sm_89, every dtype, k in 1/8/16/64, the benchmark
# grid's shapes and a ragged one), not yet timed on a GPU:
# * padded k >= WIDE_K, forward: 8 warps (two warpgroups) so the two 128 x k fp32 accumulators fit, half
#   as many columns per tile, and the Gram partial in 2 chunks of 64 rows (4 or 8 chunks spill on sm_90:
#   the batched dot's k x k outputs grow with the chunk count; on sm_80 it is the other way round);
# * below sm_90 (no wgmma): 32 fp32 columns per forward tile -- with 64, ptxas keeps the fp32 dot in 32
#   registers and spills ~5 KB per thread;
# * padded k >= 64, backward: 32 fp32 columns per tile (with 128 the fp32 backward spilled on ragged shapes);
# * sm_86 / sm_89 (A10G, A6000, RTX 30xx; L4, L40S, RTX 40xx): 99 KB of shared memory per block, not
#   sm_80's 163.  On the sm_80 tiles the wide (padded k = 64) half-precision backward took 96 KB, 112 KB
#   with the Gram term (B^T tiles of 64 x 128 fp32 in 3 stages, plus G - G_A): it could not launch.  With
#   64 half columns it takes 44-68 KB; and the wide Gram forward spilled ~300 B there with 4 chunks, none
#   with 2.  The most any sm_86/89 launch takes is the bf16/fp16 forward's 80 KB (one block per SM).
# project() and the loss forward share fwd_config(k, ...), which is what makes their Z bitwise equal.
FWD_CONFIG = TileConfig(block_n=128, block_d_half=128, block_d_fp32=64, num_warps=4, num_stages=3, programs_per_sm=1)
FWD_WIDE_CONFIG = FWD_CONFIG._replace(block_d_half=64, block_d_fp32=32, num_warps=8, gram_chunks=2)
FWD_CONFIG_SM80 = FWD_CONFIG._replace(block_d_fp32=32)
FWD_WIDE_CONFIG_SM80 = FWD_WIDE_CONFIG._replace(gram_chunks=4)
WIDE_K = 32
BWD_CONFIG = TileConfig(block_n=32, block_d_half=128, block_d_fp32=128, num_warps=8, num_stages=3, programs_per_sm=4)
BWD_WIDE_CONFIG = BWD_CONFIG._replace(block_d_fp32=32)
BWD_WIDE_K = 64
# sm_86 / sm_89: the sm_80 tiles where they fit in 99 KB and do not spill there, smaller ones where not.
FWD_CONFIG_SM86 = FWD_CONFIG_SM80
FWD_WIDE_CONFIG_SM86 = FWD_WIDE_CONFIG_SM80._replace(gram_chunks=2)
BWD_CONFIG_SM86 = BWD_CONFIG
BWD_WIDE_CONFIG_SM86 = BWD_WIDE_CONFIG._replace(block_d_half=64)


class TileFamily(NamedTuple):
    """The four tile configs one architecture uses, and the most shared memory any launch of them takes
    there (bytes per block, static + dynamic; from the committed kernel-resource baseline, checked by
    tests/test_kernel_resources.py): what a GPU must allow per block to run them."""

    fwd: TileConfig
    fwd_wide: TileConfig
    bwd: TileConfig
    bwd_wide: TileConfig
    shared_bytes: int


def _families() -> dict[str, TileFamily]:
    # Built at call time from the module's names, so benchmarks/tune_triton.py can swap FWD_CONFIG/BWD_CONFIG.
    return {
        "sm90": TileFamily(FWD_CONFIG, FWD_WIDE_CONFIG, BWD_CONFIG, BWD_WIDE_CONFIG, 121 * 1024),
        "sm80": TileFamily(FWD_CONFIG_SM80, FWD_WIDE_CONFIG_SM80, BWD_CONFIG, BWD_WIDE_CONFIG, 112 * 1024),
        "sm86": TileFamily(FWD_CONFIG_SM86, FWD_WIDE_CONFIG_SM86, BWD_CONFIG_SM86, BWD_WIDE_CONFIG_SM86, 80 * 1024),
    }


# The compute capabilities (10 major + minor) whose tiles scripts/kernel_resources.py compiles and checks.
ARCH_FAMILY = {90: "sm90", 80: "sm80", 86: "sm86", 89: "sm86"}


def tile_family(capability: int, shared_memory_per_block: int | None = None) -> str:
    """The tile family for a GPU of compute capability ``capability``: its own where the static check
    covers it (ARCH_FAMILY); otherwise the first family, in order of preference, whose shared memory
    fits the device's opt-in limit per block (``torch.cuda.get_device_properties(i).
    shared_memory_per_block_optin``), with a one-time warning; a ``RuntimeError`` when none fits."""
    family = ARCH_FAMILY.get(capability)
    if family is not None:
        return family
    return _unknown_arch_family(capability, shared_memory_per_block)


@functools.cache  # one warning per (capability, limit); an error is raised again on every call
def _unknown_arch_family(capability: int, shared_memory_per_block: int | None) -> str:
    families = _families()
    arch = f"sm_{capability}"
    if shared_memory_per_block is None:  # no device to ask: the smallest footprint
        name = min(families, key=lambda n: families[n].shared_bytes)
        warnings.warn(
            f"refusalguard_kernels: no tile configs checked for {arch} and no shared-memory limit given; "
            f"using the {name} tiles ({families[name].shared_bytes // 1024} KB per block, the smallest)",
            RuntimeWarning,
            stacklevel=4,
        )
        return name
    order = ("sm90", "sm80", "sm86") if capability >= 90 else ("sm80", "sm86")
    for name in order:
        if families[name].shared_bytes <= shared_memory_per_block:
            warnings.warn(
                f"refusalguard_kernels: no tile configs checked for {arch}; using the {name} tiles, which need "
                f"{families[name].shared_bytes // 1024} KB of shared memory per block (this GPU allows "
                f"{shared_memory_per_block // 1024} KB). Check them with scripts/kernel_resources.py.",
                RuntimeWarning,
                stacklevel=4,
            )
            return name
    smallest = min(families[name].shared_bytes for name in order)
    raise RuntimeError(
        f"refusalguard_kernels: the Triton kernels need at least {smallest // 1024} KB of shared memory per "
        f"block, and this GPU ({arch}) allows {shared_memory_per_block // 1024} KB; "
        'use backend="torch" (or "cuda") on it'
    )


FINALIZE_TILE = 16384  # elements of the partials the finalize program loads at once
FINALIZE_WARPS = 8


@triton.jit
def _half_dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b for fp16/bf16 operands, fp32 accumulation.  UPCAST is set only under
    TRITON_INTERPRET, whose bf16 dot is broken: fp32 holds the half values exactly, so
    the product is the same one the tensor cores compute."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _penalty_fwd_kernel(
    H,
    B,
    A,
    WT,
    Z,
    PART,
    N,
    d,
    n1,
    s_h0,
    s_h1,
    s_hd,
    num_row_blocks,
    part_width,
    K: tl.constexpr,
    SPLIT_BASIS: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    GRAM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    GRAM_CHUNKS: tl.constexpr,
):
    """Z_t = sum_j H_tj B_j (fp32) and per-program partials
    W_p = sum w_t,  drift_p = sum w_t ||Z_t - A_t||^2,  D_p = sum w_t (Z_t Z_t^T - A_t A_t^T)
    over the row blocks this program visits (grid-stride).  K is k; BLOCK_K its power-of-two
    padding (>= 16, what the tensor cores take).

    D_p = (X_p + X_p^T) / 2 with X_p = sum_t w_t (Z_t - A_t)(Z_t + A_t)^T: expanding, the cross
    terms Z A^T - A Z^T are antisymmetric and cancel in the symmetric part.  Z == A bitwise
    gives E == 0 and so D == 0 exactly."""
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    w_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    drift_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    gram_acc = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
    for rb in range(pid, num_row_blocks, tl.num_programs(0)):
        rows = (rb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # 64-bit offsets from here on
        rmask = rows < N
        row_off = (rows // n1) * s_h0 + (rows % n1) * s_h1
        z = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        z_lo = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_D)
        # Pointers advance by one tile a step: no per-element 64-bit index math in the loop.
        h_ptrs = H + row_off[:, None] + cols[None, :] * s_hd
        b_ptrs = B + cols[:, None] * K + offs_k[None, :]
        for d0 in tl.range(0, d, BLOCK_D, num_stages=NUM_STAGES):
            if EVEN_D:
                if EVEN_N:
                    h = tl.load(h_ptrs)
                else:
                    h = tl.load(h_ptrs, mask=rmask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
            else:
                cmask = (d0 + cols) < d
                h = tl.load(h_ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=cmask[:, None] & kmask[None, :], other=0.0)
            if SPLIT_BASIS:
                # Split here rather than once per call: same bytes per tile as pre-split halves
                # (4 vs 2 x 2), nothing cached that could go stale, nothing to allocate.
                b_hi = b.to(H.dtype.element_ty)
                b_lo = (b - b_hi.to(tl.float32)).to(H.dtype.element_ty)
                z = _half_dot(h, b_hi, z, UPCAST_DOT)
                z_lo = _half_dot(h, b_lo, z_lo, UPCAST_DOT)
            else:
                z = tl.dot(h, b, z, input_precision="ieee")
            b_ptrs += BLOCK_D * K
            h_ptrs += BLOCK_D * s_hd
        if SPLIT_BASIS:
            z = z + z_lo
        zk_mask = rmask[:, None] & kmask[None, :]
        tl.store(Z + rows[:, None] * K + offs_k[None, :], z, mask=zk_mask)
        if COMPUTE_LOSS:
            a = tl.load(A + rows[:, None] * K + offs_k[None, :], mask=zk_mask, other=0.0)
            if HAS_WEIGHT:
                w = tl.load(WT + rows, mask=rmask, other=0.0)
            else:
                w = tl.where(rmask, 1.0, 0.0)
            diff = z - a
            w_acc += w
            drift_acc += w * tl.sum(diff * diff, axis=1)
            if GRAM:
                # X += (E w)^T P, as GRAM_CHUNKS batched dots over row chunks (see the module docstring).
                ew = tl.reshape(diff * w[:, None], (GRAM_CHUNKS, BLOCK_N // GRAM_CHUNKS, BLOCK_K))
                p = tl.reshape(z + a, (GRAM_CHUNKS, BLOCK_N // GRAM_CHUNKS, BLOCK_K))
                gram_acc += tl.sum(tl.dot(tl.permute(ew, (0, 2, 1)), p, input_precision="ieee"), axis=0)
    if COMPUTE_LOSS:
        part = PART + pid.to(tl.int64) * part_width
        tl.store(part, tl.sum(w_acc, axis=0))
        tl.store(part + 1, tl.sum(drift_acc, axis=0))
        if GRAM:
            gram_acc = 0.5 * (gram_acc + tl.trans(gram_acc))
            gmask = kmask[:, None] & kmask[None, :]
            tl.store(part + 2 + offs_k[:, None] * K + offs_k[None, :], gram_acc, mask=gmask)


@triton.jit
def _penalty_finalize_kernel(
    PART,
    LOSS,
    STATE,
    P,
    part_width,
    drift_coef,
    gram_coef,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Sum the P partial rows in a fixed order, then
    loss = drift_coef * drift / W + gram_coef * ||D / W||_F^2  (0 when W == 0),
    state = [2 drift_coef / W, 4 gram_coef / W, D / W]."""
    e = tl.arange(0, BLOCK_E)
    emask = e < part_width
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tile = tl.load(PART + p[:, None] * part_width + e[None, :], mask=(p < P)[:, None] & emask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    total_w = tl.sum(tl.where(e == 0, acc, 0.0), axis=0)
    drift_sum = tl.sum(tl.where(e == 1, acc, 0.0), axis=0)
    positive = total_w > 0
    inv_w = tl.where(positive, 1.0 / tl.where(positive, total_w, 1.0), 0.0)
    gram_diff = tl.where((e >= 2) & emask, acc * inv_w, 0.0)
    loss = drift_coef * (drift_sum * inv_w) + gram_coef * tl.sum(gram_diff * gram_diff, axis=0)
    tl.store(LOSS, loss)
    state = tl.where(e == 0, 2.0 * drift_coef * inv_w, tl.where(e == 1, 4.0 * gram_coef * inv_w, gram_diff))
    tl.store(STATE + e, state, mask=emask)


@triton.jit
def _penalty_bwd_kernel(
    GIN,
    GOUT,
    Z,
    A,
    WT,
    STATE,
    GLOSS,
    B,
    N,
    d,
    n1,
    s_g0,
    s_g1,
    s_gd,
    num_row_blocks,
    K: tl.constexpr,
    DZ_GIVEN: tl.constexpr,
    HAS_GRAD_IN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    GRAM: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """GOUT_t = GIN_t + s * dZ_t B^T, where (unless DZ_GIVEN, when Z holds dZ itself)
    dZ_t = w_t (c1 (Z_t - A_t) + c2 (G - G_A) Z_t),  s = grad of the loss, and
    c1, c2, G - G_A come from the finalize kernel's state."""
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    if not DZ_GIVEN:
        c1 = tl.load(STATE)
        c2 = tl.load(STATE + 1)
        s = tl.load(GLOSS).to(tl.float32)
        if GRAM:
            m = tl.load(
                STATE + 2 + offs_k[:, None] * K + offs_k[None, :], mask=kmask[:, None] & kmask[None, :], other=0.0
            )
    for rb in range(pid, num_row_blocks, tl.num_programs(0)):
        rows = (rb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # 64-bit offsets from here on
        rmask = rows < N
        zk_mask = rmask[:, None] & kmask[None, :]
        z = tl.load(Z + rows[:, None] * K + offs_k[None, :], mask=zk_mask, other=0.0)
        if DZ_GIVEN:
            dz = z
        else:
            a = tl.load(A + rows[:, None] * K + offs_k[None, :], mask=zk_mask, other=0.0)
            if HAS_WEIGHT:
                w = tl.load(WT + rows, mask=rmask, other=0.0)
            else:
                w = tl.where(rmask, 1.0, 0.0)
            dz = c1 * (z - a)
            if GRAM:
                dz += c2 * tl.dot(z, m, input_precision="ieee")  # G - G_A is symmetric
            dz = dz * (w * s)[:, None]
        if SPLIT:
            dz_hi = dz.to(tl.bfloat16)
            dz_lo = (dz - dz_hi.to(tl.float32)).to(tl.bfloat16)
        gin_off = (rows // n1) * s_g0 + (rows % n1) * s_g1
        cols = tl.arange(0, BLOCK_D)
        gin_ptrs = GIN + gin_off[:, None] + cols[None, :] * s_gd
        out_ptrs = GOUT + rows[:, None] * d + cols[None, :]
        bt_ptrs = B + offs_k[:, None] + cols[None, :] * K
        for d0 in tl.range(0, d, BLOCK_D, num_stages=NUM_STAGES):
            cmask = (d0 + cols) < d
            if EVEN_D:
                bt = tl.load(bt_ptrs, mask=kmask[:, None], other=0.0)
            else:
                bt = tl.load(bt_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if SPLIT:
                bt_hi = bt.to(tl.bfloat16)
                bt_lo = (bt - bt_hi.to(tl.float32)).to(tl.bfloat16)
                g = _half_dot(dz_hi, bt_hi, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), UPCAST_DOT)
                g = _half_dot(dz_lo, bt_hi, g, UPCAST_DOT)
                g = _half_dot(dz_hi, bt_lo, g, UPCAST_DOT)
            else:
                g = tl.dot(dz, bt, input_precision="ieee")
            bt_ptrs += BLOCK_D * K
            if EVEN_N and EVEN_D:
                if HAS_GRAD_IN:
                    g += tl.load(gin_ptrs).to(tl.float32)
                tl.store(out_ptrs, g.to(GOUT.dtype.element_ty))
            else:
                tile_mask = rmask[:, None] & cmask[None, :]
                if HAS_GRAD_IN:
                    g += tl.load(gin_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
                tl.store(out_ptrs, g.to(GOUT.dtype.element_ty), mask=tile_mask)
            gin_ptrs += BLOCK_D * s_gd
            out_ptrs += BLOCK_D


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are already checked and converted by the functional layer:
# basis fp32 contiguous (d, k); anchors fp32 contiguous (N, k); weight fp32 contiguous (N,) or None.


def fwd_config(k: int, capability: int, shared_memory_per_block: int | None = None) -> TileConfig:
    """The forward's tiles for basis width k on a GPU of compute capability ``capability`` (10 major +
    minor; ``shared_memory_per_block``: the device's opt-in limit, consulted only for an architecture
    without checked configs, see ``tile_family``)."""
    family = _families()[tile_family(capability, shared_memory_per_block)]
    return family.fwd_wide if padded_k(k) >= WIDE_K else family.fwd


def bwd_config(k: int, capability: int, shared_memory_per_block: int | None = None) -> TileConfig:
    """The backward's tiles, as ``fwd_config``."""
    family = _families()[tile_family(capability, shared_memory_per_block)]
    return family.bwd_wide if padded_k(k) >= BWD_WIDE_K else family.bwd


def _tile_meta(cfg: TileConfig, N: int, d: int, k: int, block_d: int) -> dict:
    """The tile constexprs both main kernels take, from the tile config and the shape (the EVEN_*
    flags drop the masks on full tiles)."""
    return dict(
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        BLOCK_K=padded_k(k),
        NUM_STAGES=cfg.num_stages,
        EVEN_N=N % cfg.block_n == 0,
        EVEN_D=d % block_d == 0,
        UPCAST_DOT=interpreting(),
        num_warps=cfg.num_warps,
    )


def _interpreter_truncates(dtype: torch.dtype) -> bool:
    """The interpreter casts fp32 -> bf16 by truncation where the GPU rounds to nearest even:
    there the backward writes fp32 and lets torch round, so CI checks the GPU's arithmetic
    (tests/test_triton_penalty.py: test_bf16_gradients_round_to_nearest)."""
    return interpreting() and dtype == torch.bfloat16


def _device_context(device: torch.device):
    """Make the tensors' device current while launching: Triton launches on the current
    device (and its current stream), which with a model split over GPUs need not be the
    one holding the tensors.  Entered once per op, around all of its launches; it only
    switches the current device (no sync, no allocation), so it is CUDA-graph capturable.
    CPU tensors (the interpreter) need none."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _forward(hidden: Tensor, basis: Tensor, anchors, weight, drift_coef: float, gram_coef: float, compute_loss: bool):
    lay = row_layout(hidden)
    N, d, k = lay.rows, hidden.shape[-1], basis.shape[1]
    device = hidden.device
    cfg = fwd_config(k, device_capability(device), shared_memory_per_block(device))
    block_d = cfg.block_d(hidden.dtype)
    row_blocks = triton.cdiv(N, cfg.block_n)
    programs = persistent_programs(row_blocks, device, cfg.programs_per_sm)
    gram = compute_loss and gram_coef != 0.0
    part_width = 2 + (k * k if gram else 0)
    coords = new_output((N, k), torch.float32, device)
    partials = new_output((programs, part_width), torch.float32, device) if compute_loss else coords
    split = hidden.dtype != torch.float32
    _penalty_fwd_kernel[(programs,)](
        lay.tensor,
        basis,
        anchors if compute_loss else coords,
        weight if weight is not None else coords,
        coords,
        partials,
        N,
        d,
        lay.n1,
        lay.stride0,
        lay.stride1,
        lay.stride_col,
        row_blocks,
        part_width,
        K=k,
        SPLIT_BASIS=split,
        COMPUTE_LOSS=compute_loss,
        HAS_WEIGHT=weight is not None,
        GRAM=gram,
        GRAM_CHUNKS=max(1, min(cfg.gram_chunks, cfg.block_n // 16)),  # a dot reduces over >= 16 rows
        **_tile_meta(cfg, N, d, k, block_d),
    )
    if not compute_loss:
        return coords, None, None
    loss = new_output((), torch.float32, device)
    state = new_output((part_width,), torch.float32, device)
    block_e = triton.next_power_of_2(part_width)
    # As many partial rows per load as fit in FINALIZE_TILE elements: usually all of them in one go.
    block_p = max(1, min(triton.next_power_of_2(programs), FINALIZE_TILE // block_e))
    _penalty_finalize_kernel[(1,)](
        partials,
        loss,
        state,
        programs,
        part_width,
        float(drift_coef),
        float(gram_coef),
        BLOCK_P=block_p,
        BLOCK_E=block_e,
        num_warps=FINALIZE_WARPS,
    )
    return coords, loss, state


def project(hidden: Tensor, basis: Tensor) -> Tensor:
    with _device_context(hidden.device):
        coords, _, _ = _forward(hidden, basis, None, None, 0.0, 0.0, compute_loss=False)
    return coords


def loss_forward(hidden: Tensor, basis: Tensor, anchors: Tensor, weight, drift_coef: float, gram_coef: float):
    with _device_context(hidden.device):
        return _forward(hidden, basis, anchors, weight, drift_coef, gram_coef, compute_loss=True)


def _backward(
    grad_in, coords, anchors, weight, state, grad_loss, basis, hidden_shape, hidden_dtype, gram_coef, dz_given
):
    N, k = coords.shape
    d = hidden_shape[-1]
    device = coords.device
    out = new_output(hidden_shape, hidden_dtype, device)
    emulate_rounding = _interpreter_truncates(hidden_dtype)
    kernel_out = new_output(hidden_shape, torch.float32, device) if emulate_rounding else out
    if grad_in is not None:
        lay = row_layout(grad_in)
        gin, n1, s0, s1, sd = lay.tensor, lay.n1, lay.stride0, lay.stride1, lay.stride_col
    else:
        gin, n1, s0, s1, sd = kernel_out, 1, 0, 0, 0
    cfg = bwd_config(k, device_capability(device), shared_memory_per_block(device))
    block_d = cfg.block_d(hidden_dtype)
    row_blocks = triton.cdiv(N, cfg.block_n)
    programs = persistent_programs(row_blocks, device, cfg.programs_per_sm)
    dummy = coords
    split = hidden_dtype != torch.float32
    _penalty_bwd_kernel[(programs,)](
        gin,
        kernel_out,
        coords,
        anchors if anchors is not None else dummy,
        weight if weight is not None else dummy,
        state if state is not None else dummy,
        grad_loss if grad_loss is not None else dummy,
        basis,
        N,
        d,
        n1,
        s0,
        s1,
        sd,
        row_blocks,
        K=k,
        DZ_GIVEN=dz_given,
        HAS_GRAD_IN=grad_in is not None,
        HAS_WEIGHT=weight is not None,
        GRAM=(not dz_given) and gram_coef != 0.0,
        SPLIT=split,
        **_tile_meta(cfg, N, d, k, block_d),
    )
    if emulate_rounding:
        out.copy_(kernel_out)
    return out


def loss_backward(grad_in, grad_loss, coords, anchors, weight, state, basis, hidden_shape, hidden_dtype, gram_coef):
    with _device_context(coords.device):
        return _backward(
            grad_in, coords, anchors, weight, state, grad_loss, basis, hidden_shape, hidden_dtype, gram_coef, False
        )


def project_backward(grad_coords: Tensor, basis: Tensor, hidden_shape, hidden_dtype) -> Tensor:
    with _device_context(grad_coords.device):
        return _backward(None, grad_coords, None, None, None, None, basis, hidden_shape, hidden_dtype, 0.0, True)


def is_usable(device: torch.device) -> bool:
    return device.type == "cuda" or interpreting()
