"""Penalty microbenchmarks on a GPU: writes raw JSON + a PNG and prints a table.

    python benchmarks/run_penalty_bench.py                 # target shape, every variant
    python benchmarks/run_penalty_bench.py --grid full     # issue 6's shape grid
    python benchmarks/run_penalty_bench.py --out benchmarks/results

Results go to <out>/<device>-<date>.json (device name, torch/triton/CUDA versions,
measured copy bandwidth, every row) and <out>/<device>-<date>.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import penalty_bench as pb  # noqa: E402

import refusalguard_kernels as rg  # noqa: E402

TARGET = pb.Case(16384, 4096, 8, "bfloat16")


def grid(name: str) -> list[pb.Case]:
    if name == "target":
        return [TARGET, pb.Case(16384, 4096, 8, "float32")]
    if name == "full":
        cases = [pb.Case(N, d, k) for N in (4096, 16384, 65536) for d in (2048, 4096, 8192) for k in (1, 8, 16, 64)]
        return cases + [pb.Case(16384, 4096, 8, "float32")]
    raise SystemExit(f"unknown grid {name!r}; use target or full")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="target", choices=["target", "full"])
    parser.add_argument(
        "--variants",
        default="eager,compiled,compiled-static,triton,cuda",
        help="comma list among eager, compiled, compiled-static, triton, cuda (missing ones skipped)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    parser.add_argument("--tag", default="", help="suffix for the file names")
    parser.add_argument(
        "--host", action="store_true", help="add the host section: benchmarks/host_overhead.py, real launches"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to the file of the same name (scripts/gpu_check.sh: one file per session); a row measured "
        "again replaces the old one; each row keeps the copy bandwidth of its own run",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("these benchmarks need a CUDA GPU; on CPU run `pytest benchmarks/` for the small-size check")

    variants = [v for v in args.variants.split(",") if v]
    available = rg.available_backends()
    variants = [v for v in variants if v not in ("triton", "cuda") or v in available]
    copy_gbps = pb.copy_bandwidth_gbps()
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}; copy bandwidth {copy_gbps:.0f} GB/s (read+write)", flush=True)

    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    slug = device.replace(" ", "_").replace("/", "_") + "-" + stamp + (f"-{args.tag}" if args.tag else "")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, slug + ".json")
    command = "python benchmarks/run_penalty_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    earlier = _load_for_append(path) if args.append else None
    rows = [] if earlier is None else earlier["rows"]
    payload = {
        "device": device,
        "date": stamp,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "copy_bandwidth_gbps": copy_gbps,
        "timing": "CUDA-graph replay over input sets > 4x L2, median (p20/p80) per call over 10 replays; "
        "call_ms = do_bench median without graph (includes its L2-flush memset: not host time, see host)",
        "grid": args.grid,
        "git_commit": git_commit(),
        "command": command,
        "rows": rows,
    }
    if earlier is not None:
        payload["command"] = f"{earlier['command']} && {command}"
        payload["grid"] = "full" if "full" in (earlier.get("grid"), args.grid) else args.grid
    cases = grid(args.grid)
    for case in cases:
        for variant in variants:
            if variant == "compiled-static" and case != TARGET:
                continue
            if variant.startswith("compiled") and args.grid == "target" and case.dtype != TARGET.dtype:
                continue  # one fp32 row: eager and the kernels (a second compile would cost minutes)
            try:
                for r in pb.measure(case, variant, copy_gbps, call_overhead=args.grid == "target"):
                    row = pb.as_dict(r)
                    if earlier is not None:  # one file, several runs: each row says its run's copy bandwidth
                        row["copy_bandwidth_gbps"] = copy_gbps
                        rows[:] = [old for old in rows if _row_key(old) != _row_key(row)]
                    rows.append(row)
                    print(
                        f"{variant:>15} {r.mode:>6} N={case.N:<6} d={case.d:<5} k={case.k:<3} {case.dtype:<8} "
                        f"{r.gpu_ms * 1e3:9.1f} us {r.gbps:7.0f} GB/s {r.pct_copy_bw:5.1f}%",
                        flush=True,
                    )
            except torch.OutOfMemoryError as exc:
                print(f"{variant} N={case.N} d={case.d} k={case.k}: out of memory ({exc})", flush=True)
                torch.cuda.empty_cache()
        _save(payload, path)  # after every case: a run cut short still leaves its rows
    if args.host:
        import host_overhead

        payload["host"] = host_overhead.measure_host(real=True)
        _save(payload, path)
    plot(payload, os.path.join(args.out, slug + ".png"))
    print(f"wrote {path}")
    print_summary(payload)
    return 0


def _row_key(row: dict) -> tuple:
    return (row["variant"], row["mode"], row["N"], row["d"], row["k"], row["dtype"])


def _load_for_append(path: str) -> dict | None:
    """The earlier run's payload to add to (None: no file yet), its rows tagged with their copy bandwidth."""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        earlier = json.load(fh)
    for row in earlier["rows"]:
        row.setdefault("copy_bandwidth_gbps", earlier["copy_bandwidth_gbps"])
    return earlier


