#!/usr/bin/env bash
# The decode-step benchmark (issue 5) on a GPU: what share of a decode step the cache write costs.
# usage: benchmarks/run_step_gpu.sh [OUTDIR] [validate] [sweep]     (default: benchmarks/results sweep)
#   validate: the step-bench tests on the GPU, then a small sweep of the real shape (timings per point)
#   sweep:    llama-8b shape cut to 4 layers, bf16; batch 1..256 at context 4096 and context 512..32768
#             at batch 64; NHD / HND / paged5d x auto / fp8; torch reference (and flash-attn where
#             importable) side by side; JSON + two PNGs + log + GPU state in OUTDIR. About 4 minutes
#             on an idle H100. Rows whose graph timings contradict the events are marked SUSPECT.
set -u
out=${1:-benchmarks/results}; shift || true
stages=${*:-sweep}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
B="python benchmarks/benchmark_decode_step.py --out-dir $out"
for stage in $stages; do
  case $stage in
    validate)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$out/gpu.txt"
      python -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$out/gpu.txt"
      python -m pytest -q -p no:cacheprovider tests/test_bench_step.py 2>&1 | tail -15 | tee "$out/tests.log"
      $B --batch 1,64,256 --context 512,4096,32768 --layouts NHD,paged5d --no-progress --per-layer --plot \
        2>&1 | tee "$out/validate.log" ;;
    sweep)  # nvidia-smi before/after: evidence if the timing check marks points SUSPECT
      q=name,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active
      nvidia-smi --query-gpu=$q --format=csv > "$out/decode_step_gpu_state.txt" 2>&1
      $B --plot --no-progress 2>&1 | tee "$out/decode_step_h100_llama-8b_L4_bfloat16_sweep.log"
      nvidia-smi --query-gpu=$q --format=csv,noheader >> "$out/decode_step_gpu_state.txt" 2>&1
      nvidia-smi >> "$out/decode_step_gpu_state.txt" 2>&1 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
