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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import penalty_bench as pb  # noqa: E402

from refusalguard_kernels.ops import triton_penalty as tp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    case = pb.Case(args.N, args.d, args.k, args.dtype)
    copy = pb.copy_bandwidth_gbps()
    configs = []
    for bn, bd, warps, stages, per_sm in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4), (1, 2, 4)):
        row_blocks = -(-case.N // bn)
        if bn == 32 and (warps != 4 or bd == 64):
            continue
        if bn >= 64 and per_sm == 4:
            continue
        if row_blocks <= torch.cuda.get_device_properties(0).multi_processor_count and per_sm > 1:
            continue  # one program per row block already: per_sm changes nothing
        configs.append((bn, bd, warps, stages, per_sm))
    rows = []
    for bn, bd, warps, stages, per_sm in configs:
        tp.BLOCK_N, tp.BLOCK_D_HALF, tp.BLOCK_D_FP32 = bn, bd, bd
        tp.NUM_WARPS, tp.NUM_STAGES, tp.PROGRAMS_PER_SM = warps, stages, per_sm
        try:
            res = pb.measure(case, "triton", copy, modes=("fwd", "bwd"), call_overhead=False)
        except Exception as exc:  # a config that does not compile (shared memory, registers)
            print(f"BN={bn} BD={bd} w={warps} s={stages} per_sm={per_sm}: failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        fwd, bwd = res[0], res[1]
        rows.append((fwd.pct_copy_bw, bwd.pct_copy_bw, bn, bd, warps, stages, per_sm, fwd.gpu_ms, bwd.gpu_ms))
        print(f"BN={bn:<4} BD={bd:<4} w={warps} s={stages} per_sm={per_sm}: fwd {fwd.gpu_ms*1e3:7.1f} us "
              f"{fwd.pct_copy_bw:5.1f}%  bwd {bwd.gpu_ms*1e3:7.1f} us {bwd.pct_copy_bw:5.1f}%", flush=True)
    print(f"\ntune summary ({torch.cuda.get_device_name(0)}, copy {copy:.0f} GB/s, N={case.N} d={case.d} k={case.k} {case.dtype})")
    print("best fwd:")
    for r in sorted(rows, key=lambda r: -r[0])[:5]:
        print(f"  {r[0]:5.1f}%  BN={r[2]} BD={r[3]} w={r[4]} s={r[5]} per_sm={r[6]}  ({r[7]*1e3:.1f} us)")
    print("best bwd:")
    for r in sorted(rows, key=lambda r: -r[1])[:5]:
        print(f"  {r[1]:5.1f}%  BN={r[2]} BD={r[3]} w={r[4]} s={r[5]} per_sm={r[6]}  ({r[8]*1e3:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
