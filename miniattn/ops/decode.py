"""Paged-attention decode: one new query token per sequence attends to its paged KV cache.

Kernels first, then the launcher `paged_decode_attention`.

How it works
------------
`_paged_decode_kernel` runs one program per (KV split, kv head [x row chunk], sequence). A program
loads the query rows of every q head that shares its kv head (GQA/MQA: the whole group at once, padded
to >= MIN_ROWS rows: 16 = the MMA's M for 16-bit caches; FP8 programs compute the transposed products,
tokens along the MMA's M and the group's own >= 4 rows along its N: `SWAP_AB`), then
walks its share of the sequence BLOCK_N tokens at a time. BLOCK_N may span several cache blocks
(pages): each token's block id is gathered from the block table, so block_size 8 still gives 64-token
tiles. Split 16-bit programs gather ahead (`GATHER_AHEAD`): the first tile's ids before seq_len arrives,
at the start the split would have if the row filled its length bucket (a wrong guess gathers them
again), and each step the next step's ids, so that no step waits for a gather.
Keys and values are addressed only through the strides from `layout.cache_strides`, so NHD, HND and
paged5d (and views such as the halves of a combined NHD cache) are one kernel with different strides
and one constexpr (`KEY_X`, the head split of the paged5d key). Softmax is online, in base 2 (`exp2`,
log2(e) folded into the scale). Full steps run without token masks; a row's partial last step is peeled
off (`PEEL`, except in split 16-bit launches, see PEEL_ENABLED).

FP8 caches are loaded as float8 and widened to fp16 for the dots (e4m3/e5m2 -> fp16 is one `cvt` per
two elements, -> bf16 three; fp16 also keeps more of p's mantissa); `k_scale` is folded into the score
scale and `v_scale` into the output, so dequantisation costs two multiplies per program. On sm_89+
the values are widened by `_widen_fp8_pinned` (why: see there) and FP8 programs are one warp
with double-buffered tiles (`decode_launch_config`).

Split-KV (flash-decoding): with NUM_SPLITS > 1 each sequence is cut into NUM_SPLITS equal, BLOCK_N
aligned pieces *computed in the kernel from seq_len*; each program writes an unnormalised partial
(acc, running max, running sum) and the partials are merged. With up to FUSED_MERGE_MAX_SPLITS pieces
the merge is done inside the main kernel: each program counts its arrival on an int32 counter of its
(sequence, kv head) (an acq_rel atomic after a barrier), and the one that arrives last reads the
others' partials, writes the output and puts the counter back to 0; one launch per call. With more
pieces `_paged_decode_reduce_kernel` merges them (a second launch, since one program merging 64
partials is slower); outside a graph capture, where a launch costs the host more than the GPU time
a few more fused pieces lose, small such calls fuse up to EAGER_FUSED_MAX_SPLITS pieces instead.
Empty pieces write nothing, and the merge recomputes how many pieces exist, so no partial needs
clearing. Because the split length is derived on the device, the grid depends only on
(batch, heads, NUM_SPLITS): see "CUDA graphs" in `paged_decode_attention`. On sm_90+ the merge kernel
is a programmatic dependent launch (PDL): the main kernel's programs allow it to be scheduled as they
start, and it reads seq_len while waiting, then `gdc_wait`s for the main grid before reading the
partials. That takes its launch off the critical path (0.5-0.8 µs at batch 1 on an H100).
"""

from __future__ import annotations

import math

import torch

from ..layout import KV_CACHE_DTYPES, as_cache_dtype, cache_geometry, cache_strides, get_layout
from .launch import Launcher, compiled_handle, debug_enabled, hooks_installed, interpreting, triton_available
from .reference import paged_decode_attention_ref

__all__ = ["paged_decode_attention", "choose_num_splits", "decode_launch_config"]

_LOG2E = 1.4426950408889634
_QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP8_NAMES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_MAX_HEAD_SIZE = 256
_MAX_ROWS = 64  # q rows one program holds; larger GQA groups are cut into row chunks
#: q rows one program holds at least (a GQA group is padded to it). 16 is the MMA's M; Triton also
#: takes fewer rows and pads the MMA itself, which leaves the softmax and rescaling on the real rows
#: only. FP8 programs are issue-bound and gain (H200, 32 q / 8 kv heads: b64 x 4096 161.6 -> 158.0
#: µs, b128 x 4096 304.9 -> 297.5, b64 x 16384 588.4 -> 582.8; results/paged_decode_tune_h200_s5r2);
#: 16-bit ones read at the memory's pace and do not (b128 x 4096 488.9 -> 510.4).
MIN_ROWS = 16
MIN_ROWS_FP8 = 4
#: with SWAP_AB the q rows are the MMA's N (8 in hardware; Triton pads smaller ones)
MIN_ROWS_SWAP = 4
#: FP8 caches: scores computed as k q^T and the output as v^T p^T (`_attend_step`'s SWAP_AB), so
#: the tokens / head dims are the MMA's M and the q rows its N. With q as the A operand and 4 real
#: rows of 16, each A fragment holds every row twice, and ptxas rebuilt them with 4-6 register moves
#: before every MMA (180 moves in the one-warp FP8 step of 704 sm_90 instructions; swapped: 32 of
#: 545, and half the MMAs). H200, three trees on one machine (results/paged_decode_ab_h200_s9a*):
#: FP8 b1 x 16384 22.8 -> 21.9 µs, b128 x 4096 279.1 -> 275.4, b16 x 4096 53.2 -> 52.3, b64 x 16384
#: 577-625 -> 554-582 (noisy). SWAP_AB_16BIT the same for 16-bit caches: slower there (b64 x 4096 252.3 ->
#: 261.3, b128 x 4096 488.5 -> 503.0), off. The benchmarks switch them (clear `_PLANS` after).
SWAP_AB_FP8 = True
SWAP_AB_16BIT = False

