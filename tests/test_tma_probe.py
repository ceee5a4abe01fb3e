"""benchmarks/tma_decode_probe.py's kernel (page tiles by TMA copies) against the float64 reference, so
that what it times is the same operation: NHD / HND, 16-bit and FP8 caches, 1-4 pages per step,
one split and several (its fused merge), a row ending inside a page, slots past each row's end and
blocks outside the table poisoned with NaN."""

import os
import sys

import pytest
import torch

from conftest import DEVICE
from miniattn import paged_decode_attention_ref
from miniattn.layout import from_nhd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

if DEVICE == "cuda" and torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("TMA copies need sm_90+", allow_module_level=True)

import tma_decode_probe as probe  # noqa: E402

BS, KVH, QH, D = 16, 2, 8, 128
LENS = (150, 37)  # 9 full pages + 6 slots; 2 pages + 5


def _inputs(cache_dtype):
    g = torch.Generator().manual_seed(0)
    pages = [-(-n // BS) for n in LENS]
    nb = sum(pages) + 3  # three blocks no row uses
    k = torch.randn(nb, BS, KVH, D, generator=g)
    v = torch.randn(nb, BS, KVH, D, generator=g)
    perm = torch.randperm(nb, generator=g)
    bt = torch.zeros(len(LENS), max(pages), dtype=torch.int32)
    used = torch.zeros(nb, BS, dtype=torch.bool)
    at = 0
    for r, (n, p) in enumerate(zip(LENS, pages)):
        bt[r, :p] = perm[at: at + p].to(torch.int32)
        for t in range(n):
            used[bt[r, t // BS], t % BS] = True
        at += p
    k[~used] = float("nan")
    v[~used] = float("nan")
    if cache_dtype == "fp8":
        k, v = (k / 0.5).to(torch.float8_e4m3fn), (v / 2.0).to(torch.float8_e4m3fn)
    else:
        k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    q = torch.randn(len(LENS), QH, D, generator=g).to(torch.bfloat16)
    sl = torch.tensor(LENS, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k, v, bt, sl)]


@pytest.mark.parametrize("cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_probe_matches_reference(layout, cache_dtype):
    q, k, v, bt, sl = _inputs(cache_dtype)
    if layout != "NHD":
        k, v = from_nhd(layout, k, v)
    fp8 = cache_dtype == "fp8"
    extra = dict(kv_cache_dtype="fp8", k_scale=torch.tensor([0.5], device=DEVICE),
                 v_scale=torch.tensor([2.0], device=DEVICE)) if fp8 else {}
    ref = paged_decode_attention_ref(q, k, v, bt, sl, kv_layout=layout, **extra)
    assert torch.isfinite(ref).all()
    for pages, splits in ((1, 1), (2, 3), (4, 2)):
        run = probe.TmaDecode(q, k, v, bt, sl, layout, splits, pages, 2, 1, k_scale=0.5, v_scale=2.0)
        run.out.fill_(float("nan"))
        o = run().double()
        err = float((o - ref).abs().max() / ref.abs().max())
        assert err <= (2e-2 if fp8 else 1e-2), (pages, splits, err)
        assert int(run.arrivals.abs().sum()) == 0  # counters back to zero for the next call
