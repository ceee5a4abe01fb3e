"""The attention seam between the model and the kernels: "write the new K/V, then attend".

The model computes ``q, k, v`` for a flat batch of tokens and calls ``backend(layer, q, k, v, meta)``;
everything about caches lives behind that call. Two backends:

- `PagedAttention`: the engine's. Writes the step's keys/values into the paged cache
  (`reshape_and_cache_flash` for NHD/HND, `reshape_and_cache` for paged5d), then attends: prefill
  over the prompt tokens themselves (flash-attn varlen when importable on CUDA, else torch SDPA,
  causal), decode with `paged_decode_attention` over the cache.
- `DenseCausalAttention`: no cache at all, plain torch math over whole sequences; the tests' oracle.

`AttentionMetadata` carries the per-step tensors (one object per forward, passed explicitly; no
global context). The kernels come in through `AttentionOps`, so swapping the Triton ops for the
torch references (``impl="reference"``) or for a peer is one line.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from .layout import get_layout
from .step_timer import StepTimer, region

__all__ = ["AttentionMetadata", "AttentionOps", "load_ops", "PagedAttention", "DenseCausalAttention",
           "prefill_attention", "PREFILL_IMPLS"]


@dataclass
class AttentionMetadata:
    """What attention needs for one forward pass over a flat batch of ``T`` new tokens.

    Prefill (``is_prefill``): sequence i's new tokens are ``cu_seqlens[i] : cu_seqlens[i + 1]`` and
    are its whole sequence (no cached prefix); `query_lens` holds the same lengths on the host.
    Decode: one token per row; `block_tables` / `seq_lens` describe each row's cache, the new token
    included (rows with seq_len 0 are padding). `slot_mapping` is the write kernel's (-1 = skip).
    """

    is_prefill: bool
    slot_mapping: torch.Tensor | None = None  # [T] int64
    cu_seqlens: torch.Tensor | None = None  # [num_seqs + 1] int32 (prefill)
    query_lens: tuple[int, ...] = ()  # prefill lengths on the host
    max_query_len: int = 0
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 (decode)
    seq_lens: torch.Tensor | None = None  # [B] int32 (decode)
    max_seq_len: int | None = None  # decode, eager: host bound of seq_lens (picks KV splits); None in graphs
    timer: StepTimer | None = None


@dataclass(frozen=True)
class AttentionOps:
    """The two kernels behind `PagedAttention`, with the launchers' signatures.

    write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, kv_layout)
    decode(query, key_cache, value_cache, block_tables, seq_lens, kv_layout=, scale=,
           kv_cache_dtype=, k_scale=, v_scale=, num_splits=, max_seq_len=) -> [batch, num_q_heads, head_size]
    """

    name: str
    write: Callable
    decode: Callable


def _triton_ops() -> AttentionOps:
    from .ops.cache_write import reshape_and_cache, reshape_and_cache_flash
    from .ops.decode import paged_decode_attention

    def write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, kv_layout):
        if kv_layout == "paged5d":
            reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
        else:
            reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                    k_scale, v_scale, kv_layout=kv_layout)

    def decode(query, key_cache, value_cache, block_tables, seq_lens, *, num_splits=None, max_seq_len=None, **kw):
        # with neither given, the kernel's grid depends only on shapes (block-table capacity): graph-safe
        return paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                      num_splits=num_splits, max_seq_len=max_seq_len, **kw)

    return AttentionOps("triton", write, decode)


def _reference_ops() -> AttentionOps:
    from .ops.reference import paged_decode_attention_ref, reshape_and_cache_ref

    def write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, kv_layout):
        reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                              k_scale, v_scale, kv_layout=kv_layout)

    def decode(query, key_cache, value_cache, block_tables, seq_lens, *, num_splits=None, max_seq_len=None, **kw):
        return paged_decode_attention_ref(query, key_cache, value_cache, block_tables, seq_lens,
                                          **kw).to(query.dtype)

    return AttentionOps("reference", write, decode)


_OPS = {"triton": _triton_ops, "reference": _reference_ops}


def load_ops(impl: str) -> AttentionOps:
    """The kernels for ``impl``: "triton" (miniattn's ops) or "reference" (pure torch)."""
    if impl not in _OPS:
        raise ValueError(f"attention impl must be one of {tuple(_OPS)}, got {impl!r}")
    return _OPS[impl]()


@functools.lru_cache(maxsize=None)
def _flash_varlen():
    """flash-attn's varlen function (FA2, or FA4's CuTe version), or None when not importable."""
    try:
        from flash_attn import flash_attn_varlen_func

        return "fa2", flash_attn_varlen_func
    except Exception:
        pass
    try:
        from flash_attn.cute import flash_attn_varlen_func

        return "fa4", flash_attn_varlen_func
    except Exception:
        return None


def _sdpa_causal(q, k, v, query_lens, scale):
    """Causal attention per sequence with torch SDPA; q [T, Hq, D], k/v [T, Hkv, D]."""
    out = torch.empty_like(q)
    start = 0
    for n in query_lens:
        qs, ks, vs = (rearrange(t[start:start + n], "t h d -> 1 h t d") for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                           enable_gqa=ks.shape[1] != qs.shape[1])
        out[start:start + n] = rearrange(o, "1 h t d -> t h d")
        start += n
    return out


PREFILL_IMPLS = ("auto", "flash", "sdpa")


class _Prefill:
    """Causal varlen attention over the new tokens: flash-attn when asked for / available, else SDPA.

    impl "auto": flash-attn's varlen kernel when importable (and the tensors are fp16/bf16 on CUDA),
    torch SDPA otherwise; "flash": the same but an error when flash-attn is missing; "sdpa": SDPA.
    """

    def __init__(self, impl: str = "auto"):
        if impl not in PREFILL_IMPLS:
            raise ValueError(f"prefill impl must be one of {PREFILL_IMPLS}, got {impl!r}")
        self._flash = None if impl == "sdpa" else _flash_varlen()
        if impl == "flash" and self._flash is None:
            raise ValueError("prefill impl 'flash' asked for, but flash_attn is not importable")

    @property
    def name(self) -> str:
        """"flash-attn (fa2|fa4)" or "sdpa" (what CUDA fp16/bf16 prefill uses; CPU always uses SDPA)."""
        return f"flash-attn ({self._flash[0]})" if self._flash is not None else "sdpa"

    def __call__(self, q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if self._flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            kind, fn = self._flash
            try:
                if kind == "fa2":
                    return fn(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_query_len,
                              meta.max_query_len, softmax_scale=scale, causal=True)
                out = fn(q, k, v, cu_seqlens_q=meta.cu_seqlens, cu_seqlens_k=meta.cu_seqlens,
                         softmax_scale=scale, causal=True)
                return out[0] if isinstance(out, tuple) else out
            except Exception as e:  # an installed but unusable build: say so once, then use SDPA
                warnings.warn(f"flash-attn {kind} varlen failed ({e!r}); using torch SDPA for prefill")
                self._flash = None
        return _sdpa_causal(q, k, v, meta.query_lens, scale)


def prefill_attention(q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each prefill sequence over itself (one-off; `PagedAttention` caches the choice)."""
    return _Prefill()(q, k, v, meta, scale)


class PagedAttention:
    """Attention over a paged KV cache: write the step's K/V, then attend.

    Parameters
    ----------
    kv_caches : list of ``(key_cache, value_cache)`` per layer (`layout.allocate_kv_caches`).
    kv_layout : "NHD", "HND" or "paged5d".
    kv_cache_dtype : "auto" or an FP8 name; FP8 needs `k_scale` / `v_scale` (float32 tensors).
    scale : softmax scale (head_size ** -0.5 in the model).
    impl : "triton" (default) or "reference", or an `AttentionOps`.
    num_splits : forwarded to the decode kernel (None: its heuristic). Set it when capturing a CUDA
        graph if the kernel's grid would otherwise depend on the lengths.
    write_repeats : how many times each layer writes its K/V (1 normally). 0 and 2 exist for the
        step benchmark's ablation (a write is idempotent, so 2 gives the same tokens; 0 does not).
    prefill : "auto", "flash" or "sdpa" (see `_Prefill`).
    """

    def __init__(self, kv_caches, kv_layout: str, kv_cache_dtype: str = "auto", k_scale=None, v_scale=None,
                 *, scale: float, impl="triton", num_splits: int | None = None, write_repeats: int = 1,
                 prefill: str = "auto"):
        get_layout(kv_layout)
        self.kv_caches = kv_caches
        self.kv_layout = kv_layout
        self.kv_cache_dtype = kv_cache_dtype
        self.k_scale, self.v_scale = k_scale, v_scale
        self.scale = scale
        self.ops = impl if isinstance(impl, AttentionOps) else load_ops(impl)
        self.num_splits = num_splits
        self.write_repeats = write_repeats
        self._prefill = _Prefill(prefill)

    @property
    def prefill_name(self) -> str:
        return self._prefill.name

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new keys/values ``[T, num_kv_heads, head_size]`` at their slots."""
        key_cache, value_cache = self.kv_caches[layer]
        for _ in range(self.write_repeats):
            self.ops.write(k, v, key_cache, value_cache, slot_mapping, self.kv_cache_dtype,
                           self.k_scale, self.v_scale, self.kv_layout)

    def __call__(self, layer: int, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """``[T, Hq, D]`` attention output for the step's tokens (their K/V written first)."""
        with region(meta.timer, "write", layer):
            self.write(layer, k, v, meta.slot_mapping)
        with region(meta.timer, "attn", layer):
            if meta.is_prefill:
                return self._prefill(q, k, v, meta, self.scale)
            key_cache, value_cache = self.kv_caches[layer]
            return self.ops.decode(q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                   kv_layout=self.kv_layout, scale=self.scale,
                                   kv_cache_dtype=self.kv_cache_dtype, k_scale=self.k_scale,
                                   v_scale=self.v_scale, num_splits=self.num_splits,
                                   max_seq_len=meta.max_seq_len)


class DenseCausalAttention:
    """No cache: each prefill sequence attends causally to itself, in plain float32 torch math.

    Deliberately shares no code with the kernels or with SDPA, so that it can serve as the oracle.
    """

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, layer: int, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        if not meta.is_prefill:
            raise ValueError("DenseCausalAttention only runs whole sequences (is_prefill=True)")
        group = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        start = 0
        for n in meta.query_lens:
            qs = q[start:start + n].float()
            ks = k[start:start + n].float().repeat_interleave(group, dim=1)
            vs = v[start:start + n].float().repeat_interleave(group, dim=1)
            s = torch.einsum("qhd,khd->hqk", qs, ks) * self.scale
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
            out[start:start + n] = torch.einsum("hqk,khd->qhd", p, vs).to(q.dtype)
            start += n
        return out
