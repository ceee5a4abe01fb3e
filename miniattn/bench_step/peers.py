"""The step's attention implementations: miniattn's kernels and what a user would otherwise use.

- ``miniattn``: the engine as it is (Triton write + Triton paged decode);
- ``reference``: the engine with ``attention_impl="reference"`` (the pure-torch ops: index_put
  write, a float64 gather per sequence; it reads lengths on the host, so it cannot be captured in
  a CUDA graph and runs eagerly only);
- ``flash-attn``: `FlashKVCacheAttention` swapped in as ``engine.runner.attn``:
  `flash_attn_with_kvcache` appends the step's K/V inside its attention kernel (the write is fused,
  so it has no time of its own), NHD caches of the model dtype only. FA2 needs pages of a multiple
  of 256 tokens, so its engine gets that block size.

`peer_status(impl, layout, kv_cache_dtype, cuda)` says whether a combination runs here, and why not.
"""

from __future__ import annotations

import functools

import torch

from ..attention import AttentionMetadata
from ..step_timer import region

__all__ = ["IMPLS", "Impl", "get_impl", "peer_status", "flash_kvcache_fn", "FlashKVCacheAttention"]


class Impl:
    """One implementation: its name, whether its step can be graph-captured, its engine settings."""

    def __init__(self, name: str, graphable: bool, attention_impl: str, write_repeats: tuple[int, ...],
                 fused_write: bool = False):
        self.name = name
        self.graphable = graphable  # no host syncs inside the step
        self.attention_impl = attention_impl  # EngineConfig.attention_impl of its engine
        self.write_repeats = write_repeats  # ablation settings it supports
        self.fused_write = fused_write  # the write happens inside attention (no separate time)

    def block_size(self, requested: int) -> int:
        """The page size this implementation's engine uses for a requested one."""
        if self.name == "flash-attn":
            kind = flash_kvcache_fn()
            if kind is not None and kind[0] == "fa2" and requested % 256:
                return 256
        return requested

    def install(self, engine) -> None:
        """Swap this implementation's backend into `engine` (no-op for engine-native ones)."""
        if self.name == "flash-attn":
            engine.runner.attn = FlashKVCacheAttention(engine.runner.attn, flash_kvcache_fn()[1])


IMPLS = {
    "miniattn": Impl("miniattn", graphable=True, attention_impl="triton", write_repeats=(0, 1, 2)),
    "reference": Impl("reference", graphable=False, attention_impl="reference", write_repeats=(0, 1, 2)),
    "flash-attn": Impl("flash-attn", graphable=True, attention_impl="triton", write_repeats=(0, 1),
                       fused_write=True),
}


def get_impl(name: str) -> Impl:
    if name not in IMPLS:
        raise ValueError(f"implementation must be one of {tuple(IMPLS)}, got {name!r}")
    return IMPLS[name]


@functools.lru_cache(maxsize=None)
def flash_kvcache_fn():
    """("fa2" | "fa3", flash_attn_with_kvcache) when flash-attn 2 or 3 is importable, else None."""
    try:
        from flash_attn import flash_attn_with_kvcache

        return "fa2", flash_attn_with_kvcache
    except Exception:
        pass
    try:
        from flash_attn_interface import flash_attn_with_kvcache

        return "fa3", flash_attn_with_kvcache
    except Exception:
        return None


def peer_status(impl: str, kv_layout: str, kv_cache_dtype: str, cuda: bool) -> str | None:
    """None if `impl` runs for this layout / cache dtype here, else the reason it is skipped."""
    get_impl(impl)
    if impl == "flash-attn":
        if flash_kvcache_fn() is None:
            return "flash-attn not importable (flash_attn / flash_attn_interface)"
        if kv_layout != "NHD":
            return "flash-attn pages are NHD only"
        if kv_cache_dtype != "auto":
            return "flash-attn peer runs model-dtype caches only"
        if not cuda:
            return "flash-attn needs CUDA"
    return None


class FlashKVCacheAttention:
    """Decode attention by `flash_attn_with_kvcache`, which appends the new K/V itself.

    Replaces ``engine.runner.attn`` (same call signature as `PagedAttention`). ``write_repeats``
    is 1 (append, then attend over ``seq_lens``) or 0 (the ablation: attend over the same lengths
    without appending, i.e. the step minus its fused write). Decode only.

    Parameters
    ----------
    paged : the engine's `PagedAttention` (its NHD caches and softmax scale are reused).
    fn : ``flash_attn_with_kvcache``.
    """

    def __init__(self, paged, fn):
        if paged.kv_layout != "NHD" or paged.kv_cache_dtype != "auto":
            raise ValueError("flash_attn_with_kvcache needs NHD caches of the model dtype")
        self.kv_caches = paged.kv_caches
        self.kv_layout = "NHD"
        self.scale = paged.scale
        self.fn = fn
        self.write_repeats = 1

    def __call__(self, layer: int, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        if meta.is_prefill:
            raise ValueError("FlashKVCacheAttention runs decode steps only")
        if self.write_repeats not in (0, 1):
            raise ValueError(f"the fused append runs once or not at all, got write_repeats={self.write_repeats}")
        key_cache, value_cache = self.kv_caches[layer]
        with region(meta.timer, "attn", layer):
            if self.write_repeats:
                # lengths before the append; padding rows (seq_len 0) stay at 0
                cache_seqlens = (meta.seq_lens - 1).clamp_min(0)
                out = self.fn(q.unsqueeze(1), key_cache, value_cache, k=k.unsqueeze(1), v=v.unsqueeze(1),
                              cache_seqlens=cache_seqlens, block_table=meta.block_tables,
                              softmax_scale=self.scale, causal=True)
            else:
                out = self.fn(q.unsqueeze(1), key_cache, value_cache, cache_seqlens=meta.seq_lens,
                              block_table=meta.block_tables, softmax_scale=self.scale, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.squeeze(1)
