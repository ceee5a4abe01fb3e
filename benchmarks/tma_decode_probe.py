"""Probe: paged decode with each page's key / value tile fetched by one TMA copy (Hopper's tensor memory
accelerator), against `paged_decode_attention`'s per-token gathers.

The question (issue 3's misses at b16 x 4096 and FP8 b16 x 4096): the 16-bit kernel's 64-token step
still issues ~410 sm_90 instructions, most of them per-token addresses and 16-byte copies; a TMA copy
moves one page's [block_size, head_size] tile of one kv head with one instruction from one thread:
NHD's page holds it as block_size rows of 2 x 128 B strided by heads x head_size elements, HND's as
one contiguous run. So a 2-D descriptor over the cache fetches it: NHD as [blocks x block_size,
heads x head_size] at (block x block_size, head x head_size), HND as [blocks x heads x block_size,
head_size] at ((block x heads + head) x block_size, 0).

The probe kernel walks its split PAGES pages per step (one score dot and one value dot per page, one
online-softmax update per step), with the split, the fused merge (`decode._merge_pieces`, the same
arrival counter) and the partial layout of the real kernel, so its graph time compares with the real
call's. bf16 or FP8 caches (per-tensor scales), NHD / HND, a whole GQA group per program; TMA
coordinates are int32 (caches of < 2^31 rows). Not a library path: it measures whether one would pay.
Counted before timing (`sass_loops.py --tma`, benchmarks/README "Session 12"): with Triton 3.9 its step
issues 1.4-3x the gather kernel's instructions per token (the TMA tiles are read back with LDS, not
ldmatrix), so time it only where a Triton version compiles it better.

    python benchmarks/tma_decode_probe.py --points 16x4096,64x4096,16x16384 --out results/x.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_inputs import make_inputs  # noqa: E402

from miniattn import paged_decode_attention, paged_decode_attention_ref  # noqa: E402
from miniattn import timing  # noqa: E402
from miniattn.layout import from_nhd  # noqa: E402
from miniattn.ops import decode as decode_mod  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _page(k_desc, v_desc, bt_row_ptr, pg, n_pages, kvh, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
          HEAD: tl.constexpr, HND: tl.constexpr):
    """Key and value tiles [BLOCK_SIZE, HEAD] of page `pg` of the row (block 0 past the row's pages)."""
    blk = tl.load(bt_row_ptr + pg, mask=pg < n_pages, other=0)
    if HND:
        r = (blk * NUM_KV_HEADS + kvh) * BLOCK_SIZE
        c = 0
    else:
        r = blk * BLOCK_SIZE
        c = kvh * HEAD
    return k_desc.load([r, c]), v_desc.load([r, c])


@triton.jit
def _scores(q, k, pg, end, scale, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr):
    """q k^T of one page in log2 units, [ROWS, BLOCK_SIZE]; MASKED: slots at or past `end` get -inf."""
    s = decode_mod._dot(q, tl.trans(k.to(q.dtype)), DOT_F32, False) * scale
    if MASKED:
        t = pg * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        s = tl.where((t < end)[None, :], s, float("-inf"))
    return s


@triton.jit
def _pv(e, v, pg, end, acc, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, V_WIDEN: tl.constexpr,
        DOT_F32: tl.constexpr):
    """acc + e v for one page. MASKED: slots past `end` may hold anything (p = 0 times NaN is NaN), so
    their values are zeroed first."""
    if V_WIDEN:
        v = decode_mod._widen_fp8_pinned(v, V_WIDEN == 2)
    else:
        v = v.to(e.dtype)
    if MASKED:
        t = pg * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        v = tl.where((t < end)[:, None], v, 0.0)
    if DOT_F32:
        return tl.dot(e.to(tl.float32), v.to(tl.float32), acc)
    return tl.dot(e, v, acc)


@triton.jit
def _step(q, m_i, l_i, acc, k_desc, v_desc, bt_row, pg, p1, end, kvh, scale, NUM_KV_HEADS: tl.constexpr,
          BLOCK_SIZE: tl.constexpr, HEAD: tl.constexpr, HND: tl.constexpr, PAGES: tl.constexpr,
          MASKED: tl.constexpr, V_WIDEN: tl.constexpr, DOT_F32: tl.constexpr):
    """The pages pg .. pg + PAGES folded into the online softmax (PAGES 1, 2 or 4: a score dot and a
    value dot per page, one max / rescale per step)."""
    k0, v0 = _page(k_desc, v_desc, bt_row, pg, p1, kvh, NUM_KV_HEADS, BLOCK_SIZE, HEAD, HND)
    s0 = _scores(q, k0, pg, end, scale, BLOCK_SIZE, MASKED, DOT_F32)
    if PAGES == 1:
        m_new = tl.maximum(m_i, tl.max(s0, 1))
        a = tl.exp2(m_i - m_new)
        e0 = tl.exp2(s0 - m_new[:, None])
        l_i = l_i * a + tl.sum(e0, 1)
        acc = _pv(e0.to(q.dtype), v0, pg, end, acc * a[:, None], BLOCK_SIZE, MASKED, V_WIDEN, DOT_F32)
    elif PAGES == 2:
        k1, v1 = _page(k_desc, v_desc, bt_row, pg + 1, p1, kvh, NUM_KV_HEADS, BLOCK_SIZE, HEAD, HND)
        s1 = _scores(q, k1, pg + 1, end, scale, BLOCK_SIZE, MASKED, DOT_F32)
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
        a = tl.exp2(m_i - m_new)
        e0 = tl.exp2(s0 - m_new[:, None])
        e1 = tl.exp2(s1 - m_new[:, None])
        l_i = l_i * a + tl.sum(e0, 1) + tl.sum(e1, 1)
        acc = _pv(e0.to(q.dtype), v0, pg, end, acc * a[:, None], BLOCK_SIZE, MASKED, V_WIDEN, DOT_F32)
        acc = _pv(e1.to(q.dtype), v1, pg + 1, end, acc, BLOCK_SIZE, MASKED, V_WIDEN, DOT_F32)
    else:
        tl.static_assert(PAGES == 4)
        k1, v1 = _page(k_desc, v_desc, bt_row, pg + 1, p1, kvh, NUM_KV_HEADS, BLOCK_SIZE, HEAD, HND)
        k2, v2 = _page(k_desc, v_desc, bt_row, pg + 2, p1, kvh, NUM_KV_HEADS, BLOCK_SIZE, HEAD, HND)
        k3, v3 = _page(k_desc, v_desc, bt_row, pg + 3, p1, kvh, NUM_KV_HEADS, BLOCK_SIZE, HEAD, HND)
        s1 = _scores(q, k1, pg + 1, end, scale, BLOCK_SIZE, MASKED, DOT_F32)
        s2 = _scores(q, k2, pg + 2, end, scale, BLOCK_SIZE, MASKED, DOT_F32)
        s3 = _scores(q, k3, pg + 3, end, scale, BLOCK_SIZE, MASKED, DOT_F32)
        m_new = tl.maximum(tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1))),
                           tl.maximum(tl.max(s2, 1), tl.max(s3, 1)))
        a = tl.exp2(m_i - m_new)
        e0 = tl.exp2(s0 - m_new[:, None])
        e1 = tl.exp2(s1 - m_new[:, None])
        e2 = tl.exp2(s2 - m_new[:, None])
        e3 = tl.exp2(s3 - m_new[:, None])
        l_i = l_i * a + tl.sum(e0, 1) + tl.sum(e1, 1) + tl.sum(e2, 1) + tl.sum(e3, 1)
        acc = _pv(e0.to(q.dtype), v0, pg, end, acc * a[:, None], BLOCK_SIZE, MASKED, V_WIDEN, DOT_F32)
        acc = _pv(e1.to(q.dtype), v1, pg + 1, end, acc, BLOCK_SIZE, MASKED, V_WIDEN, DOT_F32)
        acc = _pv(e2.to(q.dtype), v2, pg + 2, end, acc, BLOCK_SIZE, MASKED, V_WIDEN, DOT_F32)
        acc = _pv(e3.to(q.dtype), v3, pg + 3, end, acc, BLOCK_SIZE, MASKED, V_WIDEN, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _tma_decode_kernel(q_ptr, k_desc, v_desc, bt_ptr, sl_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
                       arrivals_ptr, v_scale_ptr, bt_stride_b, num_q_heads, qk_scale,
                       NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD: tl.constexpr,
                       GROUP: tl.constexpr, ROWS: tl.constexpr, NUM_SPLITS: tl.constexpr, PAGES: tl.constexpr,
                       STAGES: tl.constexpr, HND: tl.constexpr, FP8: tl.constexpr, V_WIDEN: tl.constexpr,
                       DOT_F32: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_CHUNK: tl.constexpr,
                       SPLITS_PAD: tl.constexpr):
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP
    qh = kvh * GROUP + rows
    d = tl.arange(0, HEAD)
    seq_len = tl.load(sl_ptr + b)
    n_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    split_pages = tl.cdiv(tl.cdiv(n_pages, NUM_SPLITS), PAGES) * PAGES
    p0 = split * split_pages
    p1 = tl.minimum(p0 + split_pages, n_pages)
    start = p0 * BLOCK_SIZE
    end = tl.minimum(p1 * BLOCK_SIZE, seq_len)
    q = tl.load(q_ptr + (b.to(tl.int64) * num_q_heads + qh[:, None]) * HEAD + d[None, :], mask=row_ok[:, None],
                other=0.0)
    if FP8:  # fp16 dots (FP8 widens to fp16), as in the real kernel
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    bt_row = bt_ptr + b.to(tl.int64) * bt_stride_b
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD], dtype=tl.float32)
    # full steps (every slot < end) unmasked; the rest (at most one step) masked
    full = p0 + tl.maximum(tl.minimum(p1, seq_len // BLOCK_SIZE) - p0, 0) // PAGES * PAGES
    for pg in tl.range(p0, full, PAGES, num_stages=STAGES):
        m_i, l_i, acc = _step(q, m_i, l_i, acc, k_desc, v_desc, bt_row, pg, p1, end, kvh, qk_scale, NUM_KV_HEADS,
                              BLOCK_SIZE, HEAD, HND, PAGES, False, V_WIDEN, DOT_F32)
    if full < p1:
        m_i, l_i, acc = _step(q, m_i, l_i, acc, k_desc, v_desc, bt_row, full, p1, end, kvh, qk_scale, NUM_KV_HEADS,
                              BLOCK_SIZE, HEAD, HND, PAGES, True, V_WIDEN, DOT_F32)
    if NUM_SPLITS == 1:
        inv = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
        if FP8:
            inv = inv * tl.load(v_scale_ptr)
        tl.store(out_ptr + (b.to(tl.int64) * num_q_heads + qh[:, None]) * HEAD + d[None, :],
                 (acc * inv[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part_row = (b.to(tl.int64) * num_q_heads + qh) * NUM_SPLITS + split
        wrote = rows < tl.where(start < end, GROUP, 0)
        tl.store(part_acc_ptr + part_row[:, None] * HEAD + d[None, :], acc, mask=wrote[:, None])
        tl.store(part_max_ptr + part_row, m_i, mask=wrote)
        tl.store(part_sum_ptr + part_row, l_i, mask=wrote)
        tl.debug_barrier()
        arrivals = arrivals_ptr + b.to(tl.int64) * NUM_KV_HEADS + kvh
        if tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            tl.store(arrivals, 0)
            decode_mod._merge_pieces(part_acc_ptr, part_max_ptr, part_sum_ptr, v_scale_ptr, out_ptr, b, kvh, 0,
                                     seq_len, split_pages * BLOCK_SIZE, num_q_heads, num_q_heads * HEAD, HEAD, 1,
                                     HEAD, HEAD, GROUP, NUM_SPLITS, SPLITS_PAD, MERGE_ROWS, MERGE_CHUNK, FP8,
                                     False)


def _descriptors(k, v, layout, block_size, head):
    """2-D TMA descriptors over the caches whose [block_size, head] box is one page of one kv head."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    for c in (k, v):
        if layout == "HND":  # [blocks, heads, bs, d]
            rows, cols = c.shape[0] * c.shape[1] * c.shape[2], c.shape[3]
        else:  # NHD [blocks, bs, heads, d]
            rows, cols = c.shape[0] * c.shape[1], c.shape[2] * c.shape[3]
        out.append(TensorDescriptor(c, [rows, cols], [cols, 1], [block_size, head]))
    return out


class TmaDecode:
    """One configuration of the probe kernel with its scratch, callable like the real op. FP8 caches
    (float8 tensors) take per-tensor float scales."""

    def __init__(self, q, k, v, bt, sl, layout, num_splits, pages, stages, warps, k_scale=1.0, v_scale=1.0):
        batch, num_q_heads, head = q.shape
        num_kv_heads = k.shape[1] if layout == "HND" else k.shape[2]
        block_size = k.shape[2] if layout == "HND" else k.shape[1]
        group = num_q_heads // num_kv_heads
        fp8 = k.element_size() == 1
        self.args = (q, *_descriptors(k, v, layout, block_size, head), bt, sl)
        self.out = torch.empty_like(q)
        n = max(num_splits, 1)
        dev = q.device
        self.part_acc = torch.empty(batch, num_q_heads, n, head, dtype=torch.float32, device=dev)
        self.part_max = torch.empty(batch, num_q_heads, n, dtype=torch.float32, device=dev)
        self.part_sum = torch.empty(batch, num_q_heads, n, dtype=torch.float32, device=dev)
        self.arrivals = torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=dev)
        self.v_scale = torch.tensor([v_scale if fp8 else 1.0], dtype=torch.float32, device=dev)
        rows = max(16, triton.next_power_of_2(group))
        merge_rows, chunk, pad = decode_mod._merge_shape(group, rows, head, n, warps)
        scale = head ** -0.5 * _LOG2E * (k_scale if fp8 else 1.0)
        self.ints = (bt.stride(0), num_q_heads, scale)
        e5m2 = k.dtype == torch.float8_e5m2
        v_widen = decode_mod._v_widen(dev, "fp8_e5m2" if e5m2 else "fp8") if fp8 else 0
        dot_f32 = dev.type != "cuda" and q.dtype == torch.bfloat16  # the interpreter's bf16 dots
        self.consts = dict(NUM_KV_HEADS=num_kv_heads, BLOCK_SIZE=block_size, HEAD=head, GROUP=group, ROWS=rows,
                           NUM_SPLITS=n, PAGES=pages, STAGES=stages, HND=layout == "HND", FP8=fp8, V_WIDEN=v_widen,
                           DOT_F32=dot_f32, MERGE_ROWS=merge_rows, MERGE_CHUNK=chunk, SPLITS_PAD=pad,
                           num_warps=warps)
        self.grid = (n, num_kv_heads, batch)

    def __call__(self):
        q, kd, vd, bt, sl = self.args
        _tma_decode_kernel[self.grid](q, kd, vd, bt, sl, self.out, self.part_acc, self.part_max, self.part_sum,
                                      self.arrivals, self.v_scale, *self.ints, **self.consts)
        return self.out


class _A:  # the decode benchmark's defaults
    dtype, block_size, num_q_heads, num_kv_heads, head_size = "bf16", 16, 32, 8, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="16x4096,64x4096,16x16384,16x512", help="BATCHxCTX, comma separated")
    ap.add_argument("--layouts", default="NHD,HND")
    ap.add_argument("--caches", default="auto,fp8", help="auto (bf16) and / or fp8 (e4m3, scale 0.25)")
    ap.add_argument("--configs", default="1x4x1,2x4x1,2x5x1,4x3x1", help="PAGESxSTAGESxWARPS, comma separated")
    ap.add_argument("--splits", default="", help="forced split counts (comma separated); default: the real op's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",") if c]
    rows = []
    ceiling = timing.read_bandwidth()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"read ceiling {ceiling:.0f} GB/s", flush=True)
    s1 = torch.tensor([0.25], device="cuda")
    for point in a.points.split(","):
        batch, ctx = (int(x) for x in point.split("x"))
        inp = make_inputs(batch, ctx, _A)
        q, bt, sl = inp["query"], inp["block_tables"], inp["seq_lens"]
        for cache in a.caches.split(","):
            fp8 = cache == "fp8"
            k, v = ((inp["k"] / s1).to(torch.float8_e4m3fn), (inp["v"] / s1).to(torch.float8_e4m3fn)) if fp8 \
                else (inp["k"], inp["v"])
            extra = dict(kv_cache_dtype="fp8", k_scale=s1, v_scale=s1) if fp8 else {}
            nbytes = batch * ctx * _A.num_kv_heads * _A.head_size * 2 * k.element_size()
            for layout in a.layouts.split(","):
                kl, vl = (k, v) if layout == "NHD" else from_nhd(layout, k, v)
                ref = paged_decode_attention_ref(q, kl, vl, bt, sl, kv_layout=layout, **extra)
                real = lambda: paged_decode_attention(q, kl, vl, bt, sl, kv_layout=layout, **extra)  # noqa: E731
                real()
                plan = next(iter(decode_mod._PLANS.values()))
                plan = plan.capture_plan or plan
                cands = [("miniattn", None, plan.splits, real)]
                for cfg in configs:
                    for ns in [int(x) for x in a.splits.split(",") if x] or [plan.splits]:
                        try:
                            run = TmaDecode(q, kl, vl, bt, sl, layout, ns, *cfg, k_scale=0.25, v_scale=0.25)
                            err = float((run().double() - ref).abs().max() / ref.abs().max())
                        except Exception as e:  # a config that does not compile or run here
                            print(f"  {point} {cache} {layout} tma {cfg} x{ns}: {type(e).__name__}: {str(e)[:300]}",
                                  flush=True)
                            continue
                        cands.append((f"tma p{cfg[0]} s{cfg[1]} w{cfg[2]}", err, ns, run))
                for rnd in range(a.rounds):  # alternating, so that drift hits every candidate alike
                    for name, err, ns, fn in cands:
                        us = timing.time_graph(fn)
                        gb = timing.gbps(nbytes, us)
                        rows.append(dict(batch=batch, ctx=ctx, cache=cache, layout=layout, impl=name, splits=ns,
                                         round=rnd, us=us, gbps=gb, pct=100 * gb / ceiling, rel_err=err))
                        e = "" if err is None else f" rel.err {err:.1e}"
                        print(f"  b{batch:<3} x {ctx:<6} {cache:<4} {layout} {name:<18} x{ns:<3} {us:8.1f} us "
                              f"{gb:6.0f} GB/s {rows[-1]['pct']:5.1f}%{e}", flush=True)
                decode_mod._PLANS.clear()
        del inp
        torch.cuda.empty_cache()
    if a.out:
        timing.write_json(a.out, vars(a), rows, {"read_ceiling_gbps": ceiling})
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
