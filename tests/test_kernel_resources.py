"""The static kernel-resource check (scripts/kernel_resources.py, issue 19 item 1).

``test_ci_launches_match_the_baseline`` compiles every Triton kernel the public ops launch, on
every code path (project, loss with and without the Gram term, the guard's fused gradient,
weights), for sm_90 at the benchmark's target shape and the dtypes and k the issue-19 targets
name, and for sm_86 / sm_89 (99 KB of shared memory per block) at their largest footprints,
without a GPU, and fails when a launch stops compiling, spills more, keeps fewer blocks resident
per SM, does not fit in shared memory, or is not in the committed baseline.  The full sweep (four
archs, every shape, dtype and k; ~1400 compiles) is the script itself:
``python scripts/kernel_resources.py --check``.
The other tests check the parts of the script that need no compiler.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "kernel_resources.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("kernel_resources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kr = _load_script()


def test_occupancy_matches_the_cuda_rules():
    # The issue's v0.1 / today pairs on sm_90: 67 regs x 8 warps -> 3 blocks, 128 -> 2, 162 -> 1.
    assert kr.occupancy(90, 67, 8, 24 * 1024)["blocks_per_sm"] == 3
    assert kr.occupancy(90, 128, 8, 24 * 1024)["blocks_per_sm"] == 2
    assert kr.occupancy(90, 162, 8, 40 * 1024) == {"blocks_per_sm": 1, "warps_per_sm": 8, "limited_by": "registers"}
    # Shared memory: 121 KB a block leaves room for one on sm_90 (228 KB) and none more; 80 KB: two on sm_80.
    assert kr.occupancy(90, 64, 4, 121 * 1024) == {"blocks_per_sm": 1, "warps_per_sm": 4, "limited_by": "shared memory"}
    assert kr.occupancy(80, 64, 4, 80 * 1024)["blocks_per_sm"] == 2
    # Warps: 32 regs x 4 warps would allow 16 blocks by registers; 64 warps / 4 = 16; 32 blocks is the cap.
    assert kr.occupancy(90, 32, 4, 0)["blocks_per_sm"] == 16
    assert kr.occupancy(90, 16, 1, 0) == {"blocks_per_sm": 32, "warps_per_sm": 32, "limited_by": "blocks"}


def test_tool_output_parsers():
    usage = (
        "Resource usage:\n Common:\n  GLOBAL:0\n Function _penalty_fwd_kernel:\n"
        "  REG:255 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    assert kr.parse_cuobjdump(usage) == {"regs": 255, "stack": 8, "static_shared": 1024, "local": 0}
    log = (
        "ptxas info    : Function properties for _penalty_fwd_kernel\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size\n"
    )
    assert kr.parse_ptxas(log) == {"stack_frame": 8, "spill_stores": 4, "spill_loads": 4, "ptxas_regs": 255}
    with pytest.raises(ValueError, match="no resource line"):
        kr.parse_cuobjdump("nothing")


def _row(**over):
    row = dict(
        compiled=True,
        regs=128,
        stack=0,
        spill_stores=0,
        spill_loads=0,
        blocks_per_sm=2,
        fits_shared=True,
        limited_by="registers",
        static_shared=0,
        dynamic_shared=40 * 1024,
    )
    return row | over


def test_compare_flags_each_kind_of_regression():
    base = {"rows": {"sm_90": {"a": _row(), "b": _row(same_compile_as=["b2"]), "gone": _row()}}}
    same = {"rows": {"sm_90": {"a": _row(regs=120), "b2": _row()}}}  # fewer registers, an alias: fine
    assert kr.compare(same, base, complete=False) == []
    complete = kr.compare(same, base, complete=True)
    assert complete == ["sm_90 gone: in the baseline but no longer launched (regenerate it)"]
    worse = {
        "rows": {
            "sm_90": {
                "a": _row(spill_stores=8, spill_loads=4),
                "b": _row(regs=129, blocks_per_sm=1),
                "gone": _row(compiled=False, error="CompilationError: boom"),
                "new": _row(),
            }
        }
    }
    problems = kr.compare(worse, base, complete=False)
    assert any("sm_90 a: spill_stores 0 -> 8 bytes" in p for p in problems)
    assert any("sm_90 a: spill_loads 0 -> 4 bytes" in p for p in problems)
    assert any("sm_90 b: 2 -> 1 blocks/SM (regs 128 -> 129" in p for p in problems)
    assert any("sm_90 gone: does not compile any more: CompilationError: boom" in p for p in problems)
    assert any("sm_90 new: not in the baseline" in p for p in problems)
    assert len(problems) == 5
    # A launch that does not fit its architecture's shared memory fails whatever the baseline recorded.
    big = _row(fits_shared=False, dynamic_shared=112 * 1024)
    base86 = {"rows": {"sm_86": {"a": big}}}
    assert kr.compare({"rows": {"sm_86": {"a": big}}}, base86, complete=True) == [
        "sm_86 a: needs 112.0 KB of shared memory per block, sm_86 allows 99"
    ]


def test_limits_of_each_architecture():
    """The programming guide's table: sm_86/89 allow 99 KB per block (100 KB per SM) and 48 warps per SM."""
    for cap, per_block_kb in ((90, 227), (80, 163), (87, 163), (86, 99), (89, 99)):
        assert kr.LIMITS[cap].smem_block == per_block_kb * 1024
        assert kr.LIMITS[cap].smem == (per_block_kb + 1) * 1024
    # 80 KB (the bf16 forward on sm_80/86) leaves room for one block per SM on sm_86, two on sm_80.
    assert kr.occupancy(86, 128, 4, 80 * 1024)["blocks_per_sm"] == 1
    assert kr.occupancy(80, 128, 4, 80 * 1024)["blocks_per_sm"] == 2
    # 48 warps per SM (sm_80/90: 64): six 8-warp blocks of 16 registers; 24 blocks on sm_89, 16 on sm_86.
    assert kr.occupancy(86, 16, 8, 0) == {"blocks_per_sm": 6, "warps_per_sm": 48, "limited_by": "warps"}
    assert kr.occupancy(89, 16, 1, 0)["blocks_per_sm"] == 24 and kr.occupancy(86, 16, 1, 0)["blocks_per_sm"] == 16
    ci_archs = {cap for spec in kr.sweep_spec("ci") for cap in spec["archs"]}
    assert ci_archs == {90, 86, 89} and set(kr.sweep_spec("full")[0]["archs"]) == set(kr.ARCHS) == {90, 80, 86, 89}
    assert [spec["archs"] for spec in kr.sweep_spec("ci", [89])] == [(89,)] * len(kr.CI_CASES_BY_ARCH[89])


