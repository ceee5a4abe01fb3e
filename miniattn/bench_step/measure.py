"""One point of the sweep: the decode step on a prepared batch, timed both ways, shares derived.

`measure_point` returns one flat row (plus nested per-layer and raw data) with:

- ``step_graph_us`` / ``step_eager_us``: the device work of the step replayed from a CUDA graph /
  called eagerly from Python (`miniattn.timing`, median, cold L2; input preparation excluded);
- method (a), events inside the eager step queued ahead of the GPU: per layer write / attn / rest
  µs, the write's share of the layer and of the step, write / attention; and the same share from
  events *without* queueing ahead (``write_pct_step_a_raw``: launch gaps included);
- method (b), ablation: ``(T1 - T0) / T1`` and the check ``(T2 - T1) / T1`` of the graph-replayed
  step (what the write costs when served), and of the eager step queued ahead
  (``write_pct_step_b_eager``: the same execution that (a) times, without events inside;
  ``a_vs_b_eager`` compares the two methods on the same step);
- ``a_vs_b``: (a - b) / b of the two shares, ``agree`` False when it passes 10% by more than
  the ablation's noise;
- the headline pair (`headline`), both on the graph-replayed step (what serving runs): (a) net,
  events captured in the graph around each write, guarded by null kernels, minus an empty region of
  the same kind recorded just before it (``write_us_a_net`` per layer, ``write_pct_step_a_net``),
  and (b) the removal ablation T1 - T0 (``write_us_b_layer``, ``write_pct_step_b``);
  ``anet_vs_b`` / ``agree_net`` compare them. Next to them the slope ``(T[1+K] - T1) / K`` of the step
  with K extra writes per layer (``write_us_b_slope``): the marginal cost of one more write, K times
  finer than T1 - T0 but not the same quantity (the extra writes find their lines in L2);
- the same events captured inside the graph-replayed step (``write_pct_step_a_graph``,
  ``ag_vs_b``), and what an empty event pair reads in each mode (``event_pair_us*``);
- bytes moved by a perfect step (weights once, the KV read, the write) and GB/s from the graph time;
- ``write_pct_step_full_est``: the share for the preset's full layer count (layers scaled from the
  cut model's per-layer graph time; embedding and LM head once).
"""

from __future__ import annotations

import math

import torch

from .. import timing
from .ablation import ablate_writes, ablate_writes_queued
from .events import event_split, graph_event_split
from .peers import IMPLS, Impl
from .points import kv_bytes_per_token

__all__ = ["MeasureSettings", "measure_point", "step_bytes", "timing_suspect", "headline", "AGREE_TOL"]

AGREE_TOL = 0.10  # the two methods must agree within 10% of the share
# On an idle H100 the graph-replayed step takes 0.86-0.98x the eager step timed with events (those
# add their own cost) and the ablation's T1 is 0.99-1.00x the do_bench graph time. A GPU shared with
# another context (time-slicing) slows long timing windows (do_bench, ablation blocks) far more than
# a few-ms eager step, which breaks both ratios.
SUSPECT_GRAPH_OVER_EVENTS = 1.03
SUSPECT_T1_DRIFT = 0.05


class MeasureSettings:
    """How hard to measure: event reps, ablation rounds, ms per timed block, do_bench windows."""

    def __init__(self, reps: int = 5, rounds: int = 7, target_ms: float = 50.0, warmup_ms: int = 25,
                 rep_ms: int = 100, extra_writes: int = 8, graph_reps: int = 30):
        self.reps, self.rounds, self.target_ms = reps, rounds, target_ms
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.extra_writes = extra_writes  # K of the ablation's slope setting 1 + K (0: none)
        self.graph_reps = graph_reps  # replays of the graph that holds the events

    def to_dict(self) -> dict:
        return dict(vars(self))


def step_bytes(model, batch: int, context: int, kv_cache_dtype: str) -> dict:
    """Bytes a perfect decode step moves: every weight once, the cache read once, the write."""
    mc = model.config
    elem = model.dtype.itemsize
    params = sum(p.numel() for p in model.parameters()) * elem
    embed = model.embed.weight.numel() * elem
    weights = params - embed + (embed if mc.tie_word_embeddings else batch * mc.hidden_size * elem)
    per_tok = kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_size, kv_cache_dtype, model.dtype)
    kv_read = batch * context * per_tok
    write = batch * per_tok + batch * mc.num_layers * 2 * mc.num_kv_heads * mc.head_size * elem  # store + read K/V
    return {"weights": weights, "kv_read": kv_read, "write": write, "total": weights + kv_read + write}


