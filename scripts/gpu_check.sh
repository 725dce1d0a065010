#!/usr/bin/env bash
# Everything that needs a GPU, in one go (meant for one call on a lent GPU machine):
#   bash scripts/gpu_check.sh [cuda tests gpu-tests bench host train full-bench render ...]
#   (default: all of them, in that order; each fits the 10-minute-per-command limit alone,
#    so a short lease can run them as separate calls: `bash scripts/gpu_check.sh bench host`)
# Each step has its own time limit (seconds, STEP_LIMIT_<step>), so one slow step cannot eat the rest.
# Writes logs and results under ${OUT:-gpu_out}/ and prints a short table last.
set -u -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(pwd)/.torch_extensions}"
export REFUSALGUARD_CUDA_JIT=1             # build csrc/ just in time where it is not installed
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(cuda tests gpu-tests bench host train full-bench render)
summary="$OUT/summary.txt"
: >"$summary"
limit() { local v="STEP_LIMIT_${1//-/_}"; echo "${!v:-$2}"; }

python - <<'PY' | tee -a "$summary"
import torch, triton, platform
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size/2**20:.0f} MiB; "
      f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
PY

xdist=""
python -c "import xdist" 2>/dev/null && xdist="-n 8"

for step in "${steps[@]}"; do
  t0=$(date +%s)
  case "$step" in
    cuda)
      timeout "$(limit cuda 150)" python scripts/gpu_cuda_smoke.py 2>&1 | tee "$OUT/cuda_smoke.log"
      echo "cuda smoke (exit ${PIPESTATUS[0]}): $(grep -ciE '\bpass' "$OUT/cuda_smoke.log") pass lines, $(grep -ciE '\bfail' "$OUT/cuda_smoke.log") fail lines" >>"$summary"
      ;;
    tests)
      timeout "$(limit tests 170)" python -m pytest tests/test_reference.py tests/test_triton_penalty.py tests/test_functional.py \
        tests/test_gpu.py tests/test_cuda_backend.py -q -p no:cacheprovider $xdist 2>&1 | tee "$OUT/gpu_tests.log"
      echo "gpu tests: $(tail -n 1 "$OUT/gpu_tests.log")" >>"$summary"
      ;;
    gpu-tests)
      # The whole suite on the GPU (CPU tests included), then the gpu-marked tests alone for the table.
      timeout "$(limit gpu_tests 240)" python -m pytest tests -q -p no:cacheprovider $xdist 2>&1 | tee "$OUT/all_tests.log"
      timeout "$(limit gpu_tests 240)" python -m pytest tests -m gpu tests/test_cuda_backend.py -q -p no:cacheprovider \
        2>&1 | tee "$OUT/gpu_marked_tests.log"
      echo "full suite: $(tail -n 1 "$OUT/all_tests.log"); -m gpu: $(tail -n 1 "$OUT/gpu_marked_tests.log")" >>"$summary"
      ;;
    host)
      timeout "$(limit host 120)" python benchmarks/host_overhead.py --real --json "$OUT/host_overhead.json" 2>&1 \
        | tee "$OUT/host_overhead.log"
      grep -E 'validate=(True|False)' "$OUT/host_overhead.log" | sed 's/^/host us p20 p50 p80: /' >>"$summary"
      ;;
    render)
      # Regenerates only the marked block; review the diff before committing it.
      python scripts/render_perf.py docs/performance.md --results "$OUT" 2>&1 | tail -n 1 >>"$summary"
      ;;
    bench)
      # Target shape, bf16 + fp32, every variant incl. torch.compile (dynamic and static), host section.
      timeout "$(limit bench 300)" python benchmarks/run_penalty_bench.py --grid target --host --out "$OUT" 2>&1 \
        | grep -v -i warn | tee "$OUT/bench_target.log"
      sed -n '/^summary:/,$p' "$OUT/bench_target.log" >>"$summary"
      ;;
    train)
      timeout "$(limit train 420)" python benchmarks/train_step_bench.py --out "$OUT" 2>&1 | grep -v -i warn \
        | tee "$OUT/train_step.log"
      sed -n '/^train-step summary/,/^plain vs plain/p' "$OUT/train_step.log" >>"$summary"
      ;;
    full-bench)
      timeout "$(limit full_bench 480)" python benchmarks/run_penalty_bench.py --grid full --variants eager,triton,cuda \
        --out "$OUT" --tag full 2>&1 | grep -v -i warn | tee "$OUT/bench_full.log"
      echo "full grid: $(grep -c 'GB/s' "$OUT/bench_full.log") rows written" >>"$summary"
      ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  echo "[$step took $(( $(date +%s) - t0 )) s]" | tee -a "$summary"
done
echo
echo "================ summary ================"
cat "$summary"
