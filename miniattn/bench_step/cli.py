"""``miniattn bench step``: what share of a decode step the KV-cache write costs, layer by layer.

    miniattn bench step [--preset llama-8b] [--layers 4] [--batch 1,4,16,64,128,256]
                        [--context 512,1024,...,32768] [--layouts NHD,HND,paged5d]
                        [--kv-cache-dtypes auto,fp8] [--peers reference,flash-attn] [--plot]

Defaults: on a GPU the llama-8b shape cut to 4 layers, bf16, the sweep above; on a CPU (Triton
interpreter) the tiny preset at one small point, labelled as CPU numbers. Prints one table (and
the per-layer table of the first point of each run), writes ``<out-dir>/<stem>.json`` and, with
``--plot``, ``<stem>_bars.png`` and ``<stem>_share.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["HELP", "add_arguments", "run", "main"]

HELP = "decode-step benchmark: the KV-cache write's share of each layer and of the step (two methods)"

GPU_DEFAULTS = {"preset": "llama-8b", "layers": 4, "dtype": "bfloat16", "batch": "1,4,16,64,128,256",
                "context": "512,1024,2048,4096,8192,16384,32768", "pivot_batch": 64, "pivot_context": 4096,
                "kv_cache_dtypes": "auto,fp8", "reps": 5, "rounds": 7, "reference_max_tokens": 65536}
CPU_DEFAULTS = {"preset": "tiny", "layers": None, "dtype": "float16", "batch": "2", "context": "64",
                "pivot_batch": None, "pivot_context": None, "kv_cache_dtypes": "auto", "reps": 2, "rounds": 3,
                "reference_max_tokens": None}
SHAPE_FLAGS = ("hidden_size", "intermediate_size", "num_q_heads", "num_kv_heads", "head_size", "vocab_size")


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip() and x.strip() != "none")


def add_arguments(p: argparse.ArgumentParser, default_out_dir: str = ".") -> None:
    g = p.add_argument_group("model (GPU default: llama-8b cut to 4 layers, bf16; CPU: tiny, fp16)")
    g.add_argument("--preset", default=None, help="tiny | llama-1b | llama-8b")
    g.add_argument("--layers", type=int, default=None,
                   help="cut the preset to this many layers (GPU default 4; 0 = the preset's own)")
    for f in SHAPE_FLAGS:
        g.add_argument("--" + f.replace("_", "-"), type=int, default=None, help=f"override the preset's {f}")
    g.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    s = p.add_argument_group("sweep")
    s.add_argument("--batch", type=_ints, default=None, help="batch sizes, comma-separated")
    s.add_argument("--context", type=_ints, default=None, help="context lengths (tokens, new one included)")
    s.add_argument("--points", choices=["cross", "grid"], default="cross",
                   help="cross: batches at the pivot context + contexts at the pivot batch; grid: all pairs")
    s.add_argument("--pivot-batch", type=int, default=None)
    s.add_argument("--pivot-context", type=int, default=None)
    s.add_argument("--layouts", type=_names, default=("NHD", "HND", "paged5d"))
    s.add_argument("--kv-cache-dtypes", type=_names, default=None, help="auto,fp8 (GPU) / auto (CPU)")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--num-splits", type=int, default=None, help="force the decode kernel's KV splits")
    s.add_argument("--peers", type=_names, default=("reference", "flash-attn"),
                   help="side-by-side implementations where importable: reference, flash-attn, or none")
    s.add_argument("--peer-layouts", type=_names, default=("NHD",), help="layouts the peers run on")
    s.add_argument("--reference-max-tokens", type=int, default=-1,
                   help="run the torch reference only where batch x context <= this (GPU default 65536)")
    s.add_argument("--reserve-gib", type=float, default=4.0, help="GPU memory kept free besides the KV pool")
    m = p.add_argument_group("measurement")
    m.add_argument("--reps", type=int, default=None, help="eager steps timed with events (median)")
    m.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the ablation")
    m.add_argument("--target-ms", type=float, default=50.0, help="length of one timed ablation block")
    m.add_argument("--extra-writes", type=int, default=8,
                   help="K of the ablation's slope: the graph step also with 1 + K writes per layer (0: off)")
    m.add_argument("--graph-reps", type=int, default=30, help="replays of the graph that holds the events")
    m.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", default=default_out_dir, help="where the JSON (and plots) go")
    o.add_argument("--no-json", action="store_true")
    o.add_argument("--tag", default="", help="suffix of the result file names (e.g. validation)")
    o.add_argument("--plot", action="store_true", help="stacked bars per layout and the share vs batch / context")
    o.add_argument("--per-layer", action="store_true", help="print the per-layer table of every point")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: print the table (and --plot) of a saved result")


def _pivot(given: int | None, default: int | None, values) -> int | None:
    """The flag if given; else the default when it is among the swept values; else None (the middle)."""
    if given is not None:
        return given
    return default if default in values else None


def _config(args, cuda: bool):
    from .measure import MeasureSettings
    from .sweep import SweepConfig

    d = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    pick = lambda name: d[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    batches = _ints(d["batch"]) if args.batch is None else args.batch
    contexts = _ints(d["context"]) if args.context is None else args.context
    kvd = _names(d["kv_cache_dtypes"]) if args.kv_cache_dtypes is None else args.kv_cache_dtypes
    preset = pick("preset")
    layers = pick("layers")
    layers = layers if layers and layers > 0 else None  # --layers 0: the preset's own count
    ref_max = d["reference_max_tokens"] if args.reference_max_tokens < 0 else (args.reference_max_tokens or None)
    settings = MeasureSettings(reps=pick("reps"), rounds=pick("rounds"), target_ms=args.target_ms,
                               extra_writes=args.extra_writes, graph_reps=args.graph_reps)
    return SweepConfig(
        preset=preset, layers=layers, shape={f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f)},
        dtype=pick("dtype"), batches=batches, contexts=contexts, points=args.points,
        pivot_batch=_pivot(args.pivot_batch, d["pivot_batch"], batches),
        pivot_context=_pivot(args.pivot_context, d["pivot_context"], contexts),
        layouts=args.layouts, kv_cache_dtypes=kvd, block_size=args.block_size, peers=args.peers,
        peer_layouts=args.peer_layouts, reference_max_tokens=ref_max, num_splits=args.num_splits,
        reserve_gib=args.reserve_gib, seed=args.seed, settings=settings, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from .. import timing
    from .report import LEGEND, format_layers, format_table, load_result, write_results
    from .sweep import run_sweep

    if args.from_json:
        result, env = load_result(args.from_json)
    else:
        try:
            cfg = _config(args, cuda)
        except ValueError as e:
            raise SystemExit(f"miniattn bench step: {e}")
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        env = timing.env_info()
        os.makedirs(args.out_dir, exist_ok=True)
        save = None if args.no_json else (lambda res: write_results(_json_path(args, res, env), res))
        result = run_sweep(cfg, log=log, checkpoint=save)
    print(format_table(result, env))
    n_bad = sum(1 for r in result["rows"] if r.get("suspect"))
    if n_bad:
        print(f"warning: {n_bad} points with suspect graph timings (see below the table)", file=sys.stderr)
    print()
    print(LEGEND)
    seen = set()
    for r in result["rows"]:
        run_key = (r["layout"], r["kv_cache_dtype"], r["impl"])
        if r.get("status") == "ok" and (args.per_layer or run_key not in seen):
            seen.add(run_key)
            print()
            print(format_layers(r))
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, _stem(args, result, env))
    if not args.no_json and not args.from_json:  # written by the sweep's last checkpoint
        print(f"\nwrote {stem}.json")
    if args.plot:
        from .plot import plot_results

        cfg = result["config"]
        title = f"{cfg['preset']} x{result['model']['num_layers']} layers, {cfg['dtype']}, {env['device']}"
        for path in plot_results(result, stem, title):
            print(f"wrote {path}")
    return 0


def _stem(args, result: dict, env: dict) -> str:
    from .report import file_stem

    return file_stem(result, env) + (f"_{args.tag}" if getattr(args, "tag", "") else "")


def _json_path(args, result: dict, env: dict) -> str:
    return os.path.join(args.out_dir, _stem(args, result, env) + ".json")


def main(argv: list[str] | None = None, default_out_dir: str = ".") -> int:
    """Standalone entry (the benchmarks/ script): same flags as ``miniattn bench step``."""
    p = argparse.ArgumentParser(prog="benchmark_decode_step", description=HELP)
    add_arguments(p, default_out_dir=default_out_dir)
    return run(p.parse_args(argv))
