"""Static resource check of every Triton launch the public ops make -- no GPU needed.

    python scripts/kernel_resources.py                     # the full sweep, sm_90/80/86/89, printed
    python scripts/kernel_resources.py --set ci --check    # what CI runs (tests/test_kernel_resources.py)
    python scripts/kernel_resources.py --write             # refresh the committed baseline (full sweep)
    python scripts/kernel_resources.py --arch 86 --write   # refresh one architecture's rows of it

How: the public functional API (``project``, ``geometry_loss``, ``guard``; forward and backward,
with and without the Gram term and weights) runs on ``meta`` tensors of the real shapes with the
three ``@triton.jit`` kernels swapped for recorders, so each launch is recorded with the arguments
the launchers pass -- shapes, strides, dtypes, constexprs, ``num_warps``, ``num_stages`` -- at no
memory cost and without running anything.  Each distinct launch is then specialised exactly as
Triton's JIT would on a GPU (its own binder: 16-byte divisibility of pointers and ints, ints equal
to 1 as constants) and compiled ahead of time with ``triton.compile(..., target=GPUTarget("cuda",
arch, 32))``.  From the result: registers, stack and static shared memory from ``cuobjdump
--dump-resource-usage`` on the cubin, spill stores/loads from ``ptxas -v`` on the PTX (Triton's
bundled tools, Triton's own ptxas flags), dynamic shared memory from the compile metadata, and the
resident blocks per SM those allow (registers, shared memory and warps; CUDA occupancy rules).

The baseline, ``benchmarks/results/kernel_resources/triton-<version>.json``, holds the full sweep
for the Triton version it was made with (pinned in constraints.txt); ``--check`` fails when a
launch of the baseline stops compiling, spills more, loses resident blocks per SM, or no longer
fits in shared memory, or when the ops make a launch the baseline does not know; and whenever a
launch does not fit in its architecture's shared memory per block, baseline or not (it would fail
to launch there).

Must run without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions that are
compiled here); the test runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE_DIR = REPO / "benchmarks" / "results" / "kernel_resources"
DTYPES = ("bfloat16", "float16", "float32")
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
KS = (1, 8, 16, 64)

# The benchmark grid's shapes (benchmarks/run_penalty_bench.py --grid full), plus a ragged one:
# N not a multiple of any row tile and SmolLM2-135M's d=576 (not a multiple of the 128-column
# tile), i.e. the masked code paths real batches take.
GRID_SHAPES = tuple((N, d) for N in (4096, 16384, 65536) for d in (2048, 4096, 8192))
RAGGED = (16001, 576)
TARGET = (16384, 4096)

# Programs per launch are min(row blocks, SMs x programs per SM): record with the SM count of
# the GPU the arch stands for, as the launchers would see it: H100 SXM 132, A100 108, A10G 80
# (sm_86; RTX 3090: 82, A6000: 84), L4 58 (sm_89; RTX 4090: 128), Jetson AGX Orin 16 (sm_87, not in
# the sweeps: ``--arch 87`` compiles it).
SM_COUNT = {90: 132, 80: 108, 86: 80, 89: 58, 87: 16}
ARCHS = (90, 80, 86, 89)  # the full sweep and the baseline; the ops choose tiles for these (ARCH_FAMILY)


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one compute capability (CUDA occupancy calculator, programming guide table)."""

    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32
    smem: int = 233472  # shared memory per SM, bytes
    smem_block: int = 232448  # most one block may use (opt-in)
    smem_reserved: int = 1024  # per resident block, reserved by the system


# From the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (the same values as
# CCCL's cuda::arch::traits): 64 K 32-bit registers per SM and at most 255 per thread everywhere here; 1 KB of
# shared memory reserved per resident block; shared memory per SM / most per block (opt-in):
#   8.0 (A100)                    164 / 163 KB, 32 blocks, 2048 threads (64 warps) per SM
#   8.6 (A10G, A6000, RTX 30xx)   100 /  99 KB, 16 blocks, 1536 threads (48 warps)
#   8.7 (Jetson Orin)             164 / 163 KB, 16 blocks, 1536 threads (48 warps)
#   8.9 (L4, L40S, RTX 40xx)      100 /  99 KB, 24 blocks, 1536 threads (48 warps)
#   9.0 (H100, H200)              228 / 227 KB, 32 blocks, 2048 threads (64 warps)
LIMITS = {
    90: SMLimits(smem=228 * 1024, smem_block=227 * 1024),
    80: SMLimits(smem=164 * 1024, smem_block=163 * 1024),
    86: SMLimits(smem=100 * 1024, smem_block=99 * 1024, max_warps=48, max_blocks=16),
    87: SMLimits(smem=164 * 1024, smem_block=163 * 1024, max_warps=48, max_blocks=16),
    89: SMLimits(smem=100 * 1024, smem_block=99 * 1024, max_warps=48, max_blocks=24),
}