def test_merge_keeps_the_other_architectures_rows():
    base = {
        "triton": "3.9.0",
        "tools": {"ptxas sm_90": "13", "ptxas sm_80": "12"},
        "spec": [{"archs": [90, 80], "ks": [8]}],
        "seconds": 600.0,
        "rows": {"sm_90": {"a": _row(same_compile_as=["b"])}, "sm_80": {"a": _row()}},
    }
    new = {
        "triton": "3.9.0",
        "tools": {"ptxas sm_86": "12"},
        "spec": [{"archs": [86], "ks": [8]}],
        "seconds": 100.0,
        "rows": {"sm_86": {"a": _row(regs=64)}},
    }
    merged = kr.merge_baseline(new, base)
    assert merged["rows"]["sm_90"] is base["rows"]["sm_90"] and merged["rows"]["sm_80"] is base["rows"]["sm_80"]
    assert merged["rows"]["sm_86"]["a"]["regs"] == 64
    assert merged["spec"] == [{"archs": [90, 80, 86], "ks": [8]}] and merged["seconds"] == 700.0
    assert (merged["compiles"], merged["launches_recorded"]) == (3, 4)
    again = kr.merge_baseline(dict(new, seconds=50.0), merged)  # replacing sm_86 again
    assert again["runs"] == [{"archs": [90, 80], "seconds": 600.0}, {"archs": [86], "seconds": 50.0}]
    with pytest.raises(SystemExit, match="triton 3.9.0"):
        kr.merge_baseline(dict(new, triton="3.6.0"), base)


