#!/usr/bin/env bash
# Everything that needs a GPU, in one go (meant for one call on a lent GPU machine):
#   bash scripts/gpu_check.sh [tests|bench|full-bench|train|all ...]   (default: tests bench train)
# Writes logs and results under ${OUT:-gpu_out}/ and prints a short table last.
set -u -o pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests bench train)
summary="$OUT/summary.txt"
: >"$summary"

python - <<'PY' | tee -a "$summary"
import torch, triton, platform
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, {p.multi_processor_count} SMs, L2 {p.L2_cache_size/2**20:.0f} MiB; "
      f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
PY

for step in "${steps[@]}"; do
  case "$step" in
    tests)
      python -m pytest tests/test_reference.py tests/test_triton_penalty.py tests/test_functional.py tests/test_gpu.py \
        $( [ -f tests/test_cuda_backend.py ] && echo tests/test_cuda_backend.py ) -q -p no:cacheprovider 2>&1 \
        | tee "$OUT/gpu_tests.log"
      echo "gpu tests: $(tail -n 1 "$OUT/gpu_tests.log")" >>"$summary"
      ;;
    bench)
      python benchmarks/run_penalty_bench.py --grid target --out "$OUT" 2>&1 | tee "$OUT/bench_target.log"
      sed -n '/^summary:/,$p' "$OUT/bench_target.log" >>"$summary"
      ;;
    full-bench)
      python benchmarks/run_penalty_bench.py --grid full --variants eager,compiled,triton,cuda --out "$OUT" --tag full \
        2>&1 | tee "$OUT/bench_full.log"
      echo "full grid: $(grep -c 'GB/s' "$OUT/bench_full.log") rows" >>"$summary"
      ;;
    train)
      python benchmarks/train_step_bench.py --out "$OUT" 2>&1 | tee "$OUT/train_step.log"
      sed -n '/^train-step summary/,$p' "$OUT/train_step.log" >>"$summary"
      ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
echo
echo "================ summary ================"
cat "$summary"
