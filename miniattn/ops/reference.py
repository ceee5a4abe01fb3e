"""Pure-torch references of the two ops: the tests' ground truth and the CPU fallback.

Both go through `layout.to_nhd`, so they are independent of the kernels' stride arithmetic.
"""

from __future__ import annotations

import torch

from ..layout import as_cache_dtype, get_layout

__all__ = ["fp8_quantize", "reshape_and_cache_ref", "paged_decode_attention_ref"]


def _is_fp8(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype != "auto"


def _per_head_scale(scale: torch.Tensor, num_heads: int, device) -> torch.Tensor:
    """A 1-element or [num_heads] float32 scale as a [num_heads, 1] float32 tensor on `device`."""
    s = scale.to(device=device, dtype=torch.float32).reshape(-1)
    return s.expand(num_heads).reshape(num_heads, 1) if s.numel() == 1 else s.reshape(num_heads, 1)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """saturate(x / scale) in `fp8_dtype`; x is [tokens, heads, dim], scale per tensor or per head."""
    s = _per_head_scale(scale, x.shape[1], x.device)
    fmax = torch.finfo(fp8_dtype).max
    return (x.float() / s).clamp(-fmax, fmax).to(fp8_dtype)


def reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                          k_scale=None, v_scale=None, *, kv_layout="NHD"):
    """Reference of `reshape_and_cache_flash` / `reshape_and_cache` (in place, no validation).

    Token i goes to slot ``slot_mapping[i]`` (block = slot // block_size, offset = slot % block_size);
    slots < 0 are skipped.
    """
    lay = get_layout(kv_layout)
    kc = as_cache_dtype(key_cache, kv_cache_dtype)
    vc = as_cache_dtype(value_cache, kv_cache_dtype)
    k_nhd, v_nhd = lay.key_to_nhd(kc), lay.value_to_nhd(vc)
    block_size = k_nhd.shape[1]
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    slots = slots[valid]
    blk, off = slots // block_size, slots % block_size
    k, v = key[valid], value[valid]
    if _is_fp8(kv_cache_dtype):
        k = fp8_quantize(k, k_scale, kc.dtype)
        v = fp8_quantize(v, v_scale, vc.dtype)
    else:
        k, v = k.to(kc.dtype), v.to(vc.dtype)
    if lay.splits_key_dim:  # key_to_nhd copies for paged5d: write through the 5-D index instead
        x = kc.shape[-1]
        n = k.shape[0]
        kc.permute(0, 3, 1, 2, 4)[blk, off] = k.reshape(n, k.shape[1], -1, x)
    else:
        k_nhd[blk, off] = k
    v_nhd[blk, off] = v


def _dequant(t: torch.Tensor, scale, kv_cache_dtype) -> torch.Tensor:
    """[n, bs, heads, d] cache rows as float64, times the per-tensor / per-head scale for FP8."""
    t = t.to(torch.float64)
    if _is_fp8(kv_cache_dtype):
        s = scale.to(device=t.device, dtype=torch.float64).reshape(-1)
        t = t * (s if s.numel() == 1 else s.reshape(1, 1, -1, 1))
    return t


def paged_decode_attention_ref(query, key_cache, value_cache, block_tables, seq_lens, *, kv_layout="NHD",
                               scale=None, kv_cache_dtype="auto", k_scale=None, v_scale=None):
    """float64 reference of `paged_decode_attention`; returns [batch, num_q_heads, head_size_v] float64.

    Rows with seq_len 0 give zeros.
    """
    lay = get_layout(kv_layout)
    kc = lay.key_to_nhd(as_cache_dtype(key_cache, kv_cache_dtype))
    vc = lay.value_to_nhd(as_cache_dtype(value_cache, kv_cache_dtype))
    batch, num_q_heads, head_size = query.shape
    block_size, num_kv_heads = kc.shape[1], kc.shape[2]
    group = num_q_heads // num_kv_heads
    if scale is None:
        scale = head_size ** -0.5
    out = torch.zeros(batch, num_q_heads, vc.shape[-1], dtype=torch.float64, device=query.device)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        nblk = (n + block_size - 1) // block_size
        ids = block_tables[b, :nblk].long()
        k = _dequant(kc[ids], k_scale, kv_cache_dtype).flatten(0, 1)[:n]  # [n, kvh, d]
        v = _dequant(vc[ids], v_scale, kv_cache_dtype).flatten(0, 1)[:n]
        k = k.repeat_interleave(group, dim=1)  # [n, qh, d]
        v = v.repeat_interleave(group, dim=1)
        q = query[b].to(torch.float64)  # [qh, d]
        s = torch.einsum("hd,nhd->hn", q, k) * scale
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out
