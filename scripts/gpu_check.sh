#!/usr/bin/env bash
# Everything that needs a GPU, as ONE command on a lent H100/H200 (torch 2.11, triton 3.6, no network),
# within TOTAL_LIMIT seconds of command time (default 690 s: under the 12 minutes a lease allows):
#
#   bash scripts/gpu_check.sh                # every step below, in this order
#   bash scripts/gpu_check.sh target grid    # chosen steps, in the order given
#   bash scripts/gpu_check.sh --dry-run      # on CPU: print the plan, check every path and command line, run nothing
#
# Steps, most valuable first (each has its own limit, STEP_LIMIT_<step>, and never runs past the overall
# deadline: a step that would start with less than MIN_STEP seconds left is skipped and reported):
#   kernels   the Triton kernel tests on the GPU: test_triton_penalty.py (the whole grid, compiled), test_gpu.py,
#             test_functional.py, test_reference.py
#   target    fwd / bwd at N=16384, d=4096, k=8 (bf16 and fp32), eager + triton, and the copy bandwidth;
#             compared with v0.1's 62.6 / 102.6 us (scripts/gpu_check_summary.py)
#   grid      the 36-point grid (N 4096..65536 x d 2048..8192 x k 1..64, bf16), triton
#   cuda      the CUDA C++ backend: JIT build, smoke script, tests/test_cuda_backend.py; then its grid
#   host      host time per guard call (benchmarks/host_overhead.py --real)
#   compiled  torch.compile of the reference at the target shape (the 1.5x target)
#   train     a training step with the guard (benchmarks/train_step_bench.py)
#   render    docs/performance.md's generated block from the JSON written here
# Logs and JSON go to ${OUT:-gpu_out}/ (every benchmark step adds its rows to one <device>-<date>-gpucheck.json, which
# the render step and scripts/render_perf.py read); a summary is printed last (and kept in $OUT/summary.txt).
# render needs no GPU: when the deadline skips it, run it afterwards on any machine.
set -u -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(pwd)/.torch_extensions}"
export REFUSALGUARD_CUDA_JIT=1 # build csrc/ just in time where it is not installed
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
OUT="${OUT:-gpu_out}"
TOTAL_LIMIT="${TOTAL_LIMIT:-690}"
MIN_STEP="${MIN_STEP:-30}"
ALL_STEPS=(kernels target grid cuda host compiled train render)

dry_run=0
steps=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) steps+=("$arg") ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=("${ALL_STEPS[@]}")

# Per-step limits (seconds); overridable as STEP_LIMIT_<step>=...
declare -A DEFAULT_LIMIT=([kernels]=240 [target]=90 [grid]=120 [cuda]=180 [host]=60 [compiled]=150 [train]=120 [render]=20)
limit_of() { local v="STEP_LIMIT_${1}"; echo "${!v:-${DEFAULT_LIMIT[$1]}}"; }

KERNEL_TESTS=(tests/test_triton_penalty.py tests/test_gpu.py tests/test_functional.py tests/test_reference.py)
xdist=""
python -c "import xdist" 2>/dev/null && xdist="-n 8"

# The command each step runs ($1: its time limit).  Only these functions touch the GPU.
step_kernels() {
  timeout "$1" python -m pytest "${KERNEL_TESTS[@]}" -q -p no:cacheprovider $xdist 2>&1 | tee "$OUT/kernels.log"
  echo "kernel tests: $(tail -n 1 "$OUT/kernels.log")" >>"$summary"
}
step_target() {
  timeout "$1" python benchmarks/run_penalty_bench.py --grid target --variants eager,triton --out "$OUT" --tag gpucheck --append \
    2>&1 | grep -v -i warn | tee "$OUT/target.log"
  python scripts/gpu_check_summary.py "$OUT" | grep -E '^(target|fp32)' | sed 's/^/  /' >>"$summary"
}
step_grid() {
  timeout "$1" python benchmarks/run_penalty_bench.py --grid full --variants triton --out "$OUT" --tag gpucheck --append \
    2>&1 | grep -v -i warn | tee "$OUT/grid.log"
  python scripts/gpu_check_summary.py "$OUT" | grep -E '^grid triton' | sed 's/^/  /' >>"$summary"
}
step_cuda() {
  local t0=$SECONDS
  timeout "$1" python scripts/gpu_cuda_smoke.py 2>&1 | tee "$OUT/cuda_smoke.log"
  local left=$(($1 - (SECONDS - t0)))
  [ "$left" -gt 20 ] && timeout "$left" python -m pytest tests/test_cuda_backend.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/cuda_tests.log"
  left=$(($1 - (SECONDS - t0)))
  [ "$left" -gt 20 ] && timeout "$left" python benchmarks/run_penalty_bench.py --grid full --variants cuda --out "$OUT" \
    --tag gpucheck --append 2>&1 | grep -v -i warn | tee "$OUT/grid_cuda.log"
  echo "cuda smoke: $(grep -ciE '\bpass' "$OUT/cuda_smoke.log") pass, $(grep -ciE '\bfail' "$OUT/cuda_smoke.log") fail lines;" \
    "cuda tests: $(tail -n 1 "$OUT/cuda_tests.log" 2>/dev/null)" >>"$summary"
  python scripts/gpu_check_summary.py "$OUT" | grep -E '^grid cuda' | sed 's/^/  /' >>"$summary"
}
step_host() {
  timeout "$1" python benchmarks/host_overhead.py --real --json "$OUT/host_overhead.json" 2>&1 | tee "$OUT/host_overhead.log"
  grep -E 'validate=(True|False)' "$OUT/host_overhead.log" | sed 's/^/  host us p20 p50 p80: /' >>"$summary"
}
step_compiled() {
  timeout "$1" python benchmarks/run_penalty_bench.py --grid target --variants compiled,compiled-static,triton \
    --out "$OUT" --tag gpucheck --append 2>&1 | grep -v -i warn | tee "$OUT/compiled.log"
  python scripts/gpu_check_summary.py "$OUT" | grep -E '^fwd\+bwd' | sed 's/^/  /' >>"$summary"
}
step_train() {
  timeout "$1" python benchmarks/train_step_bench.py --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/train_step.log"
  sed -n '/^train-step summary/,/^plain vs plain/p' "$OUT/train_step.log" | sed 's/^/  /' >>"$summary"
}
step_render() {
  # Regenerates only the marked block; review the diff before committing it.
  timeout "$1" python scripts/render_perf.py docs/performance.md --results "$OUT" 2>&1 | tail -n 1 >>"$summary"
}

