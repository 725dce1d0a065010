"""Regenerate the performance section of a Markdown file from the benchmark JSON.

    python scripts/render_perf.py                          # docs/performance.md, newest files in benchmarks/results
    python scripts/render_perf.py docs/performance.md      # another target file
    python scripts/render_perf.py --bench F.json --train T.json --check

Only the text between ``<!-- perf:begin -->`` and ``<!-- perf:end -->`` is replaced;
every number in it is read from the JSON (nothing is typed by hand), so the section
always says which device, versions, date and command produced it.  ``--check`` exits
1 when the file is out of date instead of writing it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
TARGET = (16384, 4096, 8, "bfloat16")
VARIANT_LABELS = {
    "eager": "eager PyTorch reference",
    "compiled": "torch.compile of the reference (dynamic shapes)",
    "compiled-static": "torch.compile of the reference (static shape)",
    "triton": "**triton**",
    "cuda": "cuda (csrc)",
}
TRAIN_LABELS = {
    "plain": "plain LoRA",
    "guard-cached": "guard, cached anchors",
    "guard-online": "guard, online anchors",
    "torch-penalty": "guard, plain-PyTorch penalty",
    "guard-all-cached": "guard on all layers, cached anchors",
    "guard-all-online": "guard on all layers, online anchors",
    "torch-penalty-all": "guard on all layers, plain-PyTorch penalty",
}


def _load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def newest(folder: str, kind: str) -> str | None:
    """Newest file of a kind ("bench": penalty microbenchmarks, "train": training step) by its
    recorded date; on the same date a full grid beats a target-only run, then the name decides."""
    best, best_key = None, None
    for path in glob.glob(os.path.join(folder, "*.json")):
        try:
            data = _load(path)
        except (OSError, ValueError):
            continue
        is_train = "setup" in data
        if (kind == "train") != is_train or "rows" not in data:
            continue
        key = (data.get("date", ""), data.get("grid") == "full", os.path.basename(path))
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def _us(ms: float) -> str:
    return f"{ms * 1e3:.1f} us"


def _command(data: dict) -> str:
    cmd = data.get("command")
    return f"`{cmd}`" if cmd else "not recorded in this file"


def render_bench(data: dict, path: str) -> list[str]:
    N, d, k, dtype = TARGET
    rows = [r for r in data["rows"] if (r["N"], r["d"], r["k"], r["dtype"]) == TARGET]
    out = [
        f"## Performance (measured on an {data['device']})",
        "",
        f"The guard op (forward, backward, both) at the target shape N = {N} tokens, d = {d}, k = {k}, {dtype}.",
        f"Timing: {data.get('timing', 'not recorded')}; against a device-to-device copy of "
        f"{data['copy_bandwidth_gbps']:.0f} GB/s measured in the same run. Date {data['date']}; "
        f"torch {data.get('torch')}, triton {data.get('triton')}, CUDA {data.get('cuda')}, "
        f"python {data.get('python')}; git commit {data.get('git_commit') or 'not recorded'}.",
        f"Command: {_command(data)} (grid `{data.get('grid')}`). Raw rows: `benchmarks/results/"
        f"{os.path.basename(path)}`; history and profiles in `benchmarks/NOTES.md`.",
        "",
    ]
    with_q = any("p20_ms" in r for r in rows)
    head = "| variant | forward | backward | forward + backward | extra peak memory (fwd+bwd) |"
    out += [head, "|---|---|---|---|---|"]
    by = {(r["variant"], r["mode"]): r for r in rows}
    variants = [v for v in VARIANT_LABELS if any(key[0] == v for key in by)]
    variants += sorted({v for v, _ in by} - set(variants))
    for v in variants:
        cells = []
        for mode in ("fwd", "bwd", "fwdbwd"):
            r = by.get((v, mode))
            if r is None:
                cells.append("-")
                continue
            cell = f"{_us(r['gpu_ms'])} ({r['pct_copy_bw']:.1f} %)"
            if with_q and r.get("p20_ms") is not None:
                cell += f" [p20 {r['p20_ms'] * 1e3:.1f}, p80 {r['p80_ms'] * 1e3:.1f}]"
            cells.append(cell)
        fb = by.get((v, "fwdbwd"))
        extra = f"{fb['extra_peak_mb']:.2f} MB" if fb and fb.get("extra_peak_mb") is not None else "-"
        label = VARIANT_LABELS.get(v, v)
        if label.startswith("**"):
            cells = [f"**{c}**" if c != "-" else c for c in cells]
            extra = f"**{extra}**" if extra != "-" else extra
        out.append(f"| {label} | " + " | ".join(cells) + f" | {extra} |")
    out.append("")
    floors = []
    for mode, name in (("fwd", "forward"), ("bwd", "backward")):
        r = by.get(("triton", mode)) or by.get(("eager", mode))
        if r is not None:
            floors.append(f"{r['gpu_ms'] * r['pct_copy_bw'] / 100 * 1e3:.1f} us {name}")
    note = "(% = achieved bytes/s over the copy bandwidth"
    out.append(note + (f"; the floor is {', '.join(floors)}.)" if floors else ".)"))
    fb = {v: r["gpu_ms"] for (v, m), r in by.items() if m == "fwdbwd"}
    for fast in ("triton", "cuda"):
        if fast in fb:
            parts = [
                f"{fb[o] / fb[fast]:.2f}x faster than {VARIANT_LABELS[o]}" for o in fb if o not in ("triton", "cuda")
            ]
            if parts:
                out.append(f"{fast} forward+backward: " + "; ".join(parts) + ".")
    if not any(v.startswith("compiled") for v in fb):
        out.append("`torch.compile` of the reference has no rows in this file.")
    big = max(((r["N"] * r["d"], r["N"], r["d"]) for r in data["rows"] if r["variant"] == "triton"), default=None)
    if big is not None and (big[1], big[2]) != (N, d):
        top = [r for r in data["rows"] if r["variant"] == "triton" and (r["N"], r["d"]) == big[1:]]
        top = [r for r in top if r["dtype"] == dtype and r["k"] == k]
        if top:
            pct = ", ".join(f"{r['pct_copy_bw']:.0f} % ({r['mode']})" for r in top)
            out.append(f"At N = {big[1]}, d = {big[2]}, k = {k} the Triton kernels reach {pct} of copy bandwidth.")
    host = data.get("host")
    if host:
        out += ["", f"Host time per call ({host.get('mode')}; {host.get('method')}):", ""]
        out += ["| call | p20 | p50 | p80 |", "|---|---|---|---|"]
        for name, r in host["ops"].items():
            out.append(f"| {name} | {r['p20_us']:.1f} us | {r['p50_us']:.1f} us | {r['p80_us']:.1f} us |")
    return out


def render_train(data: dict, path: str) -> list[str]:
    s = data["setup"]
    layers = s.get("hooked_layers")
    out = [
        "",
        f"Training step (`benchmarks/train_step_bench.py`, {data['device']}, {data['date']}, torch {data.get('torch')}: "
        f"Llama-3-8B layer sizes, {s.get('layers')} layers, seq {s.get('seq')}, batch {s.get('batch')}, "
        f"LoRA r={s.get('lora_r')} on all projections, {s.get('dtype')}, AdamW; guard on layers {layers}, "
        f"k = {s.get('k')}; {s.get('steps')} timed steps after {s.get('warmup')} warm-up"
        + (f", {s['repeats']} repeats" if s.get("repeats") else "")
        + f"; command: {_command(data)}; raw: `benchmarks/results/{os.path.basename(path)}`):",
        "",
        "| variant | step (p50) | p20 / p80 | vs plain | peak memory | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    plain_seen = 0
    for r in data["rows"]:
        label = TRAIN_LABELS.get(r["variant"], r["variant"])
        if r["variant"] == "plain":
            plain_seen += 1
            if plain_seen > 1:
                label += ", run again"
        times = r.get("step_ms_all") or [r["step_ms"]]
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
        vs = "-" if r["variant"] == "plain" and plain_seen == 1 else f"{r['time_overhead_pct']:+.2f} %"
        vm = "-" if r["variant"] == "plain" and plain_seen == 1 else f"{r['mem_overhead_pct']:+.2f} %"
        out.append(
            f"| {label} | {r['step_ms']:.2f} ms | {q[1]:.2f} / {q[7]:.2f} ms | {vs} | "
            f"{r['peak_mem_gib']:.3f} GiB | {vm} |"
        )
    plains = [r for r in data["rows"] if r["variant"] == "plain"]
    if len(plains) >= 2:
        spread = 100 * abs(plains[1]["step_ms"] / plains[0]["step_ms"] - 1)
        out += ["", f"The two plain runs differ by {spread:.2f} %: effects smaller than that are not resolved."]
    return out


def render(bench: dict | None, bench_path: str | None, train: dict | None, train_path: str | None) -> str:
    lines = []
    if bench is not None:
        lines += render_bench(bench, bench_path)
    if train is not None:
        lines += render_train(train, train_path)
    return "\n".join(lines)


def splice(text: str, body: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"the target must hold exactly one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n<!-- generated by scripts/render_perf.py; edit the JSON, not this text -->\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", default="docs/performance.md")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--bench", default=None, help="penalty bench JSON (default: the newest)")
    ap.add_argument("--train", default=None, help="train-step JSON (default: the newest)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the target is out of date; write nothing")
    args = ap.parse_args(argv)
    bench_path = args.bench or newest(args.results, "bench")
    train_path = args.train or newest(args.results, "train")
    if bench_path is None and train_path is None:
        raise SystemExit(f"no result files in {args.results}")
    body = render(
        _load(bench_path) if bench_path else None, bench_path, _load(train_path) if train_path else None, train_path
    )
    with open(args.target) as fh:
        text = fh.read()
    new = splice(text, body)
    if args.check:
        if new != text:
            print(f"{args.target} is out of date; run python scripts/render_perf.py {args.target}")
            return 1
        return 0
    if new != text:
        with open(args.target, "w") as fh:
            fh.write(new)
    print(f"rendered {bench_path} and {train_path} into {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