def test_the_baseline_holds_the_issue_19_targets():
    """The committed full sweep (sm_90): no bf16/fp16 launch with k <= 16 spills, bf16/fp16 backward
    <= 96 registers at k <= 16 on the benchmark grid's shapes, fp32 at k = 8 spill-free, nothing spills
    at k = 64 outside the Gram forward; every launch compiles and fits in shared memory on sm_90 and sm_80."""
    pinned = re.search(r"^triton==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    rows = json.loads(kr.baseline_path(pinned).read_text())["rows"]  # the pinned Triton's, whichever is installed
    assert set(rows) == {kr.arch_name(cap) for cap in kr.ARCHS}
    for arch, launches in rows.items():
        assert all(r["compiled"] and r["fits_shared"] for r in launches.values()), arch
    checked = 0
    for label, r in rows["sm_90"].items():
        for name in (label, *r.get("same_compile_as", ())):
            role, op, dtype, _, _, k = name.split()
            k = int(k.removeprefix("k="))
            spills = r["spill_stores"] + r["spill_loads"]
            if dtype in ("bf16", "fp16") and k <= 16:
                assert spills == 0, name
                if role == "bwd" and name.split()[3:5] != [f"N={kr.RAGGED[0]}", f"d={kr.RAGGED[1]}"]:
                    assert r["regs"] <= 96, name
                elif role == "bwd":  # the ragged shape's masks: 97-102 registers, the same 2 blocks per SM
                    assert r["regs"] <= 104 and r["blocks_per_sm"] >= 2, name
            if dtype == "fp32" and k == 8:
                assert spills == 0, name
            if k == 64 and not (role == "fwd" and "gram" in op):
                assert spills == 0, name
            checked += 1
    assert checked > 500


def _pinned() -> bool:
    return os.environ.get("REFUSALGUARD_PINNED", "0") not in ("", "0")


def test_ci_launches_match_the_baseline(tmp_path):
    """Compiles the CI set (~100 compiles, one to two minutes on two cores) and compares it with the baseline."""
    import triton

    if not kr.baseline_path(triton.__version__).exists():
        message = f"no kernel-resource baseline for triton {triton.__version__} (the pinned version has one)"
        if _pinned():
            pytest.fail(message + ": constraints.txt and the baseline disagree")
        pytest.skip(message)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, whatever is cached elsewhere
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--set", "ci", "--check", "--quiet", "--jobs", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 problem(s)" in result.stdout


@pytest.mark.parametrize("version", ["3.9.0", "3.6.0"])
def test_each_family_fits_where_it_is_used(version):
    """Every launch of the committed sweeps (both Triton versions) fits in the shared memory its tile family
    declares (``TileFamily.shared_bytes``, what the launchers compare with an unknown GPU's limit), and the
    family of each checked architecture fits that architecture."""
    from refusalguard_kernels.ops import triton_penalty as tp

    rows = json.loads(kr.baseline_path(version).read_text())["rows"]
    families = tp._families()
    assert {int(arch.removeprefix("sm_")) for arch in rows} == set(tp.ARCH_FAMILY)
    for arch, launches in rows.items():
        cap = int(arch.removeprefix("sm_"))
        family = families[tp.ARCH_FAMILY[cap]]
        assert family.shared_bytes <= kr.LIMITS[cap].smem_block, arch
        most = max(r["static_shared"] + r["dynamic_shared"] for r in launches.values())
        assert most <= family.shared_bytes, (arch, most)
