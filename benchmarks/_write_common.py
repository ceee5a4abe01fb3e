"""What the two cache-write benchmarks share: flags, inputs, implementations, the sweep, output.

`benchmark_reshape_and_cache_flash.py` (NHD, HND) and `benchmark_reshape_and_cache.py` (paged5d)
differ only in their layouts, their defaults and the peers they can call.

Each run ends with a "Targets" table: the issue-2 targets its configuration covers (bf16, head 128,
block 16: % of copy at 16384 / 65536 tokens, 128 heads at >= 16384, FP8 against the same write into
caches in the model dtype, timed in FP8 runs as `triton:auto` rows, the host loop at <= 1024 tokens
(8 kv heads; or kernel-bound, within 1.05 x the graph time, as the decode benchmark's rule),
every token count against the fastest peer timed in the same run, paged5d against vLLM CUDA).

Each cell is timed three ways with `miniattn.timing` (the method of ../shared/peers-h100.md):
graph (one call replayed in a CUDA graph, cold L2), eager (a direct call, cold L2) and host (CUDA
events around back-to-back eager calls: what a Python loop pays). GB/s counts the bytes a perfect
kernel moves: key + value + slot_mapping read once, the cache rows written once. "% copy" divides
that by a large device-to-device copy measured in the same run; "% copy@size" by a copy of the same
number of bytes (which pays the same launch latency and cold-L2 effects at small sizes).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miniattn import timing  # noqa: E402
from miniattn.layout import allocate_kv_caches  # noqa: E402
from miniattn.ops import cache_write  # noqa: E402

DTYPES = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32,
          "float32": torch.float32}
MODES = {"cudagraph": ("graph",), "no_graph": ("eager",), "all": ("graph", "eager", "host")}
DEFAULT_TOKENS = [2**i for i in range(17)]  # 1 .. 65536
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: rows of an FP8 run that time the same write into caches in the model dtype (the FP8 target's reference)
AUTO_REF = "triton:auto"
FP8_TARGET_MIN_TOKENS = 4096

# Fastest peer per token count, graph-replayed µs, from ../shared/peers-h100.md (H100 80GB HBM3, bf16,
# head_size 128, block 16, random slots). Key: (layout, num_heads, kv_cache_dtype).
PEER_BEST_GRAPH_US = {
    ("NHD", 8, "auto"): {1: 5.6, 16: 5.8, 64: 6.0, 256: 6.7, 1024: 9.4, 4096: 19.4, 16384: 55.5, 65536: 200.5},
    ("HND", 8, "auto"): {1: 5.7, 16: 5.9, 64: 6.0, 256: 6.8, 1024: 9.4, 4096: 19.4, 16384: 55.5, 65536: 197.5},
    ("NHD", 8, "fp8"): {1: 5.8, 16: 6.0, 64: 6.2, 256: 6.9, 1024: 9.3, 4096: 19.6, 16384: 58.9, 65536: 208.0},
    ("HND", 8, "fp8"): {1: 5.7, 16: 5.9, 64: 6.0, 256: 6.8, 1024: 9.3, 4096: 19.8, 16384: 59.8, 65536: 211.4},
    ("NHD", 128, "auto"): {1: 6.0, 16: 6.8, 64: 8.9, 256: 18.4, 1024: 53.5, 4096: 191.6, 16384: 745.4, 65536: 2955.9},
    ("HND", 128, "auto"): {1: 5.9, 16: 6.7, 64: 9.0, 256: 18.4, 1024: 53.8, 4096: 199.0, 16384: 777.3, 65536: 3098.3},
    ("paged5d", 8, "auto"): {1: 7.5, 16: 7.4, 64: 8.5, 256: 21.4, 1024: 84.3, 4096: 291.6, 16384: 1112.1,
                             65536: 4398.7},
}


def parser(description: str, layouts: tuple[str, ...], default_num_heads: int, default_iters: int, flash: bool):
    """vLLM's flags (same names and defaults where they make sense) plus --layouts/--tokens/--out/--plot."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--num-heads", type=int, default=default_num_heads, help="num_kv_heads")
    p.add_argument("--head-size", type=int, default=128, choices=[64, 80, 96, 112, 120, 128, 192, 256])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=128 * 128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"], default="auto")
    p.add_argument("--iters", type=int, default=default_iters, help="calls in the host-loop timing")
    p.add_argument("--mode", choices=sorted(MODES), default="all",
                   help="cudagraph: graph replay only; no_graph: eager only; all: graph, eager and host loop")
    p.add_argument("--implementation", default="triton,torch,peers",
                   help="comma list of: triton, torch, " + ", ".join(peer_names(flash)) + "; 'peers' = every peer importable")
    p.add_argument("--layouts", default=",".join(layouts), help="comma list of " + ", ".join(layouts))
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="comma list of num_tokens")
    p.add_argument("--configs", default="",
                   help="tuning: comma list of HEADSxWARPS launch configs to time as extra 'triton[HxW]' rows")
    p.add_argument("--slots", choices=("random", "sequential"), default="random",
                   help="slot mapping: random over all slots (the default, as vLLM's script), or slots 0..n-1 "
                        "(a probe: what random destinations cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<name>.json)")
    p.add_argument("--plot", action="store_true", help="also draw latency and bandwidth vs tokens (PNG)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the copy-bandwidth measurements")
    return p


