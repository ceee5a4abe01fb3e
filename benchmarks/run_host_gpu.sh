#!/usr/bin/env bash
# One device call for the host-cost work: the GPU test suite, then where the eager host time goes
# (write and decode) and the host-loop columns of both benchmarks next to FlashInfer.
# usage: benchmarks/run_host_gpu.sh OUTDIR     (logs to OUTDIR, the JSON tables in OUTDIR/host_json.tgz:
# the device tool returns at most 8 files)
set -u
out=${1:?outdir}
js=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,utilization.gpu --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/gpu.txt"
python - > "$out/launcher.txt" 2>&1 <<'PY'
import inspect
from triton.backends.nvidia.driver import CudaLauncher
print(inspect.getsource(CudaLauncher.__call__))
PY
python -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tail -30 > "$out/tests.log"
python benchmarks/bench_write_host.py --out "$js/write_host_cost_h100.json" > "$out/write_host.log" 2>&1
for rep in 1 2; do
  python benchmarks/benchmark_reshape_and_cache_flash.py --num-heads 8 --num-blocks 65536 --mode all \
    --implementation triton,peers --tokens 1,2,4,16,64,256,1024 --no-ceiling \
    --out "$js/write_host_h100_rep$rep.json"
done > "$out/write_host_sweep.log" 2>&1
python benchmarks/decode_host_breakdown.py > "$out/decode_host.log" 2>&1
for rep in 1 2; do
  python benchmarks/benchmark_paged_decode.py --batch-sizes 1,16 --contexts 512,4096 --modes graph,host \
    --layouts NHD,HND --kv-cache-dtypes auto --peers sdpa,flashinfer --out-dir "$js" --tag "host_rep$rep"
done > "$out/decode_host_sweep.log" 2>&1
tar czf "$out/host_json.tgz" -C "$js" .
