"""scripts/render_perf.py renders the JSON faithfully and touches only the marked block."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "render_perf.py")
spec = importlib.util.spec_from_file_location("render_perf", _PATH)
render_perf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_perf)


def _row(variant, mode, ms, pct, **kw):
    return dict(variant=variant, mode=mode, N=16384, d=4096, k=8, dtype="bfloat16", gpu_ms=ms, pct_copy_bw=pct) | kw


BENCH = {
    "device": "Fake GPU",
    "date": "2030-01-02",
    "torch": "9.9",
    "triton": "8.8",
    "cuda": "7.7",
    "python": "3.12",
    "copy_bandwidth_gbps": 1000.0,
    "timing": "graph replay",
    "grid": "target",
    "git_commit": "abc123",
    "command": "python benchmarks/run_penalty_bench.py --grid target",
    "rows": [
        _row("eager", "fwd", 0.4, 10.0),
        _row("triton", "fwd", 0.05, 80.0, p20_ms=0.049, p80_ms=0.051),
        _row("triton", "fwdbwd", 0.2, 75.0, extra_peak_mb=0.5),
        _row("eager", "fwdbwd", 0.8, 20.0, extra_peak_mb=256.0),
    ],
    "host": {
        "mode": "stub",
        "method": "perf_counter",
        "ops": {"guard_fwdbwd/validate=False": {"p20_us": 1.0, "p50_us": 2.0, "p80_us": 3.0}},
    },
}
TRAIN = {
    "device": "Fake GPU",
    "date": "2030-01-02",
    "torch": "9.9",
    "setup": {
        "layers": 2,
        "seq": 8,
        "batch": 1,
        "k": 4,
        "steps": 3,
        "warmup": 1,
        "hooked_layers": [0, 1],
        "lora_r": 16,
        "dtype": "bfloat16",
    },
    "rows": [
        {
            "variant": "plain",
            "step_ms": 10.0,
            "step_ms_all": [9.0, 10.0, 11.0],
            "peak_mem_gib": 1.0,
            "time_overhead_pct": 0.0,
            "mem_overhead_pct": 0.0,
        },
        {
            "variant": "guard-cached",
            "step_ms": 10.5,
            "step_ms_all": [10.5],
            "peak_mem_gib": 1.0,
            "time_overhead_pct": 5.0,
            "mem_overhead_pct": 0.0,
        },
        {
            "variant": "plain",
            "step_ms": 10.1,
            "step_ms_all": [10.1],
            "peak_mem_gib": 1.0,
            "time_overhead_pct": 1.0,
            "mem_overhead_pct": 0.0,
        },
    ],
}


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "Fake-2030-01-02.json").write_text(json.dumps(BENCH))
    (folder / "Fake-2029-01-01.json").write_text(json.dumps(BENCH | {"date": "2029-01-01", "device": "Old GPU"}))
    (folder / "Fake-2030-01-02-train_step.json").write_text(json.dumps(TRAIN))
    return folder


def test_renders_table_between_markers_only(tmp_path, results):
    target = tmp_path / "README.md"
    target.write_text("intro\n<!-- perf:begin -->\nold stuff\n<!-- perf:end -->\noutro\n")
    assert render_perf.main([str(target), "--results", str(results)]) == 0
    text = target.read_text()
    assert text.startswith("intro\n<!-- perf:begin -->\n") and text.endswith("<!-- perf:end -->\noutro\n")
    assert "old stuff" not in text
    assert "Fake GPU" in text and "Old GPU" not in text  # the newest file by its date
    assert "| eager PyTorch reference | 400.0 us (10.0 %) | - | 800.0 us (20.0 %) | 256.00 MB |" in text
    assert (
        "| **triton** | **50.0 us (80.0 %) [p20 49.0, p80 51.0]** | - | **200.0 us (75.0 %)** | **0.50 MB** |" in text
    )
    assert "`python benchmarks/run_penalty_bench.py --grid target`" in text and "abc123" in text
    assert "triton forward+backward: 4.00x faster than eager PyTorch reference." in text
    assert "| guard_fwdbwd/validate=False | 1.0 us | 2.0 us | 3.0 us |" in text
    assert "| plain LoRA | 10.00 ms | 9.40 / 10.60 ms | - | 1.000 GiB | - |" in text
    assert "| plain LoRA, run again | 10.10 ms |" in text
    assert "The two plain runs differ by 1.00 %" in text
    # Rendering again changes nothing, and --check agrees.
    assert render_perf.main([str(target), "--results", str(results), "--check"]) == 0


def test_check_reports_stale_file(tmp_path, results):
    target = tmp_path / "doc.md"
    target.write_text("<!-- perf:begin -->\n<!-- perf:end -->\n")
    assert render_perf.main([str(target), "--results", str(results), "--check"]) == 1
    assert target.read_text() == "<!-- perf:begin -->\n<!-- perf:end -->\n"


def test_needs_exactly_one_marker_pair(tmp_path, results):
    target = tmp_path / "doc.md"
    target.write_text("no markers here\n")
    with pytest.raises(SystemExit):
        render_perf.main([str(target), "--results", str(results)])
