"""The sweep plan: which (batch, context) points to run, grouped per engine, sized to memory.

A run sweeps batch sizes and context lengths ("cross": every batch at the pivot context, then every
context at the pivot batch; "grid": every pair). Each engine holds one context length (its block
tables' capacity, which sets the decode kernel's KV splits as a server with that max_model_len
would), and a block pool sized to the largest batch of that context that fits in `budget_bytes`;
points that do not fit are skipped with a note instead of failing the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layout import resolve_cache_dtype

__all__ = ["Point", "EnginePlan", "plan_points", "kv_bytes_per_token", "plan_engines"]


@dataclass(frozen=True)
class Point:
    """One measured decode step: `batch` sequences of `context` tokens (the new one included)."""

    batch: int
    context: int


@dataclass(frozen=True)
class EnginePlan:
    """One engine's share of the sweep: its context, pool size, the points it runs and skips."""

    context: int
    num_blocks: int
    points: tuple[Point, ...]  # ascending batch
    skipped: tuple[tuple[Point, str], ...]  # (point, why)

    @property
    def max_batch(self) -> int:
        return max(p.batch for p in self.points)


def plan_points(batches, contexts, mode: str = "cross", pivot_batch: int | None = None,
                pivot_context: int | None = None) -> list[Point]:
    """The sweep's points, without repeats, in run order (batch sweep first).

    ``mode="cross"``: ``(b, pivot_context)`` for every batch b, then ``(pivot_batch, c)`` for every
    context c (pivots default to the middle entries). ``mode="grid"``: every pair.
    """
    batches, contexts = list(batches), list(contexts)
    if not batches or not contexts:
        raise ValueError("need at least one batch size and one context length")
    for name, vals in (("batch", batches), ("context", contexts)):
        if any(not isinstance(v, int) or v < 1 for v in vals):
            raise ValueError(f"{name} values must be positive ints, got {vals}")
    if mode == "grid":
        pts = [Point(b, c) for b in batches for c in contexts]
    elif mode == "cross":
        pb = batches[len(batches) // 2] if pivot_batch is None else pivot_batch
        pc = contexts[len(contexts) // 2] if pivot_context is None else pivot_context
        pts = [Point(b, pc) for b in batches] + [Point(pb, c) for c in contexts]
    else:
        raise ValueError(f"mode must be 'cross' or 'grid', got {mode!r}")
    return list(dict.fromkeys(pts))


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_size: int, kv_cache_dtype: str,
                       model_dtype) -> int:
    """Cache bytes one token occupies over all layers (key + value)."""
    elem = resolve_cache_dtype(kv_cache_dtype, model_dtype).itemsize
    return num_layers * 2 * num_kv_heads * head_size * elem


def plan_engines(points, block_size: int, bytes_per_token: int, budget_bytes: float | None,
                 max_tokens: int | None = None) -> list[EnginePlan]:
    """Group `points` by context; size each group's pool to its largest batch that fits.

    A point is skipped when its cache (``batch * ceil(context / block_size)`` blocks) exceeds
    `budget_bytes` (None: no limit) or when ``batch * context > max_tokens`` (None: no limit).
    """
    by_ctx: dict[int, list[Point]] = {}
    for p in points:
        by_ctx.setdefault(p.context, []).append(p)
    block_bytes = block_size * bytes_per_token
    plans = []
    for ctx, pts in by_ctx.items():
        per_seq = -(-ctx // block_size)
        keep, skip = [], []
        for p in sorted(pts, key=lambda p: p.batch):
            need = p.batch * per_seq * block_bytes
            if max_tokens is not None and p.batch * p.context > max_tokens:
                skip.append((p, f"batch x context {p.batch * p.context} > limit {max_tokens}"))
            elif budget_bytes is not None and need > budget_bytes:
                skip.append((p, f"cache needs {need / 2**30:.1f} GiB, {budget_bytes / 2**30:.1f} GiB available"))
            else:
                keep.append(p)
        num_blocks = max((p.batch for p in keep), default=0) * per_seq
        plans.append(EnginePlan(ctx, num_blocks, tuple(keep), tuple(skip)))
    return plans
