"""Cache layouts: shapes, the kernels' stride addressing, and exact conversion between layouts."""

from __future__ import annotations

import itertools

import pytest
import torch

from miniattn.layout import (
    LAYOUTS,
    allocate_kv_caches,
    cache_geometry,
    cache_strides,
    get_layout,
    convert_layout,
    kv_cache_shapes,
    split_combined_cache,
    to_nhd,
)
from miniattn.ops.cache_write import reshape_and_cache, reshape_and_cache_flash

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = tuple(LAYOUTS)
CACHE_DTYPES = [(torch.bfloat16, "auto"), (torch.float32, "auto"), (torch.float16, "fp8"), (torch.bfloat16, "fp8_e5m2")]


def caches(kv_layout, dtype, kv_cache_dtype, num_blocks=3, block_size=8, heads=2, head_size=32, seed=0):
    """One layer's caches filled with random bytes (NaN and Inf patterns included)."""
    [(kc, vc)] = allocate_kv_caches(kv_layout, 1, num_blocks, block_size, heads, head_size, dtype, kv_cache_dtype,
                                    device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    for t in (kc, vc):
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=g, device=DEVICE,
                                                dtype=torch.uint8))
    return kc, vc


def same_bytes(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype,kv_cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("src,dst", list(itertools.product(NAMES, NAMES)))
def test_convert_round_trip_is_bit_exact(src, dst, dtype, kv_cache_dtype):
    kc, vc = caches(src, dtype, kv_cache_dtype, seed=hash((src, dst)) % 1000)
    k2, v2 = convert_layout(kc, vc, src, dst)
    assert (k2.shape, v2.shape) == kv_cache_shapes(dst, 3, 8, 2, 32, kc.dtype)
    k3, v3 = convert_layout(k2, v2, dst, src)
    assert same_bytes(k3, kc) and same_bytes(v3, vc)
    # and the NHD views agree element for element
    for a, b in zip(to_nhd(src, kc, vc), to_nhd(dst, k2, v2)):
        assert same_bytes(a.contiguous(), b.contiguous())


@pytest.mark.parametrize("kv_layout", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn])
def test_cache_strides_address_every_element(kv_layout, dtype):
    """The kernels' formula b*block + s*slot + h*head + (d//x)*dim_hi + (d%x)*dim_lo hits each element."""
    nb, bs, h, d = 2, 8, 3, 32
    kv_cache_dtype = "auto" if dtype == torch.float16 else "fp8"
    [(kc, vc)] = allocate_kv_caches(kv_layout, 1, nb, bs, h, d, torch.float16, kv_cache_dtype, device="cpu")
    for cache, is_key in ((kc, True), (vc, False)):
        ids = torch.arange(cache.numel(), dtype=torch.int64).view(cache.shape)  # element id = flat offset
        st = cache_strides(kv_layout, cache, is_key)
        b, s, hh, dd = torch.meshgrid(torch.arange(nb), torch.arange(bs), torch.arange(h), torch.arange(d), indexing="ij")
        if st.x:
            off = b * st.block + s * st.slot + hh * st.head + (dd // st.x) * st.dim_hi + (dd % st.x) * st.dim_lo
        else:
            off = b * st.block + s * st.slot + hh * st.head + dd * st.dim_lo
        lay = get_layout(kv_layout)
        nhd = lay.key_to_nhd(ids) if is_key else lay.value_to_nhd(ids)
        assert torch.equal(off, nhd)
        assert sorted(off.flatten().tolist()) == list(range(cache.numel()))  # a bijection


@pytest.mark.parametrize("src,dst", [("NHD", "paged5d"), ("paged5d", "HND"), ("HND", "NHD")])
def test_written_cache_converts_to_the_other_layouts_write(src, dst):
    """Writing tokens then converting == converting then writing (kernel on both sides)."""
    kc, vc = caches(src, torch.bfloat16, "auto", num_blocks=4, block_size=16, heads=2, head_size=64, seed=5)
    k_dst, v_dst = convert_layout(kc, vc, src, dst)
    g = torch.Generator().manual_seed(9)
    key = torch.randn(12, 2, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    value = torch.randn(12, 2, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    slots = torch.randperm(64, generator=g)[:12].to(DEVICE)
    slots[4] = -1
    for lay, k, v in ((src, kc, vc), (dst, k_dst, v_dst)):
        if lay == "paged5d":
            reshape_and_cache(key, value, k, v, slots)
        else:
            reshape_and_cache_flash(key, value, k, v, slots, kv_layout=lay)
    k_conv, v_conv = convert_layout(kc, vc, src, dst)
    assert same_bytes(k_conv, k_dst) and same_bytes(v_conv, v_dst)


@pytest.mark.parametrize("kv_layout", NAMES)
def test_allocate_shapes_and_geometry(kv_layout):
    layers = allocate_kv_caches(kv_layout, 2, 5, 16, 4, 64, torch.bfloat16, "fp8", device=DEVICE)
    assert len(layers) == 2
    for kc, vc in layers:
        assert kc.dtype == vc.dtype == torch.float8_e4m3fn
        assert (kc.shape, vc.shape) == kv_cache_shapes(kv_layout, 5, 16, 4, 64, torch.float8_e4m3fn)
        assert cache_geometry(kv_layout, kc, vc) == (5, 16, 4, 64, 64)
    if kv_layout == "paged5d":
        assert layers[0][0].shape[-1] == 16  # x = 16 bytes of float8


def test_paged5d_needs_head_size_divisible_by_x():
    with pytest.raises(ValueError, match="head_size"):
        kv_cache_shapes("paged5d", 2, 16, 2, 36, torch.bfloat16)
    with pytest.raises(ValueError, match="kv_layout"):
        kv_cache_shapes("NDH", 2, 16, 2, 32, torch.bfloat16)


def test_split_combined_cache_views():
    combined = torch.randn(3, 8, 2, 192 + 128)
    k, v = split_combined_cache(combined, 192)
    assert k.shape[-1] == 192 and v.shape[-1] == 128
    assert k.data_ptr() == combined.data_ptr() and v.data_ptr() == combined[..., 192:].data_ptr()
    assert cache_geometry("NHD", k, v) == (3, 8, 2, 192, 128)
    for bad in (0, 320, 400):
        with pytest.raises(ValueError, match="head_size_k"):
            split_combined_cache(combined, bad)
