"""The step benchmark's outputs: the Markdown table, the per-layer tables, the JSON, the file stem."""

from __future__ import annotations

import json
import math

from .. import timing
from .measure import AGREE_TOL, headline, timing_suspect

__all__ = ["format_table", "format_layers", "write_results", "load_result", "file_stem", "LEGEND", "device_label"]

# (header, row key, format)
COLUMNS = [
    ("layout", "layout", "{}"), ("kv", "kv_cache_dtype", "{}"), ("impl", "impl", "{}"),
    ("batch", "batch", "{}"), ("ctx", "context", "{}"), ("timing", "suspect", None),
    ("graph µs", "step_graph_us", "{:.0f}"), ("eager µs", "step_eager_us", "{:.0f}"),
    ("GB/s", "step_gbps", "{:.0f}"), ("% copy", "step_pct_copy", "{:.0f}"),
    ("write µs/L (a)", "write_us_a_net", "{:.2f}"), ("write µs/L (b)", "write_us_b_layer", "{:.2f}"),
    ("a vs b", "anet_vs_b", None),
    ("write %step (a)", "write_pct_step_a_net", "{:.2f}"), ("write %step (b)", "write_pct_step_b", "{:.2f}"),
    ("(b) T2-T1", "check_pct_step_b", "{:.2f}"), ("slope µs/L", "write_us_b_slope_layer", "{:.2f}"),
    ("attn µs/L", "attn_us", "{:.1f}"), ("rest µs/L", "rest_us", "{:.1f}"), ("write %L", "write_pct_layer", "{:.2f}"),
    ("eager write µs/L", "write_us", "{:.1f}"), ("eager vs T1-T0", "a_vs_b", None),
    ("write/attn", "write_per_attn", "{:.3f}"),
    ("%step full est", "write_pct_step_full_est", "{:.2f}"),
]
#: agreement columns and the flag saying whether a miss is within the ablation's noise
_AGREEMENT = {"anet_vs_b": "within_noise_net", "a_vs_b": "within_noise", "ag_vs_b": "within_noise_graph",
              "a_vs_b_eager": "within_noise_eager"}

LEGEND = f"""\
timing: SUSPECT when the graph timings contradict the eager events (another context on the GPU,
  clocks): its graph µs, (b) and agreement columns are not to be read (reasons below the table).
graph / eager µs: the step's device work replayed from a CUDA graph / called eagerly (do_bench median,
  cold L2; input preparation excluded). GB/s: bytes of a perfect step (weights once, KV read, write)
  over the graph time; % copy: of the device-to-device copy ceiling measured in the same run.
write µs/L, write %step: the write per layer and all layers' writes as a share of the graph step T1,
  by the two methods, both on the graph-replayed step (what serving runs):
  (a) CUDA events captured in the graph around each layer's write, with null kernels between the
      events and the write, minus an empty region of the same events and null kernels recorded
      just before it (what the instrumentation itself costs), median over replays;
  (b) ablation: T1 - T0, T[n] = the graph step with n writes per layer (interleaved, paired rounds);
  a vs b: (a - b) / b; '!' beyond {AGREE_TOL:.0%} and beyond 2x the ablation's noise, '~' beyond {AGREE_TOL:.0%} but
  within its noise; 'fused': the write is inside the attention kernel (flash-attn), no separate time.
(b) T2-T1: doubling the writes, (T2 - T1) / T1; slope µs/L: (T[1+K] - T1) / K per layer, the
  marginal cost of one more write with K times the signal (the extra writes find their cache lines
  in L2, so it is not the first write's cost: on an H200 it reads 15-55% below T1 - T0).
attn / rest µs/L, write %L, eager write µs/L: CUDA events inside the eager step queued ahead of the
  GPU (launch gaps not counted; rest = projections, rotary, MLP, norms; an eager event pair adds ~1 µs
  to each region); eager vs T1-T0: that eager write share against (b) T1-T0.
%step full est: write share for the preset's full layer count (per-layer graph time scaled).
The JSON holds more: the events without queueing ahead (a raw), the ablation of the eager step, the
  graph events without calibration."""


