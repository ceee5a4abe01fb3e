"""What share of a decode step does the KV-cache write cost, layer by layer? (issue 5)

A thin wrapper of ``miniattn bench step`` (the code lives in `miniattn.bench_step`) whose JSON and
plots go to benchmarks/results/ by default. Examples::

    python benchmarks/benchmark_decode_step.py --plot               # GPU: llama-8b x4 layers, full sweep
    python benchmarks/benchmark_decode_step.py --batch 64 --context 4096 --layouts NHD
    TRITON_INTERPRET=1 python benchmarks/benchmark_decode_step.py   # CPU: tiny preset, one point

See benchmarks/README.md ("Decode step: the write share") for the method and the H100 results.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miniattn.bench_step.cli import main  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    sys.exit(main(default_out_dir=RESULTS))