if triton_available():
    import triton
    import triton.language as tl

    try:  # grid dependency control (Triton >= 3.4): the merge kernel's launch overlaps the main kernel
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        _HAS_GDC = True
    except ImportError:  # pragma: no cover - depends on the Triton version
        _HAS_GDC = False

        @triton.jit
        def gdc_launch_dependents():
            pass

        @triton.jit
        def gdc_wait():
            pass

    @triton.jit
    def _widen_fp8_pinned(x, E5M2: tl.constexpr):
        """float8 -> float16 with PTX `cvt` on packed pairs (sm_89+), as an asm that Triton must not move.

        With a plain `.to(tl.float16)` Triton moves the value tile's change to the dot-operand layout
        ahead of the conversion, onto the fp8 bytes: each thread then needs pairs of consecutive *tokens*
        (the reduction dim of p @ v), which are a head row apart in shared memory, and ldmatrix cannot
        transpose 8-bit data, so it gathers them one byte at a time (64 LDS.U8 per thread per 64-token
        step). Declared impure, the asm stays where it is: the fp8 tile is read with 16-byte loads,
        widened in registers, and the fp16 tile takes the transposing ldmatrix path of 16-bit caches."""
        if E5M2:
            return tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e5m2x2 $0, lo; cvt.rn.f16x2.e5m2x2 $1, hi; }",
                "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
                "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)

    @triton.jit
    def _run_start(t0, offs_n, V_RUN: tl.constexpr):
        """The token each lane's masking run starts at. paged5d values ([.., D, bs]) are contiguous
        inside a page: whole runs are masked so that value loads stay vector-wide (slots of a valid
        run past `end`, in the same page and so valid memory, are read and zeroed later)."""
        if V_RUN > 1:
            return t0 + (offs_n // V_RUN) * V_RUN
        return t0 + offs_n

    @triton.jit
    def _step_ids(bt_row_ptr, bt_stride_p, t0, lim, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  V_RUN: tl.constexpr):
        """Block ids ([BLOCK_N] int32) of the step starting at token t0, 0 where the token's masking run
        starts at or past `lim`."""
        offs_n = tl.arange(0, BLOCK_N)
        return tl.load(bt_row_ptr + ((t0 + offs_n) // BLOCK_SIZE) * bt_stride_p,
                       mask=_run_start(t0, offs_n, V_RUN) < lim, other=0)

    @triton.jit
    def _tok_off(blk, t0, stride_block, stride_slot, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 ALIGN: tl.constexpr, RUN: tl.constexpr):
        """Element offsets ([BLOCK_N] int64) of the tokens t0 .. t0 + BLOCK_N of one head: block id x the block
        stride + slot x the slot stride, where `blk` holds the int32 block ids and t0 is a multiple of BLOCK_N
        (every step starts at one). When pages tile the step, the slot term is the same in every step and
        leaves the loop: ~100 of the 16-bit loop's ~550 sm_90 instructions per step were the per-token
        `t % BLOCK_SIZE` and its products (Triton 3.6 SASS; see `_attend_step` for the rest).

        The hints (every offset a multiple of ALIGN; RUN > 1: runs of RUN contiguous tokens, paged5d values)
        are applied here: Triton drops a `multiple_of` put on a jit function's result when it inlines the
        call (paged5d keys, whose slot stride x = 8 is not known to divide 16, lost their 16-byte copies)."""
        offs_n = tl.arange(0, BLOCK_N)
        if BLOCK_N % BLOCK_SIZE == 0:
            slot = offs_n % BLOCK_SIZE
        elif BLOCK_SIZE % BLOCK_N == 0:
            slot = t0 % BLOCK_SIZE + offs_n
        else:
            slot = (t0 + offs_n) % BLOCK_SIZE
        off = blk.to(tl.int64) * stride_block + slot * stride_slot
        if RUN > 1:
            off = tl.max_contiguous(tl.multiple_of(off, RUN), RUN)
        elif ALIGN > 1:
            off = tl.multiple_of(off, ALIGN)
        return off

    @triton.jit
    def _merge_pieces(part_acc_ptr, part_max_ptr, part_sum_ptr, v_scale_ptr, out_ptr, b, kvh, row0, seq_len,
                      split_len, num_q_heads, o_stride_b, o_stride_h, o_stride_d,
                      HEAD_V: tl.constexpr, HEAD_V_PAD: tl.constexpr, GROUP: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, MERGE_ROWS: tl.constexpr,
                      MERGE_CHUNK: tl.constexpr, FP8: tl.constexpr, V_SCALE_PER_HEAD: tl.constexpr):
        """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the pieces s of the rows
        row0 .. row0 + MERGE_ROWS of kv head `kvh` (flash-decoding's merge, inside the main kernel).
        Partials were written by other programs: read through L2 (`.cg`), never a stale L1 line."""
        rows = row0 + tl.arange(0, MERGE_ROWS)
        row_ok = rows < GROUP
        qrow = (b.to(tl.int64) * num_q_heads + kvh * GROUP + rows) * NUM_SPLITS  # [MERGE_ROWS]
        num_pieces = tl.cdiv(seq_len, tl.maximum(split_len, 1))  # pieces that wrote partials
        sp = tl.arange(0, SPLITS_PAD)
        ok = row_ok[:, None] & (sp < num_pieces)[None, :]
        dv = tl.arange(0, HEAD_V_PAD)
        m = tl.load(part_max_ptr + qrow[:, None] + sp[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_sum_ptr + qrow[:, None] + sp[None, :], mask=ok, other=0.0, cache_modifier=".cg")
        # 16-bit caches, one step holding every piece: the acc tile goes out with m and l, one L2 round
        # trip instead of two (H200, s7r3: b16 x 512 20.5 -> 20.3 µs, b16 x 4096 79.6 -> 79.4). The
        # one-warp FP8 programs lost with it (b64 x 4096, 2 pieces: 148.8 -> 151.7; b64 x 16384 533 -> 556).
        ONE_PASS: tl.constexpr = MERGE_CHUNK >= SPLITS_PAD and not FP8
        if ONE_PASS:
            a = tl.load(part_acc_ptr + (qrow[:, None, None] + sp[None, :, None]) * HEAD_V_PAD + dv[None, None, :],
                        mask=ok[:, :, None], other=0.0, cache_modifier=".cg")  # [ROWS, SPLITS_PAD, HEAD_V_PAD]
        m_all = tl.maximum(tl.max(m, 1), -1e30)  # [MERGE_ROWS]; finite with no piece: no inf - inf
        w = tl.where(ok, tl.exp2(m - m_all[:, None]), 0.0)
        denom = tl.sum(w * l_s, 1)
        inv = 1.0 / tl.where(denom > 0.0, denom, 1.0)  # seq_len 0: the sum is 0 -> zeros
        if FP8:
            if V_SCALE_PER_HEAD:
                inv = inv * tl.load(v_scale_ptr + kvh)
            else:
                inv = inv * tl.load(v_scale_ptr)

        if ONE_PASS:
            o = tl.sum(a * w[:, :, None], 1)
        else:  # pieces in chunks of MERGE_CHUNK
            ch = tl.arange(0, MERGE_CHUNK)
            o = tl.zeros([MERGE_ROWS, HEAD_V_PAD], dtype=tl.float32)
            for s0 in range(0, num_pieces, MERGE_CHUNK):
                s = s0 + ch
                ok_s = row_ok[:, None] & (s < num_pieces)[None, :]  # [MERGE_ROWS, MERGE_CHUNK]
                m_s = tl.load(part_max_ptr + qrow[:, None] + s[None, :], mask=ok_s, other=float("-inf"),
                              cache_modifier=".cg")
                w_s = tl.where(ok_s, tl.exp2(m_s - m_all[:, None]), 0.0)
                a = tl.load(part_acc_ptr + (qrow[:, None, None] + s[None, :, None]) * HEAD_V_PAD
                            + dv[None, None, :], mask=ok_s[:, :, None], other=0.0, cache_modifier=".cg")
                o += tl.sum(a * w_s[:, :, None], 1)  # [ROWS, CHUNK, HEAD_V_PAD] -> [ROWS, HEAD_V_PAD]
        qh = kvh * GROUP + rows
        tl.store(out_ptr + b.to(tl.int64) * o_stride_b + qh[:, None] * o_stride_h + dv[None, :] * o_stride_d,
                 (o * inv[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv < HEAD_V)[None, :])

    @triton.jit
    def _attend_step(q, m_i, l_i, acc, t0, end, blk, scale, k_head_ptr, v_head_ptr, k_dim_off, v_dim_off, dk_ok,
                     dv_ok, k_stride_block, k_stride_slot, k_stride_dhi, v_stride_block, v_stride_slot, v_stride_d,
                     BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_K: tl.constexpr, HEAD_K_PAD: tl.constexpr,
                     HEAD_V: tl.constexpr, HEAD_V_PAD: tl.constexpr, KEY_X: tl.constexpr, K_ALIGN: tl.constexpr,
                     V_ALIGN: tl.constexpr, V_RUN: tl.constexpr, KV_SAME: tl.constexpr, PAGE_ORDER: tl.constexpr,
                     FP8: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, V_WIDEN: tl.constexpr,
                     SWAP_AB: tl.constexpr, MASKED: tl.constexpr, ZERO_TAIL: tl.constexpr):
        """One loop step of the online softmax: the tokens t0 .. t0 + BLOCK_N (those < end) of one kv head,
        whose block ids are `blk` ([BLOCK_N] int32), folded into (m_i, l_i, acc). KV_SAME: the value cache has
        the key cache's block and slot strides, so the keys' token offsets serve both.

        PAGE_ORDER (paged5d): keys and values are read in the cache's own order, [D/x, tokens, x] keys and
        [pages, D, tokens] values, and permuted to [D, tokens] / [tokens, D] on chip: every 8 lanes of a warp
        then read one whole 128-byte line and the L2 gets 4-sector requests, where the [tokens, D] tiles
        had lanes on 16-byte pieces of 8-16 different lines (1 sector per request; H200, b64 x 4096 bf16
        409 -> 283 µs, FP8 273 -> 150). Both loads mask whole page runs (one predicate per page's lanes),
        so the last page's slots past `end` are read: the scores' mask removes those keys, and ZERO_TAIL
        (the last, partial step only) zeroes those values, since p = 0 times a garbage inf/NaN is NaN. The
        zeroing takes the values through registers and shared memory again, so full steps skip it.

        MASKED: the step may end past `end` (the peeled last step, or every step where the loop does not
        peel); without it, no token mask at all: a full step's loads, scores and values are all valid."""
        offs_n = tl.arange(0, BLOCK_N)
        t = t0 + offs_n
        t_ok = t < end
        run_ok = _run_start(t0, offs_n, V_RUN) < end
        k_tok = _tok_off(blk, t0, k_stride_block, k_stride_slot, BLOCK_SIZE, BLOCK_N, K_ALIGN, 1)
        if PAGE_ORDER:
            kc = tl.arange(0, HEAD_K_PAD // KEY_X)
            k3 = _tile_load(k_head_ptr + (kc * k_stride_dhi)[:, None, None] + k_tok[None, :, None]
                            + tl.arange(0, KEY_X)[None, None, :], run_ok[None, :, None],
                            (kc * KEY_X < HEAD_K)[:, None, None], MASKED, HEAD_K < HEAD_K_PAD)
            kt = tl.reshape(tl.permute(k3, (0, 2, 1)), (HEAD_K_PAD, BLOCK_N))  # [D/x, N, x] -> [D, N]
        else:
            kt = tl.trans(_tile_load(k_head_ptr + k_tok[:, None] + k_dim_off[None, :], t_ok[:, None], dk_ok[None, :],
                                     MASKED, HEAD_K < HEAD_K_PAD))  # [HEAD_K_PAD, BLOCK_N]
        if FP8:  # keys: Triton's conversion is already cheap (no transpose: d is their reduction dim)
            kt = kt.to(q.dtype)
        # scores [ROWS, BLOCK_N] fp32 in log2 units; SWAP_AB: s^T = k q^T [BLOCK_N, ROWS], tokens along
        # the MMA's M (q holds q^T then), so the token axis TOK is 0 instead of 1
        TOK: tl.constexpr = 0 if SWAP_AB else 1
        if SWAP_AB:
            s = _dot(tl.trans(kt), q, DOT_F32, IEEE) * scale
        else:
            s = _dot(q, kt, DOT_F32, IEEE) * scale
        if MASKED:
            s = tl.where(tl.expand_dims(t_ok, 1 - TOK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, TOK))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - tl.expand_dims(m_new, TOK))
        l_i = l_i * alpha + tl.sum(p, TOK)

        if PAGE_ORDER:
            PAGES: tl.constexpr = BLOCK_N // V_RUN
            page_t = t0 + tl.arange(0, PAGES) * V_RUN  # first token of each run
            page_blk = tl.max(tl.reshape(blk, (PAGES, V_RUN)), 1)  # the run's block id (one per run)
            page_off = tl.multiple_of(page_blk.to(tl.int64) * v_stride_block + (page_t % BLOCK_SIZE) * v_stride_slot,
                                      V_RUN)
            v3 = _tile_load(v_head_ptr + page_off[:, None, None] + tl.multiple_of(v_dim_off, V_RUN)[None, :, None]
                            + tl.arange(0, V_RUN)[None, None, :], (page_t < end)[:, None, None],
                            dv_ok[None, :, None], MASKED, HEAD_V < HEAD_V_PAD)  # [PAGES, D, RUN]
            v = tl.reshape(tl.permute(v3, (0, 2, 1)), (BLOCK_N, HEAD_V_PAD))
        else:
            if KV_SAME:  # (V_RUN is 1 then, and K_ALIGN divides the same strides)
                v_tok = k_tok
            else:
                v_tok = _tok_off(blk, t0, v_stride_block, v_stride_slot, BLOCK_SIZE, BLOCK_N, V_ALIGN, V_RUN)
            v = _tile_load(v_head_ptr + v_tok[:, None] + v_dim_off[None, :], run_ok[:, None], dv_ok[None, :],
                           MASKED, HEAD_V < HEAD_V_PAD)  # [BLOCK_N, HEAD_V_PAD]
        if FP8:
            if V_WIDEN:
                v = _widen_fp8_pinned(v, V_WIDEN == 2)
            else:
                v = v.to(q.dtype)
        if ZERO_TAIL:
            v = tl.where(t_ok[:, None], v, 0.0)
        p = p if IEEE else p.to(q.dtype)
        if SWAP_AB:  # acc^T [HEAD_V_PAD, ROWS] += v^T p^T
            pv = _dot(tl.trans(v), p, DOT_F32, IEEE)
        else:
            pv = _dot(p, v, DOT_F32, IEEE)
        return m_new, l_i, acc * tl.expand_dims(alpha, TOK) + pv

    @triton.jit
    def _tile_load(ptrs, tok_ok, dim_ok, MASKED: tl.constexpr, PADDED: tl.constexpr):
        """A key / value tile: masked by the tokens' and the head dims' masks (broadcast to the tile) in
        a masked step, by the head dims' alone where the head is padded, not at all otherwise."""
        if MASKED:
            return tl.load(ptrs, mask=tok_ok & dim_ok, other=0.0)
        elif PADDED:
            return tl.load(ptrs, mask=dim_ok, other=0.0)
        return tl.load(ptrs)

    @triton.jit
    def _dot(a, b, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """a @ b in fp32: widened first under the interpreter (DOT_F32), exact for float32 inputs (IEEE)."""
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _paged_decode_kernel(
        # ---- pointers -------------------------------------------------------------------------
        q_ptr,  # [batch, num_q_heads, HEAD_K] query dtype
        k_cache_ptr,  # key cache, any layout (cache dtype); addressed through the k_* strides
        v_cache_ptr,  # value cache, any layout (cache dtype); addressed through the v_* strides
        block_tables_ptr,  # [batch, max_blocks] int32
        seq_lens_ptr,  # [batch] int32
        k_scale_ptr,  # [1] or [num_kv_heads] float32 (read only when FP8)
        v_scale_ptr,  # [1] or [num_kv_heads] float32 (read only when FP8 and NUM_SPLITS == 1)
        out_ptr,  # [batch, num_q_heads, HEAD_V] query dtype (written when NUM_SPLITS == 1)
        part_acc_ptr,  # [batch, num_q_heads, NUM_SPLITS, HEAD_V_PAD] float32 (NUM_SPLITS > 1)
        part_max_ptr,  # [batch, num_q_heads, NUM_SPLITS] float32, running max (log2 units)
        part_sum_ptr,  # [batch, num_q_heads, NUM_SPLITS] float32, running sum of exp2
        arrivals_ptr,  # [batch, grid axis 1] int32, zero between calls (FUSED_MERGE: pieces done so far)
        # ---- ints -----------------------------------------------------------------------------
        q_stride_b, q_stride_h, q_stride_d,  # query
        o_stride_b, o_stride_h, o_stride_d,  # out
        bt_stride_b, bt_stride_p,  # block_tables (row, page)
        k_stride_block, k_stride_slot, k_stride_head, k_stride_dhi, k_stride_dlo,  # key cache
        v_stride_block, v_stride_slot, v_stride_head, v_stride_d,  # value cache
        num_q_heads,
        bt_tokens,  # block table capacity in tokens (max_blocks * BLOCK_SIZE)
        guess_split_len,  # GATHER_AHEAD: split length for a sequence as long as the plan's length bucket
        qk_scale,  # float: softmax scale * log2(e)
        # ---- constexprs -----------------------------------------------------------------------
        BLOCK_SIZE: tl.constexpr,  # tokens per cache block (page)
        BLOCK_N: tl.constexpr,  # tokens per loop step (may span several pages)
        HEAD_K: tl.constexpr,
        HEAD_K_PAD: tl.constexpr,
        HEAD_V: tl.constexpr,
        HEAD_V_PAD: tl.constexpr,
        KEY_X: tl.constexpr,  # paged5d key head split (elements); 0: d is addressed as d * k_stride_dlo
        K_ALIGN: tl.constexpr,  # every key token offset (block/slot/head strides) is a multiple of this
        V_ALIGN: tl.constexpr,  # the same for values
        V_RUN: tl.constexpr,  # >1: value tokens are contiguous in page-aligned runs of V_RUN (paged5d)
        GROUP: tl.constexpr,  # q heads per kv head
        ROWS: tl.constexpr,  # q rows per program (>= MIN_ROWS, pow2)
        ROW_CHUNKS: tl.constexpr,  # programs per kv head along the group
        NUM_SPLITS: tl.constexpr,
        FP8: tl.constexpr,
        K_SCALE_PER_HEAD: tl.constexpr,
        V_SCALE_PER_HEAD: tl.constexpr,
        DOT_F32: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 as raw bits, so widen first
        IEEE: tl.constexpr,  # float32 queries and caches: exact fp32 dots (no tf32)
        PDL: tl.constexpr,  # the merge kernel is launched as a programmatic dependent of this one
        FUSED_MERGE: tl.constexpr,  # NUM_SPLITS > 1: the last program of a (sequence, kv head) merges
        MERGE_ROWS: tl.constexpr,  # FUSED_MERGE: q rows merged (pow2 >= the group's rows in this program)
        MERGE_CHUNK: tl.constexpr,  # FUSED_MERGE: pieces merged per step
        SPLITS_PAD: tl.constexpr,  # FUSED_MERGE: next_pow2(NUM_SPLITS)
        GATHER_AHEAD: tl.constexpr,  # block ids gathered a step ahead, the first step's on a guess
        PEEL: tl.constexpr,  # full steps unmasked, a partial last step peeled off (always when V_RUN > 1)
        KV_SAME: tl.constexpr,  # values share the keys' token offsets (same block / slot strides, V_RUN 1)
        PAGE_ORDER: tl.constexpr,  # paged5d keys / values read in their memory order (`_attend_step`)
        SWAP_AB: tl.constexpr,  # scores as k q^T, output as v^T p^T: tokens / d along the MMA's M (see _build_plan)
        V_WIDEN: tl.constexpr,  # FP8 values: 0 Triton's conversion, 1 / 2 `_widen_fp8_pinned` e4m3 / e5m2
    ):
        if PDL:  # let the merge kernel's programs be scheduled now; they wait for this grid's end
            gdc_launch_dependents()
        split = tl.program_id(0)
        pid_h = tl.program_id(1)
        b = tl.program_id(2)
        kvh = pid_h // ROW_CHUNKS
        chunk = pid_h % ROW_CHUNKS

        rows = chunk * ROWS + tl.arange(0, ROWS)  # index inside the group
        row_ok = rows < GROUP
        qh = kvh * GROUP + rows  # q head of each row
        dk = tl.arange(0, HEAD_K_PAD)
        dv = tl.arange(0, HEAD_V_PAD)
        dk_ok = dk < HEAD_K
        dv_ok = dv < HEAD_V
        out_rows_ptr = out_ptr + b.to(tl.int64) * o_stride_b + qh[:, None] * o_stride_h + dv[None, :] * o_stride_d

        bt_row_ptr = block_tables_ptr + b.to(tl.int64) * bt_stride_b
        offs_n = tl.arange(0, BLOCK_N)
        seq_len = tl.load(seq_lens_ptr + b)
        if GATHER_AHEAD:
            # The first step's block ids would wait for seq_len (it fixes where this split starts),
            # and the first key/value loads for them: two memory latencies in a row. So gather them
            # now, at the start this split has when the sequence fills the plan's length bucket;
            # they are used when the guess was right (always for split 0).
            guess = split * guess_split_len
            guess_t = guess + offs_n
            guess_blk = tl.load(bt_row_ptr + (guess_t // BLOCK_SIZE) * bt_stride_p, mask=guess_t < bt_tokens,
                                other=0)
        if NUM_SPLITS == 1:
            start = 0
            end = seq_len
        else:
            split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
            start = split * split_len
            end = tl.minimum(start + split_len, seq_len)
            if not FUSED_MERGE:
                if start >= end:  # past the end of this sequence (or an empty one): nothing to do
                    return

        q = tl.load(
            q_ptr + b.to(tl.int64) * q_stride_b + qh[:, None] * q_stride_h + dk[None, :] * q_stride_d,
            mask=row_ok[:, None] & dk_ok[None, :],
            other=0.0,
        )  # [ROWS, HEAD_K_PAD]
        if FP8:
            # FP8 caches are widened to fp16 (one cvt per two elements; bf16 would need two more),
            # so the dots run in fp16: queries are clamped to its range
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        if SWAP_AB:
            q = tl.trans(q)  # [HEAD_K_PAD, ROWS]

        scale = qk_scale
        if FP8:
            if K_SCALE_PER_HEAD:
                scale = scale * tl.load(k_scale_ptr + kvh)
            else:
                scale = scale * tl.load(k_scale_ptr)

        # element offsets of one token's head vector inside a block (int64 from here on)
        if KEY_X > 0:
            k_dim_off = (dk // KEY_X) * k_stride_dhi + (dk % KEY_X) * k_stride_dlo
        else:
            k_dim_off = dk * k_stride_dlo
        v_dim_off = dv * v_stride_d
        k_head_ptr = k_cache_ptr + kvh.to(tl.int64) * k_stride_head
        v_head_ptr = v_cache_ptr + kvh.to(tl.int64) * v_stride_head

        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        if SWAP_AB:
            acc = tl.zeros([HEAD_V_PAD, ROWS], dtype=tl.float32)
        else:
            acc = tl.zeros([ROWS, HEAD_V_PAD], dtype=tl.float32)

        if GATHER_AHEAD:  # the first step's ids: guessed right, this gather loads nothing
            hit = start == guess
            lim = tl.where(hit, 0, end)  # a limit, not `mask & scalar` (the interpreter rejects that)
            blk_next = tl.where(hit, guess_blk, _step_ids(bt_row_ptr, bt_stride_p, start, lim, BLOCK_SIZE, BLOCK_N,
                                                          V_RUN))
        if PEEL:  # the loop runs the full steps, unmasked; a partial last step runs on its own, masked
            loop_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
        else:
            loop_end = end
        for t0 in range(start, loop_end, BLOCK_N):
            if GATHER_AHEAD:  # this step's ids arrived during the last step; the next step's go out now
                blk = blk_next
                blk_next = _step_ids(bt_row_ptr, bt_stride_p, t0 + BLOCK_N, end, BLOCK_SIZE, BLOCK_N, V_RUN)
            else:
                blk = _step_ids(bt_row_ptr, bt_stride_p, t0, end, BLOCK_SIZE, BLOCK_N, V_RUN)
            m_i, l_i, acc = _attend_step(
                q, m_i, l_i, acc, t0, end, blk, scale, k_head_ptr, v_head_ptr, k_dim_off, v_dim_off, dk_ok, dv_ok,
                k_stride_block, k_stride_slot, k_stride_dhi, v_stride_block, v_stride_slot, v_stride_d,
                BLOCK_SIZE, BLOCK_N, HEAD_K, HEAD_K_PAD, HEAD_V, HEAD_V_PAD, KEY_X, K_ALIGN, V_ALIGN, V_RUN,
                KV_SAME, PAGE_ORDER, FP8, DOT_F32, IEEE, V_WIDEN, SWAP_AB, not PEEL, False)
        if PEEL:
            if loop_end < end:
                if GATHER_AHEAD:
                    blk = blk_next
                else:
                    blk = _step_ids(bt_row_ptr, bt_stride_p, loop_end, end, BLOCK_SIZE, BLOCK_N, V_RUN)
                m_i, l_i, acc = _attend_step(
                    q, m_i, l_i, acc, loop_end, end, blk, scale, k_head_ptr, v_head_ptr, k_dim_off, v_dim_off,
                    dk_ok, dv_ok, k_stride_block, k_stride_slot, k_stride_dhi, v_stride_block, v_stride_slot,
                    v_stride_d, BLOCK_SIZE, BLOCK_N, HEAD_K, HEAD_K_PAD, HEAD_V, HEAD_V_PAD, KEY_X, K_ALIGN, V_ALIGN,
                    V_RUN, KV_SAME, PAGE_ORDER, FP8, DOT_F32, IEEE, V_WIDEN, SWAP_AB, True, V_RUN > 1)

        if SWAP_AB:
            acc = tl.trans(acc)  # [ROWS, HEAD_V_PAD]
        if NUM_SPLITS == 1:
            inv = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)  # seq_len 0: acc is 0 -> zeros, never NaN
            if FP8:
                if V_SCALE_PER_HEAD:
                    inv = inv * tl.load(v_scale_ptr + kvh)
                else:
                    inv = inv * tl.load(v_scale_ptr)
            tl.store(out_rows_ptr, (acc * inv[:, None]).to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & dv_ok[None, :])
        else:
            part_row = (b.to(tl.int64) * num_q_heads + qh) * NUM_SPLITS + split  # [ROWS]
            # FUSED_MERGE: an empty piece writes nothing but arrives (a row limit, not `mask & scalar`,
            # which the interpreter turns into int32 and rejects)
            wrote = rows < tl.where(start < end, GROUP, 0)
            tl.store(part_acc_ptr + part_row[:, None] * HEAD_V_PAD + dv[None, :], acc, mask=wrote[:, None])
            tl.store(part_max_ptr + part_row, m_i, mask=wrote)
            tl.store(part_sum_ptr + part_row, l_i, mask=wrote)
            if FUSED_MERGE:
                # Arrive: every thread's partial stores come before the barrier, and the counter's
                # acq_rel atomic (one thread) releases them at GPU scope; the program that arrives
                # last acquires everyone's and merges. It also puts the counter back to 0 for the
                # next call (nobody else touches it after the last arrival), so graphs replay.
                tl.debug_barrier()
                arrivals = arrivals_ptr + b.to(tl.int64) * tl.num_programs(1) + pid_h
                if tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                    tl.store(arrivals, 0)
                    _merge_pieces(part_acc_ptr, part_max_ptr, part_sum_ptr, v_scale_ptr, out_ptr,
                                  b, kvh, chunk * ROWS, seq_len, split_len, num_q_heads,
                                  o_stride_b, o_stride_h, o_stride_d, HEAD_V, HEAD_V_PAD, GROUP,
                                  NUM_SPLITS, SPLITS_PAD, MERGE_ROWS, MERGE_CHUNK, FP8, V_SCALE_PER_HEAD)

    @triton.jit
    def _paged_decode_reduce_kernel(
        # ---- pointers -------------------------------------------------------------------------
        part_acc_ptr,  # [batch, num_q_heads, NUM_SPLITS, HEAD_V_PAD] float32
        part_max_ptr,  # [batch, num_q_heads, NUM_SPLITS] float32
        part_sum_ptr,  # [batch, num_q_heads, NUM_SPLITS] float32
        seq_lens_ptr,  # [batch] int32
        v_scale_ptr,  # [1] or [num_kv_heads] float32 (read only when FP8)
        out_ptr,  # [batch, num_q_heads, HEAD_V] query dtype
        # ---- ints -----------------------------------------------------------------------------
        o_stride_b, o_stride_h, o_stride_d,
        num_q_heads,
        # ---- constexprs -----------------------------------------------------------------------
        BLOCK_N: tl.constexpr,  # must match the main kernel (split lengths are multiples of it)
        HEAD_V: tl.constexpr,
        HEAD_V_PAD: tl.constexpr,
        GROUP: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        FP8: tl.constexpr,
        V_SCALE_PER_HEAD: tl.constexpr,
        PDL: tl.constexpr,  # launched as a programmatic dependent of the main kernel
    ):
        qh = tl.program_id(0)
        b = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + b)  # written before the main kernel started: safe to read now
        split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        num_pieces = tl.cdiv(seq_len, tl.maximum(split_len, 1))  # pieces the main kernel wrote
        if PDL:  # the partials: only after the main kernel has finished and its writes are visible
            gdc_wait()

        # out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the pieces s (flash-decoding)
        sp = tl.arange(0, SPLITS_PAD)
        sp_ok = sp < num_pieces
        dv = tl.arange(0, HEAD_V_PAD)
        part_row = (b.to(tl.int64) * num_q_heads + qh) * NUM_SPLITS + sp  # [SPLITS_PAD]
        m = tl.load(part_max_ptr + part_row, mask=sp_ok, other=float("-inf"))
        l = tl.load(part_sum_ptr + part_row, mask=sp_ok, other=0.0)
        acc = tl.load(part_acc_ptr + part_row[:, None] * HEAD_V_PAD + dv[None, :], mask=sp_ok[:, None], other=0.0)
        m_all = tl.maximum(tl.max(m, 0), -1e30)  # finite even with no valid piece: no inf - inf
        w = tl.where(sp_ok, tl.exp2(m - m_all), 0.0)
        o = tl.sum(acc * w[:, None], 0)  # [HEAD_V_PAD]
        denom = tl.sum(w * l, 0)
        inv = 1.0 / tl.where(denom > 0.0, denom, 1.0)  # seq_len 0: o is 0 -> zeros
        if FP8:
            if V_SCALE_PER_HEAD:
                inv = inv * tl.load(v_scale_ptr + qh // GROUP)
            else:
                inv = inv * tl.load(v_scale_ptr)
        tl.store(out_ptr + b.to(tl.int64) * o_stride_b + qh * o_stride_h + dv * o_stride_d,
                 (o * inv).to(out_ptr.dtype.element_ty), mask=dv < HEAD_V)

    _DECODE = Launcher(_paged_decode_kernel)
    _REDUCE = Launcher(_paged_decode_reduce_kernel)


# ------------------------------------------------------------------------------------------------
# launch heuristics
# ------------------------------------------------------------------------------------------------

#: fewest BLOCK_N tiles a split may have
MIN_TILES_PER_SPLIT = 1
MAX_SPLITS = 64
_CPU_SM_COUNT = 4  # under the interpreter: few programs, fast tests
_SM_COUNT: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _align(*strides: int) -> int:
    """Largest power of two <= 16 dividing every stride (0 strides ignored): a divisibility hint."""
    g = 16
    for st in strides:
        if st:
            g = math.gcd(g, st)
    return 1 << (g.bit_length() - 1)


#: programmatic dependent launch of the merge kernel where it exists (sm_90+, CUDA, Triton with grid
#: dependency control); the benchmarks switch it off to measure what it saves (clear `_PLANS` after)
PDL_ENABLED = True
_CAPABILITY: dict = {}


def _pdl_available(device: torch.device) -> bool:
    if not (PDL_ENABLED and _TRITON and _HAS_GDC and device.type == "cuda") or interpreting():
        return False
    return _capability(device) >= (9, 0)


def _capability(device: torch.device) -> tuple:
    """An NVIDIA GPU's compute capability; (0, 0) on ROCm, whose "cuda" devices run no PTX (the pinned
    widening's inline asm, PDL's grid-dependency control)."""
    if device not in _CAPABILITY:
        _CAPABILITY[device] = (0, 0) if torch.version.hip else torch.cuda.get_device_capability(device)
    return _CAPABILITY[device]


#: split-KV partials merged inside the main kernel by the last program of each (sequence, kv head)
#: to finish (one launch per call), instead of by `_paged_decode_reduce_kernel` (a second launch),
#: for up to FUSED_MERGE_MAX_SPLITS pieces. Measured on an H200 (results/paged_decode_tune_h200_s5r1):
#: with 4-16 pieces fused is faster in graphs (b16 x 4096 81.7 -> 79.1 µs, b16 x 512 23.9 -> 21.4,
#: FP8 b1 x 512 12.2 -> 11.0) and saves the second launch's host cost (b1 x 512 eager loop 15.1 ->
#: 11.7 µs); with 64 one program's serial merge of 64 partials is slower than the merge kernel's 32
#: programs (b1 x 4096 16.5 -> 19.4, b1 x 16384 32.7 -> 34.9). The benchmarks switch it off to
#: compare (clear `_PLANS` after).
FUSED_MERGE_ENABLED = True
FUSED_MERGE_MAX_SPLITS = 16
#: Outside a CUDA graph capture, a call with a cache in the model dtype (not FP8) whose split needs
#: the merge kernel (more pieces than FUSED_MERGE_MAX_SPLITS) and whose length bucket holds at most
#: EAGER_ONE_LAUNCH_MAX_BYTES of keys and values fuses at most EAGER_FUSED_MAX_SPLITS pieces instead:
#: one launch. A second launch
#: costs the host 5-8 µs on the H200 machine, which a graph hides and an eager call pays, while the
#: GPU time lost is 0-2.5 µs (H200, results/paged_decode_tune_h200_s10r1, graph / host-loop µs, the
#: merge kernel -> 32 fused pieces: b1 x 2048 13.9 / 27.1 -> 14.25 / 19.5, b1 x 4096 15.8 / 26.5 ->
#: 17.75 / 20.5, b1 x 8192 21.05 / 19.1 -> 23.55 / 15.65, b2 x 4096 22.2 / 17.8 -> 22.2 / 13.55).
#: Captured calls keep the split that is fastest on the GPU (the plan's `capture_plan`, compiled by
#: the first eager call); above the byte limit the kernel, not the host, sets the pace (b2 x 8192:
#: 32.35 / 25.1 -> 32.3 / 26.0). Not for FP8 caches, whose one-warp programs merge 32 pieces slowly (b1 x
#: 4096 13.3 -> 17.75 µs, b1 x 8192 16.0 -> 21.15). The benchmarks switch it off to compare (clear
#: `_PLANS` after).
EAGER_ONE_LAUNCH_ENABLED = True
EAGER_FUSED_MAX_SPLITS = 32
EAGER_ONE_LAUNCH_MAX_BYTES = 32 << 20
#: split launches with 16-bit caches gather block ids ahead (`GATHER_AHEAD` in the kernel). The
#: first step's before seq_len arrives, one memory latency less before the first key/value loads
#: (H200, graph µs, tune s6r5: b1 x 512 10.3 -> 10.0, b16 x 512 21.2 -> 20.4, b1 x 16384 32.6 ->
#: 31.7, b1 x 32768 50.7 -> 50.0); then each step the next step's, so that no step's key/value
#: copies wait for a gather (s7r4, two alternating rounds: b1 x 16384 32.0 -> 31.65, b1 x 32768
#: 50.55 -> 50.0, b16 x 4096 81.15 -> 80.75, paged5d 119.7 -> 118.9). Launches without splits
#: (large batches) were within 0.5% either way and keep the plain gather; the one-warp FP8
#: programs lost with the early gather (b1 x 16384 22.3 -> 23.8: the ids stay live through the
#: 5-stage loop) and keep the plain gather too.
GATHER_AHEAD_ENABLED = True
#: the gather ahead for every launch (unsplit ones and FP8 too): a tuning probe, off by default
GATHER_AHEAD_ALWAYS = False
#: paged5d caches read in their memory order (`_attend_step`'s PAGE_ORDER); the benchmarks switch it
#: off to compare (clear `_PLANS` after)
PAGE_ORDER_ENABLED = True
#: launches with page-run value masks capped at the registers their programs per SM leave (see
#: `_build_plan`); the benchmarks switch it off to compare (clear `_PLANS` after)
REGISTER_CAP_ENABLED = True


def _merge_shape(group: int, rows: int, head_v_pad: int, num_splits: int, warps: int) -> tuple:
    """(MERGE_ROWS, MERGE_CHUNK, SPLITS_PAD) of the fused merge: the q rows one program holds (the
    group's real rows, not the padded ones), and as many pieces per step as keep the
    [rows, pieces, head] partial tile at 32 floats per thread: sm_90 SASS of the 4-warp 16-bit
    kernel kept its 96 registers with that (session 5), and took 139 with twice as much (fewer
    programs per SM); 112 today, with the gather ahead and the one-round merge (Triton 3.9)."""
    merge_rows = min(rows, _next_pow2(group))
    splits_pad = max(2, _next_pow2(num_splits))
    chunk = max(1, (32 * 32 * warps) // (merge_rows * head_v_pad))
    return merge_rows, min(_next_pow2(chunk + 1) // 2, splits_pad), splits_pad


#: FP8 value widening by `_widen_fp8_pinned` where the GPU has the cvt (sm_89+); the benchmarks
#: switch it off to compare (clear `_PLANS` after)
PINNED_WIDEN_ENABLED = True


def _v_widen(device: torch.device, kv_cache_dtype: str) -> int:
    """The kernel's V_WIDEN for an FP8 cache on `device` (0: Triton's own conversion)."""
    if not (PINNED_WIDEN_ENABLED and _TRITON and device.type == "cuda") or interpreting():
        return 0
    if _capability(device) < (8, 9):
        return 0
    return 2 if kv_cache_dtype == "fp8_e5m2" else 1


#: token offsets computed once for keys and values when their strides agree (`_attend_step`'s
#: KV_SAME); the benchmarks switch it off to compare (clear `_PLANS` after)
KV_SAME_ENABLED = True
#: the loop runs only full steps, with no token masks, and a partial last step runs on its own
#: (`_attend_step`'s MASKED; always for page-run value masks, V_RUN > 1). Measured on an H200 against
#: the masked loop, three trees alternating on one machine (benchmarks/README.md, session 9): FP8
#: b128 x 4096 276.2 -> 272.9 µs, b64 x 16384 553.5 -> 541.5; unsplit 16-bit b128 x 4096 499.6 ->
#: 497.5, b64 x 4096 256.8 -> 256.1. Split 16-bit launches (the gather ahead) lost with it (b16 x 4096
#: 78.4 -> 78.7, b1 x 4096 15.8 -> 16.05: ptxas sized them for the peeled step, 150 registers, and
#: capped at 128 they still ran slower), so they keep the masked loop.
PEEL_ENABLED = True


def _register_cap(warps: int, programs_per_sm: int):
    """Registers per thread that let `programs_per_sm` programs of `warps` warps share an SM's 64K
    (a multiple of 8, ptxas's allocation unit); None when that is no cap (>= 255)."""
    cap = 65536 // (programs_per_sm * warps * 32) // 8 * 8
    return cap if cap < 255 else None


def _sm_count(device: torch.device) -> int:
    n = _SM_COUNT.get(device)
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _CPU_SM_COUNT
        _SM_COUNT[device] = n
    return n


def decode_launch_config(head_size_k: int, head_size_v: int, cache_elem_bytes: int, base_programs: int,
                         sm_count: int, pinned_widen: bool = False):
    """(BLOCK_N, num_warps, num_stages, programs_per_sm) of the main kernel, for `base_programs` =
    batch x kv heads (x row chunks) programs before any split.

    About 16 KB of keys per loop step: 64 tokens x 128 x 2 B (32 tokens for head sizes over 128).
    programs_per_sm is how many programs fit on an SM at once (sm_90: 112-116 registers and 38 KB of
    shared memory for 16-bit caches, <= 128 and 57 KB allow 4), which the split heuristic fills.
    Deeper pipelines and 8 warps were no faster for 16-bit caches, nor were 1- or 2-warp programs
    (H100 and H200, benchmarks/README.md).

    FP8 with `pinned_widen` (values widened by `_widen_fp8_pinned`), measured on an H200 (`--tune`,
    results/paged_decode_tune_h200_s4*.json, _s5r3, _s5r4): the FP8 kernel is bound by issue and
    latency rather than by DRAM, so it wants (a) one-warp programs, which keep the softmax reductions
    and the p operand inside the warp where four warps split the tokens and meet in shared memory
    behind barriers, (b) num_stages >= 5, where Triton double-buffers the key and value tiles (with
    2-4 it keeps one buffer, because the block-table gather takes a pipeline stage, and waits for
    every copy at the top of each step: 27% of the samples of an ncu profile sat on that barrier),
    and (c) many programs per SM. Since FP8 programs hold the group's own 4 q rows (MIN_ROWS_FP8)
    rather than 16, one warp x 32 tokens x 5 stages takes 202 registers and 26 KB of shared memory
    (~170 registers since SWAP_AB and PEEL, Triton 3.6):
    8 programs per SM, at every batch (b16 x 16384 167.2 -> 149.2 µs, b64 x 16384 618.4 -> 526.4,
    b128 x 4096 301.6 -> 267.4 against the 7-stage, 6-per-SM config of session 4; b16 x 4096 equal,
    51.4). Without pinned widening (Triton's conversion; measured on an H100): 128-token steps (196
    registers, 2 per SM) when the batch is small; with at least two programs per SM before
    splitting, 64-token steps pipelined 5 deep (145 registers, 3 per SM) are 5-10% faster."""
    head = max(head_size_k, head_size_v)
    if cache_elem_bytes == 1 and head <= 128:
        if pinned_widen:
            return 32, 1, 5, 8
        return (64, 4, 5, 3) if base_programs >= 2 * sm_count else (128, 4, 2, 2)
    return (64 if head <= 128 else 32), 4, 2, 4


def choose_num_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int, sm_count: int,
                      programs_per_sm: int = 4) -> int:
    """Split-KV factor (a power of two) for batch x kv_heads rows of up to `max_len` tokens.

    Fills one wave of resident programs (programs_per_sm x sm_count slots): the largest power of
    two with batch x kv_heads x splits <= slots. When the rows alone exceed the slots but fill less
    than 1.5 waves, 2 splits, so that the last wave is not mostly empty. At least
    MIN_TILES_PER_SPLIT tiles of BLOCK_N tokens per split, at most MAX_SPLITS."""
    base = max(1, batch * num_kv_heads)
    slots = programs_per_sm * sm_count
    if base <= slots:
        n = slots // base
    else:
        n = 2 if 2 * base < 3 * slots else 1
    tiles = -(-max(1, max_len) // block_n)
    n = min(n, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS)
    if n <= 1:
        return 1
    return 1 << (n.bit_length() - 1)  # round down to a power of two


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------

def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_scale(name, s, num_kv_heads, device):
    if s is None:
        raise ValueError(f"{name} is required for an FP8 cache (value = stored x {name})")
    _check_tensor(name, s)
    if s.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {s.dtype}")
    if s.numel() not in (1, num_kv_heads) or (s.numel() == num_kv_heads and s.dim() > 1 and s.shape[-1] != num_kv_heads):
        raise ValueError(f"{name} must have 1 or num_kv_heads={num_kv_heads} elements, got shape {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"{name} must be on {device}, got {s.device}")
    if s.numel() > 1 and not s.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


class _Plan:
    """Everything about a call that depends only on metadata: computed once per configuration."""

    __slots__ = ("grid", "ints", "consts", "warps", "stages", "splits", "rgrid", "rints", "rconsts",
                 "part_acc", "part_max", "part_sum", "part_addrs", "out_shape", "fp8", "dummy",
                 "device_index", "direct", "rdirect", "tail", "rtail", "pdl", "dummy_addrs", "arrivals",
                 "merges", "maxnreg", "capture_plan", "capture_warm")


def _build_plan(query, key_cache, value_cache, block_tables, seq_lens, kv_layout, scale, kv_cache_dtype,
                k_scale, v_scale, out, num_splits, max_seq_len, fused_max=None) -> _Plan:
    """Validate every argument (metadata only, no device sync) and precompute the launches.

    With the split left to the heuristic, a plan whose split needs the merge kernel may come back as
    the one-launch plan of eager calls, holding the heuristic's plan as `capture_plan` (see
    EAGER_ONE_LAUNCH_ENABLED). `fused_max`: the most pieces fused (default FUSED_MERGE_MAX_SPLITS)."""
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        _check_tensor(name, t)
    lay = get_layout(kv_layout)  # ValueError naming kv_layout
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if query.dim() != 3:
        raise ValueError(f"query must be [batch, num_q_heads, head_size], got shape {tuple(query.shape)}")
    if query.dtype not in _QUERY_DTYPES:
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    device = query.device
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens)):
        if t.device != device:
            raise ValueError(f"{name} must be on the query's device {device}, got {t.device}")
    fp8 = kv_cache_dtype != "auto"
    if fp8:
        want = _FP8_NAMES[kv_cache_dtype]
        for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
            if t.dtype not in (want, torch.uint8):
                raise TypeError(f"{name} must be {want} or uint8 for kv_cache_dtype={kv_cache_dtype!r}, got {t.dtype}")
    else:
        for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
            if t.dtype != query.dtype:
                raise TypeError(f"{name} dtype {t.dtype} must equal the query dtype {query.dtype} "
                                f"with kv_cache_dtype='auto'")
    kc = as_cache_dtype(key_cache, kv_cache_dtype)
    vc = as_cache_dtype(value_cache, kv_cache_dtype)
    num_blocks, block_size, num_kv_heads, head_k, head_v = cache_geometry(kv_layout, kc, vc)
    if lay.splits_key_dim and kc.shape[-1] * kc.element_size() != 16:
        raise ValueError(f"key_cache's last dim must be x = 16 // element size = {16 // kc.element_size()} "
                         f"for kv_layout='paged5d', got {kc.shape[-1]}")
    batch, num_q_heads, head_q = query.shape
    if head_q != head_k:
        raise ValueError(f"query head_size {head_q} must equal the key cache's head_size {head_k}")
    for name, h in (("head_size", head_k), ("value head_size", head_v)):
        if not 1 <= h <= _MAX_HEAD_SIZE:
            raise ValueError(f"{name} must be in [1, {_MAX_HEAD_SIZE}], got {h}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query's num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if block_tables.dtype != torch.int32:
        raise TypeError(f"block_tables must be int32, got {block_tables.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks], got shape {tuple(block_tables.shape)}")
    if seq_lens.dtype != torch.int32:
        raise TypeError(f"seq_lens must be int32, got {seq_lens.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must be [batch={batch}], got shape {tuple(seq_lens.shape)}")
    if batch > 1 and seq_lens.stride(0) != 1:
        raise ValueError("seq_lens must be contiguous")
    if batch > 65535:  # the grid's third axis
        raise ValueError(f"query's batch must be <= 65535, got {batch}")
    if fp8:
        _check_scale("k_scale", k_scale, num_kv_heads, device)
        _check_scale("v_scale", v_scale, num_kv_heads, device)
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if out is not None:
        _check_tensor("out", out)
        if tuple(out.shape) != (batch, num_q_heads, head_v):
            raise ValueError(f"out must be [{batch}, {num_q_heads}, {head_v}], got shape {tuple(out.shape)}")
        if out.dtype != query.dtype:
            raise TypeError(f"out must be {query.dtype} like the query, got {out.dtype}")
        if out.device != device:
            raise ValueError(f"out must be on {device}, got {out.device}")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                   or not 1 <= num_splits <= 1024):
        raise ValueError(f"num_splits must be None or an int in [1, 1024], got {num_splits!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool)
                                    or max_seq_len < 0):
        raise ValueError(f"max_seq_len must be None or an int >= 0, got {max_seq_len!r}")

    plan = _Plan()
    plan.fp8 = fp8
    plan.device_index = device.index
    plan.direct = plan.rdirect = None  # raw-launch handles, taken after the first aligned call (False: none)
    plan.out_shape = (batch, num_q_heads, head_v)
    group = num_q_heads // num_kv_heads
    swap = SWAP_AB_FP8 if fp8 else SWAP_AB_16BIT
    rows = max(MIN_ROWS_SWAP if swap else MIN_ROWS_FP8 if fp8 else MIN_ROWS, min(_next_pow2(group), _MAX_ROWS))
    row_chunks = -(-group // rows)
    sm_count = _sm_count(device)
    v_widen = _v_widen(device, kv_cache_dtype) if fp8 else 0
    block_n, warps, stages, per_sm = decode_launch_config(head_k, head_v, kc.element_size(),
                                                          batch * num_kv_heads * row_chunks, sm_count, v_widen > 0)

    capacity = block_tables.shape[1] * block_size
    bucket = capacity if max_seq_len is None else min(_next_pow2(max(max_seq_len, 1)), max(capacity, 1))
    chosen = num_splits is None
    if chosen:
        num_splits = choose_num_splits(batch, num_kv_heads * row_chunks, bucket, block_n, sm_count, per_sm)
    plan.splits = num_splits
    fused = FUSED_MERGE_ENABLED and 1 < num_splits <= (FUSED_MERGE_MAX_SPLITS if fused_max is None else fused_max)
    plan.capture_plan, plan.capture_warm = None, True
    bucket_bytes = batch * bucket * num_kv_heads * (head_k * kc.element_size() + head_v * vc.element_size())
    if (chosen and num_splits > 1 and not fused and not fp8 and FUSED_MERGE_ENABLED and EAGER_ONE_LAUNCH_ENABLED
            and bucket_bytes <= EAGER_ONE_LAUNCH_MAX_BYTES):
        eager = _build_plan(query, key_cache, value_cache, block_tables, seq_lens, kv_layout, scale,
                            kv_cache_dtype, k_scale, v_scale, out, min(num_splits, EAGER_FUSED_MAX_SPLITS),
                            max_seq_len, fused_max=EAGER_FUSED_MAX_SPLITS)
        eager.capture_plan = _build_plan(query, key_cache, value_cache, block_tables, seq_lens, kv_layout, scale,
                                         kv_cache_dtype, k_scale, v_scale, out, num_splits, max_seq_len)
        eager.capture_warm = False  # the first eager call also compiles the capture plan
        return eager
    plan.pdl = num_splits > 1 and not fused and _pdl_available(device)

    ks = cache_strides(kv_layout, kc, is_key=True)
    vs = cache_strides(kv_layout, vc, is_key=False)
    k_align = _align(ks.block, ks.slot, ks.head, ks.dim_hi)
    v_align = _align(vs.block, vs.slot, vs.head)
    v_run = 1
    if vs.slot == 1 and vs.dim_lo != 1:  # value tokens contiguous inside a page (paged5d)
        run = block_n if block_size % block_n == 0 else block_size if block_n % block_size == 0 else 1
        if run > 1 and vs.block % run == 0:  # run starts are then multiples of `run` too
            v_run = run
    head_k_pad = max(16, _next_pow2(head_k))
    head_v_pad = max(16, _next_pow2(head_v))
    sm_scale = float(head_k ** -0.5 if scale is None else scale)
    # `out` strides are part of the plan key; a fresh output is contiguous
    out_strides = tuple(out.stride()) if out is not None else (num_q_heads * head_v, head_v, 1)
    # GATHER_AHEAD's guess: the kernel's split_len (a piece rounded up to BLOCK_N) for a row as long as the bucket
    piece = -(-bucket // num_splits)
    guess_split_len = -(-piece // block_n) * block_n if num_splits > 1 else 0
    gather_ahead = GATHER_AHEAD_ALWAYS or (GATHER_AHEAD_ENABLED and not fp8 and num_splits > 1)
    peel = bool(v_run > 1 or (PEEL_ENABLED and not gather_ahead))
    plan.ints = (
        *query.stride(), *out_strides,
        *block_tables.stride(),
        ks.block, ks.slot, ks.head, ks.dim_hi, ks.dim_lo,
        vs.block, vs.slot, vs.head, vs.dim_lo,
        num_q_heads,
        capacity,
        guess_split_len,
        sm_scale * _LOG2E,
    )
    plan.consts = (
        block_size, block_n, head_k, head_k_pad, head_v, head_v_pad, ks.x, k_align, v_align, v_run, group, rows,
        row_chunks, num_splits, fp8,
        bool(fp8 and k_scale.numel() > 1), bool(fp8 and v_scale.numel() > 1),
        device.type != "cuda" and query.dtype == torch.bfloat16 and not fp8,
        query.dtype == torch.float32 and not fp8,
        plan.pdl,
        fused,
        *_merge_shape(group, rows, head_v_pad, num_splits, warps),
        gather_ahead,
        peel,
        bool(KV_SAME_ENABLED and v_run == 1 and (ks.block, ks.slot) == (vs.block, vs.slot)),
        bool(PAGE_ORDER_ENABLED and ks.x > 0 and ks.dim_lo == 1 and v_run > 1 and vs.dim_lo % v_run == 0),
        swap,
        v_widen,
    )
    plan.grid = (num_splits, num_kv_heads * row_chunks, batch)
    plan.warps, plan.stages = warps, stages
    # The peeled last step (PEEL) loads its tiles into registers outside the pipelined loop, and ptxas
    # may then size the whole kernel for it: paged5d took 168 registers (Triton 3.9), i.e. 3 programs
    # per SM instead of 4, so paged5d launches are capped at what `per_sm` programs leave (ptxas spills
    # a few pointers around the loop). Others stay uncapped: the unsplit NHD kernel takes 126 as it is,
    # and with a cap ptxas schedules its loop worse (410 sm_90 instructions per step instead of 368).
    cap = v_run > 1 and REGISTER_CAP_ENABLED
    plan.maxnreg = _register_cap(warps, per_sm) if cap else None
    # a 1-element float32 stand-in for unused pointer arguments (scales without FP8, partials without splits)
    plan.dummy = torch.zeros(1, dtype=torch.float32, device=device)
    plan.dummy_addrs = (plan.dummy.data_ptr(),) * 2  # the scale pointers of 16-bit caches
    # split-KV scratch, allocated once per configuration (so that graph capture allocates nothing)
    plan.arrivals = plan.dummy
    plan.merges = num_splits > 1 and not fused  # a second launch: the merge kernel
    if num_splits > 1:
        plan.part_acc = torch.empty(batch, num_q_heads, num_splits, head_v_pad, dtype=torch.float32, device=device)
        plan.part_max = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=device)
        plan.part_sum = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=device)
        if fused:  # zero now; each call's last arrivals put their counters back to zero
            plan.arrivals = torch.zeros(batch, num_kv_heads * row_chunks, dtype=torch.int32, device=device)
        plan.rgrid = (num_q_heads, batch)
        plan.rints = (*out_strides, num_q_heads)
        plan.rconsts = (block_n, head_v, head_v_pad, group, num_splits, max(2, _next_pow2(num_splits)), fp8,
                        bool(fp8 and v_scale.numel() > 1), plan.pdl)
    else:
        plan.part_acc = plan.part_max = plan.part_sum = plan.dummy
    plan.part_addrs = (plan.part_acc.data_ptr(), plan.part_max.data_ptr(), plan.part_sum.data_ptr())
    # the hot path's arguments after the pointers
    plan.tail = plan.part_addrs + (plan.arrivals.data_ptr(),) + plan.ints + plan.consts
    plan.rtail = (plan.rints + plan.rconsts) if plan.merges else ()
    return plan


#: True inside a CUDA graph capture on the current stream (torch's C function: no Python frame)
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing
#: plans by metadata key. Never evicted: a captured CUDA graph keeps the raw addresses of its plan's
#: scratch buffers, which must outlive it (a few MB at most per configuration).
_PLANS: dict = {}
_TRITON = triton_available()


def _debug_checks(block_tables, seq_lens, num_blocks, block_size):
    """MINIATTN_DEBUG=1: seq_lens within the table, block ids in range (syncs the device)."""
    cap = block_tables.shape[1] * block_size
    sl = seq_lens.to(torch.int64)
    if bool((sl < 0).any()) or bool((sl > cap).any()):
        raise ValueError(f"seq_lens must be in [0, max_blocks * block_size = {cap}], got min {int(sl.min())} "
                         f"max {int(sl.max())}")
    pages = (sl + block_size - 1) // block_size  # blocks each row uses
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < pages[:, None]
    ids = block_tables.to(torch.int64)[used]
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= num_blocks).any())):
        raise ValueError(f"block_tables holds block ids outside [0, num_blocks={num_blocks}) in used entries: "
                         f"min {int(ids.min())} max {int(ids.max())}")


def paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, *, kv_layout="NHD", scale=None,
                           kv_cache_dtype="auto", k_scale=None, v_scale=None, out=None, num_splits=None,
                           max_seq_len=None):
    """Decode attention of one query token per sequence over a paged KV cache.

    Parameters
    ----------
    query : [batch, num_q_heads, head_size] float16 / bfloat16 / float32 (float32 runs exact fp32 dots:
        a test/CPU path, slower on the GPU than the 16-bit types).
    key_cache, value_cache : one layer's caches in `kv_layout` ("NHD", "HND" or "paged5d", see
        `miniattn.layout`), in the query dtype or, with an FP8 `kv_cache_dtype`, float8 / uint8.
        Views are fine (e.g. the halves of `layout.split_combined_cache`: key and value head sizes
        may differ).
    block_tables : [batch, max_blocks] int32, block ids of each sequence in order.
    seq_lens : [batch] int32, tokens in the cache per sequence (0: a padding row, output zeros).
    scale : softmax scale, default head_size ** -0.5.
    kv_cache_dtype : "auto", "fp8" / "fp8_e4m3" or "fp8_e5m2".
    k_scale, v_scale : float32 tensors of 1 or num_kv_heads elements (FP8 only; value = stored x scale).
    out : optional [batch, num_q_heads, head_size_v] output (query dtype).
    num_splits : force the split-KV factor (1 = no split); default from `choose_num_splits`.
    max_seq_len : optional host-side upper bound of seq_lens, used only to pick the split factor.

    Returns
    -------
    [batch, num_q_heads, head_size_v] tensor in the query dtype (`out` when given).

    CUDA graphs
    -----------
    The launch grid depends only on metadata: batch, heads, and the split factor, which is chosen
    from a *length bucket*: ``next_pow2(max_seq_len)`` capped at the table capacity when `max_seq_len`
    is given, else the block table's capacity ``max_blocks * block_size``. The split lengths are
    computed on the device from seq_lens, so a captured call replays correctly with any new seq_lens
    (and block_tables contents) within the capacity; the bucket only affects speed. Capture after
    one eager call with the same shapes (compilation and the split-KV scratch buffers happen there);
    the scratch (and the fused merge's arrival counters) is shared by all calls of one configuration,
    so calls of one configuration must not run concurrently on different streams. Where the split
    would need the separate merge kernel and the bucket is small (EAGER_ONE_LAUNCH_ENABLED), eager
    calls fuse fewer pieces into one launch and a captured call takes the heuristic's split with the
    merge kernel (what is fastest on the GPU); both are prepared by the first eager call, and their
    results agree to rounding (the partials are summed in another order), not bit for bit.

    Example
    -------
    >>> import torch, miniattn
    >>> k, v = miniattn.allocate_kv_caches("NHD", 1, 64, 16, 2, 64, torch.float16)[0]
    >>> k.normal_(); v.normal_()  # doctest: +SKIP
    >>> q = torch.randn(3, 8, 64, dtype=torch.float16)
    >>> bt = torch.randperm(64, dtype=torch.int32)[:12].reshape(3, 4)
    >>> o = miniattn.paged_decode_attention(q, k, v, bt, torch.tensor([5, 64, 0], dtype=torch.int32))
    >>> o.shape
    torch.Size([3, 8, 64])
    """
    try:
        key = (query.shape, query.stride(), query.dtype, query.device,
               key_cache.shape, key_cache.stride(), key_cache.dtype, key_cache.device,
               value_cache.shape, value_cache.stride(), value_cache.dtype, value_cache.device,
               block_tables.shape, block_tables.stride(), block_tables.dtype, block_tables.device,
               seq_lens.shape, seq_lens.stride(), seq_lens.dtype, seq_lens.device,
               kv_layout, scale, kv_cache_dtype, num_splits,
               # max_seq_len by its power-of-two bucket (what the plan uses); invalid values stay as
               # they are, match no valid plan and fail validation
               max_seq_len if max_seq_len is None or max_seq_len <= 0 else (max_seq_len - 1).bit_length() + 1,
               None if out is None else (out.shape, out.stride(), out.dtype, out.device),
               None if k_scale is None else (k_scale.shape, k_scale.dtype, k_scale.device),
               None if v_scale is None else (v_scale.shape, v_scale.dtype, v_scale.device))
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):  # not a tensor somewhere (or unhashable): let validation say which
        key, plan = None, None
    if plan is None:
        plan = _build_plan(query, key_cache, value_cache, block_tables, seq_lens, kv_layout, scale,
                           kv_cache_dtype, k_scale, v_scale, out, num_splits, max_seq_len)
        if key is not None:
            _PLANS[key] = plan

    if debug_enabled():
        num_blocks, block_size = cache_geometry(kv_layout, key_cache, value_cache)[:2]
        _debug_checks(block_tables, seq_lens, num_blocks, block_size)

    if not _TRITON or not (query.is_cuda or interpreting()):
        return _fallback(query, key_cache, value_cache, block_tables, seq_lens, kv_layout, scale,
                         kv_cache_dtype, k_scale, v_scale, out)

    capturing = plan.capture_plan is not None and query.is_cuda and _capturing()
    if capturing:  # inside a CUDA graph capture: the split that is fastest on the GPU (EAGER_ONE_LAUNCH_ENABLED)
        plan = plan.capture_plan
    if out is None:  # the query's dtype and device, sizes spread out: the cheapest allocation torch has here
        out = query.new_empty(*plan.out_shape)  # (1.2 µs on the dev VM; torch.empty(shape, ...) 1.7-2.6)
    direct = plan.direct
    if direct:
        # Hot path: this configuration is validated and both kernels are compiled for 16-byte aligned
        # pointers. Raw addresses go straight to the compiled kernels' C launchers (no per-pointer
        # data_ptr() / attribute query there, no key building); profilers' launch hooks take the
        # Launcher path below. (uint8 FP8 caches need no float8 view: the address is the same.)
        q_a, k_a, v_a, o_a = query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), out.data_ptr()
        bt_a, sl_a = block_tables.data_ptr(), seq_lens.data_ptr()
        ks_a, vs_a = (k_scale.data_ptr(), v_scale.data_ptr()) if plan.fp8 else plan.dummy_addrs
        if not (q_a | k_a | v_a | o_a | bt_a | sl_a | ks_a | vs_a) & 15 and not hooks_installed():
            stream = torch._C._cuda_getCurrentRawStream(plan.device_index)
            g = plan.grid
            if direct.spread:  # `launch.DirectLaunch.__call__`, inlined (one Python frame less)
                direct.fn(g[0], g[1], g[2], stream, *direct.head, q_a, k_a, v_a, bt_a, sl_a, ks_a, vs_a, o_a,
                          *plan.tail)
            else:
                direct.fn(g[0], g[1], g[2], stream, *direct.head, (q_a, k_a, v_a, bt_a, sl_a, ks_a, vs_a, o_a,
                                                                   *plan.tail))
            if plan.merges:
                r = plan.rdirect
                if r.spread:
                    r.fn(plan.rgrid[0], plan.rgrid[1], 1, stream, *r.head, *plan.part_addrs, sl_a, vs_a, o_a,
                         *plan.rtail)
                else:
                    r.fn(plan.rgrid[0], plan.rgrid[1], 1, stream, *r.head, (*plan.part_addrs, sl_a, vs_a, o_a,
                                                                           *plan.rtail))
            return out

    args = (query, key_cache, value_cache, block_tables, seq_lens, kv_cache_dtype, k_scale, v_scale, out)
    if not plan.capture_warm and not capturing:
        # compile (and take the raw-address handles of) the plan a later capture will launch, now:
        # a capture must not compile. Its output is overwritten below.
        _launch(plan.capture_plan, *args)
        plan.capture_warm = True
    _launch(plan, *args)
    return out


def _launch(plan, query, key_cache, value_cache, block_tables, seq_lens, kv_cache_dtype, k_scale, v_scale, out):
    """The launches of one call through `Launcher` (compiling on first use), and the raw-address
    handles of the hot path once the pointers allow them."""
    ks, vs = (k_scale, v_scale) if plan.fp8 else (plan.dummy, plan.dummy)
    kc, vc = key_cache, value_cache
    if plan.fp8:
        kc, vc = as_cache_dtype(kc, kv_cache_dtype), as_cache_dtype(vc, kv_cache_dtype)
    ptrs = (query, kc, vc, block_tables, seq_lens, ks, vs, out, plan.part_acc, plan.part_max, plan.part_sum,
            plan.arrivals)
    _DECODE(plan.grid, ptrs, plan.ints, plan.consts, plan.warps, plan.stages, maxnreg=plan.maxnreg)
    rptrs = (plan.part_acc, plan.part_max, plan.part_sum, seq_lens, vs, out)
    if plan.merges:
        _REDUCE(plan.rgrid, rptrs, plan.rints, plan.rconsts, 4, 1, launch_pdl=plan.pdl)
    if plan.direct is None and query.is_cuda and not interpreting() and not any(p.data_ptr() & 15 for p in ptrs):
        plan.direct = compiled_handle(_paged_decode_kernel, plan.grid, ptrs, plan.ints, plan.consts, plan.warps,
                                       plan.stages, maxnreg=plan.maxnreg)
        if plan.direct and plan.merges:
            plan.rdirect = compiled_handle(_paged_decode_reduce_kernel, plan.rgrid, rptrs, plan.rints,
                                            plan.rconsts, 4, 1, launch_pdl=plan.pdl)
            plan.direct = plan.direct if plan.rdirect else False


def _fallback(query, key_cache, value_cache, block_tables, seq_lens, kv_layout, scale, kv_cache_dtype,
              k_scale, v_scale, out):
    """Triton missing (or CPU tensors outside the interpreter): the float64 reference, cast."""
    res = paged_decode_attention_ref(query, key_cache, value_cache, block_tables, seq_lens, kv_layout=kv_layout,
                                     scale=scale, kv_cache_dtype=kv_cache_dtype, k_scale=k_scale,
                                     v_scale=v_scale).to(query.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out
