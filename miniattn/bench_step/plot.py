"""Two figures of a step-benchmark result (matplotlib, Agg backend).

- ``<stem>_bars.png``: one panel per (layout, cache dtype, implementation); per point a stacked bar
  of the step in µs from method (a): write, attention, rest of the layers, outside the layers
  (embedding, LM head); a dot marks the graph-replayed step.
- ``<stem>_share.png``: miniattn's layouts only (the peers' shares are off this scale; they are in
  the table), points with suspect timings left out: the write's share of the step against batch (at the pivot context) and against
  context (at the pivot batch), solid lines method (b) ablation, dashed method (a) events; and the
  write's µs per layer against batch (ablation), which layout's write is cheaper.
"""

from __future__ import annotations

import math

__all__ = ["plot_results"]

PARTS = (("write", "write", "tab:red"), ("attention", "attn", "tab:blue"), ("rest of layers", "rest", "tab:gray"))


def _pick(row: dict, key: str, fallback: str) -> float:
    """row[key] when it is a number (results of this version), else row[fallback] (older results)."""
    v = row.get(key)
    return v if isinstance(v, (int, float)) and not math.isnan(v) else row.get(fallback, float("nan"))


def _runs(rows):
    out = {}
    for r in rows:
        if r.get("status") == "ok":
            out.setdefault((r["layout"], r["kv_cache_dtype"], r["impl"]), []).append(r)
    return out


def _bars(plt, runs, order, title):
    n = len(runs)
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, ((lay, kvd, impl), rows) in zip(axes.flat, runs.items()):
        rows = sorted(rows, key=lambda r: order.get((r["batch"], r["context"]), len(order)))
        x = range(len(rows))
        bottom = [0.0] * len(rows)
        for label, key, color in PARTS:
            h = [sum(d[key] for d in r["layers"]) for r in rows]
            ax.bar(x, h, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, h)]
        h = [max(r["outside_us"], 0.0) for r in rows]
        ax.bar(x, h, bottom=bottom, color="tab:olive", label="embed + LM head")
        ax.plot(x, [r["step_graph_us"] for r in rows], "k.", label="graph step")
        ax.set_xticks(list(x), [f"b{r['batch']}\nc{r['context']}" for r in rows], fontsize=6)
        for i, r in enumerate(rows):  # the write's share (ablation) above each bar; '?' if the timing is suspect
            txt = "?" if r.get("suspect") else f"{r['write_pct_step_b']:.1f}%"
            ax.annotate(txt, (i, bottom[i] + h[i]), ha="center", va="bottom", fontsize=6, color="tab:red")
        ax.set_ylabel("µs per step")
        ax.set_title(f"{lay} / {kvd} / {impl}", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title + " (events (a) per component; red: write share by ablation (b))", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _share(plt, runs, pivot_batch, pivot_context, title):
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.2))
    left_out = 0
    for (lay, kvd, impl), rows in runs.items():
        if impl != "miniattn":
            continue
        left_out += sum(1 for r in rows if r.get("suspect"))
        rows = [r for r in rows if not r.get("suspect")]
        label = f"{lay}/{kvd}"
        share_b = lambda r: r["write_pct_step_b"]  # noqa: E731
        share_a = lambda r: _pick(r, "write_pct_step_a_net", "write_pct_step_a")  # noqa: E731
        us_b = lambda r: r["write_us_b"] / len(r["layers"])  # noqa: E731
        panels = ((a1, pivot_context, "context", "batch", share_b, share_a),
                  (a2, pivot_batch, "batch", "context", share_b, share_a),
                  (a3, pivot_context, "context", "batch", us_b, None))
        for ax, fixed, key_fixed, key_x, get_b, get_a in panels:
            pts = sorted((r for r in rows if r[key_fixed] == fixed), key=lambda r: r[key_x])
            if not pts:
                continue
            xs = [r[key_x] for r in pts]
            line, = ax.plot(xs, [get_b(r) for r in pts], "-o", ms=3, label=label)
            if get_a:
                ax.plot(xs, [get_a(r) for r in pts], "--", color=line.get_color(), lw=0.8)
    a1.set_xlabel(f"batch (context {pivot_context})")
    a2.set_xlabel(f"context (batch {pivot_batch})")
    a3.set_xlabel(f"batch (context {pivot_context})")
    for ax in (a1, a2, a3):
        ax.set_xscale("log", base=2)
        ax.set_ylabel("write % of step")
        ax.grid(alpha=0.3)
    a3.set_ylabel("write µs per layer, ablation (T1 - T0) / layers")
    a1.legend(fontsize=7)
    note = f"; {left_out} points with suspect timings left out" if left_out else ""
    fig.suptitle(title + f" (solid: ablation (b), dashed: events (a){note})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_results(result: dict, stem_path: str, title: str) -> list[str]:
    """Write the two PNGs next to `stem_path` (no extension); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(result["rows"])
    if not runs:
        return []
    pb, pc = result["pivots"]["batch"], result["pivots"]["context"]
    paths = []
    order = {(p["batch"], p["context"]): i for i, p in enumerate(result.get("points") or [])}
    for suffix, fig in (("_bars.png", _bars(plt, runs, order, title)), ("_share.png", _share(plt, runs, pb, pc, title))):
        fig.savefig(stem_path + suffix, dpi=110)
        plt.close(fig)
        paths.append(stem_path + suffix)
    return paths
