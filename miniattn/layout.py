"""KV-cache layouts: shapes, element strides, allocation and exact conversion.

Every layout is described by one `Layout` object in `LAYOUTS`. Kernels never hard-code a layout:
they address element (block, slot, head, d) of a key or value cache as

    block * s_block + slot * s_slot + head * s_head + (d // x) * s_dim_hi + (d % x) * s_dim_lo

when the layout splits the head dimension (paged5d key: ``x = 16 // element_size``), and as
``... + d * s_dim_lo`` otherwise (``x == 0``). `cache_strides` returns that tuple for a tensor, so
adding a layout means adding one `Layout` here (plus, if its addressing is new, the kernels' few
lines of address arithmetic).

Layouts (``bs`` = block_size, ``H`` = num_kv_heads, ``D`` = head_size):

    NHD      key/value [num_blocks, bs, H, D]
    HND      key/value [num_blocks, H, bs, D]
    paged5d  key       [num_blocks, H, D // x, bs, x]     (vLLM PagedAttention, x = 16 // elem size)
             value     [num_blocks, H, D, bs]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

__all__ = [
    "LAYOUTS",
    "KV_CACHE_DTYPES",
    "Layout",
    "CacheStrides",
    "get_layout",
    "resolve_cache_dtype",
    "as_cache_dtype",
    "x_factor",
    "kv_cache_shapes",
    "allocate_kv_caches",
    "cache_strides",
    "cache_geometry",
    "to_nhd",
    "from_nhd",
    "convert_layout",
    "split_combined_cache",
]

#: kv_cache_dtype names accepted everywhere (vLLM's spelling).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CacheStrides(NamedTuple):
    """Element strides of one cache tensor along (block, slot, head, dim_hi, dim_lo) and the split x."""

    block: int
    slot: int
    head: int
    dim_hi: int  # stride of d // x (0 when the layout does not split the head dim)
    dim_lo: int  # stride of d % x, or of d itself when x == 0
    x: int  # 0: no split


@dataclass(frozen=True)
class Layout:
    name: str
    # (num_blocks, block_size, num_kv_heads, head_size, x) -> shape
    key_shape: Callable[[int, int, int, int, int], tuple]
    value_shape: Callable[[int, int, int, int, int], tuple]
    # permutation taking the cache tensor (after unsplitting) to [blocks, block_size, heads, dim]
    key_to_nhd: Callable[[torch.Tensor], torch.Tensor]
    value_to_nhd: Callable[[torch.Tensor], torch.Tensor]
    key_strides: Callable[[torch.Tensor], CacheStrides]
    value_strides: Callable[[torch.Tensor], CacheStrides]
    splits_key_dim: bool = False


def _nhd_strides(t: torch.Tensor) -> CacheStrides:
    s = t.stride()
    return CacheStrides(s[0], s[1], s[2], 0, s[3], 0)


def _hnd_strides(t: torch.Tensor) -> CacheStrides:
    s = t.stride()
    return CacheStrides(s[0], s[2], s[1], 0, s[3], 0)


def _p5_key_strides(t: torch.Tensor) -> CacheStrides:
    s = t.stride()  # [blocks, heads, D // x, bs, x]
    return CacheStrides(s[0], s[3], s[1], s[2], s[4], t.shape[4])


def _p5_value_strides(t: torch.Tensor) -> CacheStrides:
    s = t.stride()  # [blocks, heads, D, bs]
    return CacheStrides(s[0], s[3], s[1], 0, s[2], 0)


def _p5_key_to_nhd(t: torch.Tensor) -> torch.Tensor:
    b, h, dx, bs, x = t.shape
    return t.permute(0, 3, 1, 2, 4).reshape(b, bs, h, dx * x)


LAYOUTS: dict[str, Layout] = {
    "NHD": Layout(
        "NHD",
        key_shape=lambda n, bs, h, d, x: (n, bs, h, d),
        value_shape=lambda n, bs, h, d, x: (n, bs, h, d),
        key_to_nhd=lambda t: t,
        value_to_nhd=lambda t: t,
        key_strides=_nhd_strides,
        value_strides=_nhd_strides,
    ),
    "HND": Layout(
        "HND",
        key_shape=lambda n, bs, h, d, x: (n, h, bs, d),
        value_shape=lambda n, bs, h, d, x: (n, h, bs, d),
        key_to_nhd=lambda t: t.transpose(1, 2),
        value_to_nhd=lambda t: t.transpose(1, 2),
        key_strides=_hnd_strides,
        value_strides=_hnd_strides,
    ),
    "paged5d": Layout(
        "paged5d",
        key_shape=lambda n, bs, h, d, x: (n, h, d // x, bs, x),
        value_shape=lambda n, bs, h, d, x: (n, h, d, bs),
        key_to_nhd=_p5_key_to_nhd,
        value_to_nhd=lambda t: t.permute(0, 3, 1, 2),
        key_strides=_p5_key_strides,
        value_strides=_p5_value_strides,
        splits_key_dim=True,
    ),
}


def get_layout(kv_layout: str) -> Layout:
    """The `Layout` named `kv_layout` ("NHD", "HND" or "paged5d"); ValueError otherwise."""
    try:
        return LAYOUTS[kv_layout]
    except (KeyError, TypeError):
        raise ValueError(f"kv_layout must be one of {tuple(LAYOUTS)}, got {kv_layout!r}") from None


def resolve_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of a cache: the model dtype for "auto", a float8 dtype for the fp8 names."""
    if kv_cache_dtype == "auto":
        if model_dtype not in _MODEL_DTYPES:
            raise TypeError(f"dtype must be one of {_MODEL_DTYPES}, got {model_dtype}")
        return model_dtype
    if kv_cache_dtype in _FP8:
        return _FP8[kv_cache_dtype]
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def as_cache_dtype(cache: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """`cache` viewed as its storage dtype: uint8 FP8 caches become float8 views (no copy)."""
    if kv_cache_dtype in _FP8 and cache.dtype == torch.uint8:
        return cache.view(_FP8[kv_cache_dtype])
    return cache


def x_factor(cache_dtype: torch.dtype) -> int:
    """paged5d's key split: 16 bytes worth of elements (8 for 16-bit, 16 for FP8)."""
    return 16 // torch.empty((), dtype=cache_dtype).element_size()


def kv_cache_shapes(kv_layout, num_blocks, block_size, num_kv_heads, head_size, cache_dtype):
    """(key_shape, value_shape) of one layer's caches."""
    lay = get_layout(kv_layout)
    x = x_factor(cache_dtype)
    if lay.splits_key_dim and head_size % x:
        raise ValueError(f"paged5d needs head_size divisible by x={x}, got head_size={head_size}")
    args = (num_blocks, block_size, num_kv_heads, head_size, x)
    return lay.key_shape(*args), lay.value_shape(*args)


def allocate_kv_caches(
    kv_layout: str,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
    device="cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Key/value caches for `num_layers` layers, one allocation viewed per layer.

    Returns a list of ``(key_cache, value_cache)``; with FP8 the tensors are float8 (e4m3fn or e5m2).
    The memory is uninitialised (``torch.empty``), as in vLLM: only written slots are ever read.
    """
    for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                    ("num_kv_heads", num_kv_heads), ("head_size", head_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    cdt = resolve_cache_dtype(kv_cache_dtype, dtype)
    kshape, vshape = kv_cache_shapes(kv_layout, num_blocks, block_size, num_kv_heads, head_size, cdt)
    knum = torch.Size(kshape).numel()
    buf = torch.empty(num_layers, 2, knum, dtype=cdt, device=device)
    return [(buf[i, 0].view(kshape), buf[i, 1].view(vshape)) for i in range(num_layers)]


def cache_strides(kv_layout: str, cache: torch.Tensor, is_key: bool) -> CacheStrides:
    """Element strides of `cache` (a key cache if `is_key`) in the kernels' addressing scheme."""
    lay = get_layout(kv_layout)
    return lay.key_strides(cache) if is_key else lay.value_strides(cache)


def cache_geometry(kv_layout: str, key_cache: torch.Tensor, value_cache: torch.Tensor):
    """(num_blocks, block_size, num_kv_heads, head_size_k, head_size_v) read off the two caches.

    Raises ValueError naming the argument when a cache has the wrong rank or the two disagree.
    """
    lay = get_layout(kv_layout)
    kdim = 5 if lay.splits_key_dim else 4
    if key_cache.dim() != kdim:
        raise ValueError(f"key_cache must be {kdim}-D for kv_layout={kv_layout!r}, got shape {tuple(key_cache.shape)}")
    if value_cache.dim() != 4:
        raise ValueError(f"value_cache must be 4-D for kv_layout={kv_layout!r}, got shape {tuple(value_cache.shape)}")
    k = lay.key_to_nhd(key_cache)
    v = lay.value_to_nhd(value_cache)
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"key_cache and value_cache disagree on (num_blocks, block_size, num_kv_heads): "
            f"{tuple(k.shape[:3])} vs {tuple(v.shape[:3])}"
        )
    return k.shape[0], k.shape[1], k.shape[2], k.shape[3], v.shape[3]


def to_nhd(kv_layout: str, key_cache: torch.Tensor, value_cache: torch.Tensor):
    """Views of both caches as [num_blocks, block_size, num_kv_heads, head_size] (a copy for paged5d key)."""
    lay = get_layout(kv_layout)
    return lay.key_to_nhd(key_cache), lay.value_to_nhd(value_cache)


def from_nhd(kv_layout: str, key_nhd: torch.Tensor, value_nhd: torch.Tensor):
    """New contiguous caches in `kv_layout` holding the same elements as the NHD tensors given."""
    lay = get_layout(kv_layout)
    n, bs, h, d = key_nhd.shape
    x = x_factor(key_nhd.dtype)
    kshape, vshape = kv_cache_shapes(kv_layout, n, bs, h, d, key_nhd.dtype)
    _, _, _, dv = value_nhd.shape
    vshape = lay.value_shape(n, bs, h, dv, x)
    k = torch.empty(kshape, dtype=key_nhd.dtype, device=key_nhd.device)
    v = torch.empty(vshape, dtype=value_nhd.dtype, device=value_nhd.device)
    if lay.splits_key_dim:
        k.copy_(key_nhd.reshape(n, bs, h, d // x, x).permute(0, 2, 3, 1, 4))
    else:
        lay.key_to_nhd(k).copy_(key_nhd)
    lay.value_to_nhd(v).copy_(value_nhd)
    return k, v


def convert_layout(key_cache, value_cache, src_layout: str, dst_layout: str):
    """Exact copy of a filled cache into another layout (bit-identical round trip)."""
    k, v = to_nhd(src_layout, key_cache, value_cache)
    return from_nhd(dst_layout, k, v)


def split_combined_cache(kv_cache: torch.Tensor, head_size_k: int):
    """Key and value views of a combined NHD cache [blocks, bs, heads, head_size_k + head_size_v].

    This is vLLM's "diffkv" arrangement (e.g. a 192-dim key beside a 128-dim value in one tensor);
    pass the two views to `reshape_and_cache_flash` / `paged_decode_attention` with kv_layout="NHD".
    """
    if kv_cache.dim() != 4 or not 0 < head_size_k < kv_cache.shape[-1]:
        raise ValueError(
            f"kv_cache must be [blocks, block_size, heads, head_size_k + head_size_v] with "
            f"0 < head_size_k < last dim; got shape {tuple(kv_cache.shape)}, head_size_k={head_size_k}"
        )
    return kv_cache[..., :head_size_k], kv_cache[..., head_size_k:]
