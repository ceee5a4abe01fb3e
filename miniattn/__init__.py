"""miniattn: a small, fast, readable paged-attention mini-engine (Triton kernels + toy engine)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so that `import miniattn` stays cheap and
# a CPU-only machine without Triton can still use the layouts, the allocator and the references.
_EXPORTS = {
    "LAYOUTS": "layout", "KV_CACHE_DTYPES": "layout", "allocate_kv_caches": "layout",
    "kv_cache_shapes": "layout", "convert_layout": "layout", "split_combined_cache": "layout",
    "cache_geometry": "layout",
    "BlockAllocator": "allocator", "BlockTable": "allocator", "OutOfBlocksError": "allocator",
    "AllocatorError": "allocator",
    "SlotMappingBuilder": "slots", "BatchSlots": "slots",
    "reshape_and_cache_flash": "ops.cache_write", "reshape_and_cache": "ops.cache_write",
    "paged_decode_attention": "ops.decode",
    "reshape_and_cache_ref": "ops.reference", "paged_decode_attention_ref": "ops.reference",
    "ModelConfig": "model", "ToyLlama": "model", "PRESETS": "model", "get_preset": "model",
    "Engine": "engine", "EngineConfig": "engine", "Request": "engine", "SamplingParams": "engine",
    "RequestOutput": "engine", "StepStats": "engine", "DecodeBatch": "engine",
    "StepTimer": "step_timer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'miniattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