def arch_name(cap: int) -> str:
    return f"sm_{cap}"


def occupancy(cap: int, regs: int, warps: int, smem_bytes: int) -> dict:
    """Resident blocks per SM and what limits them, from registers/thread, warps/block and
    shared memory/block (static + dynamic)."""
    lim = LIMITS[cap]
    per_warp = -(-regs * 32 // lim.reg_unit) * lim.reg_unit
    by_regs = lim.regs // (per_warp * warps) if per_warp else lim.max_blocks
    by_smem = lim.smem // (smem_bytes + lim.smem_reserved)
    by_warps = lim.max_warps // warps
    blocks = min(by_regs, by_smem, by_warps, lim.max_blocks)
    limiter = min(
        (("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps), ("blocks", lim.max_blocks)),
        key=lambda kv: kv[1],
    )[0]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "limited_by": limiter}


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS_RE = re.compile(r"Used (\d+) registers")


def parse_cuobjdump(text: str) -> dict:
    m = _RESOURCE_RE.search(text)
    if m is None:
        raise ValueError(f"no resource line in cuobjdump output:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def parse_ptxas(text: str) -> dict:
    m, r = _SPILL_RE.search(text), _PTXAS_REGS_RE.search(text)
    if m is None or r is None:
        raise ValueError(f"no spill/register lines in ptxas -v output:\n{text}")
    frame, stores, loads = map(int, m.groups())
    return {"stack_frame": frame, "spill_stores": stores, "spill_loads": loads, "ptxas_regs": int(r.group(1))}


# ------------------------------------------------------------------------------------ recording


@dataclasses.dataclass
class Launch:
    """One recorded launch: which op made it, on what, and the arguments the launcher passed."""

    label: str  # e.g. "bwd guard+gram+weight bf16 N=16384 d=4096 k=8"
    kernel: str
    args: tuple
    kwargs: dict


def op_variants(names: Iterable[str] | None = None) -> list[tuple[str, str, bool, bool]]:
    """(name, op, gram, weighted): every way the public API reaches the kernels (or those named)."""
    out = [("project", "project", False, False)]
    for op in ("loss", "guard"):
        for gram in (False, True):
            for weighted in (False, True):
                name = op + ("+gram" if gram else "") + ("+weight" if weighted else "")
                out.append((name, op, gram, weighted))
    return out if names is None else [v for v in out if v[0] in names]


class _Recorder:
    def __init__(self, name: str, sink: list):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.name, args, kwargs))

        return launch


@contextmanager
def _recording(cap: int, sink: list):
    """Kernels replaced by recorders, the backend resolved to "triton" for meta tensors, and the
    launchers seeing a GPU of capability ``cap``: its tile configs, its SM count for the grids."""
    import triton

    import refusalguard_kernels.functional as functional
    from refusalguard_kernels.ops import triton_penalty as tp

    saved = {name: obj for name, obj in vars(tp).items() if isinstance(obj, triton.runtime.jit.JITFunction)}
    saved_resolve, saved_programs = functional.resolve_backend, tp.persistent_programs
    saved_capability = getattr(tp, "device_capability", None)
    saved_smem = getattr(tp, "shared_memory_per_block", None)

    def programs(row_blocks, device, per_sm=2):
        return max(1, min(row_blocks, SM_COUNT[cap] * per_sm))

    try:
        for name in saved:  # helpers (@triton.jit called from kernels) too: restored before compiling
            setattr(tp, name, _Recorder(name, sink))
        functional.resolve_backend = lambda backend, device: "triton"
        tp.persistent_programs = programs
        if saved_capability is not None:
            tp.device_capability = lambda device: cap
        if saved_smem is not None:  # what torch would report: consulted for an arch without checked tiles
            tp.shared_memory_per_block = lambda device: LIMITS[cap].smem_block
        yield
    finally:
        for name, kernel in saved.items():
            setattr(tp, name, kernel)
        functional.resolve_backend, tp.persistent_programs = saved_resolve, saved_programs
        if saved_capability is not None:
            tp.device_capability = saved_capability
        if saved_smem is not None:
            tp.shared_memory_per_block = saved_smem


def role(kernel_name: str) -> str:
    """The kernel's role in a label: "_penalty_fwd_kernel" -> "fwd"."""
    return kernel_name.removeprefix("_penalty_").removeprefix("_").removesuffix("_kernel")


def record(
    shapes: Iterable[tuple[int, int]],
    dtypes: Iterable[str],
    ks: Iterable[int],
    cap: int,
    ops: Iterable[str] | None = None,
) -> list[Launch]:
    """Every launch the public ops (all, or the ``ops`` named) make on these shapes, in a fixed order."""
    import torch

    import refusalguard_kernels as rg
    from refusalguard_kernels.backends import kernel_module

    launches: list[Launch] = []
    for N, d in shapes:
        for dtype in dtypes:
            for k in ks:
                meta = dict(device="meta")
                hidden = torch.empty(N, d, dtype=getattr(torch, dtype), **meta, requires_grad=True)
                basis = torch.empty(d, k, dtype=torch.float32, **meta)
                anchors = torch.empty(N, k, dtype=torch.float32, **meta)
                weight = torch.empty(N, dtype=torch.float32, **meta)
                for name, op, gram, weighted in op_variants(ops):
                    sink: list = []
                    w = weight if weighted else None
                    gram_coef = 0.5 if gram else 0.0
                    with _recording(cap, sink):
                        if op == "project":
                            # With a graph, project goes through its torch.library op, which meta tensors
                            # send to the fake implementation: record the anchor path (no grad: straight
                            # to the launcher) and the launcher the backward op calls.
                            with torch.no_grad():
                                coords = rg.project(hidden, basis, backend="triton", validate=False)
                            kernel_module("triton").project_backward(
                                coords.view(N, k), basis, list(hidden.shape), hidden.dtype
                            )
                        elif op == "loss":
                            loss = rg.geometry_loss(
                                hidden, basis, anchors, w, gram_coef=gram_coef, backend="triton", validate=False
                            )
                            loss.backward()
                        else:
                            out, loss = rg.guard(
                                hidden, basis, anchors, w, gram_coef=gram_coef, backend="triton", validate=False
                            )
                            torch.autograd.backward([out, loss], [torch.empty_like(out), torch.empty_like(loss)])
                    hidden.grad = None
                    for kernel, args, kwargs in sink:
                        label = f"{role(kernel)} {name} {SHORT[dtype]} N={N} d={d} k={k}"
                        launches.append(Launch(label, kernel, args, kwargs))
    return launches


# ------------------------------------------------------------------------------------ compiling


def _specialise(kernel_name: str, args: tuple, kwargs: dict, cap: int):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them on a GPU
    of capability ``cap`` (its binder and _pack_args), without a driver."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from refusalguard_kernels.ops import triton_penalty as tp

    kernel = getattr(tp, kernel_name)
    backend = make_backend(GPUTarget("cuda", cap, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    # The options JITFunction.run adds from the knobs (3.6: instrumentation_mode; 3.9 also fpsan_homomorphic_casts).
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return kernel, signature, constexprs, attrs, options


def compile_key(launch: Launch, cap: int) -> str:
    _, signature, constexprs, attrs, options = _specialise(launch.kernel, launch.args, launch.kwargs, cap)
    return repr((launch.kernel, cap, signature, sorted(constexprs.items()), sorted(attrs.items()), options.hash()))


def _tool(name: str, cap: int) -> str:
    from triton.backends.nvidia import compiler as nvc

    if name == "ptxas":
        return nvc.get_ptxas(cap).path
    return getattr(nvc.knobs.nvidia, name).path


def compile_and_measure(kernel_name: str, args: tuple, kwargs: dict, cap: int) -> dict:
    """Compile one launch for sm_<cap> and read its resources; {"compiled": False, "error": ...}
    when Triton or ptxas rejects it."""
    _, signature, constexprs, attrs, options = _specialise(kernel_name, args, kwargs, cap)
    return _compile_specialised(kernel_name, signature, constexprs, attrs, options.__dict__, cap)


def _compile_specialised(kernel_name: str, signature: dict, constexprs: dict, attrs: dict, options: dict, cap: int):
    """The compile itself, from plain (picklable) values: what the worker processes run."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    from refusalguard_kernels.ops import triton_penalty as tp

    t0 = time.perf_counter()
    try:
        kernel = getattr(tp, kernel_name)
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32), options=options
        )
    except Exception as exc:  # any compile failure is a result, reported per launch
        text = str(exc).strip()  # Triton puts the source excerpt first and the reason last
        return {"compiled": False, "error": f"{type(exc).__name__}: {text[-300:]}"}
    with tempfile.TemporaryDirectory(prefix="rg-kres-") as tmp:
        cubin, ptx = Path(tmp, "k.cubin"), Path(tmp, "k.ptx")
        cubin.write_bytes(compiled.asm["cubin"])
        ptx.write_text(compiled.asm["ptx"])
        usage = subprocess.run(
            [_tool("cuobjdump", cap), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        # Triton's own ptxas command line (backends/nvidia/compiler.py: make_cubin), with -v read back.
        fmad = [] if options["enable_fp_fusion"] else ["--fmad=false"]
        cmd = [_tool("ptxas", cap), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(cap)}", str(ptx), "-o", str(Path(tmp, "k.o"))]
        ptxas = subprocess.run(cmd, capture_output=True, text=True, check=True)
    row = {"compiled": True, **parse_cuobjdump(usage), **parse_ptxas(ptxas.stdout + ptxas.stderr)}
    row["warps"] = compiled.metadata.num_warps
    row["num_stages"] = compiled.metadata.num_stages
    row["dynamic_shared"] = compiled.metadata.shared
    smem = row["static_shared"] + row["dynamic_shared"]
    row["fits_shared"] = smem <= LIMITS[cap].smem_block
    row.update(occupancy(cap, row["regs"], row["warps"], smem))
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _worker(job):
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return _compile_specialised(*job)


# ------------------------------------------------------------------------------------ sweeps


# What CI compiles (tests/test_kernel_resources.py; ~3 minutes on two loaded cores): every kernel and every
# code path of it (project, loss with and without Gram, guard's fused grad_in, weights), sm_90, at the target
# shape, for the dtypes and k the issue-19 targets name.  The weights flag only adds a load, so CI takes the
# weighted form of each op; the full sweep has both.  sm_86 (99 KB of shared memory per block): its own tile
# configs at the largest footprints (bf16 k = 8: the 80 KB forward; bf16 and fp32 k = 64: the wide tiles), where
# a launch that outgrows the block's shared memory shows first.  sm_89 compiles to the same resources as sm_86
# (the full sweep: every fwd/bwd launch identical; only the finalize's grid differs), so CI takes one case.
CI_OPS = ("project", "loss+weight", "loss+gram+weight", "guard", "guard+gram+weight")
CI_CASES = (("bfloat16", 8), ("bfloat16", 16), ("bfloat16", 64), ("float16", 8), ("float32", 8), ("float32", 64))
CI_CASES_BY_ARCH = {
    90: CI_CASES,
    86: (("bfloat16", 8), ("bfloat16", 64), ("float32", 64)),
    89: (("bfloat16", 64),),
}


def sweep_spec(name: str, archs: Iterable[int] | None = None) -> list[dict]:
    """full: every op, dtype and k on the grid's shapes and the ragged one, for every arch of ARCHS; ci: see
    CI_OPS.  ``archs``: only these architectures."""
    if name == "full":
        chosen = tuple(ARCHS if archs is None else archs)
        return [{"shapes": GRID_SHAPES + (RAGGED,), "dtypes": DTYPES, "ks": KS, "archs": chosen, "ops": None}]
    if name == "ci":
        return [
            {"shapes": (TARGET,), "dtypes": (dtype,), "ks": (k,), "archs": (cap,), "ops": CI_OPS}
            for cap, cases in CI_CASES_BY_ARCH.items()
            if archs is None or cap in archs
            for dtype, k in cases
        ]
    raise SystemExit(f"unknown set {name!r}; use full or ci")


def run(specs: list[dict], jobs: int = 1, progress: bool = True) -> dict:
    """Record, dedupe by compile key, compile, and return {"rows": {arch: {label: row}}, ...}."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default on 3.6 and 3.9; silences 3.9's warning
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    import triton

    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    unique: dict[tuple[int, str], tuple[Launch, list[str]]] = {}
    for spec in specs:
        for cap in spec["archs"]:
            for launch in record(spec["shapes"], spec["dtypes"], spec["ks"], cap, spec["ops"]):
                key = compile_key(launch, cap)
                if (cap, key) in unique:
                    unique[(cap, key)][1].append(launch.label)
                else:
                    unique[(cap, key)] = (launch, [launch.label])
    recorded = sum(len(labels) for _, labels in unique.values())
    items = list(unique.items())
    jobs_list = []  # specialised here, compiled in the workers: meta tensors do not cross processes
    for (cap, _), (launch, _) in items:
        _, signature, constexprs, attrs, options = _specialise(launch.kernel, launch.args, launch.kwargs, cap)
        jobs_list.append((launch.kernel, signature, constexprs, attrs, options.__dict__, cap))
    if progress:
        print(f"{recorded} launches recorded, {len(items)} distinct compiles; compiling with {jobs} job(s)", flush=True)
    pool = None
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=jobs)
    results = []
    try:
        for row in pool.map(_worker, jobs_list, chunksize=1) if pool else map(_worker, jobs_list):
            results.append(row)
            if progress and len(results) % 50 == 0:
                print(f"  {len(results)}/{len(jobs_list)} compiled ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for ((cap, _), (_launch, labels)), row in zip(items, results):
        row = dict(row, same_compile_as=labels[1:]) if len(labels) > 1 else row
        rows.setdefault(arch_name(cap), {})[labels[0]] = row
    return {
        "triton": triton.__version__,
        "tools": tool_versions(sorted({cap for spec in specs for cap in spec["archs"]}, reverse=True)),
        "spec": [{k: None if v is None else list(v) for k, v in spec.items()} for spec in specs],
        "launches_recorded": recorded,
        "compiles": len(items),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


def tool_versions(archs) -> dict:
    out = {}
    for cap in archs:
        text = subprocess.run([_tool("ptxas", cap), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", text)
        out[f"ptxas {arch_name(cap)}"] = m.group(2) if m else text.strip()[-40:]
    return out


# ------------------------------------------------------------------------------------ baseline


def compare(result: dict, baseline: dict, *, complete: bool) -> list[str]:
    """Regressions of ``result`` against ``baseline``, one line each (empty: none).

    A launch regresses when it stops compiling, spills more bytes (stores or loads), or keeps fewer
    blocks resident per SM.  A launch that does not fit in its architecture's shared memory per
    block is an error whatever the baseline says (it cannot launch there), and so is one the baseline
    lacks (nothing may go unchecked); with ``complete`` (the full sweep) so is a baseline launch the
    ops no longer make.  Registers may move freely as long as the occupancy holds."""
    problems = []
    for arch, rows in result["rows"].items():
        base_rows = baseline["rows"].get(arch, {})
        by_label = {}  # every label a baseline compile stands for, the ones it was deduplicated with too
        for label, base in base_rows.items():
            for alias in (label, *base.get("same_compile_as", ())):
                by_label[alias] = base
        for label, row in rows.items():
            if row["compiled"] and not row["fits_shared"]:
                smem = (row["static_shared"] + row["dynamic_shared"]) / 1024
                limit = LIMITS[int(arch.removeprefix("sm_"))].smem_block / 1024
                problems.append(
                    f"{arch} {label}: needs {smem:.1f} KB of shared memory per block, {arch} allows {limit:.0f}"
                )
            base = by_label.get(label)
            if base is None:
                problems.append(f"{arch} {label}: not in the baseline (regenerate it with --write)")
                continue
            if not row["compiled"]:
                problems.append(f"{arch} {label}: does not compile any more: {row['error']}")
                continue
            if not base["compiled"]:
                continue
            for field in ("spill_stores", "spill_loads"):
                if row[field] > base[field]:
                    problems.append(f"{arch} {label}: {field} {base[field]} -> {row[field]} bytes")
            if row["blocks_per_sm"] < base["blocks_per_sm"]:
                problems.append(
                    f"{arch} {label}: {base['blocks_per_sm']} -> {row['blocks_per_sm']} blocks/SM "
                    f"(regs {base['regs']} -> {row['regs']}, limited by {row['limited_by']})"
                )
        if complete:
            seen = {alias for label, row in rows.items() for alias in (label, *row.get("same_compile_as", ()))}
            for label in sorted(base_rows):
                if seen.isdisjoint((label, *base_rows[label].get("same_compile_as", ()))):
                    problems.append(f"{arch} {label}: in the baseline but no longer launched (regenerate it)")
    return problems


def merge_baseline(result: dict, baseline: dict) -> dict:
    """``baseline`` with the rows of ``result``'s architectures replaced by ``result``'s (a full sweep of
    those archs, same Triton); the other architectures' rows are kept as they are, byte for byte."""
    if baseline["triton"] != result["triton"]:
        raise SystemExit(f"baseline is for triton {baseline['triton']}, this run is {result['triton']}")
    archs = [int(arch.removeprefix("sm_")) for arch in result["rows"]]
    old_archs = [cap for spec in baseline["spec"] for cap in spec["archs"] if cap not in archs]
    merged = dict(baseline, rows={**baseline["rows"], **result["rows"]}, tools={**baseline["tools"], **result["tools"]})
    merged["spec"] = [dict(spec, archs=[*old_archs, *archs]) for spec in result["spec"]]
    runs = baseline.get("runs") or [{"archs": old_archs + archs, "seconds": baseline["seconds"]}]
    runs = [dict(run, archs=[cap for cap in run["archs"] if cap not in archs]) for run in runs]
    merged["runs"] = [run for run in runs if run["archs"]] + [{"archs": archs, "seconds": result["seconds"]}]
    merged["seconds"] = round(sum(run["seconds"] for run in merged["runs"]), 1)
    merged["compiles"] = sum(len(rows) for rows in merged["rows"].values())
    merged["launches_recorded"] = sum(
        1 + len(row.get("same_compile_as", ())) for rows in merged["rows"].values() for row in rows.values()
    )
    return merged


def baseline_path(version: str) -> Path:
    return BASELINE_DIR / f"triton-{version}.json"


def table(result: dict, labels: Iterable[str] | None = None) -> Iterator[str]:
    yield f"{'arch':6} {'launch':52} {'regs':>4} {'stack':>5} {'spill st/ld':>12} {'smem KB':>7} {'warps':>5} {'blk/SM':>6}"
    for arch, rows in result["rows"].items():
        for label, r in rows.items():
            if labels is not None and label not in labels:
                continue
            if not r["compiled"]:
                yield f"{arch:6} {label:52} does not compile: {r['error'][:80]}"
                continue
            spill = f"{r['spill_stores']}/{r['spill_loads']}"
            smem = (r["static_shared"] + r["dynamic_shared"]) / 1024
            yield (
                f"{arch:6} {label:52} {r['regs']:4d} {r['stack']:5d} {spill:>12} {smem:7.1f} {r['warps']:5d} "
                f"{r['blocks_per_sm']:6d}"
            )


def summary(result: dict) -> str:
    lines = []
    for arch, rows in result["rows"].items():
        ok = [r for r in rows.values() if r["compiled"]]
        spilling = [label for label, r in rows.items() if r["compiled"] and r["spill_stores"] > 0]
        lines.append(
            f"{arch}: {len(ok)}/{len(rows)} distinct launches compile, "
            f"{sum(r['fits_shared'] for r in ok)} fit in shared memory, {len(spilling)} spill"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="full", choices=["full", "ci"], help="which launches (default: full)")
    parser.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    parser.add_argument(
        "--check", action="store_true", help="compare against the committed baseline; exit 1 on a regression"
    )
    parser.add_argument("--write", action="store_true", help="write the result as the baseline (full set only)")
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        help=f"only these compute capabilities (default: {' '.join(map(str, ARCHS))}); "
        "with --write, replace only their rows of the baseline",
    )
    parser.add_argument("--baseline", type=Path, help="baseline file (default: the one for this Triton version)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--quiet", action="store_true", help="no table, only the summary and problems")
    args = parser.parse_args(argv)

    if args.arch is not None and not set(args.arch) <= set(LIMITS) & set(SM_COUNT):
        raise SystemExit(f"--arch: known capabilities are {sorted(set(LIMITS) & set(SM_COUNT))}")
    result = run(sweep_spec(args.set, args.arch), jobs=args.jobs)
    if not args.quiet:
        print("\n".join(table(result)))
    print(summary(result))
    print(f"{result['launches_recorded']} launches, {result['compiles']} compiles, {result['seconds']} s "
          f"(triton {result['triton']}, {', '.join(f'{k} {v}' for k, v in result['tools'].items())})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    path = args.baseline or baseline_path(result["triton"])
    if args.write:
        if args.set != "full":
            raise SystemExit("--write takes the full set: the baseline must cover every launch")
        path.parent.mkdir(parents=True, exist_ok=True)
        written = result
        if args.arch is not None and path.exists():
            written = merge_baseline(result, json.loads(path.read_text()))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # atomic: a failed write leaves the old baseline
        print(f"baseline written: {path.relative_to(REPO)}")
    if args.check:
        if not path.exists():
            print(f"no baseline for triton {result['triton']} at {path}; make one with --write")
            return 2
        problems = compare(result, json.loads(path.read_text()), complete=args.set == "full")
        for line in problems:
            print("REGRESSION", line)
        print(f"check against {path.relative_to(REPO)}: {len(problems)} problem(s)")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
