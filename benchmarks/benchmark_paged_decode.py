"""Paged decode attention: miniattn's Triton kernel against the peers that import, on one GPU.

For each (batch, context) point: miniattn in every layout (NHD, HND, paged5d) with a bf16/fp16 cache
and an FP8 cache, torch SDPA on a contiguous (unpaged) cache of the same size, FlashInfer's
`BatchDecodeWithPagedKVCacheWrapper` (planned once, `run` timed) and flash-attn-4 (`flash_attn.cute`
varlen with a page table). Random block tables over the whole pool, random data (never zeros).

Each cell is timed in the modes of `miniattn.timing` (graph = one call replayed in a CUDA graph, cold
L2; eager = a direct call; host = back-to-back eager calls, what a Python loop sees). Bytes are the KV
read: batch x ctx x kv_heads x head_size x bytes x 2 (K and V once); % is of the read bandwidth
measured in the same run (`timing.read_bandwidth`). The issue-3 targets are checked at the end.

    python benchmarks/benchmark_paged_decode.py                 # default sweep, ~3 min on an H100
    python benchmarks/benchmark_paged_decode.py --quick --plot
    python benchmarks/benchmark_paged_decode.py --tune          # launch-config / split sweep
    python benchmarks/benchmark_paged_decode.py --pdl-ab        # merge kernel with / without PDL
    python benchmarks/benchmark_paged_decode.py --host-stub     # Python-side cost, launches stubbed (CPU ok)
    python benchmarks/benchmark_paged_decode.py --flush-probe   # what do_bench's L2 flush costs small points
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # --host-stub on a CPU machine runs the launcher under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from miniattn import timing  # noqa: E402
from miniattn.layout import from_nhd  # noqa: E402
from miniattn.ops import decode as decode_mod  # noqa: E402
from miniattn.ops.decode import paged_decode_attention  # noqa: E402
from miniattn.ops.launch import DirectLaunch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_inputs import DTYPES, make_inputs  # noqa: E402
FP8 = torch.float8_e4m3fn


def ints(s):
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=ints, default=[1, 16, 64, 128])
    p.add_argument("--contexts", type=ints, default=[512, 4096, 16384, 32768])
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--layouts", default="NHD,HND,paged5d")
    p.add_argument("--kv-cache-dtypes", default="auto,fp8")
    p.add_argument("--peers", default="sdpa,flashinfer,flashinfer_tc,fa4", help="comma list of sdpa, flashinfer, flashinfer_tc, fa4")
    p.add_argument("--modes", default="graph,eager,host")
    p.add_argument("--all-modes-max-tokens", type=int, default=16 * 4096,
                   help="eager/host are timed only where batch x ctx <= this (they equal graph beyond)")
    p.add_argument("--quick", action="store_true", help="a small sweep: batch 1,16,64 x ctx 512,4096,16384, NHD")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--tune", action="store_true", help="sweep launch configs and split counts instead")
    p.add_argument("--pdl-ab", action="store_true",
                   help="split points with the merge kernel launched with and without PDL, alternating")
    p.add_argument("--host-stub", action="store_true", help="Python-side cost per call with the launches stubbed")
    p.add_argument("--flush-probe", action="store_true",
                   help="small points timed after do_bench's L2 flush with and without a clean read before")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_sizes, a.contexts = [1, 16, 64], [512, 4096, 16384]
        a.layouts = "NHD"
    a.layouts = [x for x in a.layouts.split(",") if x]
    a.kv_cache_dtypes = [x for x in a.kv_cache_dtypes.split(",") if x]
    a.peers = [x for x in a.peers.split(",") if x]
    a.modes = [x for x in a.modes.split(",") if x]
    return a


def kv_bytes(batch, ctx, a, elem):
    return batch * ctx * a.num_kv_heads * a.head_size * elem * 2


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def free():
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# the contenders: each yields (name, fn, bytes, info)
# ------------------------------------------------------------------------------------------------

def ours(inp, a):
    q, bt, sl = inp["query"], inp["block_tables"], inp["seq_lens"]
    for cdt in a.kv_cache_dtypes:
        if cdt == "auto":
            kn, vn, extra, elem = inp["k"], inp["v"], {}, inp["k"].element_size()
        else:
            ks = torch.tensor([0.25], device="cuda")
            vs = torch.tensor([0.5], device="cuda")
            kn, vn = (inp["k"] / ks).to(FP8), (inp["v"] / vs).to(FP8)
            extra, elem = dict(kv_cache_dtype="fp8", k_scale=ks, v_scale=vs), 1
        for lay in a.layouts:
            kc, vc = (kn, vn) if lay == "NHD" else from_nhd(lay, kn, vn)
            decode_mod._PLANS.clear()
            fn = lambda kc=kc, vc=vc, lay=lay, extra=extra: paged_decode_attention(  # noqa: E731
                q, kc, vc, bt, sl, kv_layout=lay, **extra)
            fn()
            plan = next(iter(decode_mod._PLANS.values()))
            # eager calls may fuse fewer pieces than a captured one launches (`EAGER_ONE_LAUNCH_ENABLED`)
            graph = plan.capture_plan or plan
            info = dict(splits=plan.splits, graph_splits=graph.splits, graph_merges=graph.merges,
                        block_n=plan.consts[1], warps=plan.warps, stages=plan.stages)
            name = f"miniattn:{lay}" + ("" if cdt == "auto" else ":fp8")
            yield name, fn, kv_bytes(q.shape[0], int(sl[0]), a, elem), info
            del kc, vc, fn
        del kn, vn
        free()


def peer_sdpa(inp, a):
    import torch.nn.functional as F

    q, bt = inp["query"], inp["block_tables"]
    batch, ctx = q.shape[0], int(inp["seq_lens"][0])
    dense = lambda c: c[bt.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()  # noqa: E731
    k, v = dense(inp["k"]), dense(inp["v"])  # [batch, kv_heads, ctx, head]
    q4 = q[:, :, None, :]
    fn = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
    fn()
    yield "torch_sdpa:contig", fn, kv_bytes(batch, ctx, a, k.element_size()), {}


def peer_flashinfer(inp, a, tensor_cores=False):
    import flashinfer

    q, bt = inp["query"], inp["block_tables"]
    batch, ctx = q.shape[0], int(inp["seq_lens"][0])
    max_blocks = bt.shape[1]
    indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * max_blocks
    indices = bt.flatten().contiguous()
    last = torch.full((batch,), ctx - (max_blocks - 1) * a.block_size, dtype=torch.int32, device="cuda")
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    for lay in [x for x in a.layouts if x in ("NHD", "HND")]:
        kc, vc = (inp["k"], inp["v"]) if lay == "NHD" else from_nhd(lay, inp["k"], inp["v"])
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, lay, use_tensor_cores=tensor_cores)
        w.plan(indptr, indices, last, a.num_q_heads, a.num_kv_heads, a.head_size, a.block_size,
               q_data_type=q.dtype, kv_data_type=kc.dtype)
        fn = lambda w=w, kc=kc, vc=vc: w.run(q, (kc, vc))  # noqa: E731
        fn()
        yield f"flashinfer{'_tc' if tensor_cores else ''}:{lay}", fn, kv_bytes(batch, ctx, a, kc.element_size()), {}


def peer_fa4(inp, a):
    from flash_attn.cute import flash_attn_varlen_func

    q, bt, sl = inp["query"], inp["block_tables"], inp["seq_lens"]
    batch = q.shape[0]
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    fn = lambda: flash_attn_varlen_func(q, inp["k"], inp["v"], cu_seqlens_q=cu_q, cu_seqlens_k=None,  # noqa: E731
                                        max_seqlen_q=1, seqused_k=sl, page_table=bt)
    fn()
    yield "fa4:NHD", fn, kv_bytes(batch, int(sl[0]), a, inp["k"].element_size()), {}


PEERS = {"sdpa": peer_sdpa, "flashinfer": peer_flashinfer,
         "flashinfer_tc": lambda inp, a: peer_flashinfer(inp, a, tensor_cores=True), "fa4": peer_fa4}


# ------------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------------

def time_one(fn, modes):
    res = {}
    for m in modes:
        try:
            res[m] = timing.time_modes(fn, [m])[m]
        except Exception as e:  # e.g. a peer that cannot be captured in a CUDA graph
            res[m] = float("nan")
            res[m + "_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return res


def run_sweep(a):
    ceiling = timing.read_bandwidth()
    copy = timing.copy_bandwidth()
    print(f"read ceiling {ceiling:.0f} GB/s, copy ceiling {copy:.0f} GB/s (same run)", flush=True)
    rows, skipped = [], {}
    t_start = time.time()
    for batch, ctx in itertools.product(a.batch_sizes, a.contexts):
        inp = make_inputs(batch, ctx, a)
        # the read ceiling at this point's size (bf16 KV bytes): small reads never reach the 1 GiB figure
        at_size = timing.read_bandwidth(kv_bytes(batch, ctx, a, inp["k"].element_size()))
        print(f"b={batch} ctx={ctx}: read ceiling at this size {at_size:.0f} GB/s", flush=True)
        modes = a.modes if batch * ctx <= a.all_modes_max_tokens else [m for m in a.modes if m == "graph"]
        gens = [ours(inp, a)] + [PEERS[p](inp, a) for p in a.peers if p not in skipped]
        names = ["miniattn"] + [p for p in a.peers if p not in skipped]
        for pname, gen in zip(names, gens):
            try:
                for name, fn, nbytes, info in gen:
                    t = time_one(fn, modes)
                    us = t.get("graph", t.get(modes[0]))
                    gb = timing.gbps(nbytes, us)
                    row = dict(batch=batch, ctx=ctx, impl=name, bytes=nbytes, gbps=gb, pct=100 * gb / ceiling,
                               read_ceiling_at_size=at_size, **t, **info)
                    rows.append(row)
                    print(f"  b={batch:<4} ctx={ctx:<6} {name:<22} " + " ".join(f"{m}={t[m]:8.1f}" for m in modes)
                          + f"  {gb:6.0f} GB/s {row['pct']:5.1f}% {info if info else ''}", flush=True)
                    del fn
            except Exception as e:  # a peer that does not import / run here: say so once, skip it after
                msg = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"  {pname}: skipped ({msg})", flush=True)
                if pname != "miniattn":
                    skipped[pname] = msg
                else:
                    raise
        del inp, gens
        free()
    print(f"sweep took {time.time() - t_start:.0f} s", flush=True)
    return rows, ceiling, copy, skipped


def best(rows, batch, ctx, pred):
    c = [r for r in rows if r["batch"] == batch and r["ctx"] == ctx and pred(r["impl"]) and r.get("graph") == r.get("graph")]
    return min(c, key=lambda r: r["graph"]) if c else None


def is_ours(name):
    return name.startswith("miniattn") and not name.endswith(":fp8")


def check_targets(rows, ceiling, a):
    """The issue-3 targets (graph-mode µs unless stated); each: (target, measured, bound, ok)."""
    out = []

    def add(name, val, bound, ok):
        out.append(dict(target=name, measured=val, bound=bound, ok=bool(ok)))

    nhd = lambda n: n == "miniattn:NHD"  # noqa: E731
    for r in rows:
        if nhd(r["impl"]) and r["batch"] >= 64 and r["ctx"] >= 4096:
            add(f"b{r['batch']}x{r['ctx']} >= 93% read ceiling", f"{r['gbps']:.0f} GB/s ({r['pct']:.1f}%)",
                f">= {0.93 * ceiling:.0f} GB/s", r["pct"] >= 93)
    o, s = best(rows, 16, 4096, nhd), best(rows, 16, 4096, lambda n: n == "torch_sdpa:contig")
    if o and s:
        add("b16x4096 <= torch SDPA contiguous", f"{o['graph']:.1f} us", f"<= {s['graph']:.1f} us", o["graph"] <= s["graph"])
    o = best(rows, 1, 16384, nhd)
    f = best(rows, 1, 16384, lambda n: n.startswith("flashinfer"))
    if o:
        bound = 0.8 * f["graph"] if f else 36.0
        add("b1x16384 <= 0.8x FlashInfer", f"{o['graph']:.1f} us", f"<= {bound:.1f} us" + ("" if f else " (peer file)"),
            o["graph"] <= bound)
    o = best(rows, 1, 512, nhd)
    if o:
        add("b1x512 graph <= 12 us", f"{o['graph']:.1f} us", "<= 12 us", o["graph"] <= 12.0)
    for r in rows:
        if r["impl"] == "miniattn:NHD:fp8" and r["batch"] >= 16 and r["ctx"] >= 4096:
            ref = best(rows, r["batch"], r["ctx"], nhd)
            if ref:
                add(f"b{r['batch']}x{r['ctx']} fp8 <= 0.6x bf16", f"{r['graph']:.1f} us",
                    f"<= {0.6 * ref['graph']:.1f} us", r["graph"] <= 0.6 * ref["graph"])
    for r in rows:
        if nhd(r["impl"]) and r["batch"] <= 16 and r["ctx"] <= 4096 and "host" in r:
            add(f"b{r['batch']}x{r['ctx']} host loop <= 15 us or kernel-bound", f"{r['host']:.1f} us",
                f"<= max(15, 1.05 x graph {r['graph']:.1f}) us", r["host"] <= max(15.0, r["graph"] * 1.05))
    # every point: our best layout (bf16) vs the fastest peer
    for batch, ctx in sorted({(r["batch"], r["ctx"]) for r in rows}):
        o = best(rows, batch, ctx, is_ours)
        p = best(rows, batch, ctx, lambda n: not n.startswith("miniattn"))
        if o and p:
            add(f"b{batch}x{ctx} <= fastest peer ({p['impl']})", f"{o['graph']:.1f} us ({o['impl']})",
                f"<= {p['graph']:.1f} us", o["graph"] <= p["graph"])
    return out


def summary_table(rows, modes):
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    points = sorted({(r["batch"], r["ctx"]) for r in rows})
    by = {(r["batch"], r["ctx"], r["impl"]): r for r in rows}
    table = []
    for b, c in points:
        line = {"batch": b, "ctx": c}
        for i in impls:
            r = by.get((b, c, i))
            if r:
                line[i] = "/".join(f"{r[m]:.1f}" for m in modes if m in r) + f" ({r['gbps']:.0f}, {r['pct']:.0f}%)"
        table.append(line)
    return timing.format_table(table, ["batch", "ctx"] + impls)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches), 8), squeeze=False)
    for j, b in enumerate(batches):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["ctx"], r["graph"], r["gbps"]) for r in rows if r["batch"] == b and r["impl"] == impl)
            if pts:
                style = "-o" if impl.startswith("miniattn") else "--x"
                axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
                axes[1][j].plot([p[0] for p in pts], [p[2] for p in pts], style, label=impl)
        axes[0][j].set(title=f"batch {b}", xscale="log", yscale="log", ylabel="µs (graph)")
        axes[1][j].set(xscale="log", xlabel="context", ylabel="GB/s of KV read")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ------------------------------------------------------------------------------------------------
# --tune: launch configurations and split counts, NHD, graph mode
# ------------------------------------------------------------------------------------------------

def _tune_experiments():
    """(batch, ctx, kv_cache_dtype, layout, launch config or None, num_splits or None, knobs).

    Launch configs are (BLOCK_N, warps, stages, programs per SM for the split heuristic); None: the
    heuristics'. knobs: `decode` module settings for the experiment ({"MIN_ROWS": 4}, ...), put
    back after it. Harness options (not module settings): "_table": "sequential" reads the blocks in
    allocation order instead of through the random table; "_skip_merge": True launches the main
    kernel alone at merge-kernel points (the output is then wrong: a probe of the merge's share).
    Each tuning round replaces this set with its question (the set here, s11r1: FP8 at b16 x 4096,
    the one FP8 point above 0.6 x bf16, against split counts 4 / 16, pipeline depths 4 / 6,
    two-warp and 16-token-step programs and the gather ahead, with b16 x 16384 and b64 x 4096 as
    controls; two alternating rounds);
    earlier rounds' sets are in git history and their results in results/paged_decode_tune_*.json
    (s6r1: evict-first key/value loads, no change, but Triton 3.6 had dropped the hint on the copies;
    s6r2: random against sequential tables; s6r3: the
    merge kernel's share at b1, 2.1-2.7 µs; s6r4: a two-level fused merge above 16 pieces, slower by
    1-3.6 µs, reverted; s6r5: the first step's block ids
    gathered before seq_len, adopted for 16-bit caches; s7r1: HND / NHD, 4 q rows,
    double-buffered steps with fewer splits: no gain; s7r2: the fused merge costs 1.3-2.4 µs at
    its points; s7r3: the fused merge's loads in one L2 round trip when one step holds every
    piece, -0.2 µs at b16 x 512 / 4096, adopted for 16-bit caches; s7r4: each step gathers the next
    step's block ids, -0.4 to -0.8 µs at split points, within 0.5% without splits; s7r5: that rule
    against the plain gather, two rounds; s8r1 / s8r2: paged5d keys, then values, read in memory
    order, and what zeroing the values in every step costs; b1 x 4096 at 8-64 fused pieces; s8r3 /
    s8r4: paged5d page order on / off, the register cap off, rows ending inside a step; s9r1: b16 x
    4096 with 1-2 pieces single-buffered, b1 x 16384 configs, FP8 NHD / HND / paged5d: no gain; s9r2:
    b16 x 4096 unsplit with double-buffered tiles as cuDNN's SDPA kernel runs it: equal, no gain;
    s9r3: block offsets by an inline-PTX mul.wide: Triton 3.6 then stops pipelining the copies, 3x slower;
    s9r4, written, not run: SWAP_AB / KV_SAME on and off, measured with benchmarks/ab_decode.py instead;
    s10r1: 16 / 32 fused pieces where the heuristic's split needs the merge kernel: one launch costs
    0-2.5 µs of GPU time and saves 4-8 µs of host, taken for eager calls, EAGER_ONE_LAUNCH_ENABLED;
    s10r2: b16 x 512 / 4096 with 2 pieces 5 deep or unsplit: b16 x 512 unsplit 5 deep 19.35 against
    19.8, 2 pieces slower everywhere; s10r3: short rows unsplit 3-5 deep: 5 deep wins at b16 x 512
    (19.45 vs 19.85) and b32 x 512 (29.2 vs 29.9) only, loses at b16 x 1024, b64 / b128 x 512; 2-4
    deep unsplit 25 µs at b16 x 512: not adopted, a two-point window)."""
    exps = []
    ahead = {"GATHER_AHEAD_ALWAYS": True}
    variants = {
        (16, 4096): [(None, None, {}), (None, 4, {}), (None, 16, {}), ((32, 1, 4, 8), None, {}),
                     ((32, 1, 6, 7), None, {}), ((32, 2, 5, 4), None, {}), ((16, 1, 5, 8), None, {}),
                     (None, None, ahead)],
        (16, 16384): [(None, None, {}), ((32, 1, 4, 8), None, {}), ((32, 2, 5, 4), None, {}), (None, None, ahead)],
        (64, 4096): [(None, None, {}), ((32, 1, 4, 8), None, {}), ((32, 2, 5, 4), None, {}), (None, None, ahead)],
    }
    for _ in range(2):  # two alternating rounds
        for (b, c), vs in variants.items():
            exps += [(b, c, "fp8", "NHD", cfg, ns, knobs) for cfg, ns, knobs in vs]
    return exps


def run_tune(a):
    ceiling = timing.read_bandwidth()
    print(f"read ceiling {ceiling:.0f} GB/s")
    real_cfg = decode_mod.decode_launch_config
    rows = []
    exps = sorted(_tune_experiments(), key=lambda e: (e[0], e[1]))
    for (batch, ctx), group in itertools.groupby(exps, key=lambda e: (e[0], e[1])):
        nbytes = kv_bytes(batch, ctx, a, 2)
        # the same bytes read by the faster of a `sum` and a Triton read: what this size allows
        sum_gbps = timing.read_bandwidth(nbytes)
        print(f"b={batch} ctx={ctx}: size-matched read {nbytes / sum_gbps / 1e3:.1f} us ({sum_gbps:.0f} GB/s)")
        rows.append(dict(batch=batch, ctx=ctx, cache="read", us=nbytes / sum_gbps / 1e3, gbps=sum_gbps))
        inp = make_inputs(batch, ctx, a)
        q, bt, sl = inp["query"], inp["block_tables"], inp["seq_lens"]
        s1 = torch.tensor([0.25], device="cuda")
        caches = {}
        ref = {}
        for _, _, cdt, lay, cfg, ns, knobs in group:
            if (cdt, lay) not in caches:
                k, v = (inp["k"], inp["v"]) if cdt == "auto" else ((inp["k"] / s1).to(FP8), (inp["v"] / s1).to(FP8))
                caches[(cdt, lay)] = (k, v) if lay == "NHD" else from_nhd(lay, k, v)
            k, v = caches[(cdt, lay)]
            extra = {} if cdt == "auto" else dict(kv_cache_dtype="fp8", k_scale=s1, v_scale=s1)
            elem = k.element_size()
            decode_mod.decode_launch_config = (lambda *x, cfg=cfg: cfg) if cfg else real_cfg
            settings = {name: val for name, val in knobs.items() if not name.startswith("_")}
            saved = {name: getattr(decode_mod, name) for name in settings}
            for name, val in settings.items():
                setattr(decode_mod, name, val)
            bt_used = bt
            if knobs.get("_table") == "sequential":
                bt_used = torch.arange(bt.numel(), dtype=torch.int32, device=bt.device).reshape(bt.shape)
            decode_mod._PLANS.clear()
            fn = lambda: paged_decode_attention(q, k, v, bt_used, sl, kv_layout=lay, num_splits=ns, **extra)  # noqa: E731
            try:
                o = fn().float()
                if knobs.get("_skip_merge"):
                    for p in decode_mod._PLANS.values():
                        for pp in (p, p.capture_plan):
                            if pp is not None:
                                pp.merges = False
                    fn()
                err = float((o - ref.setdefault((cdt, bt_used is bt), o)).abs().max())
                us = timing.time_graph(fn)
                host = timing.time_host_loop(fn) if batch * ctx <= 65536 else None
            except Exception as e:
                print(f"  b={batch} ctx={ctx} {cdt} {lay} cfg={cfg} splits={ns} {knobs}: {type(e).__name__} "
                      f"{str(e)[:160]}")
                continue
            finally:
                for name, val in saved.items():
                    setattr(decode_mod, name, val)
            plan = next(iter(decode_mod._PLANS.values()))
            decode_mod._PLANS.clear()
            gb = timing.gbps(kv_bytes(batch, ctx, a, elem), us)
            used = (plan.consts[1], plan.warps, plan.stages) if cfg is None else cfg
            graph = plan.capture_plan or plan  # what `us` ran; `host_us` ran `plan`
            rows.append(dict(batch=batch, ctx=ctx, cache=cdt, layout=lay, cfg=str(used), splits=graph.splits,
                             forced_splits=ns, v_widen=plan.consts[-1], merges=graph.merges,
                             eager_splits=plan.splits, eager_merges=plan.merges, knobs=knobs, us=us,
                             host_us=host, gbps=gb, pct=100 * gb / ceiling, max_diff_vs_first=err))
            eager = "" if graph is plan else f" (eager {plan.splits}, merge kernel={plan.merges:d})"
            print(f"  b={batch:<4} ctx={ctx:<6} {cdt:<5} {lay:<8} cfg={str(used):<13} splits={graph.splits:<3} "
                  f"widen={plan.consts[-1]} merge kernel={graph.merges:d}{eager} {knobs} {us:8.1f} us {gb:6.0f} GB/s "
                  f"{rows[-1]['pct']:5.1f}% host {'-' if host is None else f'{host:.1f}'} diff {err:.2e}", flush=True)
        decode_mod.decode_launch_config = real_cfg
        del inp, caches
        free()
    return rows, ceiling


# ------------------------------------------------------------------------------------------------
# --pdl-ab: the merge kernel with and without programmatic dependent launch, split points, graph mode
# ------------------------------------------------------------------------------------------------

PDL_POINTS = [(1, 512), (1, 4096), (1, 16384), (1, 32768), (16, 512), (16, 4096), (16, 16384)]


def run_pdl_ab(a, rounds=3):
    """Graph µs with PDL on and off, alternating per round at each point (on, off, on, off, ...), so
    drift hits both alike; the spread of each side's rounds is the noise to compare the gain with."""
    ceiling = timing.read_bandwidth()
    print(f"read ceiling {ceiling:.0f} GB/s")
    rows = []
    decode_mod.FUSED_MERGE_ENABLED = False  # PDL is the merge kernel's launch
    try:
        for batch, ctx in PDL_POINTS:
            inp = make_inputs(batch, ctx, a)
            q, k, v, bt, sl = inp["query"], inp["k"], inp["v"], inp["block_tables"], inp["seq_lens"]
            times = {True: [], False: []}
            for _ in range(rounds):
                for pdl in (True, False):
                    decode_mod.PDL_ENABLED = pdl
                    decode_mod._PLANS.clear()
                    fn = lambda: paged_decode_attention(q, k, v, bt, sl)  # noqa: E731
                    fn()
                    plan = next(iter(decode_mod._PLANS.values()))
                    assert plan.pdl == (pdl and plan.splits > 1), "PDL not available here"
                    times[pdl].append(timing.time_graph(fn))
            on, off = sorted(times[True]), sorted(times[False])
            row = dict(batch=batch, ctx=ctx, splits=plan.splits, pdl_us=on[len(on) // 2], no_pdl_us=off[len(off) // 2],
                       pdl_spread=on[-1] - on[0], no_pdl_spread=off[-1] - off[0])
            row["gain_us"] = row["no_pdl_us"] - row["pdl_us"]
            rows.append(row)
            print(f"  b={batch:<3} ctx={ctx:<6} splits={plan.splits:<3} PDL {row['pdl_us']:7.1f} us "
                  f"(spread {row['pdl_spread']:.1f})  no PDL {row['no_pdl_us']:7.1f} (spread {row['no_pdl_spread']:.1f})  "
                  f"gain {row['gain_us']:+.1f} us", flush=True)
            del inp
            free()
    finally:
        decode_mod.PDL_ENABLED = True
        decode_mod.FUSED_MERGE_ENABLED = True
        decode_mod._PLANS.clear()
    return rows, ceiling


# ------------------------------------------------------------------------------------------------
# --flush-probe: what do_bench's L2 flush leaves behind costs the small points
# ------------------------------------------------------------------------------------------------

FLUSH_POINTS = [(1, 512), (1, 4096), (1, 16384), (16, 512), (16, 4096), (64, 4096)]


def _events_after_flush(fn, clean: bool, reps: int = 40) -> float:
    """Median µs of one graph replay of `fn`, each rep after do_bench's kind of flush (a `zero_` of 256
    MB, which leaves L2 full of dirty lines); with `clean`, a `sum` over another 256 MB follows the
    flush, so the dirty lines are written back before the timed replay and L2 holds clean lines."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    other = torch.ones(128 << 20, dtype=torch.bfloat16, device="cuda")
    g = timing.capture_graph(fn)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(3):
        g.replay()
    for start, end in ev:
        flush.zero_()
        if clean:
            other.sum(dtype=torch.float32)
        start.record()
        g.replay()
        end.record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) * 1e3 for s, e in ev)
    del flush, other
    return ts[len(ts) // 2]


def _probe_row(rows, label, name, fn):
    """Time `fn` the three ways of `run_flush_probe`, append the row to `rows`, print it."""
    fn()
    row = dict(label, what=name, do_bench=timing.time_graph(fn), after_flush=_events_after_flush(fn, False),
               after_flush_and_clean_read=_events_after_flush(fn, True))
    row["dirty_writeback_us"] = row["after_flush"] - row["after_flush_and_clean_read"]
    rows.append(row)
    where = " ".join(f"{k}={v}" for k, v in label.items())
    print(f"  {where:<18} {name:<15} do_bench {row['do_bench']:7.1f}  after flush {row['after_flush']:7.1f}  "
          f"after flush + clean read {row['after_flush_and_clean_read']:7.1f} us", flush=True)


def run_flush_probe(a):
    """Graph µs of the decode (bf16, FP8) and of a `sum` over the same bytes, three ways: do_bench
    (the benchmarks' method), events after the same flush, events after the flush plus a clean read.
    The difference between the last two is what writing back the flush's dirty lines costs a point."""
    rows = []
    for batch, ctx in FLUSH_POINTS:
        inp = make_inputs(batch, ctx, a)
        q, k, v, bt, sl = inp["query"], inp["k"], inp["v"], inp["block_tables"], inp["seq_lens"]
        s1 = torch.tensor([0.25], device="cuda")
        k8, v8 = (k / s1).to(FP8), (v / s1).to(FP8)
        fns = {"bf16": lambda: paged_decode_attention(q, k, v, bt, sl),
               "fp8": lambda: paged_decode_attention(q, k8, v8, bt, sl, kv_cache_dtype="fp8", k_scale=s1, v_scale=s1),
               "sum_bf16_bytes": lambda: (k.sum(dtype=torch.float32), v.sum(dtype=torch.float32))}
        for name, fn in fns.items():
            _probe_row(rows, dict(batch=batch, ctx=ctx), name, fn)
        del inp, k8, v8
        free()
    # the cache write's 16384-token point (issue 2's 80% target), 8 kv heads x 128, random slots over
    # 65536 blocks, and a device copy of the same bytes
    from miniattn.ops.cache_write import reshape_and_cache_flash
    n, h, d = 16384, a.num_kv_heads, a.head_size
    kc = torch.empty(65536, 16, h, d, dtype=DTYPES[a.dtype], device="cuda")
    vc = torch.empty_like(kc)
    key, val = (torch.randn(n, h, d, dtype=kc.dtype, device="cuda") for _ in range(2))
    slots = torch.randperm(65536 * 16, device="cuda")[:n]
    src = torch.randn(2 * n * h * d, dtype=kc.dtype, device="cuda")
    dst = torch.empty_like(src)
    for name, fn in {"write_16384": lambda: reshape_and_cache_flash(key, val, kc, vc, slots),
                     "copy_same_bytes": lambda: dst.copy_(src)}.items():
        _probe_row(rows, dict(batch=n, ctx=0), name, fn)
    return rows


# ------------------------------------------------------------------------------------------------
# --host-stub: the Python side of one call, launches replaced by no-ops (runs on a CPU machine)
# ------------------------------------------------------------------------------------------------

def run_host_stub(a, calls=20000):
    """µs of Python per eager call on the hot path, with the compiled kernels' C launchers replaced by
    no-ops: everything `paged_decode_attention` does per call except Triton's own C launch and the
    CUDA driver (measure those on the GPU: `host` mode). Runs on a CPU machine (the first call, which
    builds the plan, goes through stubbed Launchers)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decode_mod._SM_COUNT[dev] = 132  # the H100's heuristic, so the split path is measured where it is used
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    real = decode_mod._DECODE, decode_mod._REDUCE
    noop = lambda *args: None  # noqa: E731

    def per_call(fn):
        for _ in range(500):
            fn()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls * 1e6

    rows = []
    try:
        torch._C._cuda_getCurrentRawStream = lambda index: 0
        decode_mod._DECODE = decode_mod._REDUCE = lambda *args, **kw: None
        for batch, ctx in itertools.product([1, 16], [512, 4096]):
            dt = DTYPES[a.dtype]
            mb = -(-ctx // a.block_size)
            k = torch.empty(batch * mb, a.block_size, a.num_kv_heads, a.head_size, dtype=dt, device=dev)
            bt = torch.arange(batch * mb, dtype=torch.int32, device=dev).reshape(batch, mb)
            sl = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            q = torch.empty(batch, a.num_q_heads, a.head_size, dtype=dt, device=dev)
            decode_mod._PLANS.clear()
            fn = lambda: paged_decode_attention(q, k, k, bt, sl)  # noqa: E731
            fn()
            plan = next(iter(decode_mod._PLANS.values()))
            plan.direct = plan.rdirect = DirectLaunch(noop, (), True, "stub")
            us = per_call(fn)
            launches = 1 + plan.merges
            rows.append(dict(batch=batch, ctx=ctx, splits=plan.splits, launches=launches, python_us=us))
            print(f"  b={batch:<3} ctx={ctx:<5} splits={plan.splits:<3} {launches} launch(es): {us:5.2f} us of Python "
                  f"per call (+ Triton's C launch and the driver per kernel)", flush=True)
    finally:
        decode_mod._DECODE, decode_mod._REDUCE = real
        if raw_stream is not None:
            torch._C._cuda_getCurrentRawStream = raw_stream
        decode_mod._PLANS.clear()
        decode_mod._SM_COUNT.pop(dev, None)
    return rows


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    dev = timing.device_tag()
    tag = f"_{a.tag}" if a.tag else ""
    config = {k: v for k, v in vars(a).items()}
    if a.host_stub:
        rows = run_host_stub(a)
        path = os.path.join(a.out_dir, f"paged_decode_host_stub{tag}.json")
        timing.write_json(path, config, rows)
        print(f"json: {path}")
        return
    if not timing.has_cuda():
        sys.exit("needs a CUDA device (use --host-stub on a CPU machine)")
    if a.pdl_ab:
        rows, ceiling = run_pdl_ab(a)
        path = os.path.join(a.out_dir, f"paged_decode_pdl_{dev}{tag}.json")
        timing.write_json(path, config, rows, {"read_ceiling_gbps": ceiling})
        print(timing.format_table(rows, list(rows[0])) + f"\njson: {path}")
        return
    if a.flush_probe:
        rows = run_flush_probe(a)
        path = os.path.join(a.out_dir, f"paged_decode_flush_probe_{dev}{tag}.json")
        timing.write_json(path, config, rows)
        print(timing.format_table(rows, list(rows[0])) + f"\njson: {path}")
        return
    if a.tune:
        rows, ceiling = run_tune(a)
        path = os.path.join(a.out_dir, f"paged_decode_tune_{dev}{tag}.json")
        timing.write_json(path, config, rows, {"read_ceiling_gbps": ceiling})
        print(f"json: {path}")
        return
    rows, ceiling, copy, skipped = run_sweep(a)
    modes = a.modes
    table = summary_table(rows, modes)
    targets = check_targets(rows, ceiling, a)
    ttable = timing.format_table(targets, ["target", "measured", "bound", "ok"])
    head = (f"# paged decode, {timing.env_info()['device']}\n\nq heads {a.num_q_heads}, kv heads {a.num_kv_heads}, "
            f"head {a.head_size}, block {a.block_size}, {a.dtype}; cells: {'/'.join(modes)} µs (GB/s, % of read "
            f"ceiling {ceiling:.0f} GB/s; copy {copy:.0f} GB/s). eager/host only where batch x ctx <= "
            f"{a.all_modes_max_tokens}.\n")
    if skipped:
        head += "\nPeers skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "\n"
    md = head + "\n" + table + "\n\n## Targets\n\n" + ttable + "\n"
    print("\n" + md)
    base = os.path.join(a.out_dir, f"paged_decode_{dev}{tag}")
    timing.write_json(base + ".json", config, rows, {"read_ceiling_gbps": ceiling, "copy_ceiling_gbps": copy,
                                                     "targets": targets, "skipped_peers": skipped})
    with open(base + ".md", "w") as f:
        f.write(md)
    print(f"json: {base}.json\ntable: {base}.md")
    if a.plot:
        plot(rows, base + ".png")


if __name__ == "__main__":
    main()