# ------------------------------------------------------------------------------------------ inputs

class Case:
    """Caches for one layout at the largest token count, and per-token-count input views."""

    def __init__(self, args, kv_layout: str, max_tokens: int):
        self.args, self.kv_layout = args, kv_layout
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = DTYPES[args.dtype]
        [(self.key_cache, self.value_cache)] = allocate_kv_caches(
            kv_layout, 1, args.num_blocks, args.block_size, args.num_heads, args.head_size, dtype,
            args.kv_cache_dtype, device=dev)
        g = torch.Generator(device=dev).manual_seed(args.seed)
        shape = (max_tokens, args.num_heads, args.head_size)
        self.key = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(dtype)
        self.value = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(dtype)
        self.fp8 = args.kv_cache_dtype != "auto"
        # vLLM's benchmark: per-tensor scales from the data's range
        self.k_scale = (self.key.abs().amax().float() / 64.0).reshape(1) if self.fp8 else None
        self.v_scale = (self.value.abs().amax().float() / 64.0).reshape(1) if self.fp8 else None
        self.num_slots = args.num_blocks * args.block_size
        self.device = dev
        self._gen = torch.Generator(device=dev).manual_seed(args.seed + 1)

    def inputs(self, n: int) -> dict:
        if n > self.num_slots:
            raise SystemExit(f"num_tokens {n} > num_slots {self.num_slots}: raise --num-blocks")
        if self.args.slots == "sequential":
            slots = torch.arange(n, device=self.device)
        else:
            slots = torch.randperm(self.num_slots, generator=self._gen, device=self.device)[:n].contiguous()
        return dict(key=self.key[:n], value=self.value[:n], key_cache=self.key_cache, value_cache=self.value_cache,
                    slot_mapping=slots, kv_cache_dtype=self.args.kv_cache_dtype, k_scale=self.k_scale,
                    v_scale=self.v_scale)

    def bytes_moved(self, n: int, cache_elem_size: int | None = None) -> int:
        """Bytes a perfect kernel moves: key/value/slot_mapping read, cache rows written (caches of
        `cache_elem_size` bytes per element if given, else this case's)."""
        a = self.args
        elems = 2 * n * a.num_heads * a.head_size
        return elems * self.key.element_size() + n * 8 + elems * (cache_elem_size or self.key_cache.element_size())


# ---------------------------------------------------------------------------------- implementations

def peer_names(flash: bool) -> list[str]:
    return ["vllm_cuda", "vllm_triton", "flashinfer"] if flash else ["vllm_cuda"]


