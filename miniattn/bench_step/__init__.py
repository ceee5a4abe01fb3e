"""The decode-step benchmark: what share of a decode step does the KV-cache write cost, layer by layer?

Modules, one job each:

    points.py   the sweep plan: (batch, context) points, one engine per context, pool sized to memory
    peers.py    the implementations compared: miniattn, the torch reference, flash-attn's fused append
    events.py   method (a): CUDA events per component inside the eager step (queued ahead of the GPU)
    ablation.py method (b): the graph-replayed step with 0 / 1 / 2 writes, interleaved and paired
    measure.py  one point: both methods, step latencies (graph, eager), bytes, the derived shares
    sweep.py    the whole run: model once, an engine per (layout, cache dtype, implementation, context)
    report.py   the Markdown table, per-layer tables, JSON
    plot.py     stacked bars per layout; the write share against batch and context
    cli.py      ``miniattn bench step`` (also benchmarks/benchmark_decode_step.py)

Nothing is imported here, so that ``miniattn bench --help`` stays light and Triton is not imported
before the CLI decides on the interpreter: ``from miniattn.bench_step.sweep import run_sweep``.
"""