def _pct(x: float, of: float) -> float:
    return 100.0 * x / of if of and of > 0 and not math.isnan(x) else float("nan")


def timing_suspect(row: dict) -> str | None:
    """Why a measured row's graph timings look disturbed (GPU shared, clocks), or None if they look sane."""
    g = row.get("step_graph_us", float("nan"))
    ev = (row.get("events") or {}).get("step_us", float("nan"))
    t1 = float(((row.get("ablation") or {}).get("t_us") or {}).get("1", "nan"))
    if any(not isinstance(x, (int, float)) or math.isnan(x) or x <= 0 for x in (g, ev, t1)):
        return None  # no graph (CPU, a step that syncs): nothing to cross-check
    if g > SUSPECT_GRAPH_OVER_EVENTS * ev:
        return f"graph step {g / ev:.2f}x the eager step timed with events (idle GPU: <= 0.98x)"
    if abs(t1 / g - 1) > SUSPECT_T1_DRIFT:
        return f"ablation T1 {t1 / g:.2f}x the do_bench graph step (idle GPU: 0.99-1.00x)"
    return None


def _agreement(share_x: float, share_b: float, t1_us: float, noise_us: float, fused: bool):
    """((x - b) / b, |x - b| within 2x the ablation's noise, agree) of two write shares (%)."""
    if fused or math.isnan(share_x) or math.isnan(share_b) or share_b == 0:
        return float("nan"), False, None
    diff = (share_x - share_b) / share_b
    within = abs(share_x - share_b) / 100 * t1_us <= 2 * noise_us
    return diff, within, bool(abs(diff) <= AGREE_TOL or within)


def measure_point(engine, batch, impl: Impl, settings: MeasureSettings, full_layers: int,
                  copy_gbps: float = float("nan")) -> dict:
    """Measure the decode step of `engine` on `batch` (see the module docstring)."""
    cuda = engine.device.type == "cuda"
    graph = cuda and impl.graphable
    engine.decode_step(batch, use_graph=False)  # warm-up: compile and plan
    if cuda:
        torch.cuda.synchronize()
    ev = event_split(engine, batch, settings.reps, queue_ahead=graph)
    raw = event_split(engine, batch, settings.reps, queue_ahead=False) if graph else ev
    fn = engine.runner.decode_callable(batch.seqs, use_graph=False)
    kw = {"warmup_ms": settings.warmup_ms, "rep_ms": settings.rep_ms}
    eager_us = timing.time_eager(fn, **kw)
    graph_us = timing.time_graph(fn, **kw) if graph else float("nan")
    repeats = impl.write_repeats
    extra = getattr(settings, "extra_writes", 0)
    abl_repeats = repeats + (1 + extra,) if graph and 2 in repeats and extra > 0 else repeats
    abl = ablate_writes(engine, batch, graph=graph, repeats=abl_repeats, rounds=settings.rounds,
                        target_ms=settings.target_ms, step_us_hint=graph_us if graph else eager_us)

    # (b) on the eager step queued ahead: the same execution (a) times, with no events inside
    abl_e = ablate_writes_queued(engine, batch, repeats=repeats, rounds=2 * settings.rounds) if graph else None

    gev, gev_error = None, None
    if graph:
        try:
            gev = graph_event_split(engine, batch, getattr(settings, "graph_reps", settings.reps))
        except Exception as e:  # events captured in a graph need torch >= 2.8 (external events)
            gev_error = f"{type(e).__name__}: {str(e)[:200]}"
            try:
                torch.cuda.synchronize()
            except RuntimeError:
                pass

    n_layers = len(ev.layers)
    t1 = abl.t_us[1]
    write_a, attn_a, rest_a, layer_a = (ev.total(k) for k in ("write", "attn", "rest", "layer"))
    share_a = _pct(write_a, ev.step_us)
    share_b = _pct(abl.write_us, t1)
    diff, within_noise, agree = _agreement(share_a, share_b, t1, abl.noise_us, impl.fused_write)
    share_be = _pct(abl_e.write_us, abl_e.t_us[1]) if abl_e else float("nan")
    diff_e, within_noise_e, agree_e = (_agreement(share_a, share_be, abl_e.t_us[1], abl_e.noise_us, impl.fused_write)
                                       if abl_e else (float("nan"), False, None))
    share_ag = _pct(gev.total("write"), gev.step_us) if gev else float("nan")
    diff_g, within_noise_g, agree_g = _agreement(share_ag, share_b, t1, abl.noise_us, impl.fused_write)
    b = step_bytes(engine.model, batch.batch_size, batch.context_len, engine.config.kv_cache_dtype)
    ref_us = graph_us if graph else eager_us
    # full-model estimate: per-layer time in the graph = the cut model's layers' share of T1
    per_layer_graph = (t1 - ev.outside_us * t1 / ev.step_us) / n_layers if ev.step_us else float("nan")
    full_step = t1 - n_layers * per_layer_graph + full_layers * per_layer_graph
    full_share = _pct(abl.write_us / n_layers * full_layers, full_step)
    return _with_suspect({
        "step_graph_us": graph_us,
        "step_eager_us": eager_us,
        "bytes": b,
        "step_gbps": timing.gbps(b["total"], ref_us),
        "step_pct_copy": _pct(timing.gbps(b["total"], ref_us), copy_gbps),
        "write_us": write_a / n_layers,
        "attn_us": attn_a / n_layers,
        "rest_us": rest_a / n_layers,
        "layer_us": layer_a / n_layers,
        "outside_us": ev.outside_us,
        "write_pct_layer": _pct(write_a, layer_a),
        "write_pct_step_a": share_a,
        "write_pct_step_a_raw": _pct(raw.total("write"), raw.step_us),
        "write_per_attn": write_a / attn_a if attn_a else float("nan"),
        "write_pct_step_b": share_b,
        "check_pct_step_b": _pct(abl.check_us, t1),
        "write_us_b": abl.write_us,
        "a_vs_b": diff,
        "agree": agree,
        "within_noise": within_noise,
        "write_pct_step_b_eager": share_be,
        "write_us_b_eager": abl_e.write_us if abl_e else float("nan"),
        "a_vs_b_eager": diff_e,
        "agree_eager": agree_e,
        "within_noise_eager": within_noise_e,
        "write_pct_step_a_graph": share_ag,
        "write_us_a_graph": gev.total("write") / n_layers if gev else float("nan"),
        "ag_vs_b": diff_g,
        "agree_graph": agree_g,
        "within_noise_graph": within_noise_g,
        "event_pair_us": ev.empty_us,
        "event_pair_us_graph": gev.empty_us if gev else float("nan"),
        "queued_ahead": ev.queued_ahead,
        "write_pct_step_full_est": full_share,
        "full_layers": full_layers,
        "layers": ev.layers,
        "events": ev.to_dict(),
        "events_raw": raw.to_dict(),
        "events_graph": gev.to_dict() if gev else {"error": gev_error},
        "ablation": abl.to_dict(),
        "ablation_eager": abl_e.to_dict() if abl_e else None,
    })