def git_commit() -> str | None:
    """HEAD of the checkout being measured, with "+dirty" when it has uncommitted changes."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=here, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _save(payload: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r["dtype"] == "bfloat16"]
    shapes = sorted({(r["N"], r["d"], r["k"]) for r in rows})
    variants = sorted({r["variant"] for r in rows})
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.35 * len(shapes) + 3), 10), sharex=True)
    for ax, mode in zip(axes, ("fwd", "bwd", "fwdbwd")):
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            vals = []
            for s in shapes:
                hit = [
                    r["pct_copy_bw"]
                    for r in rows
                    if (r["N"], r["d"], r["k"]) == s and r["variant"] == v and r["mode"] == mode
                ]
                vals.append(hit[0] if hit else 0.0)
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=v)
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.axhline(85, color="r", lw=0.8, ls=":")
        ax.set_ylabel(f"{mode}: % of copy BW")
    axes[0].legend(ncol=len(variants))
    axes[-1].set_xticks(range(len(shapes)))
    axes[-1].set_xticklabels([f"{n}/{d}/{k}" for n, d, k in shapes], rotation=90, fontsize=7)
    axes[-1].set_xlabel("N / d / k (bf16)")
    fig.suptitle(f"guard op, {payload['device']}, copy BW {payload['copy_bandwidth_gbps']:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_summary(payload: dict) -> None:
    t = TARGET
    rows = [r for r in payload["rows"] if (r["N"], r["d"], r["k"], r["dtype"]) == (t.N, t.d, t.k, t.dtype)]
    if not rows:
        return
    print(
        f"\nsummary: N={t.N} d={t.d} k={t.k} {t.dtype}; copy BW {payload['copy_bandwidth_gbps']:.0f} GB/s "
        f"({payload['device']})"
    )
    print(f"{'variant':>15} {'mode':>6} {'gpu us':>9} {'call us':>9} {'GB/s':>7} {'%BW':>6} {'extra MB':>9}")
    for r in rows:
        call = f"{r['call_ms'] * 1e3:9.1f}" if r["call_ms"] is not None else f"{'-':>9}"
        extra = f"{r['extra_peak_mb']:9.2f}" if r["extra_peak_mb"] is not None else f"{'':>9}"
        print(
            f"{r['variant']:>15} {r['mode']:>6} {r['gpu_ms'] * 1e3:9.1f} {call} {r['gbps']:7.0f} "
            f"{r['pct_copy_bw']:6.1f} {extra}"
        )
    fb = {r["variant"]: r["gpu_ms"] for r in rows if r["mode"] == "fwdbwd"}
    for fast in ("triton", "cuda"):
        if fast in fb:
            parts = [f"{fast} fwd+bwd speed-up: {fb['eager'] / fb[fast]:.2f}x vs eager" if "eager" in fb else ""]
            for c in ("compiled", "compiled-static"):
                if c in fb:
                    parts.append(f"{fb[c] / fb[fast]:.2f}x vs {c}")
            print("; ".join(p for p in parts if p))


if __name__ == "__main__":
    sys.exit(main())
