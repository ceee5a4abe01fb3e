#!/usr/bin/env bash
# One device call for any mix of the GPU stages below, on whatever GPU the device tool lends.
# usage: benchmarks/run_gpu.sh OUTDIR STAGE [STAGE ...]
#   tests   the whole test suite on CUDA tensors (8 workers); quicktests: launch, write, step-bench files
#   write   cache-write sweeps: 8 heads auto / fp8, 128 heads, paged5d, peers that import (FlashInfer)
#   host    eager host cost: write / decode breakdowns, host-loop sweeps next to FlashInfer (two runs)
#   write128  the 128-head write sweep alone; writeauto: the 8-head ones (FP8 with configs side by side)
#   decode  paged decode sweep (all modes, NHD and paged5d, peers that import)
#   decodetune  decode tests, then launch configs x splits x FP8 widening (`--tune`, TUNE_TAG)
#   step    decode-step benchmark: validation points (per layer)
#   sweep   decode-step benchmark: the full sweep
#   sass    the decode kernel's loop instructions as this machine's Triton compiles them (sass_loops.py)
#   tma     tma_decode_probe.py: page tiles by TMA copies against the real op, graph µs (TMA_CONFIGS)
#   readprobe  paged_read_probe.py: the op's bytes through its table with no attention, next to the op
# Logs go to OUTDIR; results (JSON, PNG, logs) are written under benchmarks/results/ and tarred into
# OUTDIR/results.tgz (the device tool returns at most 8 files). Each stage has its own time limit.
# Carried wheels (FlashInfer) must already be on PYTHONPATH. Set MINIATTN_GIT_COMMIT to HEAD's hash.
set -u
out=${1:?outdir}; shift
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
R=benchmarks/results
W="python benchmarks/benchmark_reshape_and_cache_flash.py"
P="python benchmarks/benchmark_reshape_and_cache.py"
S="python benchmarks/benchmark_decode_step.py --out-dir $R --no-progress"
GPU_TAG=$(python -c "from miniattn.timing import device_tag; print(device_tag())")
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,utilization.gpu --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/gpu.txt" 2>&1
python -c "import flashinfer; print('flashinfer', flashinfer.__version__)" >> "$out/gpu.txt" 2>&1
w8() {  # the 8-head sweeps: auto, then FP8 (with extra launch configs side by side, if given)
  timeout 150 $W --num-heads 8 --num-blocks 65536 --implementation triton,torch,peers --plot
  timeout 120 $W --num-heads 8 --num-blocks 65536 --implementation triton,peers --kv-cache-dtype fp8 --plot "$@"
}
w128() { timeout 100 $W --num-heads 128 --num-blocks 16384 --implementation triton,peers --plot; }
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    tests)
      timeout 300 python -m pytest -q -n 8 -p no:cacheprovider tests > "$out/tests.log" 2>&1 ;;
    quicktests)  # the files a host-path or benchmark change touches
      timeout 200 python -m pytest -q -n 8 -p no:cacheprovider tests/test_launch.py tests/test_cache_write.py \
        tests/test_bench_step.py > "$out/tests.log" 2>&1 ;;
    write)
      { w8; w128; timeout 100 $P --num-heads 8 --num-blocks 65536 --implementation triton,peers --plot; } \
        > "$out/write.log" 2>&1 ;;
    host)
      {
        timeout 60 python benchmarks/bench_write_host.py --out "$R/write_host_cost_$GPU_TAG.json"
        for rep in 1 2; do
          timeout 90 $W --num-heads 8 --num-blocks 65536 --mode all --implementation triton,peers \
            --tokens 1,2,4,16,64,256,1024 --no-ceiling --out "$R/write_host_${GPU_TAG}_rep$rep.json"
        done
        timeout 60 python benchmarks/decode_host_breakdown.py
        for rep in 1 2; do
          timeout 90 python benchmarks/benchmark_paged_decode.py --batch-sizes 1,16 --contexts 512,4096 \
            --modes graph,host --layouts NHD,HND --kv-cache-dtypes auto --peers sdpa,flashinfer --out-dir $R \
            --tag "host_rep$rep"
        done
      } > "$out/host.log" 2>&1 ;;
    writetune)  # launch configs (heads per program x warps) at the sizes the targets name
      {
        timeout 120 $W --num-heads 128 --num-blocks 16384 --mode cudagraph --implementation triton --layouts NHD \
          --tokens 16384,65536 --configs 8x4,8x2,16x4,16x8,32x8,32x16,4x2,4x4 --out /tmp/tune128.json
        timeout 120 $W --num-heads 8 --num-blocks 65536 --mode cudagraph --implementation triton --layouts NHD \
          --tokens 4096,16384,65536 --configs 8x1,8x2,8x4,8x8,4x1,4x2 --out /tmp/tune8.json
      } > "$out/writetune.log" 2>&1 ;;
    writeauto)  # the 8-head sweeps alone (auto, then FP8 with its launch configs side by side)
      w8 --configs 8x1,8x2,8x4 > "$out/writeauto.log" 2>&1 ;;
    write128)
      w128 > "$out/write128.log" 2>&1 ;;
    decode)  # HND reads as NHD (+-1%, every earlier run): NHD and paged5d
      timeout 420 python benchmarks/benchmark_paged_decode.py --layouts NHD,paged5d --peers sdpa,flashinfer,flashinfer_tc \
        --plot > "$out/decode.log" 2>&1 ;;
    decodetune)  # launch configs x split counts x FP8 widening at the points the targets name
      timeout 100 python -m pytest -q -n 8 -p no:cacheprovider tests/test_decode.py > "$out/tests_decode.log" 2>&1
      timeout 400 python benchmarks/benchmark_paged_decode.py --tune --out-dir $R --tag "${TUNE_TAG:-}" \
        > "$out/decodetune.log" 2>&1 ;;
    step)
      timeout 400 $S --batch 1,64,256 --context 512,4096,32768 --layouts NHD,paged5d --peers none --plot \
        --tag validation > "$out/step.log" 2>&1 ;;
    sweep)  # nvidia-smi before / after: evidence if the timing check marks points SUSPECT
      q=name,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active
      nvidia-smi --query-gpu=$q --format=csv > "$out/sweep_gpu_state.txt" 2>&1
      timeout 560 $S --plot > "$out/sweep.log" 2>&1; rc=$?
      nvidia-smi --query-gpu=$q --format=csv,noheader >> "$out/sweep_gpu_state.txt" 2>&1
      (exit $rc) ;;
    sass)
      timeout 200 python benchmarks/sass_loops.py --points 16x4096,64x4096,1x16384 --caches auto,fp8 \
        --tma 1x4x1,2x4x1 --out "$R/sass_loops_${GPU_TAG}_triton$(python -c 'import triton; print(triton.__version__)').json" \
        > "$out/sass.log" 2>&1 ;;
    tma)
      timeout 400 python benchmarks/tma_decode_probe.py --points 16x4096,64x4096,16x16384,16x512 \
        --configs "${TMA_CONFIGS:-1x4x1,2x4x1,2x5x1,4x3x1}" --out "$R/tma_decode_probe_$GPU_TAG.json" \
        > "$out/tma.log" 2>&1 ;;
    readprobe)
      timeout 300 python benchmarks/paged_read_probe.py --points 16x4096,64x4096,1x16384,16x512,1x512 \
        --out "$R/paged_read_probe_$GPU_TAG.json" > "$out/readprobe.log" 2>&1 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  echo "stage $stage: rc=$? $(( $(date +%s) - start )) s" | tee -a "$out/stages.txt"
done
tar czf "$out/results.tgz" $R 2>/dev/null || true