for step in "${steps[@]}"; do
  if ! declare -F "step_$step" >/dev/null; then
    echo "unknown step '$step'; steps: ${ALL_STEPS[*]}" >&2
    exit 2
  fi
done

if [ "$dry_run" = 1 ]; then
  # The plan, and every check that needs no GPU: files exist, the tests collect, every script's command line parses.
  total=0
  echo "dry run: ${#steps[@]} steps, deadline ${TOTAL_LIMIT} s"
  for step in "${steps[@]}"; do
    l=$(limit_of "$step")
    [ $((total + MIN_STEP)) -gt "$TOTAL_LIMIT" ] && {
      echo "  $step: skipped if every earlier step used its whole limit"
      continue
    }
    [ $((total + l)) -gt "$TOTAL_LIMIT" ] && l=$((TOTAL_LIMIT - total))
    total=$((total + l))
    echo "  $step: up to ${l} s (cumulative ${total} s)"
  done
  if [ "$total" -gt 720 ]; then
    echo "dry run: the plan could take ${total} s, over 12 minutes" >&2
    exit 1
  fi
  files=("${KERNEL_TESTS[@]}" tests/test_cuda_backend.py benchmarks/run_penalty_bench.py benchmarks/host_overhead.py
    benchmarks/train_step_bench.py scripts/gpu_cuda_smoke.py scripts/render_perf.py scripts/gpu_check_summary.py
    docs/performance.md)
  for f in "${files[@]}"; do
    [ -f "$f" ] || { echo "dry run: missing $f" >&2; exit 1; }
  done
  python - "${files[@]}" <<'PY' || exit 1
import contextlib, io, runpy, sys
# Every script's command line, as the steps give it, must parse (argparse exits 0 on --help).
for script, argv in [
    ("benchmarks/run_penalty_bench.py", ["--grid", "full", "--variants", "triton", "--out", "x", "--tag", "g", "--append"]),
    ("benchmarks/host_overhead.py", ["--real", "--json", "x.json"]),
    ("benchmarks/train_step_bench.py", ["--out", "x"]),
    ("scripts/render_perf.py", ["docs/performance.md", "--results", "x"]),
    ("scripts/gpu_check_summary.py", ["x"]),
]:
    sys.argv = [script, *argv, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            sys.exit(f"dry run: {script} {' '.join(argv)}: exit {exc.code}")
    print(f"  ok: {script} {' '.join(argv)}")
compile(open("scripts/gpu_cuda_smoke.py").read(), "scripts/gpu_cuda_smoke.py", "exec")
print("  ok: scripts/gpu_cuda_smoke.py compiles")
PY
  collected=$(python -m pytest "${KERNEL_TESTS[@]}" tests/test_cuda_backend.py --collect-only -q -p no:cacheprovider 2>&1 \
    | tail -n 1)
  case "$collected" in
    *error*) echo "dry run: test collection failed: $collected" >&2; exit 1 ;;
  esac
  echo "  ok: kernel and cuda tests collect ($collected)"
  echo "dry run: ok"
  exit 0
fi

mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
python - <<'PY' | tee -a "$summary"
import torch, triton, platform
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size/2**20:.0f} MiB; "
      f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
PY

start=$SECONDS
for step in "${steps[@]}"; do
  left=$((TOTAL_LIMIT - (SECONDS - start)))
  if [ "$left" -lt "$MIN_STEP" ]; then
    echo "[$step skipped: ${left} s left of ${TOTAL_LIMIT}]" | tee -a "$summary"
    continue
  fi
  l=$(limit_of "$step")
  [ "$l" -gt "$left" ] && l=$left
  t0=$SECONDS
  "step_$step" "$l"
  echo "[$step took $((SECONDS - t0)) s of ${l}]" | tee -a "$summary"
done
echo
echo "================ summary ================"
cat "$summary"
