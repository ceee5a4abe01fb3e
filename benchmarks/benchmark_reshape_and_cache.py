"""Cache-write benchmark for vLLM's paged5d layout (vLLM's benchmark_reshape_and_cache.py flags).

key_cache [blocks, heads, head_size // x, block_size, x], value_cache [blocks, heads, head_size,
block_size]: the value layout scatters 2-byte writes 32+ bytes apart, so this op is bound by sectors
touched, not bytes (see benchmarks/README.md). Same table, JSON and --plot as the flash script.

    python benchmarks/benchmark_reshape_and_cache.py --num-heads 8 --num-blocks 65536 --plot
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _write_common import main  # noqa: E402

if __name__ == "__main__":
    main(__doc__.splitlines()[0], "reshape_and_cache", ("paged5d",), flash=False, default_num_heads=128,
         default_iters=200)
