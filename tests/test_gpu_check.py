"""scripts/gpu_check.sh without a GPU: its dry-run mode (the plan fits 12 minutes, every path and
command line it uses is valid), and the helpers that read a GPU session's results (issue 19, item 4)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
H100_FULL = REPO / "benchmarks" / "results" / "NVIDIA_H100_80GB_HBM3-2026-11-23-full.json"
ORDER = ["kernels", "target", "grid", "cuda", "host", "compiled", "train", "render"]


def _run(*args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_dry_run_plans_every_step_in_order_within_12_minutes(tmp_path):
    result = _run("--dry-run", OUT=str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    planned = [m.group(1) for line in lines if (m := re.match(r"  (\w+): (up to|skipped)", line))]
    assert planned == ORDER
    cumulative = [int(m.group(1)) for line in lines if (m := re.search(r"cumulative (\d+) s", line))]
    assert cumulative and cumulative == sorted(cumulative) and cumulative[-1] <= 720
    assert cumulative[0] <= 240  # the kernel tests come first and cannot starve the rest
    assert "ok: kernel and cuda tests collect" in result.stdout
    assert lines[-1] == "dry run: ok"
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_dry_run_refuses_a_plan_over_12_minutes():
    result = _run("--dry-run", TOTAL_LIMIT="1000")
    assert result.returncode == 1
    assert "over 12 minutes" in result.stderr


def test_unknown_step_is_an_error():
    result = _run("--dry-run", "kernels", "benchmark")
    assert result.returncode == 2
    assert "unknown step 'benchmark'" in result.stderr


def test_summary_reads_the_h100_run():
    """The summary's numbers come from the rows: on the committed v0.1 H100 run they are v0.1's."""
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check_summary.py", str(H100_FULL)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "target triton fwd: 62.6 us, 72.1 % of copy BW" in out
    assert "target triton bwd: 102.6 us, 87.6 % of copy BW" in out
    assert re.search(r"grid triton fwd: geometric mean [\d.]+ % \(target 85 %\).*: missed", out)
    assert "fwd+bwd vs eager: 5.06x (target 5.0x): met" in out
    assert "fwd+bwd vs compiled: not measured" in out


def test_bench_append_keeps_earlier_rows_with_their_copy_bandwidth(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    run_penalty_bench = pytest.importorskip("run_penalty_bench")
    path = tmp_path / "dev-gpucheck.json"
    row = {"variant": "triton", "mode": "fwd", "N": 1, "d": 2, "k": 1, "dtype": "bfloat16", "gpu_ms": 0.1}
    path.write_text(json.dumps({"command": "first", "copy_bandwidth_gbps": 2999.0, "rows": [row]}))
    earlier = run_penalty_bench._load_for_append(str(path))
    assert earlier["rows"][0]["copy_bandwidth_gbps"] == 2999.0
    assert run_penalty_bench._row_key(earlier["rows"][0]) == ("triton", "fwd", 1, 2, 1, "bfloat16")
    assert run_penalty_bench._load_for_append(str(tmp_path / "none.json")) is None