def _ours(kv_layout):
    if kv_layout == "paged5d":
        return lambda i: cache_write.reshape_and_cache(**i)
    return lambda i: cache_write.reshape_and_cache_flash(**i, kv_layout=kv_layout)


def _torch(kv_layout):
    """Plain torch index_put through the NHD view, as the reference does, minus its -1 filter (a boolean
    index syncs the device and cannot be graph-captured; the benchmark's slots are all valid)."""
    from miniattn.layout import get_layout  # noqa: PLC0415
    from miniattn.ops.reference import fp8_quantize  # noqa: PLC0415

    lay = get_layout(kv_layout)

    def run(i):
        kc, vc = i["key_cache"], i["value_cache"]
        slots = i["slot_mapping"]
        bs = lay.value_to_nhd(vc).shape[1]
        blk, off = slots // bs, slots % bs
        k, v = i["key"], i["value"]
        if i["kv_cache_dtype"] != "auto":
            k, v = fp8_quantize(k, i["k_scale"], kc.dtype), fp8_quantize(v, i["v_scale"], vc.dtype)
        if lay.splits_key_dim:
            kc.permute(0, 3, 1, 2, 4)[blk, off] = k.reshape(k.shape[0], k.shape[1], -1, kc.shape[-1])
        else:
            lay.key_to_nhd(kc)[blk, off] = k
        lay.value_to_nhd(vc)[blk, off] = v
    return run


def _nhd_view(kv_layout, cache):
    """vLLM's flash kernels read (block, slot, head) strides off a [blocks, bs, heads, D] tensor."""
    return cache.transpose(1, 2) if kv_layout == "HND" else cache


def _vllm_cuda(kv_layout):
    from vllm import _custom_ops as ops  # noqa: PLC0415 - optional peer

    def run(i):
        ks = i["k_scale"] if i["k_scale"] is not None else _ONE[i["key"].device]
        vs = i["v_scale"] if i["v_scale"] is not None else _ONE[i["key"].device]
        kvd = "fp8" if i["kv_cache_dtype"] != "auto" else "auto"
        if kv_layout == "paged5d":
            ops.reshape_and_cache(i["key"], i["value"], i["key_cache"], i["value_cache"], i["slot_mapping"], kvd, ks, vs)
        else:
            ops.reshape_and_cache_flash(i["key"], i["value"], _nhd_view(kv_layout, i["key_cache"]),
                                        _nhd_view(kv_layout, i["value_cache"]), i["slot_mapping"], kvd, ks, vs)
    return run


def _vllm_triton(kv_layout):
    try:
        from vllm.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash as fn  # noqa: PLC0415
    except ImportError:
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash as fn  # noqa: PLC0415

    def run(i):
        ks = i["k_scale"] if i["k_scale"] is not None else _ONE[i["key"].device]
        vs = i["v_scale"] if i["v_scale"] is not None else _ONE[i["key"].device]
        kvd = "fp8" if i["kv_cache_dtype"] != "auto" else "auto"
        fn(i["key"], i["value"], _nhd_view(kv_layout, i["key_cache"]), _nhd_view(kv_layout, i["value_cache"]),
           i["slot_mapping"], kvd, ks, vs)
    return run


