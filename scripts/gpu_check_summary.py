"""Read the benchmark JSON a GPU session wrote and say where the issue-19 targets stand.

    python scripts/gpu_check_summary.py gpu_out/                  # the newest *.json files there
    python scripts/gpu_check_summary.py benchmarks/results/NVIDIA_H100_80GB_HBM3-2026-11-23-full.json

Prints, from the rows alone (nothing typed by hand):
* the target shape (N=16384, d=4096, k=8, bf16) forward / backward against v0.1's 62.6 / 102.6 us
  (benchmarks/NOTES.md, run 6) and the copy bandwidth of the same run;
* the bf16 grid: geometric mean of % of copy bandwidth forward and backward per backend, and the
  lowest point (targets: Triton >= 85 % mean, no point < 70 %; CUDA >= 80 % mean);
* fp32 at the target shape (target >= 80 %);
* fwd+bwd speed-up over eager and torch.compile (targets 5x and 1.5x) where those rows exist.
Each line ends in "met", "missed" or "not measured".
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

TARGET = (16384, 4096, 8)
V01_US = {"fwd": 62.6, "bwd": 102.6}  # benchmarks/NOTES.md, run 6 (H100, triton 3.6, v0.1 kernels)
GRID_MEAN_TARGET = {"triton": 85.0, "cuda": 80.0}
GRID_FLOOR_TARGET = 70.0
FP32_TARGET = 80.0
SPEEDUP_TARGETS = {"eager": 5.0, "compiled": 1.5}


def load_rows(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(rows, payload headers) from JSON files or folders (every penalty-bench JSON in a folder)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.json")))
        else:
            files.append(path)
    rows, headers = [], []
    for file in files:
        with open(file) as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or "rows" not in payload or "copy_bandwidth_gbps" not in payload:
            continue  # train-step, host or kernel-resource files
        headers.append({k: v for k, v in payload.items() if k != "rows"} | {"file": file})
        rows += payload["rows"]
    return rows, headers


def _pick(rows, variant, mode, N, d, k, dtype):
    hits = [
        r
        for r in rows
        if (r["variant"], r["mode"], r["N"], r["d"], r["k"], r["dtype"]) == (variant, mode, N, d, k, dtype)
    ]
    return hits[-1] if hits else None  # the newest file's row last


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "missed")


def summarise(rows: list[dict], headers: list[dict]) -> list[str]:
    out = []
    for h in headers:
        out.append(
            f"{os.path.basename(h['file'])}: {h.get('device')}, copy {h.get('copy_bandwidth_gbps', 0):.0f} GB/s, "
            f"torch {h.get('torch')}, triton {h.get('triton')}, grid {h.get('grid')}"
        )
    N, d, k = TARGET
    for mode in ("fwd", "bwd"):
        r = _pick(rows, "triton", mode, N, d, k, "bfloat16")
        if r is None:
            out.append(f"target triton {mode}: not measured")
            continue
        us = r["gpu_ms"] * 1e3
        change = (V01_US[mode] - us) / V01_US[mode] * 100
        out.append(
            f"target triton {mode}: {us:.1f} us, {r['pct_copy_bw']:.1f} % of copy BW "
            f"(v0.1 {V01_US[mode]} us: {'faster' if change >= 0 else 'slower'} by {abs(change):.1f} %)"
        )
    for backend, goal in GRID_MEAN_TARGET.items():
        for mode in ("fwd", "bwd"):
            pts = [
                r
                for r in rows
                if r["variant"] == backend and r["mode"] == mode and r["dtype"] == "bfloat16" and r["pct_copy_bw"] > 0
            ]
            keyed = {(r["N"], r["d"], r["k"]): r for r in pts}  # newest wins
            if len(keyed) < 36:
                out.append(f"grid {backend} {mode}: {len(keyed)}/36 points: not measured")
                continue
            pcts = [r["pct_copy_bw"] for r in keyed.values()]
            mean = math.exp(sum(math.log(p) for p in pcts) / len(pcts))
            low_key, low = min(((key, r["pct_copy_bw"]) for key, r in keyed.items()), key=lambda kv: kv[1])
            ok = mean >= goal and (backend != "triton" or low >= GRID_FLOOR_TARGET)
            floor = f", lowest {low:.1f} % at N,d,k={low_key}" + (
                f" (floor {GRID_FLOOR_TARGET:.0f} %)" if backend == "triton" else ""
            )
            out.append(
                f"grid {backend} {mode}: geometric mean {mean:.1f} % (target {goal:.0f} %){floor}: {_verdict(ok)}"
            )
    for mode in ("fwd", "bwd"):
        r = _pick(rows, "triton", mode, N, d, k, "float32")
        ok = None if r is None else r["pct_copy_bw"] >= FP32_TARGET
        pct = "" if r is None else f"{r['pct_copy_bw']:.1f} % "
        out.append(f"fp32 target triton {mode}: {pct}(target {FP32_TARGET:.0f} %): {_verdict(ok)}")
    mine = _pick(rows, "triton", "fwdbwd", N, d, k, "bfloat16")
    for other, goal in SPEEDUP_TARGETS.items():
        theirs = _pick(rows, other, "fwdbwd", N, d, k, "bfloat16")
        if mine is None or theirs is None:
            out.append(f"fwd+bwd vs {other}: not measured")
            continue
        speedup = theirs["gpu_ms"] / mine["gpu_ms"]
        out.append(f"fwd+bwd vs {other}: {speedup:.2f}x (target {goal}x): {_verdict(speedup >= goal)}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="result JSON files or folders")
    args = parser.parse_args(argv)
    rows, headers = load_rows(args.paths)
    if not rows:
        print(f"no penalty-bench rows in {args.paths}")
        return 1
    print("\n".join(summarise(rows, headers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
