"""The `miniattn` command.

    miniattn generate [--preset tiny|llama-1b|llama-8b] [--batch N] [--prompt-len N] [--gen-len N]
                      [--layout NHD|HND|paged5d] [--kv-cache-dtype auto|fp8|...] [--no-cuda-graph] ...

Subcommands live in `SUBCOMMANDS`: a `Subcommand` (help, add_arguments, run), or the dotted name of
a module that defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` (imported only
when the parser is built). Adding ``bench`` is one entry there.

Without CUDA the command sets ``TRITON_INTERPRET=1`` before Triton is imported, so the Triton
kernels run under the interpreter on the CPU (small defaults: the ``tiny`` preset).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["main", "Subcommand", "SUBCOMMANDS", "build_parser"]


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _prepare_backend() -> bool:
    """True if CUDA is usable; otherwise make Triton interpret (must run before triton is imported)."""
    cuda = _has_cuda()
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return cuda


# ------------------------------------------------------------------------------------------ generate
def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, llama-1b on GPU)")
    p.add_argument("--num-layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument("--batch", type=int, default=None, help="number of prompts (default: 8 CPU, 64 GPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default: 16 CPU, 512 GPU)")
    p.add_argument("--gen-len", type=int, default=None, help="new tokens per prompt (default: 16 CPU, 256 GPU)")
    p.add_argument("--layout", default="NHD", choices=["NHD", "HND", "paged5d"], help="KV-cache layout")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="cache pool size (default: fits the whole batch)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: float16 CPU, bfloat16 GPU; the decode kernel takes fp16/bf16)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps from CUDA graphs (default: on with CUDA)")
    p.add_argument("--attention-impl", default="triton", choices=["triton", "reference"],
                   help="cache write + decode: miniattn's Triton kernels or the torch references")
    p.add_argument("--prefill", default="auto", choices=["auto", "flash", "sdpa"],
                   help="prefill attention: flash-attn varlen when importable (auto), or torch SDPA")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the prompts and the sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-component breakdown step")


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def _run_generate(args: argparse.Namespace) -> int:
    cuda = _prepare_backend()
    import torch

    from .engine import Engine, EngineConfig, SamplingParams
    from .model import ToyLlama, get_preset
    from .step_timer import StepTimer

    preset = args.preset or ("llama-1b" if cuda else "tiny")
    batch = args.batch or (64 if cuda else 8)
    prompt_len = args.prompt_len or (512 if cuda else 16)
    gen_len = args.gen_len or (256 if cuda else 16)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float16)
    use_graph = cuda if args.cuda_graph is None else args.cuda_graph
    device = "cuda" if cuda else "cpu"
    for name, v in (("--batch", batch), ("--prompt-len", prompt_len), ("--gen-len", gen_len)):
        if v < 1:
            raise SystemExit(f"miniattn generate: {name} must be >= 1, got {v}")
    try:
        mcfg = get_preset(preset, **({"num_layers": args.num_layers} if args.num_layers else {}))
    except ValueError as e:
        raise SystemExit(f"miniattn generate: {e}")

    t0 = time.perf_counter()
    model = ToyLlama(mcfg, dtype=dtype, device=device, seed=args.seed)
    max_seq_len = prompt_len + gen_len
    ecfg = EngineConfig(kv_layout=args.layout, kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                        num_blocks=args.num_blocks, max_num_seqs=batch, max_seq_len=max_seq_len,
                        cuda_graph=use_graph, attention_impl=args.attention_impl,
                        prefill_attention=args.prefill, seed=args.seed)
    steps = []
    engine = Engine(model, ecfg, on_step=steps.append)
    setup_s = time.perf_counter() - t0
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    where = torch.cuda.get_device_name() if cuda else ("CPU, Triton interpreter" if interp else "CPU")
    print(f"miniattn generate: {preset} ({mcfg.num_layers} layers, {mcfg.num_params / 1e9:.2f}B params, "
          f"{str(dtype).removeprefix('torch.')}) on {where}")
    print(f"  batch {batch} x (prompt {prompt_len} + gen {gen_len}), layout {args.layout}, "
          f"kv_cache_dtype {args.kv_cache_dtype}, block {args.block_size}, "
          f"{engine.config.num_blocks} blocks, cuda_graph {'on' if use_graph else 'off'}, "
          f"attention {args.attention_impl}, prefill {engine.runner.attn.prefill_name if cuda else 'sdpa'}; "
          f"setup {setup_s:.1f}s")

    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, mcfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    sp = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_new_tokens=gen_len)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp, progress=not args.no_progress)
    wall = time.perf_counter() - t0

    new_tokens = sum(len(o.output_token_ids) for o in outs)
    pre = [s for s in steps if s.is_prefill]
    dec = [s for s in steps if not s.is_prefill]
    dec_ms = [s.wall_ms for s in dec]
    pre_s = sum(s.wall_ms for s in pre) / 1e3
    dec_s = sum(dec_ms) / 1e3
    print(f"\n  generated {new_tokens} tokens in {wall:.2f}s: {new_tokens / wall:,.1f} tok/s overall")
    print(f"  prefill: {len(pre)} step(s), {sum(s.num_tokens for s in pre)} prompt tokens, {pre_s * 1e3:.1f} ms "
          f"({sum(s.num_tokens for s in pre) / max(pre_s, 1e-9):,.0f} tok/s)")
    if dec:
        print(f"  decode:  {len(dec)} steps, {sum(s.num_tokens for s in dec) / max(dec_s, 1e-9):,.1f} tok/s; "
              f"step latency median {statistics.median(dec_ms):.2f} ms, p90 {_pct(dec_ms, 0.9):.2f} ms, "
              f"max {max(dec_ms):.2f} ms (batch {max(s.num_seqs for s in dec)})")
    print(f"  preemptions: {engine.scheduler.num_preemptions}; "
          f"blocks free at the end: {engine.allocator.num_free}/{engine.allocator.num_blocks}")

    if not args.no_breakdown:
        _print_breakdown(engine, torch, StepTimer, batch, max_seq_len - 1, cuda)
    return 0


def _print_breakdown(engine, torch, StepTimer, batch, ctx, cuda) -> None:
    """Per-component time of one eager decode step at the final context length (a synthetic batch)."""
    per_seq = -(-ctx // engine.config.block_size)
    batch = min(batch, engine.allocator.num_free // per_seq)  # a pool too small for all: fewer rows
    if batch < 1:
        print(f"\n  (no breakdown: one sequence of {ctx} tokens needs {per_seq} blocks)")
        return
    db = engine.prepare_decode_batch(batch, ctx)
    try:
        reps = 5 if cuda else 1
        engine.decode_step(db, use_graph=False)  # warm-up
        timer = StepTimer(engine.device)
        for _ in range(reps):
            engine.decode_step(db, timer=timer, use_graph=False)
        tot = {k: v / reps for k, v in timer.totals().items()}
        graph_ms = None
        if engine.runner.graph_for(batch) is not None:
            gt = StepTimer(engine.device)
            engine.decode_step(db, use_graph=True)
            for _ in range(reps):
                engine.decode_step(db, timer=gt, use_graph=True)
            graph_ms = gt.totals()["step"] / reps
    finally:
        engine.release(db)
    step = tot["step"]
    parts = [("kv-cache write", tot.get("write", 0.0)), ("attention", tot.get("attn", 0.0)),
             ("rest of layers", tot.get("other", 0.0)),
             ("embed + lm head", tot.get("embed", 0.0) + tot.get("head", 0.0))]
    parts.append(("outside layers", step - sum(v for _, v in parts)))
    how = "CUDA events" if cuda else "wall clock"
    print(f"\n  breakdown of one eager decode step (batch {batch}, context {ctx}, {how}): {step:.3f} ms")
    for name, ms in parts:
        print(f"    {name:<16} {ms:9.3f} ms  {100 * ms / step:5.1f}%")
    if graph_ms is not None:
        print(f"  same step replayed from a CUDA graph: {graph_ms:.3f} ms")


# ------------------------------------------------------------------------------------------ registry
SUBCOMMANDS: dict[str, Subcommand | str] = {
    "generate": Subcommand("generate with the toy model over random prompts; print tok/s, step latency "
                           "and a breakdown", _add_generate_arguments, _run_generate),
    "bench": "miniattn.bench",
}


def _resolve(entry: Subcommand | str) -> Subcommand:
    if isinstance(entry, Subcommand):
        return entry
    mod = importlib.import_module(entry)
    return Subcommand(mod.HELP, mod.add_arguments, mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniattn", description="miniattn: paged-attention mini-engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, entry in SUBCOMMANDS.items():
        cmd = _resolve(entry)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return args._run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
