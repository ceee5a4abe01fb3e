#!/usr/bin/env bash
# One device call's worth of cache-write work: GPU tests, launch-config tuning, full sweeps.
# usage: benchmarks/run_write_gpu.sh OUTDIR [tests] [tune] [host] [tune2] [final]
# Logs go to OUTDIR; JSON/PNG results to benchmarks/results/ (tarred into OUTDIR/results.tgz).
set -u
out=${1:?outdir}; shift
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
B="python benchmarks/benchmark_reshape_and_cache_flash.py"
P="python benchmarks/benchmark_reshape_and_cache.py"
for stage in "$@"; do
  case $stage in
    tests)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$out/gpu.txt" 2>&1
      python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/gpu.txt"
      python -m pytest -q -n 8 -p no:cacheprovider tests/test_cache_write.py tests/test_layout.py 2>&1 | tail -25 > "$out/tests.log" ;;
    tune)
      {
        $B --num-heads 8 --num-blocks 65536 --mode cudagraph --implementation triton --no-ceiling \
           --tokens 1,256,4096,16384,65536 --configs 8x1,8x2,8x8,4x1,4x2,2x1 --out /tmp/t1.json
        $B --num-heads 128 --num-blocks 16384 --mode cudagraph --implementation triton --no-ceiling \
           --tokens 256,4096,16384,65536 --configs 4x2,8x2,16x4,16x8,32x8 --out /tmp/t2.json
        $B --num-heads 8 --num-blocks 65536 --mode cudagraph --implementation triton --no-ceiling --layouts NHD \
           --kv-cache-dtype fp8 --tokens 4096,16384,65536 --configs 8x1,8x2,8x8,4x1 --out /tmp/t3.json
        $P --num-heads 8 --num-blocks 65536 --mode cudagraph --implementation triton,torch --no-ceiling \
           --tokens 4096,65536 --configs 8x8,4x4,2x2,1x1,1x4 --out /tmp/t4.json
      } > "$out/tune.log" 2>&1 ;;
    host)
      python benchmarks/bench_write_host.py > "$out/host.log" 2>&1 ;;
    tune2)
      {
        $B --num-heads 8 --num-blocks 65536 --mode cudagraph --implementation triton --no-ceiling --layouts NHD \
           --tokens 1024,2048,4096,8192,32768 --configs 8x1,8x2 --out /tmp/t5.json
        $B --num-heads 8 --num-blocks 65536 --mode cudagraph --implementation triton --no-ceiling --layouts NHD \
           --kv-cache-dtype fp8 --tokens 4096,16384,65536 --configs 8x2 --out /tmp/t6.json
        $B --num-heads 128 --num-blocks 16384 --mode cudagraph --implementation triton --no-ceiling --layouts NHD \
           --tokens 4096,65536 --configs 8x1,16x2 --out /tmp/t7.json
        $P --num-heads 8 --num-blocks 65536 --mode cudagraph --implementation triton --no-ceiling \
           --tokens 4096,16384,65536 --configs 1x4,2x2,4x4,4x2,8x1 --out /tmp/t8.json
      } > "$out/tune2.log" 2>&1 ;;
    final)
      {
        $B --num-heads 8 --num-blocks 65536 --implementation triton,torch,peers --plot
        $B --num-heads 8 --num-blocks 65536 --implementation triton,torch,peers --kv-cache-dtype fp8 --plot
        $B --num-heads 128 --num-blocks 16384 --implementation triton,peers --plot
        $P --num-heads 8 --num-blocks 65536 --implementation triton,torch,peers --plot
      } > "$out/final.log" 2>&1 ;;
  esac
done
tar czf "$out/results.tgz" benchmarks/results 2>/dev/null || true