def _flashinfer(kv_layout):
    import flashinfer  # noqa: PLC0415 - optional peer

    prepared = {}

    def run(i):
        if i["kv_cache_dtype"] != "auto":  # seen on an H200: 5.2 TB/s for the FP8 byte count, above the memory's peak
            raise ValueError("FlashInfer's append takes no FP8 scales: not this operation")
        _, heads, head_size = i["key"].shape
        if heads * head_size // 8 > 1024:  # refused at launch, and the error would surface later, elsewhere
            raise ValueError(f"FlashInfer's append uses heads * head_size / 8 = {heads * head_size // 8} "
                             "threads per block (> 1024)")
        # every token is its own one-page "request": page = slot // bs, position = slot % bs
        slots = i["slot_mapping"]
        bs = i["key_cache"].shape[1 if kv_layout == "NHD" else 2]
        key = (slots.data_ptr(), slots.numel())
        if key not in prepared:
            n = slots.numel()
            ar = torch.arange(n + 1, dtype=torch.int32, device=slots.device)
            prepared.clear()
            prepared[key] = (ar[:n], (slots % bs).int(), (slots // bs).int(), ar, torch.ones_like(ar[:n]))
        batch, pos, pages, indptr, last = prepared[key]
        flashinfer.append_paged_kv_cache(i["key"], i["value"], batch, pos, (i["key_cache"], i["value_cache"]),
                                         pages, indptr, last, kv_layout=kv_layout)
    return run


class _OneScale(dict):
    def __missing__(self, device):
        self[device] = torch.ones(1, dtype=torch.float32, device=device)
        return self[device]


_ONE = _OneScale()
_FACTORIES = {"triton": _ours, "torch": _torch, "vllm_cuda": _vllm_cuda, "vllm_triton": _vllm_triton,
              "flashinfer": _flashinfer}


def resolve_implementations(spec: str, flash: bool) -> list[str]:
    names = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        names += peer_names(flash) if name == "peers" else [name]
    for name in names:
        if name not in _FACTORIES or (name not in ("triton", "torch") and name not in peer_names(flash)):
            raise SystemExit(f"unknown implementation {name!r}; choose from triton, torch, {', '.join(peer_names(flash))}")
    return list(dict.fromkeys(names))


def make_impl(name: str, kv_layout: str):
    """A callable(inputs) for `name`, or (None, reason) when the peer is not importable."""
    try:
        return _FACTORIES[name](kv_layout), None
    except Exception as e:  # peers are optional
        return None, f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------- sweep

def _time(fn, modes, iters):
    out = {}
    for m in modes:
        if m == "graph":
            out[m] = timing.time_graph(fn)
        elif m == "eager":
            out[m] = timing.time_eager(fn)
        else:
            out[m] = timing.time_host_loop(fn, calls=iters)
    return out


def _same_size_copy_us(nbytes: int) -> float:
    """Graph-replayed µs of the fastest device copy moving `nbytes` in total (half read, half written):
    torch's memcpy (which a graph may hand to a copy engine, ~2.7 TB/s on an H200) or the Triton copy."""
    if not timing.has_cuda():
        return float("nan")
    n = max(1, nbytes // 8)  # int32 elements each way
    src = torch.empty(n, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    us = min(timing.time_graph(lambda: dst.copy_(src)), timing.time_graph(lambda: timing.triton_copy(dst, src)))
    del src, dst
    return us


def measure_ceilings(nbytes: int = 1 << 30) -> dict:
    """Copy ceilings in GB/s (bytes read + written, `nbytes` each way): torch memcpy replayed in a
    graph and called eagerly, and a Triton copy kernel replayed in a graph. The ceiling used for
    "% copy" is the best of them (a graph-captured memcpy may run on a copy engine, slower than SMs)."""
    if not timing.has_cuda():
        return {"ceiling": float("nan")}
    out = {"memcpy_graph": timing.copy_bandwidth(nbytes, "graph"), "memcpy_eager": timing.copy_bandwidth(nbytes, "eager")}
    src = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
    dst = torch.empty_like(src)
    out["triton_copy_graph"] = 2 * nbytes / timing.time_graph(lambda: timing.triton_copy(dst, src)) / 1e3
    assert torch.equal(src, dst)
    del src, dst
    torch.cuda.empty_cache()
    out["ceiling"] = max(out.values())
    return out


def run(args, flash: bool, name: str) -> dict:
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    tokens = sorted({int(t) for t in args.tokens.split(",") if t.strip()})
    impls = resolve_implementations(args.implementation, flash)
    modes = MODES[args.mode]
    primary = modes[0]
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c.strip()]

    ceilings = {"ceiling": float("nan")} if args.no_ceiling else measure_ceilings()
    ceiling = ceilings["ceiling"]
    print(f"# {name}: heads={args.num_heads} head_size={args.head_size} block_size={args.block_size} "
          f"num_blocks={args.num_blocks} dtype={args.dtype} kv_cache_dtype={args.kv_cache_dtype} mode={args.mode}; "
          "copy ceilings (1 GiB each way) " + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()) + " GB/s",
          flush=True)
    copy_at = {}
    rows, skipped = [], {}
    for lay in layouts:
        case = Case(args, lay, max(tokens))
        runners = []
        for impl in impls:
            fn, why = make_impl(impl, lay)
            if fn is None:
                skipped[impl] = why
            else:
                runners.append((impl, fn, None))
        for cfg in configs:
            runners.append((f"triton[{cfg[0]}x{cfg[1]}]", _ours(lay), cfg))
        auto = None
        if case.fp8 and "triton" in impls:  # the FP8 target's reference: the same write into auto caches
            [auto] = allocate_kv_caches(lay, 1, args.num_blocks, args.block_size, args.num_heads, args.head_size,
                                        DTYPES[args.dtype], "auto", device=case.device)
            runners.append((AUTO_REF, _ours(lay), None))
        for n in tokens:
            inputs = case.inputs(n)
            nbytes = case.bytes_moved(n)
            if n not in copy_at and not args.no_ceiling:
                copy_at[n] = _same_size_copy_us(nbytes)
            for impl, fn, cfg in runners:
                inp, nb, at_size = inputs, nbytes, copy_at.get(n, float("nan"))
                if impl == AUTO_REF:
                    if n < FP8_TARGET_MIN_TOKENS:
                        continue
                    inp = dict(inputs, key_cache=auto[0], value_cache=auto[1], kv_cache_dtype="auto",
                               k_scale=None, v_scale=None)
                    nb, at_size = case.bytes_moved(n, auto[0].element_size()), float("nan")
                cache_write._CONFIG_OVERRIDE = cfg
                cache_write._PLANS.clear()
                try:
                    us = _time(lambda: fn(inp), modes, args.iters)
                    if impl.startswith("triton") and n == max(tokens):  # poisoned caches, one call, read back
                        for c in (inp["key_cache"], inp["value_cache"]):
                            c.view(torch.uint8).fill_(0xFF)
                        fn(inp)
                        _verify(lay, inp, impl)
                except Exception as e:  # a peer refusing a shape (FlashInfer at 128 heads) is a result too
                    skipped[f"{impl}@{lay}:{n}"] = f"{type(e).__name__}: {str(e)[:200]}"
                    continue
                finally:
                    cache_write._CONFIG_OVERRIDE = None
                    cache_write._PLANS.clear()
                bw = timing.gbps(nb, us[primary])
                peer = PEER_BEST_GRAPH_US.get((lay, args.num_heads, "fp8" if case.fp8 else "auto"), {}).get(n)
                same_cfg = args.head_size == 128 and args.block_size == 16 and args.dtype == "bfloat16"
                row = dict(num_tokens=n, layout=lay, impl=impl, bytes=nb, gbps=bw,
                           pct_copy=100 * bw / ceiling if ceiling == ceiling else float("nan"),
                           pct_copy_at_size=100 * at_size / us[primary],
                           peer_best_graph_us=peer if same_cfg and args.kv_cache_dtype in ("auto", "fp8")
                           and impl != AUTO_REF else None,
                           **{f"{m}_us": v for m, v in us.items()})
                rows.append(row)
                print(_row_line(row, modes), flush=True)
        del case, auto
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if skipped:
        print("# not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    return dict(rows=rows, ceiling_gbps=ceiling, ceilings=ceilings, copy_same_size_us=copy_at, skipped=skipped,
                modes=modes)


def check_targets(args, name: str, rows: list, modes) -> list[dict]:
    """Issue 2's targets that this run covers (bf16, head 128, block 16): each a dict of target,
    measured, bound and ok, from the first mode's µs (graph by default) and the host loop.

    Peers are the ones timed in the same run (the peer file's numbers are the H100's); the FP8
    target compares an FP8 run's rows with its `AUTO_REF` rows (the same slots into auto caches)."""
    out = []
    if not (args.head_size == 128 and args.block_size == 16 and args.dtype == "bfloat16"):
        return out
    t = f"{modes[0]}_us"

    def add(target, measured, bound, ok):
        out.append(dict(target=target, measured=measured, bound=bound, ok=bool(ok)))

    ours = [r for r in rows if r["impl"] == "triton"]
    by = {(r["layout"], r["num_tokens"], r["impl"]): r for r in rows}
    auto = args.kv_cache_dtype == "auto"
    for r in ours:
        lay, n = r["layout"], r["num_tokens"]
        where = f"{lay} {n} tokens"
        if auto and args.num_heads == 8 and lay != "paged5d" and n in (16384, 65536):
            need = 90.0 if n == 65536 else 80.0
            add(f"{where}: >= {need:.0f}% of copy", f"{r['pct_copy']:.1f}%", f">= {need:.0f}%", r["pct_copy"] >= need)
        if auto and args.num_heads == 128 and n >= 16384:
            add(f"{where}, 128 heads: >= 95% of copy", f"{r['pct_copy']:.1f}%", ">= 95%", r["pct_copy"] >= 95.0)
        ref = by.get((lay, n, AUTO_REF))
        if ref and n >= FP8_TARGET_MIN_TOKENS:
            add(f"{where}: {args.kv_cache_dtype} <= 0.9 x auto", f"{r[t]:.2f} us ({r[t] / ref[t]:.3f}x)",
                f"<= {0.9 * ref[t]:.2f} us", r[t] <= 0.9 * ref[t])
        if "host_us" in r and n <= 1024 and args.num_heads == 8:  # as decode's: or kernel-bound (1.05 x graph)
            bound = max(10.0, 1.05 * r["graph_us"]) if "graph_us" in r else 10.0
            add(f"{where}: host loop <= 10 us or kernel-bound", f"{r['host_us']:.1f} us", f"<= {bound:.1f} us",
                r["host_us"] <= bound)
        peers = [p for (pl, pn, pi), p in by.items() if pl == lay and pn == n and pi in _FACTORIES
                 and pi not in ("triton", "torch")]
        v = by.get((lay, n, "vllm_cuda"))
        if v and name == "reshape_and_cache":
            add(f"{where}: <= 0.5 x vLLM CUDA", f"{r[t]:.1f} us", f"<= {0.5 * v[t]:.1f} us", r[t] <= 0.5 * v[t])
        if peers:
            p = min(peers, key=lambda p: p[t])
            add(f"{where}: <= fastest peer ({p['impl']})", f"{r[t]:.1f} us", f"<= {p[t]:.1f} us", r[t] <= p[t])
    return out


def _verify(kv_layout, i, impl="triton"):
    """After the timings: the tokens of one call into poisoned caches, read back through the NHD view
    (FP8: quantised)."""
    from miniattn.layout import to_nhd  # noqa: PLC0415
    from miniattn.ops.reference import fp8_quantize  # noqa: PLC0415

    k_nhd, v_nhd = to_nhd(kv_layout, i["key_cache"], i["value_cache"])
    slots = i["slot_mapping"]
    bs = k_nhd.shape[1]
    k, v = i["key"], i["value"]
    if i["kv_cache_dtype"] != "auto":
        k, v = fp8_quantize(k, i["k_scale"], k_nhd.dtype), fp8_quantize(v, i["v_scale"], v_nhd.dtype)
    ok = torch.equal(k_nhd[slots // bs, slots % bs].view(torch.uint8), k.view(torch.uint8)) and torch.equal(
        v_nhd[slots // bs, slots % bs].view(torch.uint8), v.view(torch.uint8))
    print(f"# check {impl} {kv_layout} {len(slots)} tokens: cache rows {'equal' if ok else 'DIFFER from'} the inputs")
    if not ok:
        raise SystemExit(f"{impl} wrote wrong values")


def _row_line(r, modes):
    t = "/".join(f"{r[m + '_us']:.1f}" for m in modes)
    peer = f" | peer best {r['peer_best_graph_us']}" if r.get("peer_best_graph_us") else ""
    return (f"| {r['num_tokens']} | {r['layout']} | {r['impl']} | {t} | {r['gbps']:.0f} | {r['pct_copy']:.1f} | "
            f"{r['pct_copy_at_size']:.1f}{peer} |")


def report(args, result: dict, name: str, flash: bool) -> None:
    modes = result["modes"]
    rows = result["rows"]
    us_col = "µs " + "/".join(modes)
    table = [dict(r, **{us_col: "/".join(f"{r[m + '_us']:.1f}" for m in modes),
                        "peer_best_graph_us": r["peer_best_graph_us"] or "-"}) for r in rows]
    cols = ["num_tokens", "layout", "impl", us_col, "gbps", "pct_copy", "pct_copy_at_size", "peer_best_graph_us"]
    print()
    print(f"copy ceiling: {result['ceiling_gbps']:.0f} GB/s (best of {result['ceilings']}); "
          f"GB/s and % from {modes[0]} time")
    print(timing.format_table(table, cols, floatfmt="{:.1f}"))
    targets = check_targets(args, name, rows, modes)
    if targets:
        print("\n## Targets (issue 2; peers timed in this run)\n")
        print(timing.format_table(targets, ["target", "measured", "bound", "ok"]))
        print(f"{sum(x['ok'] for x in targets)} of {len(targets)} met")
    out = args.out or os.path.join(RESULTS, default_stem(args, name) + ".json")
    timing.write_json(out, config=vars(args), rows=rows,
                      extra=dict(ceiling_gbps=result["ceiling_gbps"], ceilings=result["ceilings"],
                                 copy_same_size_us=result["copy_same_size_us"], targets=targets,
                                 skipped=result["skipped"], peer_source="../shared/peers-h100.md"))
    print(f"wrote {out}")
    if args.plot:
        plot(rows, modes[0], out[:-5] + ".png", f"{name} heads={args.num_heads} {args.dtype} {args.kv_cache_dtype}",
             result["ceiling_gbps"])


def default_stem(args, name):
    dev = timing.device_tag()
    return f"{name}_{dev}_h{args.num_heads}_d{args.head_size}_bs{args.block_size}_{args.dtype}_{args.kv_cache_dtype}"


def plot(rows, mode, path, title, ceiling):
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (lay, impl) in dict.fromkeys((r["layout"], r["impl"]) for r in rows):
        rs = [r for r in rows if r["layout"] == lay and r["impl"] == impl]
        x = [r["num_tokens"] for r in rs]
        ax1.plot(x, [r[f"{mode}_us"] for r in rs], marker="o", ms=3, label=f"{impl} {lay}")
        ax2.plot(x, [r["gbps"] for r in rs], marker="o", ms=3, label=f"{impl} {lay}")
    if ceiling == ceiling:
        ax2.axhline(ceiling, color="k", ls="--", lw=0.8, label="copy ceiling")
    for ax, yl in ((ax1, f"µs ({mode})"), (ax2, "GB/s (read + written)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("num_tokens")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(description, name, layouts, flash, default_num_heads, default_iters, argv=None):
    args = parser(description, layouts, default_num_heads, default_iters, flash).parse_args(argv)
    for lay in [s.strip() for s in args.layouts.split(",") if s.strip()]:
        if lay not in layouts:
            raise SystemExit(f"--layouts: {lay!r} is not one of {layouts}")
    result = run(args, flash, name)
    report(args, result, name, flash)
    return result

