"""Run the whole sweep: every (layout, kv_cache_dtype, implementation) over the planned points.

One model is built once. For each run configuration and each context length an engine is built
(`points.plan_engines` sizes its pool to the largest batch that fits, skipping the rest with a
note), its cache is filled with random values once, and every point of that context is measured
by `measure.measure_point` on a fresh synthetic batch (scattered blocks). Engines are freed
between contexts, so one pool lives at a time.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from .. import timing
from ..engine import Engine, EngineConfig
from ..model import PRESETS, ToyLlama, get_preset
from .measure import MeasureSettings, measure_point
from .peers import get_impl, peer_status
from .points import kv_bytes_per_token, plan_engines, plan_points

__all__ = ["SweepConfig", "Run", "run_sweep", "build_model_config"]


@dataclass
class SweepConfig:
    """Everything a sweep needs; `run_sweep` records it in the JSON."""

    preset: str = "tiny"
    layers: int | None = None  # cut the preset to this many layers (None: the preset's)
    shape: dict = field(default_factory=dict)  # ModelConfig overrides (hidden_size=..., ...)
    dtype: str = "float16"
    batches: tuple[int, ...] = (2,)
    contexts: tuple[int, ...] = (64,)
    points: str = "cross"
    pivot_batch: int | None = None
    pivot_context: int | None = None
    layouts: tuple[str, ...] = ("NHD", "HND", "paged5d")
    kv_cache_dtypes: tuple[str, ...] = ("auto",)
    block_size: int = 16
    peers: tuple[str, ...] = ("reference", "flash-attn")
    peer_layouts: tuple[str, ...] = ("NHD",)
    reference_max_tokens: int | None = None  # the torch reference only runs batch x context <= this
    num_splits: int | None = None
    reserve_gib: float = 4.0
    seed: int = 0
    settings: MeasureSettings = field(default_factory=MeasureSettings)
    progress: bool = True

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["settings"] = self.settings.to_dict()
        return d


@dataclass(frozen=True)
class Run:
    """One line of the comparison: a layout, a cache dtype and an implementation."""

    layout: str
    kv_cache_dtype: str
    impl: str


def build_model_config(cfg: SweepConfig):
    """The preset with `layers` and `shape` applied."""
    over = dict(cfg.shape)
    if cfg.layers is not None:
        over["num_layers"] = cfg.layers
    return get_preset(cfg.preset, **over)


def _runs(cfg: SweepConfig, cuda: bool) -> tuple[list[Run], list[str]]:
    runs = [Run(lay, kvd, "miniattn") for lay in cfg.layouts for kvd in cfg.kv_cache_dtypes]
    notes = []
    for impl in cfg.peers:
        get_impl(impl)
        for lay in (x for x in cfg.layouts if x in cfg.peer_layouts):
            for kvd in cfg.kv_cache_dtypes:
                why = peer_status(impl, lay, kvd, cuda)
                if why is None:
                    runs.append(Run(lay, kvd, impl))
                elif f"{impl}: {why}" not in notes:
                    notes.append(f"{impl}: {why}")
    return runs, notes


def _free_engine():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_sweep(cfg: SweepConfig, log=print, checkpoint=None) -> dict:
    """Measure every run at every point; returns {"config", "model", "ceilings", "rows", "notes", ...}.

    `checkpoint(partial_result)`, if given, is called whenever a run (layout, cache dtype,
    implementation) is complete, so that a sweep cut short still leaves its finished runs.
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, cfg.dtype)
    mcfg = build_model_config(cfg)
    t0 = time.perf_counter()
    model = ToyLlama(mcfg, dtype=dtype, device=device, seed=cfg.seed)
    copy_gbps = timing.copy_bandwidth() if cuda else float("nan")
    budget = None
    if cuda:
        free, total = torch.cuda.mem_get_info()
        budget = free - cfg.reserve_gib * 2**30
    runs, notes = _runs(cfg, cuda)
    pivots = {"batch": cfg.pivot_batch or cfg.batches[len(cfg.batches) // 2],
              "context": cfg.pivot_context or cfg.contexts[len(cfg.contexts) // 2]}
    points = plan_points(cfg.batches, cfg.contexts, cfg.points, pivots["batch"], pivots["context"])
    work, rows = [], []
    for run in runs:
        impl = get_impl(run.impl)
        bs = impl.block_size(cfg.block_size)
        per_tok = kv_bytes_per_token(mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_size, run.kv_cache_dtype, dtype)
        limit = cfg.reference_max_tokens if run.impl == "reference" else None
        for plan in plan_engines(points, bs, per_tok, budget, limit):
            for p, why in plan.skipped:
                rows.append(_base(run, p, bs) | {"status": "skipped", "note": why})
            work += [(run, bs, plan, p) for p in plan.points]
    log(f"model {cfg.preset} ({mcfg.num_layers} layers, {mcfg.num_params / 1e9:.2f}B params, {cfg.dtype}) on "
        f"{'GPU' if cuda else 'CPU'} in {time.perf_counter() - t0:.1f}s; {len(runs)} runs, {len(points)} points, "
        f"{len(work)} to measure" + (f"; cache budget {budget / 2**30:.1f} GiB" if budget is not None else ""))
    full_layers = PRESETS[cfg.preset].num_layers if cfg.layers is not None else mcfg.num_layers
    n_skipped = len(rows)
    engine, key, first, engine_error = None, None, False, None
    bar = timing.progress(work, desc="bench step", unit="pt", disable=not cfg.progress, mininterval=2.0)
    model_info = {"num_params": mcfg.num_params, "full_layers": full_layers, **vars(mcfg)}

    def result():
        return {"config": cfg.to_dict(), "model": model_info, "ceilings": {"copy_gbps": copy_gbps},
                "rows": _ordered(rows, runs), "notes": notes, "points": [vars(p) for p in points], "pivots": pivots}

    for run, bs, plan, p in bar:
        if key is not None and run != key[0] and checkpoint is not None:
            checkpoint(result())
        if (run, plan.context) != key:
            engine, engine_error = None, None
            _free_engine()
            key, first = (run, plan.context), True
            try:
                engine = _build_engine(model, cfg, run, bs, plan)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory: the next engine may fit
                engine_error = _why(e)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{run.layout}/{run.kv_cache_dtype}/{run.impl} b{p.batch} c{p.context}")
        row = _base(run, p, bs)
        if engine_error is not None:
            row |= {"status": "failed", "note": f"engine: {engine_error}"}
        else:
            row |= _measure(engine, run, p, cfg, first, full_layers, copy_gbps)
            first = False
        if row["status"] == "failed":
            log(f"  {run.layout}/{run.kv_cache_dtype}/{run.impl} batch {p.batch} ctx {p.context} failed: {row['note']}")
        elif not cfg.progress:  # one line per point instead of a bar (logs)
            log(f"  [{len(rows) + 1 - n_skipped}/{len(work)}] {run.layout}/{run.kv_cache_dtype}/{run.impl} "
                f"b{p.batch} c{p.context}: {row['wall_s']:.1f}s, write {row['write_pct_step_a_net']:.2f}% (a) "
                f"{row['write_pct_step_b']:.2f}% (b) {row['write_pct_step_b_slope']:.2f}% (slope) "
                f"{row['write_pct_step_a']:.2f}% (eager events) of {row['step_graph_us']:.0f} µs")
        rows.append(row)
    engine = None
    _free_engine()
    out = result()
    if checkpoint is not None:
        checkpoint(out)
    return out


def _build_engine(model, cfg: SweepConfig, run: Run, block_size: int, plan) -> Engine:
    impl = get_impl(run.impl)
    ecfg = EngineConfig(kv_layout=run.layout, kv_cache_dtype=run.kv_cache_dtype, block_size=block_size,
                        num_blocks=plan.num_blocks, max_num_seqs=plan.max_batch, max_seq_len=plan.context,
                        cuda_graph=False, attention_impl=impl.attention_impl, num_splits=cfg.num_splits,
                        seed=cfg.seed)
    engine = Engine(model, ecfg)
    impl.install(engine)
    return engine


def _measure(engine, run: Run, p, cfg: SweepConfig, fill: bool, full_layers: int, copy_gbps: float) -> dict:
    """One point's measurements, or status "failed" with the reason (the sweep goes on)."""
    t0 = time.perf_counter()
    batch = engine.prepare_decode_batch(p.batch, p.context, seed=cfg.seed, fill_cache=fill)
    try:
        row = {"status": "ok", "note": ""} | measure_point(engine, batch, get_impl(run.impl), cfg.settings,
                                                           full_layers, copy_gbps)
    except (RuntimeError, ValueError) as e:  # out of memory, a peer refusing its inputs
        row = {"status": "failed", "note": _why(e)}
    finally:
        engine.release(batch)
    return row | {"wall_s": time.perf_counter() - t0}


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _base(run: Run, p, block_size: int) -> dict:
    return {"layout": run.layout, "kv_cache_dtype": run.kv_cache_dtype, "impl": run.impl,
            "batch": p.batch, "context": p.context, "block_size": block_size}


def _ordered(rows: list[dict], runs: list[Run]) -> list[dict]:
    """Rows grouped by run (in run order), then by context, then batch."""
    order = {Run(r.layout, r.kv_cache_dtype, r.impl): i for i, r in enumerate(runs)}
    return sorted(rows, key=lambda r: (order[Run(r["layout"], r["kv_cache_dtype"], r["impl"])],
                                       r["context"], r["batch"]))
