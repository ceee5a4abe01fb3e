"""Cache-write benchmark for the NHD / HND layouts (vLLM's benchmark_reshape_and_cache_flash.py flags).

Sweeps num_tokens 1..65536 with a random slot mapping over all slots, for each layout and
implementation (ours `triton`, the torch reference `torch`, and vLLM / FlashInfer when importable).
Prints µs (graph / eager / host loop), GB/s (bytes read + written) and % of the copy ceiling measured
in the same run; writes JSON under benchmarks/results/ (and a PNG with --plot).

    python benchmarks/benchmark_reshape_and_cache_flash.py --num-heads 8 --num-blocks 65536 --plot
    python benchmarks/benchmark_reshape_and_cache_flash.py --kv-cache-dtype fp8 --mode cudagraph
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _write_common import main  # noqa: E402

if __name__ == "__main__":
    main(__doc__.splitlines()[0], "reshape_and_cache_flash", ("NHD", "HND"), flash=True, default_num_heads=128,
         default_iters=200)
