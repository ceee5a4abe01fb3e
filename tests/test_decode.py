"""paged_decode_attention against the float64 reference, on fresh random inputs (seeded per case).

On a CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay tiny and the
layout x GQA x head size x block size cross product is sampled (every value of each axis appears).
"""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from miniattn.layout import allocate_kv_caches, from_nhd, split_combined_cache
from miniattn.timing import capture_graph
from miniattn.ops import decode as decode_mod
from miniattn.ops.decode import choose_num_splits, paged_decode_attention
from miniattn.ops.cache_write import reshape_and_cache, reshape_and_cache_flash
from miniattn.ops.reference import fp8_quantize, paged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("NHD", "HND", "paged5d")
HEAD_SIZES = (64, 80, 96, 112, 120, 128, 192, 256)
BLOCK_SIZES = (8, 16, 32, 64, 128)
GQA = ((2, 2), (4, 1), (8, 1), (6, 1))  # (num_q_heads, num_kv_heads): ratio 1, 4, 8, all-to-one (6:1)
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _seed(*case):
    torch.manual_seed(zlib.crc32(repr(case).encode()))


def rel_err(out, ref):
    out = out.double()
    assert not torch.isnan(out).any(), "NaN in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_case(layout, num_q_heads, num_kv_heads, head_size, block_size, lens, dtype=torch.bfloat16,
              kv_cache_dtype="auto", per_head_scale=False, head_size_v=None, extra_blocks=3):
    """Random caches in `layout` (values stored in every slot), a random non-contiguous block table
    and a query. Returns the kwargs of paged_decode_attention."""
    head_size_v = head_size_v or head_size
    batch = len(lens)
    max_blocks = max(1, max(-(-n // block_size) for n in lens))
    num_blocks = batch * max_blocks + extra_blocks
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_size, dtype=dtype, device=DEVICE)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_size_v, dtype=dtype, device=DEVICE)
    kw = {}
    if kv_cache_dtype != "auto":
        n = num_kv_heads if per_head_scale else 1
        ks = (torch.rand(n, device=DEVICE) * 0.5 + 0.02).float()
        vs = (torch.rand(n, device=DEVICE) * 0.5 + 0.02).float()
        fdt = FP8[kv_cache_dtype]
        k = fp8_quantize(k.flatten(0, 1), ks, fdt).view(k.shape)
        v = fp8_quantize(v.flatten(0, 1), vs, fdt).view(v.shape)
        kw.update(kv_cache_dtype=kv_cache_dtype, k_scale=ks, v_scale=vs)
    if head_size_v != head_size:  # NHD combined cache, as `split_combined_cache` views it
        assert layout == "NHD"
        comb = torch.cat([k, v], dim=-1)
        kc, vc = split_combined_cache(comb, head_size)
    else:
        kc, vc = from_nhd(layout, k, v)
    perm = torch.randperm(num_blocks, device=DEVICE)[: batch * max_blocks]
    block_tables = perm.reshape(batch, max_blocks).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(batch, num_q_heads, head_size, dtype=dtype, device=DEVICE)
    return dict(query=query, key_cache=kc, value_cache=vc, block_tables=block_tables, seq_lens=seq_lens,
                kv_layout=layout, **kw)


def check(case, tol, **kw):
    out = paged_decode_attention(**case, **kw)
    if DEVICE == "cuda":  # the second call of a configuration takes the raw-address hot path
        again = paged_decode_attention(**case, **kw)
        assert torch.equal(again, out) and (kw.get("out") is None or again is kw["out"])
    ref = paged_decode_attention_ref(**case)
    assert out.dtype == case["query"].dtype
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    zero = case["seq_lens"] == 0
    if zero.any():
        assert (out[zero] == 0).all(), "seq_len 0 rows must be exactly zero"
    return out


def _lens(bs):
    return (1, bs, bs + 1, 0, 2 * bs + 7)


# a covering sample of layouts x GQA x head sizes x block sizes x dtypes: every head size twice,
# every (layout, ratio) pair and every block size several times
_PAIRS = list(itertools.product(LAYOUTS, GQA))  # all 12 (layout, ratio) pairs, then 4 more
_PAIRS += random.Random(3).sample(_PAIRS, 4)
_CROSS = []
for i, (hs, (lay, (qh, kvh))) in enumerate(zip(HEAD_SIZES * 2, _PAIRS)):
    bs = BLOCK_SIZES[i % 5]
    dt = (torch.bfloat16, torch.float16)[(i // 2) % 2]
    _CROSS.append((lay, qh, kvh, hs, bs, dt))
assert {c[0] for c in _CROSS} == set(LAYOUTS) and {c[4] for c in _CROSS} == set(BLOCK_SIZES)
assert {(c[0], c[1]) for c in _CROSS} == set(itertools.product(LAYOUTS, [g[0] for g in GQA]))


@pytest.mark.parametrize("layout,qh,kvh,head_size,block_size,dtype", _CROSS,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(layout, qh, kvh, head_size, block_size, dtype):
    _seed(layout, qh, kvh, head_size, block_size, dtype)
    case = make_case(layout, qh, kvh, head_size, block_size, _lens(block_size), dtype=dtype)
    check(case, 1e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_exact(layout):
    """float32 queries and caches run exact (ieee) fp32 dots: far tighter than the 16-bit tolerance."""
    _seed(layout, "fp32")
    case = make_case(layout, 8, 2, 64, 8, (1, 8, 9, 0, 23), dtype=torch.float32)
    check(case, 1e-5)
    check(case, 1e-5, num_splits=3)


@pytest.mark.parametrize("layout,kv_cache_dtype,per_head,head_size,as_uint8", [
    ("NHD", "fp8", False, 128, False),
    ("HND", "fp8_e4m3", True, 64, True),
    ("paged5d", "fp8_e5m2", False, 96, False),
    ("paged5d", "fp8", True, 64, True),
    ("NHD", "fp8_e5m2", True, 80, False),
    ("HND", "fp8_e5m2", False, 120, True),
    ("NHD", "fp8", False, 256, False),  # head sizes over 128: the 4-warp FP8 config
    ("paged5d", "fp8_e5m2", True, 192, False),
])
def test_fp8(layout, kv_cache_dtype, per_head, head_size, as_uint8):
    _seed(layout, kv_cache_dtype, per_head, head_size, as_uint8)
    case = make_case(layout, 8, 2, head_size, 16, (1, 16, 17, 0, 40), kv_cache_dtype=kv_cache_dtype,
                     per_head_scale=per_head)
    if as_uint8:
        case["key_cache"] = case["key_cache"].view(torch.uint8)
        case["value_cache"] = case["value_cache"].view(torch.uint8)
    check(case, 2e-2)
    check(case, 2e-2, num_splits=3)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_large_batch_launch_config(kv_cache_dtype):
    """Enough rows for two programs per SM before splitting: FP8 takes its launch config for that
    (on sm_89+ GPUs the one config: one warp, 32 tokens, 5 stages; before, 64-token 4-warp programs)
    and stays within the FP8 tolerance."""
    dev = torch.device(DEVICE)
    kvh = 2
    batch = 2 * decode_mod._sm_count(dev) // kvh + 1
    rng = random.Random(batch)
    lens = [rng.randrange(0, 70) for _ in range(batch)]
    _seed("fp8 large batch", kv_cache_dtype)
    case = make_case("NHD", 4 * kvh, kvh, 64, 16, lens, kv_cache_dtype=kv_cache_dtype)
    decode_mod._PLANS.clear()
    check(case, 2e-2)
    plan = next(iter(decode_mod._PLANS.values()))
    widen = plan.consts[-1] > 0
    want = decode_mod.decode_launch_config(64, 64, 1, batch * kvh, decode_mod._sm_count(dev), widen)
    assert (plan.consts[1], plan.warps, plan.stages) == want[:3]
    if widen:
        assert want[:3] == (32, 1, 5)


#: decode settings off their defaults: the masked loop everywhere, the transposed products for 16-bit
#: caches and not for FP8, separate value offsets
_OFF_DEFAULT = ({"PEEL_ENABLED": False}, {"SWAP_AB_16BIT": True, "SWAP_AB_FP8": False}, {"KV_SAME_ENABLED": False})


@pytest.mark.parametrize("layout,kv_cache_dtype,knobs",
                         [(lay, "auto", {}) for lay in LAYOUTS] + [("paged5d", "fp8", {}), ("NHD", "fp8", {})]
                         + [(lay, cdt, k) for k in _OFF_DEFAULT for lay, cdt in (("NHD", "auto"), ("NHD", "fp8"))])
def test_unwritten_slots_poisoned(monkeypatch, layout, kv_cache_dtype, knobs):
    """Every slot no row uses holds NaN, keys and values (FP8: the e4m3 NaN byte). Rows end inside a
    page, inside a loop step, inside an 8-token vector, or on a step's edge, with 1 and 3 splits.
    paged5d both in its memory order (whole pages masked: the last page's unused slots are read,
    their scores masked and their values zeroed by the peeled last step) and in the generic order.
    Full steps run without token masks, so any slot past a row's end read there would show. Also with
    the kernel's settings off their defaults (`knobs`). No NaN, and the reference's result."""
    for name, val in knobs.items():
        monkeypatch.setattr(decode_mod, name, val)
    _seed("poison", layout, kv_cache_dtype)
    bs, lens = 16, (21, 64, 3, 0, 75, 130)
    batch, max_blocks = len(lens), -(-max(lens) // bs)
    num_blocks = batch * max_blocks + 2
    k = torch.randn(num_blocks, bs, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn_like(k)
    extra = {}
    if kv_cache_dtype == "fp8":
        s = torch.tensor([0.05], device=DEVICE)
        k = fp8_quantize(k.flatten(0, 1), s, torch.float8_e4m3fn).view(k.shape).view(torch.uint8)
        v = fp8_quantize(v.flatten(0, 1), s, torch.float8_e4m3fn).view(v.shape).view(torch.uint8)
        extra = dict(kv_cache_dtype="fp8", k_scale=s, v_scale=s)
    bt = torch.randperm(num_blocks, device=DEVICE)[: batch * max_blocks].reshape(batch, max_blocks).to(torch.int32)
    used = torch.zeros(num_blocks, bs, dtype=torch.bool, device=DEVICE)
    for row, n in enumerate(lens):
        tok = torch.arange(n, device=DEVICE)
        used[bt[row, tok // bs].long(), tok % bs] = True
    nan = 0x7F if kv_cache_dtype == "fp8" else float("nan")
    k[~used], v[~used] = nan, nan
    kc, vc = from_nhd(layout, k, v)
    case = dict(query=torch.randn(batch, 8, 64, dtype=torch.bfloat16, device=DEVICE), key_cache=kc,
                value_cache=vc, block_tables=bt, seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                kv_layout=layout, **extra)
    ref = paged_decode_attention_ref(**case)
    assert not ref.isnan().any()
    for order in (True, False) if layout == "paged5d" else (True,):
        monkeypatch.setattr(decode_mod, "PAGE_ORDER_ENABLED", order)
        for n in (1, 3):
            monkeypatch.setattr(decode_mod, "_PLANS", {})
            out = paged_decode_attention(**case, num_splits=n)
            (plan,) = decode_mod._PLANS.values()
            assert plan.consts[-3] == (order and layout == "paged5d")  # PAGE_ORDER
            assert rel_err(out, ref) <= (2e-2 if extra else 1e-2)
            assert (out[3] == 0).all()


def test_register_cap():
    """The cap lets programs_per_sm programs share an SM's 64K registers; paged5d launches (the
    peeled last step) take it, the others none, split or not."""
    assert decode_mod._register_cap(4, 4) == 128
    assert decode_mod._register_cap(4, 3) == 168
    assert decode_mod._register_cap(1, 8) is None and decode_mod._register_cap(4, 2) is None
    for layout in LAYOUTS:
        decode_mod._PLANS.clear()
        paged_decode_attention(**make_case(layout, 4, 1, 64, 16, (40,)))
        (plan,) = decode_mod._PLANS.values()
        assert plan.maxnreg == (128 if layout == "paged5d" else None)
        decode_mod._PLANS.clear()
        paged_decode_attention(**make_case(layout, 4, 1, 64, 16, (200,)), num_splits=2)
        (plan,) = decode_mod._PLANS.values()
        assert plan.maxnreg == (128 if layout == "paged5d" else None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_splits_agree(layout):
    """1 split == many splits (and == the reference), lengths long enough for several splits."""
    _seed("splits", layout)
    bs = 16
    case = make_case(layout, 8, 2, 64, bs, (300, 1, 0, 17, 129, 64))
    one = check(case, 1e-2, num_splits=1)
    for n in (2, 5, 8):
        many = check(case, 1e-2, num_splits=n)
        assert rel_err(many, one.double()) <= 1e-2
    # more splits than the sequence has tiles: the extra programs exit, the merge ignores them
    check(case, 1e-2, num_splits=32)


@pytest.mark.parametrize("qh,kvh,kv_cache_dtype", [(8, 2, "auto"), (2, 2, "fp8"), (72, 1, "auto")])
def test_fused_merge_equals_merge_kernel(monkeypatch, qh, kvh, kv_cache_dtype):
    """Split partials merged inside the main kernel (the last program of a sequence and kv head to
    finish) == merged by the separate merge kernel == the reference, with empty pieces (more splits
    than a short row has tiles), padding rows, GQA 4:1, MHA, row chunks (72:1), FP8 with per-head
    scales; every piece merged in one step (8:2, 16-bit) and in chunks of pieces (72:1; FP8 always
    takes the chunked merge). The arrival counters are back at zero after every call, so calls can
    repeat."""
    _seed("fused", qh, kvh, kv_cache_dtype)
    case = make_case("NHD", qh, kvh, 64, 16, (300, 1, 0, 129), kv_cache_dtype=kv_cache_dtype,
                     per_head_scale=True)
    ref = paged_decode_attention_ref(**case)
    outs = {}
    for fused in (True, False):
        monkeypatch.setattr(decode_mod, "FUSED_MERGE_ENABLED", fused)
        monkeypatch.setattr(decode_mod, "_PLANS", {})
        outs[fused] = [paged_decode_attention(**case, num_splits=8) for _ in range(3 if DEVICE == "cuda" else 2)]
        (plan,) = decode_mod._PLANS.values()
        assert plan.merges == (not fused) and plan.splits == 8
        if fused:
            _, merge_chunk, splits_pad = decode_mod._merge_shape(qh // kvh, plan.consts[11], 64, 8, plan.warps)
            one_pass = merge_chunk >= splits_pad and kv_cache_dtype == "auto"  # `_merge_pieces`' ONE_PASS
            assert one_pass == ((qh, kvh) == (8, 2)), "both merge paths are meant to run here"
            assert plan.arrivals.shape == (4, kvh * -(-(qh // kvh) // 64))
            assert (plan.arrivals == 0).all(), "arrival counters not reset"
        poisoned = torch.full_like(outs[fused][0], float("nan"))  # every output element must be written
        outs[fused].append(paged_decode_attention(**case, num_splits=8, out=poisoned))
    for o in outs[True] + outs[False]:
        assert rel_err(o, ref) <= (2e-2 if kv_cache_dtype != "auto" else 1e-2)
        assert (o[2] == 0).all()
    for o in outs[True]:  # the same partials, summed in another order
        assert rel_err(o, outs[False][0].double()) <= 2e-3


@pytest.mark.parametrize("layout", ["NHD", "paged5d"])
def test_gather_ahead(monkeypatch, layout):
    """Split programs gather block ids ahead: the first step's before seq_len is known, at the start
    a split would have if the row filled the table (rows of other lengths start elsewhere: a wrong
    guess, the ids gathered again), then each step the next step's, the last one past the row's
    end masked off. Right and wrong guesses, 2 and 8 splits, rows ending inside a tile, table
    entries past each row's blocks poisoned (an id far out of range: a load through one faults or
    reads garbage): the same bits as the plain gather, and the reference's result."""
    _seed("guess", layout)
    lens = (2000, 100, 0, 700)
    case = make_case(layout, 4, 1, 64, 16, lens)
    ref = paged_decode_attention_ref(**case)
    for row, n in enumerate(lens):
        case["block_tables"][row, -(-n // 16):] = 2**30
    for n in (2, 8):
        outs = []
        for ahead in (True, False):
            monkeypatch.setattr(decode_mod, "GATHER_AHEAD_ENABLED", ahead)
            monkeypatch.setattr(decode_mod, "_PLANS", {})
            outs.append(paged_decode_attention(**case, num_splits=n))
            (plan,) = decode_mod._PLANS.values()
            assert plan.splits == n
        assert torch.equal(outs[0], outs[1])
        assert rel_err(outs[0], ref) <= 1e-2


def test_rows_per_program(monkeypatch):
    """A GQA group of 4 is padded to 16 q rows (the MMA's M) with 16-bit caches, to 4 with FP8."""
    for cdt, want in (("auto", 16), ("fp8", 4)):
        _seed("rows", cdt)
        monkeypatch.setattr(decode_mod, "_PLANS", {})
        check(make_case("NHD", 8, 2, 64, 16, (40, 3), kv_cache_dtype=cdt), 2e-2)
        (plan,) = decode_mod._PLANS.values()
        assert plan.consts[11] == want


def test_merge_shape():
    """The fused merge holds the group's real rows, pieces up to 32 floats per thread per step, a pow2 pad."""
    assert decode_mod._merge_shape(4, 16, 128, 64, 4) == (4, 8, 64)
    assert decode_mod._merge_shape(4, 16, 128, 64, 1) == (4, 2, 64)
    assert decode_mod._merge_shape(1, 16, 64, 3, 4) == (1, 4, 4)
    assert decode_mod._merge_shape(72, 64, 256, 8, 4) == (64, 1, 8)
    assert decode_mod._merge_shape(8, 16, 128, 2, 2) == (8, 2, 2)


def test_split_heuristic():
    assert choose_num_splits(128, 8, 4096, 64, 132) == 1  # the batch alone fills the GPU
    assert choose_num_splits(1, 8, 16384, 64, 132) > 8  # small batch, long context: split
    assert choose_num_splits(1, 8, 64, 64, 132) == 1  # one tile: nothing to split
    for b, ctx in itertools.product((1, 3, 16, 64, 256), (1, 512, 4096, 32768)):
        n = choose_num_splits(b, 8, ctx, 64, 132)
        assert n >= 1 and n & (n - 1) == 0


def test_auto_splits_used(monkeypatch):
    """The default path picks several splits for a long sequence and stays correct."""
    _seed("auto")
    monkeypatch.setattr(decode_mod, "_PLANS", {})
    case = make_case("NHD", 4, 1, 64, 16, (700, 3))
    check(case, 1e-2)
    (plan,) = decode_mod._PLANS.values()
    assert plan.splits > 1


def _long_table_case(tag, lens, capacity, **kw):
    """make_case with block tables widened to `capacity` tokens (valid random ids past each row's
    blocks): a length bucket the rows do not fill, so the split heuristic plans for `capacity`."""
    _seed("long_table", tag)
    case = make_case("NHD", lens=lens, extra_blocks=8, **kw)
    bt = case["block_tables"]
    bs = case["key_cache"].shape[1]
    num_blocks = case["key_cache"].shape[0]
    wide = torch.randint(0, num_blocks, (bt.shape[0], capacity // bs), dtype=torch.int32, device=DEVICE)
    wide[:, : bt.shape[1]] = bt
    case["block_tables"] = wide
    return case


def test_eager_one_launch_plan(monkeypatch):
    """A split that needs the merge kernel (64 pieces for a 4096-token bucket on 132 SMs) becomes, for
    eager calls, 32 pieces merged inside the main kernel (one launch); the heuristic's plan is kept
    as `capture_plan` for graph captures and compiled by the first eager call. Both equal the
    reference and each other to rounding; a forced split, the switch off, a bucket over the byte
    limit, or an FP8 cache keep one plan."""
    monkeypatch.setitem(decode_mod._SM_COUNT, torch.device(DEVICE), 132)
    monkeypatch.setattr(decode_mod, "_PLANS", {})
    case = _long_table_case("eager", (300, 1, 0), 4096, num_q_heads=4, num_kv_heads=1, head_size=64, block_size=16)
    ref = paged_decode_attention_ref(**case)
    out = check(case, 1e-2)
    (plan,) = decode_mod._PLANS.values()
    assert (plan.splits, plan.merges) == (32, False)
    assert (plan.capture_plan.splits, plan.capture_plan.merges) == (64, True) and plan.capture_warm
    assert plan.capture_plan.capture_plan is None
    graph_out = torch.full_like(out, float("nan"))
    decode_mod._launch(plan.capture_plan, case["query"], case["key_cache"], case["value_cache"],
                       case["block_tables"], case["seq_lens"], "auto", None, None, graph_out)
    assert rel_err(graph_out, ref) <= 1e-2 and rel_err(graph_out, out.double()) <= 2e-3
    for knob, val, kw in (("EAGER_ONE_LAUNCH_ENABLED", False, {}), ("EAGER_ONE_LAUNCH_MAX_BYTES", 1 << 20, {}),
                          (None, None, {"num_splits": 64})):
        with monkeypatch.context() as m:
            if knob:
                m.setattr(decode_mod, knob, val)
            m.setattr(decode_mod, "_PLANS", {})
            m.setattr(decode_mod, "_launch", lambda *a: None)  # the plan is what is checked
            paged_decode_attention(**case, **kw)
            (plan,) = decode_mod._PLANS.values()
            assert (plan.splits, plan.merges, plan.capture_plan) == (64, True, None)
    fp8 = _long_table_case("eager8", (300, 1, 0), 4096, num_q_heads=4, num_kv_heads=1, head_size=64, block_size=16,
                           kv_cache_dtype="fp8")
    monkeypatch.setattr(decode_mod, "_launch", lambda *a: None)
    paged_decode_attention(**fp8)
    plan = list(decode_mod._PLANS.values())[-1]
    assert plan.splits > decode_mod.FUSED_MERGE_MAX_SPLITS and plan.merges and plan.capture_plan is None


@pytest.mark.parametrize("num_splits", [1, 4])
def test_padding_rows_and_out(num_splits):
    """seq_len 0 rows give exact zeros; every output element is written (out poisoned with NaN)."""
    _seed("pad", num_splits)
    case = make_case("HND", 8, 2, 64, 16, (0, 33, 0, 0, 5))
    out = torch.full((5, 8, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    res = check(case, 1e-2, num_splits=num_splits, out=out)
    assert res is out
    assert not out.isnan().any()
    assert (out[[0, 2, 3]] == 0).all()


def test_all_padding():
    _seed("allpad")
    case = make_case("NHD", 4, 2, 64, 16, (0, 0, 0))
    for n in (1, 4):
        out = paged_decode_attention(**case, num_splits=n)
        assert (out == 0).all()


def test_diff_kv_head_sizes():
    """192-dim keys with 128-dim values in one combined NHD cache."""
    _seed("diffkv")
    case = make_case("NHD", 8, 2, 192, 16, (1, 16, 17, 50), head_size_v=128)
    out = check(case, 1e-2)
    assert out.shape == (4, 8, 128)
    check(case, 1e-2, num_splits=4)


def test_large_group_row_chunks():
    """MQA with more q heads than one program holds (row chunks)."""
    _seed("mqa")
    case = make_case("NHD", 72, 1, 64, 16, (20, 1))
    check(case, 1e-2)


def test_strided_query_and_scale():
    _seed("strided")
    case = make_case("paged5d", 8, 2, 64, 8, (9, 30))
    big = torch.randn(2, 8, 3 * 64, dtype=torch.bfloat16, device=DEVICE)
    case["query"] = big[:, :, 64:128]  # a slice of a fused qkv output
    out = paged_decode_attention(**case, scale=0.3)
    ref = paged_decode_attention_ref(**case, scale=0.3)
    assert rel_err(out, ref) <= 1e-2


def test_plan_reused_with_new_lengths():
    """A second call with the same shapes but new seq_lens / block tables uses the cached plan."""
    _seed("replan")
    case = make_case("NHD", 4, 1, 64, 16, (40, 40))
    check(case, 1e-2)
    n = len(decode_mod._PLANS)
    case["seq_lens"] = torch.tensor([3, 47], dtype=torch.int32, device=DEVICE)
    case["block_tables"] = case["block_tables"].flip(1).contiguous()
    check(case, 1e-2)
    assert len(decode_mod._PLANS) == n


def test_fallback_without_triton(monkeypatch):
    """Without Triton the reference runs, cast to the query dtype (and written into `out`)."""
    _seed("fallback")
    case = make_case("HND", 4, 2, 64, 16, (5, 0, 20))
    monkeypatch.setattr(decode_mod, "_TRITON", False)
    out = paged_decode_attention(**case)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, paged_decode_attention_ref(**case)) <= 1e-2
    buf = torch.empty_like(out)
    assert paged_decode_attention(**case, out=buf) is buf and torch.equal(buf, out)


def test_max_seq_len_hint():
    """The hint only picks the split factor: any hint, even below the real lengths, is correct."""
    _seed("hint")
    case = make_case("NHD", 4, 1, 64, 16, (700, 3, 0), extra_blocks=30)
    splits = set()
    for hint in (1, 64, 700, 5000):
        check(case, 1e-2, max_seq_len=hint)
        splits.add(list(decode_mod._PLANS.values())[-1].splits)
    assert len(splits) > 1


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

def _bad_cases():
    base = make_case("NHD", 4, 2, 64, 16, (5, 20))
    fp8 = make_case("NHD", 4, 2, 64, 16, (5, 20), kv_cache_dtype="fp8")

    def mod(case=base, **kw):
        c = dict(case)
        c.update(kw)
        return c

    q, bt, sl = base["query"], base["block_tables"], base["seq_lens"]
    return [
        (TypeError, "query", mod(query=q.float())),
        (ValueError, "query", mod(query=q[0])),
        (TypeError, "query", mod(query=q.tolist())),
        (ValueError, "kv_layout", mod(kv_layout="NDH")),
        (ValueError, "kv_cache_dtype", mod(kv_cache_dtype="int8")),
        (TypeError, "key_cache", mod(key_cache=base["key_cache"].half())),
        (ValueError, "key_cache", mod(key_cache=base["key_cache"][..., None])),
        (ValueError, "head_size", mod(query=q[..., :32])),
        (ValueError, "num_q_heads", mod(query=q[:, :3])),
        (TypeError, "block_tables", mod(block_tables=bt.long())),
        (ValueError, "block_tables", mod(block_tables=bt[:1])),
        (TypeError, "seq_lens", mod(seq_lens=sl.long())),
        (ValueError, "seq_lens", mod(seq_lens=sl[:1])),
        (ValueError, "scale", mod(scale=-1.0)),
        (ValueError, "num_splits", mod(num_splits=0)),
        (ValueError, "max_seq_len", mod(max_seq_len=-3)),
        (ValueError, "max_seq_len", mod(max_seq_len=2.5)),
        (ValueError, "seq_lens", mod(seq_lens=torch.zeros(4, dtype=torch.int32, device=DEVICE)[::2])),
        (ValueError, "out", mod(out=torch.empty(2, 4, 32, dtype=q.dtype, device=DEVICE))),
        (TypeError, "out", mod(out=torch.empty(2, 4, 64, dtype=torch.float16, device=DEVICE))),
        (ValueError, "k_scale", mod(fp8, k_scale=None)),
        (TypeError, "v_scale", mod(fp8, v_scale=fp8["v_scale"].double())),
        (ValueError, "k_scale", mod(fp8, k_scale=torch.ones(3, device=DEVICE))),
        (TypeError, "key_cache", mod(fp8, key_cache=base["key_cache"])),
    ]


def test_validation():
    _seed("validation")
    for exc, name, case in _bad_cases():
        with pytest.raises(exc, match=name):
            paged_decode_attention(**case)


def test_debug_checks(monkeypatch):
    _seed("debug")
    case = make_case("NHD", 4, 2, 64, 16, (5, 20))
    monkeypatch.setenv("MINIATTN_DEBUG", "1")
    paged_decode_attention(**case)  # valid: passes
    bad = dict(case, block_tables=case["block_tables"].clone())
    bad["block_tables"][1, 1] = 10_000
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(**bad)
    bad = dict(case, seq_lens=torch.tensor([5, 33], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(**bad)
    monkeypatch.setenv("MINIATTN_DEBUG", "0")
    bad["block_tables"] = case["block_tables"]
    paged_decode_attention(**dict(case))  # checks off again: no error


# ------------------------------------------------------------------------------------------------
# write-then-read round trip
# ------------------------------------------------------------------------------------------------

def _write(layout, key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    if layout == "paged5d":
        reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
    else:
        reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale,
                                kv_layout=layout)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_then_read_round_trip(layout, kv_cache_dtype):
    """Tokens written by the write kernel, attended by the decode kernel == SDPA on the dense K/V
    (FP8: == the reference on what was stored, and near SDPA up to the quantisation noise)."""
    _seed("roundtrip", layout, kv_cache_dtype)
    qh, kvh, d, bs, dtype = 8, 2, 64, 16, torch.bfloat16
    lens = [37, 1, 16, 50]
    batch, max_blocks = len(lens), 4
    num_blocks = batch * max_blocks + 2
    ((kc, vc),) = allocate_kv_caches(layout, 1, num_blocks, bs, kvh, d, dtype, kv_cache_dtype, device=DEVICE)
    kc.view(torch.uint8).fill_(0x7F)  # NaN in bf16, e4m3 and e5m2 alike: never read an unwritten slot
    vc.view(torch.uint8).fill_(0x7F)
    scales = {}
    if kv_cache_dtype != "auto":
        scales = dict(kv_cache_dtype=kv_cache_dtype, k_scale=torch.tensor([0.03], device=DEVICE),
                      v_scale=torch.rand(kvh, device=DEVICE) * 0.02 + 0.01)
    block_tables = torch.randperm(num_blocks, device=DEVICE)[: batch * max_blocks].reshape(batch, max_blocks)
    block_tables = block_tables.to(torch.int32)
    keys = [torch.randn(n, kvh, d, dtype=dtype, device=DEVICE) for n in lens]
    vals = [torch.randn(n, kvh, d, dtype=dtype, device=DEVICE) for n in lens]
    slots = torch.cat([block_tables[b, torch.arange(n, device=DEVICE) // bs].long() * bs
                       + torch.arange(n, device=DEVICE) % bs for b, n in enumerate(lens)])
    slots = torch.cat([slots, torch.full((3,), -1, dtype=torch.long, device=DEVICE)])  # padding tokens
    k_all = torch.cat(keys + [torch.randn(3, kvh, d, dtype=dtype, device=DEVICE)])
    v_all = torch.cat(vals + [torch.randn(3, kvh, d, dtype=dtype, device=DEVICE)])
    _write(layout, k_all, v_all, kc, vc, slots, kv_cache_dtype, scales.get("k_scale"), scales.get("v_scale"))

    query = torch.randn(batch, qh, d, dtype=dtype, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    args = (query, kc, vc, block_tables, seq_lens)
    out = paged_decode_attention(*args, kv_layout=layout, **scales)
    if scales:
        ref = paged_decode_attention_ref(*args, kv_layout=layout, **scales)
        assert rel_err(out, ref) <= 2e-2
    for b, n in enumerate(lens):
        q = query[b].float()[:, None, :]  # [qh, 1, d]
        k = keys[b].float().transpose(0, 1).repeat_interleave(qh // kvh, 0)  # [qh, n, d]
        v = vals[b].float().transpose(0, 1).repeat_interleave(qh // kvh, 0)
        ref = F.scaled_dot_product_attention(q, k, v)[:, 0]
        err = ((out[b].float() - ref).norm() / ref.norm()).item()
        assert err <= (1e-2 if not scales else 8e-2), f"row {b}: relative error {err:.3g}"


# ------------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_graph_replay_with_new_lengths(monkeypatch, fused):
    """A captured split call replays right with new lengths and tables, the split merge fused (its
    arrival counters reset by every replay) or in the merge kernel; the output is poisoned each time."""
    monkeypatch.setattr(decode_mod, "FUSED_MERGE_ENABLED", fused)
    monkeypatch.setattr(decode_mod, "_PLANS", {})
    _seed("graph")
    case = make_case("NHD", 32, 8, 128, 16, (1000, 200, 0, 64), extra_blocks=40)
    out = torch.empty(4, 32, 128, dtype=torch.bfloat16, device=DEVICE)
    g = capture_graph(lambda: paged_decode_attention(**case, out=out), warmup_calls=1)
    (plan,) = decode_mod._PLANS.values()
    assert plan.splits > 1 and plan.merges == (not fused)
    for lens in ((1000, 200, 0, 64), (3, 999, 17, 0), (0, 0, 0, 0), (512, 1, 1000, 777)):
        case["seq_lens"].copy_(torch.tensor(lens, dtype=torch.int32))
        case["block_tables"].copy_(case["block_tables"][torch.randperm(4, device=DEVICE)])
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_ref(**case)
        assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_takes_capture_plan(monkeypatch):
    """Where eager calls fuse fewer pieces into one launch, a capture records the heuristic's split
    (the merge kernel) through its own raw-address handle, prepared by the warm-up call; replays
    with new lengths are right, and eager calls after the capture take the one-launch plan again."""
    from miniattn.ops.launch import DirectLaunch
    monkeypatch.setattr(decode_mod, "_PLANS", {})
    case = _long_table_case("capture", (4096, 1000, 0), 4096, num_q_heads=32, num_kv_heads=8, head_size=128,
                            block_size=16)
    case["query"], case["seq_lens"] = case["query"][:1].contiguous(), case["seq_lens"][:1].contiguous()
    case["block_tables"] = case["block_tables"][:1].contiguous()
    out = torch.empty(1, 32, 128, dtype=torch.bfloat16, device=DEVICE)
    run = lambda: paged_decode_attention(**case, out=out)  # noqa: E731
    run()  # the plan, both plans' compilation and raw-address handles
    (plan,) = decode_mod._PLANS.values()
    assert plan.capture_plan is not None and not plan.merges and plan.capture_plan.merges
    calls = []
    for name, p in (("eager", plan), ("capture", plan.capture_plan)):
        d = p.direct
        assert d, "both plans hold raw-address handles after the warm-up"

        def counted(*a, _f=d.fn, _n=name):
            calls.append(_n)
            return _f(*a)
        p.direct = DirectLaunch(counted, d.head, d.spread, d.kind)
    g = capture_graph(run, warmup_calls=1)  # an eager warm-up call, then the capture
    assert calls == ["eager", "capture"]
    for n in (4096, 1, 0, 2049):
        case["seq_lens"].fill_(n)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, paged_decode_attention_ref(**case)) <= 1e-2
    run()
    assert calls == ["eager", "capture", "eager"]
    assert rel_err(out, paged_decode_attention_ref(**case)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_kernel_with_and_without_pdl(monkeypatch):
    """The merge kernel launched as a programmatic dependent (sm_90+) gives the result of a plain launch."""
    from miniattn.ops import decode as decode_mod
    monkeypatch.setattr(decode_mod, "FUSED_MERGE_ENABLED", False)  # the merge kernel, not the fused merge
    _seed("pdl")
    case = make_case("NHD", 32, 8, 128, 16, (3000, 1, 0, 777), extra_blocks=40)
    outs = {}
    for pdl in (True, False):
        monkeypatch.setattr(decode_mod, "PDL_ENABLED", pdl)
        decode_mod._PLANS.clear()
        outs[pdl] = [paged_decode_attention(**case, num_splits=8) for _ in range(3)]  # plan, Launcher, direct
        plan = next(iter(decode_mod._PLANS.values()))
        assert plan.pdl == (pdl and torch.cuda.get_device_capability() >= (9, 0))
    decode_mod._PLANS.clear()
    ref = paged_decode_attention_ref(**case)
    for o in outs[True] + outs[False]:
        assert rel_err(o, ref) <= 1e-2
    assert all(torch.equal(o, outs[False][0]) for o in outs[True])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_pinned_widen_matches_triton_conversion(monkeypatch, kv_cache_dtype):
    """FP8 values widened by the pinned PTX cvt (sm_89+) give Triton's own conversion's result (the two
    plans may differ in launch config, so the dots' summation order may too), over every layout."""
    for layout in LAYOUTS:
        _seed("widen", layout, kv_cache_dtype)
        case = make_case(layout, 32, 8, 128, 16, (2000, 1, 0, 333, 64), kv_cache_dtype=kv_cache_dtype,
                         extra_blocks=20)
        outs = {}
        for pinned in (True, False):
            monkeypatch.setattr(decode_mod, "PINNED_WIDEN_ENABLED", pinned)
            decode_mod._PLANS.clear()
            outs[pinned] = [paged_decode_attention(**case) for _ in range(3)]  # plan, Launcher, direct
            plan = next(iter(decode_mod._PLANS.values()))
            assert plan.consts[-1] == (pinned and torch.cuda.get_device_capability() >= (8, 9)) * (
                2 if kv_cache_dtype == "fp8_e5m2" else 1)
        decode_mod._PLANS.clear()
        ref = paged_decode_attention_ref(**case)
        for o in outs[True] + outs[False]:
            assert rel_err(o, ref) <= 2e-2
        for o in outs[True]:
            assert rel_err(o, outs[False][0].double()) <= 2e-3


def test_pinned_widen_and_pdl_gates(monkeypatch):
    """Which GPUs get the PTX paths: pinned FP8 widening from sm_89, PDL from sm_90, neither on ROCm
    (whose devices torch also calls cuda) nor under the interpreter (decisions only: no launch)."""
    fake = torch.device("cuda", 7)
    monkeypatch.setattr(decode_mod, "interpreting", lambda: False)
    monkeypatch.setattr(decode_mod, "_TRITON", True)
    for cap, widen, pdl in [((8, 0), 0, False), ((8, 9), 1, False), ((9, 0), 1, True), ((10, 0), 1, True)]:
        monkeypatch.setitem(decode_mod._CAPABILITY, fake, cap)
        assert decode_mod._v_widen(fake, "fp8") == widen
        assert decode_mod._v_widen(fake, "fp8_e5m2") == (2 if widen else 0)
        assert decode_mod._pdl_available(fake) == (pdl and decode_mod._HAS_GDC)
    monkeypatch.setattr(decode_mod, "PINNED_WIDEN_ENABLED", False)
    assert decode_mod._v_widen(fake, "fp8") == 0
    monkeypatch.setattr(decode_mod, "PINNED_WIDEN_ENABLED", True)
    monkeypatch.delitem(decode_mod._CAPABILITY, fake)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert decode_mod._capability(fake) == (0, 0)
    assert decode_mod._v_widen(fake, "fp8") == 0 and not decode_mod._pdl_available(fake)
    monkeypatch.setattr(decode_mod, "interpreting", lambda: True)
    monkeypatch.setitem(decode_mod._CAPABILITY, fake, (9, 0))
    assert decode_mod._v_widen(fake, "fp8") == 0