def _cell(row: dict, key: str, fmt: str | None) -> str:
    v = row.get(key)
    if key == "suspect":
        return "SUSPECT" if v else "ok"
    if key in _AGREEMENT:
        if row.get("impl") == "flash-attn":
            return "fused"
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        noise = row.get(_AGREEMENT[key])
        mark = "" if abs(v) <= AGREE_TOL else (" ~" if noise else " !")
        return f"{100 * v:+.0f}%{mark}"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def device_label(env: dict) -> str:
    """'NVIDIA H100 80GB HBM3' or 'CPU numbers (Triton interpreter)'."""
    if env.get("cpu_only"):
        interp = env.get("triton_interpret", "0") not in ("", "0")
        return "CPU numbers" + (" (Triton interpreter)" if interp else "") + ", not GPU timings"
    return env.get("device", "?")


def format_table(result: dict, env: dict) -> str:
    """Title line, the Markdown table of measured rows, then skipped / failed points and notes."""
    cfg, model = result["config"], result["model"]
    title = (f"## Decode step: the write share on {device_label(env)}\n"
             f"{cfg['preset']} shape, {model['num_layers']} layers (full: {model['full_layers']}), {cfg['dtype']}, "
             f"block {cfg['block_size']}; copy ceiling {result['ceilings']['copy_gbps']:.0f} GB/s")
    ok = [r for r in result["rows"] if r.get("status") == "ok"]
    for r in ok:
        r.setdefault("suspect", timing_suspect(r))  # results saved before the check existed
    body = [{h: _cell(r, k, f) for h, k, f in COLUMNS} for r in ok]
    lines = [title, "", timing.format_table(body, [h for h, _, _ in COLUMNS])]
    bad = [r for r in ok if r["suspect"]]
    if bad:
        lines += ["", f"**{len(bad)} of {len(ok)} points have suspect graph timings** (GPU shared or throttled "
                      "while they ran; re-run on an idle GPU):"]
        lines += [f"- {r['layout']}/{r['kv_cache_dtype']}/{r['impl']} batch {r['batch']} ctx {r['context']}: "
                  f"{r['suspect']}" for r in bad]
    other = [r for r in result["rows"] if r.get("status") != "ok"]
    if other:
        lines.append("")
        lines += [f"- {r['status']}: {r['layout']}/{r['kv_cache_dtype']}/{r['impl']} batch {r['batch']} "
                  f"ctx {r['context']}: {r['note']}" for r in other]
    if result.get("notes"):
        lines.append("")
        lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def format_layers(row: dict) -> str:
    """Per-layer table of one measured row (method (a), µs)."""
    head = (f"### layers: {row['layout']}/{row['kv_cache_dtype']}/{row['impl']} batch {row['batch']} "
            f"ctx {row['context']} (events{', queued ahead' if row.get('queued_ahead') else ''})")
    body = [{"layer": i, "write µs": f"{d['write']:.1f}", "attn µs": f"{d['attn']:.1f}", "rest µs": f"{d['rest']:.1f}",
             "layer µs": f"{d['layer']:.1f}", "write %L": f"{100 * d['write'] / d['layer']:.2f}" if d["layer"] else "-"}
            for i, d in enumerate(row["layers"])]
    cols = ["layer", "write µs", "attn µs", "rest µs", "layer µs", "write %L"]
    tail = f"outside layers (embedding, LM head, gaps): {row['outside_us']:.1f} µs of {row['events']['step_us']:.1f}"
    return "\n".join([head, "", timing.format_table(body, cols), tail])


def file_stem(result: dict, env: dict) -> str:
    """decode_step_<device>_<preset>_L<layers>_<dtype>, e.g. decode_step_h100_llama-8b_L4_bfloat16."""
    dev = "cpu" if env.get("cpu_only") else timing.device_tag(env.get("device", "gpu"))
    cfg = result["config"]
    return f"decode_step_{dev}_{cfg['preset']}_L{result['model']['num_layers']}_{cfg['dtype']}"


def write_results(path: str, result: dict) -> None:
    """The JSON beside the table: env (device, versions, commit), config, rows, model, ceilings, notes."""
    timing.write_json(path, result["config"], result["rows"],
                      extra={k: result[k] for k in ("model", "ceilings", "notes", "points", "pivots") if k in result})


def load_result(path: str) -> tuple[dict, dict]:
    """(result, env) from a JSON written by `write_results` (the table and plots can be redrawn).
    Rows saved before the headline pair existed get it from their raw parts (`measure.headline`)."""
    with open(path) as f:
        doc = json.load(f)
    result = {k: doc[k] for k in ("config", "model", "ceilings", "notes", "points", "pivots") if k in doc}
    result["rows"] = doc["rows"]
    for r in result["rows"]:
        if r.get("status") == "ok" and "anet_vs_b" not in r:
            r |= headline(r)
    return result, doc["env"]