def _with_suspect(row: dict) -> dict:
    row |= headline(row)
    row["suspect"] = timing_suspect(row)
    return row


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) else float("nan")


def headline(row: dict) -> dict:
    """The headline pair of a measured row, from its raw parts (so older saved rows get it too).

    (a) net: the graph events' per-layer ``write_net`` summed (NaN without a graph); (b): the
    removal ablation T1 - T0; both as shares of T1 and per layer, their agreement, and the ablation's
    slope over K extra writes next to them.
    """
    abl = row.get("ablation") or {}
    t1 = _num((abl.get("t_us") or {}).get("1"))
    n_layers = max(1, len(row.get("layers") or ()))
    graph_layers = (row.get("events_graph") or {}).get("layers") or []

    def net(key):
        vals = [d.get(key) for d in graph_layers]
        return sum(vals) if vals and all(isinstance(v, (int, float)) for v in vals) else float("nan")

    write_net, removal, slope = net("write_net"), _num(abl.get("write_us")), _num(abl.get("slope_us"))
    share_an, share_b = _pct(write_net, t1), _pct(removal, t1)
    fused = row.get("impl") in IMPLS and IMPLS[row["impl"]].fused_write
    diff, within, agree = _agreement(share_an, share_b, t1, _num(abl.get("noise_us")), fused)
    return {
        "write_us_a_net": write_net / n_layers,
        "attn_us_a_net": net("attn_net") / n_layers,
        "write_pct_step_a_net": share_an,
        "write_us_b_layer": removal / n_layers,
        "anet_vs_b": diff,
        "agree_net": agree,
        "within_noise_net": within,
        "write_us_b_slope": slope,
        "write_us_b_slope_layer": slope / n_layers,
        "slope_noise_us": _num(abl.get("slope_noise_us")),
        "write_pct_step_b_slope": _pct(slope, t1),
        "removal_vs_slope": (removal - slope) / slope if slope and not math.isnan(slope) else float("nan"),
    }
