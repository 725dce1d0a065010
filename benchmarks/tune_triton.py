"""Sweep the Triton kernels' tile constants on one shape (GPU); prints a table.

    python benchmarks/tune_triton.py [--N 16384 --d 4096 --k 8 --dtype bfloat16]

The launchers read their constants from module globals, so each config is set there
and both passes are timed through the public guard op (CUDA-graph replay, inputs
rotated beyond L2).  Use the winner to update the constants in triton_penalty.py.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import penalty_bench as pb  # noqa: E402

from refusalguard_kernels.ops import triton_penalty as tp  # noqa: E402


def breakdown(case: pb.Case) -> None:
    """Device time of the small launches around the main kernels (graph replay, median)."""
    P = 132
    part = torch.randn(P, 2 + case.k * case.k, device="cuda")
    loss = torch.empty((), device="cuda")
    state = torch.empty(2 + case.k * case.k, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fin = pb._graph_time(
            lambda: [
                tp._penalty_finalize_kernel[(1,)](
                    part,
                    loss,
                    state,
                    P,
                    part.shape[1],
                    1.0,
                    0.1,
                    BLOCK_P=min(256, tp.FINALIZE_TILE // 128),
                    BLOCK_E=triton.next_power_of_2(part.shape[1]),
                    num_warps=tp.FINALIZE_WARPS,
                )
                for _ in range(20)
            ],
            20,
        )
    torch.cuda.synchronize()
    print(f"breakdown: finalize (P={P}) {fin * 1e3:.1f} us per launch", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="fwd,bwd", help="which passes to sweep")
    args = ap.parse_args()
    case = pb.Case(args.N, args.d, args.k, args.dtype)
    copy = pb.copy_bandwidth_gbps()
    breakdown(case)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = []
    for bn, bd, warps, stages, per_sm in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4), (1, 2, 4)):
        if bn * bd > 128 * 256 or (bn == 128 and warps == 4 and bd == 256):
            continue
        if -(-case.N // bn) <= sms and per_sm > 1:
            continue  # one program per row block already: per_sm changes nothing
        grid.append(tp.TileConfig(bn, bd, bd, warps, stages, per_sm))
    fwd_grid = [c for c in grid if c.block_n >= 64 and c.programs_per_sm <= 2]
    bwd_grid = [c for c in grid if c.block_n <= 64 and c.num_stages == 3 and c.block_d_half >= 128]
    best = {}
    default_fwd = tp.FWD_CONFIG
    for mode, configs in (("fwd", fwd_grid), ("bwd", bwd_grid)):
        if mode not in args.modes.split(","):
            continue
        tp.FWD_CONFIG = default_fwd  # the bwd sweep runs forwards too: keep them on a config that compiles
        rows = []
        for cfg in configs:
            if mode == "fwd":
                tp.FWD_CONFIG = cfg
            else:
                tp.BWD_CONFIG = cfg
            try:
                (res,) = pb.measure(case, "triton", copy, modes=(mode,), call_overhead=False)
            except Exception as exc:  # a config that does not compile (shared memory, registers)
                print(f"{mode} {cfg}: failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                continue
            rows.append((res.pct_copy_bw, res.gpu_ms, cfg))
            print(f"{mode} {cfg}: {res.gpu_ms * 1e3:7.1f} us {res.pct_copy_bw:5.1f}%", flush=True)
        rows.sort(key=lambda r: -r[0])
        best[mode] = rows[:5]
    print(
        f"\ntune summary ({torch.cuda.get_device_name(0)}, copy {copy:.0f} GB/s, "
        f"N={case.N} d={case.d} k={case.k} {case.dtype})"
    )
    for mode, rows in best.items():
        print(f"best {mode}:")
        for pct, ms, cfg in rows:
            print(f"  {pct:5.1f}%  {ms * 1e3:6.1f} us  {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
