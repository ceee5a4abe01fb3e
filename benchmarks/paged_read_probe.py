"""Probe: how fast can a kernel read the decode's paged keys and values at all, with no attention?

The question (issue 3's misses at b16 x 4096, b1 x 16384 and FP8 b16 x 4096): how much of the op's
time is the bytes through a random block table, with the op's program shape and timing, and how
much is the attention around them? The probe kernel has the op's grid (split pieces x kv heads x
rows; `--shapes` for others), walks its piece in the op's steps (BLOCK_N tokens), gathers the next
step's block ids a step ahead, loads each step's key and value tiles [BLOCK_N, head_size] of its kv
head from the NHD caches and adds them up; one float per program comes out, no merge. Loads come in
three disciplines (`--modes`, `MODES`): one step in flight, the next step's tiles prefetched into
registers, or cp.async copies into shared memory as the op's. Next to it, in the same run and rounds:
the op itself, the probe over a table that lists the same blocks in allocation order, a plain Triton
streaming read of the same number of bytes (`timing.triton_read`), and torch SDPA on a contiguous
cache (16-bit only). All graph-replayed, do_bench medians (cold L2 after its flush).

    python benchmarks/paged_read_probe.py --points 16x4096,64x4096,1x16384 --out results/x.json
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_inputs import make_inputs  # noqa: E402

from miniattn import paged_decode_attention  # noqa: E402
from miniattn import timing  # noqa: E402
from miniattn.ops import decode as decode_mod  # noqa: E402
from miniattn.ops.launch import interpreting  # noqa: E402

_A = SimpleNamespace(dtype="bf16", block_size=16, num_q_heads=32, num_kv_heads=8, head_size=128)


@triton.jit
def _tiles(k_ptr, v_ptr, blk, blk_stride, slot, d):
    off = blk.to(tl.int64) * blk_stride + slot
    return tl.load(k_ptr + off[:, None] + d[None, :]), tl.load(v_ptr + off[:, None] + d[None, :])


@triton.jit
def _paged_read_kernel(k_ptr, v_ptr, table_ptr, out_ptr, piece_len, table_stride, blk_stride, tok_stride,
                       head_stride, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
                       MODE: tl.constexpr, ONE_BYTE: tl.constexpr, DOT_F32: tl.constexpr):
    """out[row, head, piece] = sum of the piece's key and value elements (as float32). The piece is
    tokens [piece x piece_len, (piece + 1) x piece_len) of the row, piece_len a multiple of BLOCK_N and
    BLOCK_N of BLOCK_SIZE, so every step covers whole blocks and needs no mask. MODE 0: each step's
    tiles are loaded and added (one step in flight); 1: the next step's tiles are loaded into
    registers before this step's are added (two in flight); 2: the tiles feed a dot with a one-hot
    row (what makes Triton pipeline them as cp.async copies into shared memory, num_stages deep)."""
    piece, head, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = piece * piece_len + tl.arange(0, BLOCK_N)
    end = (piece + 1) * piece_len
    tbl = table_ptr + row.to(tl.int64) * table_stride
    slot = (t % BLOCK_SIZE) * tok_stride + head * head_stride  # the same every step: steps cover whole blocks
    d = tl.arange(0, HEAD)
    blk = tl.load(tbl + t // BLOCK_SIZE)
    if MODE == 2:
        acc = tl.zeros([16, HEAD], tl.float32)
        # [16, BLOCK_N], ones in row 0: e @ tile is the tile's column sums in row 0, zeros elsewhere
        one_hot = (tl.arange(0, 16)[:, None] == 0) & (tl.arange(0, BLOCK_N)[None, :] >= 0)
    else:
        acc = tl.zeros([BLOCK_N, HEAD], tl.float32)
    if MODE == 1:
        k, v = _tiles(k_ptr, v_ptr, blk, blk_stride, slot, d)
    for s in range(0, piece_len, BLOCK_N):
        t += BLOCK_N
        nxt = tl.load(tbl + t // BLOCK_SIZE, mask=t < end, other=0)  # ahead
        if MODE == 1:
            k_next, v_next = _tiles(k_ptr, v_ptr, nxt, blk_stride, slot, d)
            acc += k.to(tl.float32) + v.to(tl.float32)
            k, v = k_next, v_next
        elif MODE == 2:
            k, v = _tiles(k_ptr, v_ptr, blk, blk_stride, slot, d)
            if DOT_F32:  # the interpreter's tl.dot multiplies bf16 as raw bits
                k, v = k.to(tl.float32), v.to(tl.float32)
            elif ONE_BYTE:
                k, v = k.to(tl.bfloat16), v.to(tl.bfloat16)
            e = one_hot.to(k.dtype)
            acc = tl.dot(e, k, acc)
            acc = tl.dot(e, v, acc)
        else:
            k, v = _tiles(k_ptr, v_ptr, blk, blk_stride, slot, d)
            acc += k.to(tl.float32) + v.to(tl.float32)
        blk = nxt
    n_pieces = tl.num_programs(0)
    tl.store(out_ptr + (row * tl.num_programs(1) + head) * n_pieces + piece, tl.sum(tl.sum(acc, 1), 0))


#: the probe's load disciplines, by name (MODE of the kernel)
MODES = {"plain": 0, "prefetch": 1, "cp.async": 2}


def paged_read(k, v, table, ctx, pieces, block_n, warps=4, stages=2, mode="plain", out=None):
    """Launch the probe over NHD caches `k`, `v` [blocks, block_size, heads, head] (1-byte caches as
    uint8), `table` [batch, max_blocks] int32, every row `ctx` tokens, loads as `mode` (MODES);
    returns out [batch, heads, pieces]."""
    batch, (bs, heads, head) = table.shape[0], k.shape[1:]
    piece_len = ctx // pieces
    if ctx % pieces or piece_len % block_n or block_n % bs:
        raise ValueError(f"ctx {ctx} must split into {pieces} pieces of whole {block_n}-token steps of "
                         f"whole {bs}-token blocks")
    out = torch.empty(batch, heads, pieces, dtype=torch.float32, device=k.device) if out is None else out
    _paged_read_kernel[(pieces, heads, batch)](
        k, v, table, out, piece_len, table.stride(0), k.stride(0), k.stride(1), k.stride(2),
        BLOCK_SIZE=bs, BLOCK_N=block_n, HEAD=head, MODE=MODES[mode], ONE_BYTE=k.element_size() == 1,
        DOT_F32=interpreting(),
        num_warps=warps, num_stages=stages)
    return out


def paged_read_ref(k, v, table, ctx, pieces):
    """The probe's sums in float64."""
    batch, (bs, heads, head) = table.shape[0], k.shape[1:]
    rows = []
    for b in range(batch):
        t = torch.arange(ctx, device=k.device)
        blk = table[b].long()[t // bs]
        kv = k[blk, t % bs].double() + v[blk, t % bs].double()  # [ctx, heads, head]
        rows.append(kv.reshape(pieces, ctx // pieces, heads, head).sum((1, 3)).T)
    return torch.stack(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="16x4096,64x4096,1x16384,16x512", help="BATCHxCTX, comma separated")
    ap.add_argument("--caches", default="auto,fp8", help="auto (bf16) and / or fp8 (e4m3, scale 0.25)")
    ap.add_argument("--stages", default="2,3", help="the probe's num_stages values with the op's shape")
    ap.add_argument("--shapes", default="", help="more probe shapes PIECESxBLOCK_NxWARPSxSTAGES, comma separated "
                    "(random table only)")
    ap.add_argument("--modes", default="plain,prefetch,cp.async", help=f"load disciplines: {', '.join(MODES)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    if not timing.has_cuda():
        print("paged_read_probe: needs a CUDA GPU (tests/test_paged_read_probe.py runs the kernel anywhere)")
        return
    ceiling = timing.read_bandwidth()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"read ceiling {ceiling:.0f} GB/s", flush=True)
    rows = []
    s1 = torch.tensor([0.25], device="cuda")
    for point in a.points.split(","):
        batch, ctx = (int(x) for x in point.split("x"))
        inp = make_inputs(batch, ctx, _A)
        q, bt, sl = inp["query"], inp["block_tables"], inp["seq_lens"]
        seq_table = torch.arange(bt.numel(), dtype=torch.int32, device="cuda").reshape(bt.shape)
        for cache in a.caches.split(","):
            fp8 = cache == "fp8"
            k, v = ((inp["k"] / s1).to(torch.float8_e4m3fn), (inp["v"] / s1).to(torch.float8_e4m3fn)) if fp8 \
                else (inp["k"], inp["v"])
            extra = dict(kv_cache_dtype="fp8", k_scale=s1, v_scale=s1) if fp8 else {}
            kr, vr = (k.view(torch.uint8), v.view(torch.uint8)) if fp8 else (k, v)
            nbytes = batch * ctx * _A.num_kv_heads * _A.head_size * 2 * k.element_size()
            decode_mod._PLANS.clear()
            op = lambda: paged_decode_attention(q, k, v, bt, sl, **extra)  # noqa: E731
            op()
            plan = next(iter(decode_mod._PLANS.values()))
            plan = plan.capture_plan or plan
            splits, block_n = plan.splits, plan.consts[1]
            cands = [(f"miniattn ({splits} x {block_n}/{plan.warps}w/{plan.stages}s)", op,
                      dict(pieces=splits, block_n=block_n, warps=plan.warps, stages=plan.stages))]
            shapes = [(splits, block_n, plan.warps, int(st), t, m) for st in a.stages.split(",") if st
                      for t in ("random table", "blocks in order") for m in modes]
            shapes += [(*(int(x) for x in sh.split("x")), "random table", m)
                       for sh in a.shapes.split(",") if sh for m in modes]
            refs = {}
            for pieces, bn, w, st, tname, mode in shapes:
                table = bt if tname == "random table" else seq_table
                fn = lambda t=table, p=pieces, bn=bn, w=w, st=st, m=mode: paged_read(  # noqa: E731
                    kr, vr, t, ctx, p, bn, w, st, m)
                try:
                    got = fn().double()
                except ValueError as e:  # a shape that does not divide this point
                    if mode == modes[0]:
                        print(f"  skip {pieces}x{bn}x{w}x{st} at {point}: {e}", flush=True)
                    continue
                except Exception as e:  # a shape that does not compile here (registers, shared memory)
                    print(f"  {pieces}x{bn}x{w}x{st} {mode} at {point}: {type(e).__name__}: {str(e)[:200]}",
                          flush=True)
                    continue
                if (tname, pieces) not in refs:  # the same sums for every step, warps, stages and mode
                    refs[tname, pieces] = paged_read_ref(kr, vr, table, ctx, pieces)
                ref = refs[tname, pieces]
                err = float((got - ref).abs().max() / ref.abs().max())
                assert err < 1e-4, f"probe sums off by {err:.1e} at {point} {cache}"
                cands.append((f"read {mode}, {tname}, {pieces} x {bn}/{w}w/{st}s", fn,
                              dict(pieces=pieces, block_n=bn, warps=w, stages=st, mode=mode, table=tname)))
            words = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
            part = torch.empty(-(-words.numel() // 4096), dtype=torch.int32, device="cuda")
            cands.append(("plain read, same bytes", lambda: timing.triton_read(words, part), {}))
            if not fp8:
                import torch.nn.functional as F
                dense = lambda c: c[bt.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()  # noqa: E731
                kd, vd = dense(k), dense(v)
                cands.append(("torch SDPA, contiguous", lambda: F.scaled_dot_product_attention(
                    q[:, :, None], kd, vd, enable_gqa=True), {}))
            for rnd in range(a.rounds):  # alternating, so that drift hits every candidate alike
                for name, fn, shape in cands:
                    us = timing.time_graph(fn)
                    gb = timing.gbps(nbytes, us)
                    rows.append(dict(batch=batch, ctx=ctx, cache=cache, impl=name, **shape,
                                     round=rnd, us=us, gbps=gb, pct=100 * gb / ceiling))
                    print(f"  b{batch:<3} x {ctx:<6} {cache:<4} {name:<44} {us:8.1f} us {gb:6.0f} GB/s "
                          f"{rows[-1]['pct']:5.1f}%", flush=True)
            del cands, words, part
            decode_mod._PLANS.clear()
        del inp
        torch.cuda.empty_cache()
    if a.out:
        timing.write_json(a.out, vars(a), rows, {"read_ceiling_gbps": ceiling})
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
