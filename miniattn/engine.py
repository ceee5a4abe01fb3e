"""The engine: requests in, tokens out, with continuous batching over a paged KV cache.

One `Engine.step()` = schedule (prefill admitted requests, or decode every running one, preempting
the newest when blocks run out) → run the model (`ModelRunner`: eager, or a captured CUDA graph for
decode) → sample → finish sequences that are done, freeing their blocks at once.

Hooks for measuring, so a benchmark need not copy the loop:

- ``Engine(..., on_step=fn)``: `fn(StepStats)` after every step (kind, batch, tokens, host wall
  time, graph bucket used, preemptions; with ``EngineConfig(profile=True)`` also the step's timed
  regions in ms: "step", and for eager steps "write", "attn", "layer", "other", "embed", "head").
- `Engine.prepare_decode_batch(batch_size, context_len)`: synthetic sequences holding
  `context_len` tokens each (random cache contents, scattered blocks), ready for decode steps;
  `Engine.decode_step(batch, timer=StepTimer(...), use_graph=False)`: one full decode step on it
  (host work included), per-layer regions in the timer; `Engine.release(batch)` frees the blocks.
- `ModelRunner.decode_callable(seqs, use_graph)`: only the device work of that step, inputs
  prepared once. With ``use_graph=True`` it replays the engine's captured graph (time it with
  `miniattn.timing.time_eager`); with ``use_graph=False`` it is the eager forward, which
  `miniattn.timing.time_graph` can capture itself.
- Write ablation: ``engine.runner.attn.write_repeats = 0 | 1 | 2`` changes what later eager calls
  and later captures do; `ModelRunner.set_write_repeats(n)` also re-captures the engine's graphs.
- The attention backend is ``engine.runner.attn``: any object with
  ``__call__(layer, q, k, v, meta) -> out`` (see `miniattn.attention`) can replace it, e.g. a peer
  with a fused cache append (re-capture graphs afterwards: ``engine.runner.capture_graphs(sizes)``).

A step benchmark in a few lines::

    model = ToyLlama(get_preset("llama-8b", num_layers=4), dtype=torch.bfloat16, device="cuda")
    engine = Engine(model, EngineConfig(kv_layout="HND", max_num_seqs=64, max_seq_len=4097,
                                        cuda_graph=True, graph_batch_sizes=(64,)))
    batch = engine.prepare_decode_batch(64, context_len=4096)
    timer = StepTimer("cuda")
    engine.decode_step(batch, timer=timer, use_graph=False)      # (a) events per component
    per_layer = timer.per_layer()                                 # {layer: {write, attn, other, layer}}
    full = time_eager(engine.runner.decode_callable(batch.seqs, use_graph=True))
    engine.runner.set_write_repeats(0)                            # (b) ablation: no writes
    no_write = time_eager(engine.runner.decode_callable(batch.seqs, use_graph=True))

Example
-------
>>> from miniattn.model import ToyLlama, get_preset
>>> engine = Engine(ToyLlama(get_preset("tiny")), EngineConfig(attention_impl="reference"))
>>> out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
>>> len(out[0].output_token_ids)
4
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence as Seq

import torch

from .allocator import BlockAllocator, BlockTable
from .attention import PREFILL_IMPLS
from .layout import KV_CACHE_DTYPES, get_layout
from .model import ToyLlama
from .runner import ModelRunner
from .sampler import sample_next_tokens
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Request, RequestOutput, SamplingParams, Sequence, SequenceStatus
from .step_timer import StepTimer

__all__ = ["EngineConfig", "Engine", "StepStats", "DecodeBatch", "Request", "RequestOutput", "SamplingParams"]


def default_graph_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 16, capped by (and always including) max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return tuple(sizes) + (max_num_seqs,)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. ``None`` fields are filled in by `resolve` from the model.

    kv_layout : "NHD", "HND" or "paged5d".
    kv_cache_dtype : "auto" (the model dtype) or "fp8" / "fp8_e4m3" / "fp8_e5m2" with per-tensor
        scales `k_scale`, `v_scale` (stored = x / scale).
    block_size : tokens per cache block.
    num_blocks : blocks in the pool (default: `max_num_seqs` sequences of `max_seq_len`).
    max_num_seqs : most sequences in one step.
    max_seq_len : longest prompt + generated tokens (default: the model's).
    max_num_batched_tokens : most prompt tokens in one prefill step (default: 4096 or `max_seq_len` if
        larger; at least `max_seq_len`, so that a preempted sequence can always be recomputed).
    cuda_graph : capture decode steps as CUDA graphs for `graph_batch_sizes` (CUDA only).
    attention_impl : "triton" (miniattn's kernels) or "reference" (pure torch).
    prefill_attention : "auto" (flash-attn's varlen kernel when importable, else torch SDPA),
        "flash" or "sdpa".
    num_splits : force the decode kernel's KV splits (None: its heuristic).
    seed : base seed of the per-request sampling generators.
    profile : record a `StepTimer` per step and report its regions in `StepStats.regions`.
    """

    kv_layout: str = "NHD"
    kv_cache_dtype: str = "auto"
    k_scale: float = 1.0
    v_scale: float = 1.0
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 8
    max_seq_len: int | None = None
    max_num_batched_tokens: int | None = None
    cuda_graph: bool = False
    graph_batch_sizes: tuple[int, ...] | None = None
    attention_impl: str = "triton"
    prefill_attention: str = "auto"
    num_splits: int | None = None
    seed: int = 0
    profile: bool = False

    def resolve(self, model: ToyLlama) -> "EngineConfig":
        """A copy with every default filled in and every setting checked (ValueError naming it)."""
        get_layout(self.kv_layout)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        for name in ("block_size", "max_num_seqs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        model_max = model.config.max_seq_len
        max_seq_len = model_max if self.max_seq_len is None else self.max_seq_len
        if not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= model_max:
            raise ValueError(f"max_seq_len must be in 1..{model_max} (the model's), got {max_seq_len!r}")
        tokens = self.max_num_batched_tokens or max(max_seq_len, self.max_num_seqs, 4096)
        if tokens < max(max_seq_len, self.max_num_seqs):
            raise ValueError(f"max_num_batched_tokens ({tokens}) must be >= max_seq_len ({max_seq_len}) "
                             f"and >= max_num_seqs ({self.max_num_seqs})")
        per_seq = -(-max_seq_len // self.block_size)
        num_blocks = self.num_blocks if self.num_blocks is not None else self.max_num_seqs * per_seq
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        cuda_graph = self.cuda_graph
        if cuda_graph and model.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        sizes = self.graph_batch_sizes
        if sizes is None:
            sizes = default_graph_batch_sizes(self.max_num_seqs)
        sizes = tuple(sorted(set(sizes)))
        if sizes and not all(isinstance(b, int) and 1 <= b <= self.max_num_seqs for b in sizes):
            raise ValueError(f"graph_batch_sizes must lie in 1..max_num_seqs ({self.max_num_seqs}), got {sizes}")
        if self.attention_impl not in ("triton", "reference"):
            raise ValueError(f"attention_impl must be 'triton' or 'reference', got {self.attention_impl!r}")
        if self.prefill_attention not in PREFILL_IMPLS:
            raise ValueError(f"prefill_attention must be one of {PREFILL_IMPLS}, got {self.prefill_attention!r}")
        return dataclasses.replace(self, max_seq_len=max_seq_len, max_num_batched_tokens=tokens,
                                   num_blocks=num_blocks, graph_batch_sizes=sizes)


@dataclass
class StepStats:
    """What one `Engine.step` did; passed to the `on_step` hook."""

    step: int
    is_prefill: bool
    num_seqs: int
    num_tokens: int  # tokens run through the model (prompt tokens for prefill, 1 per row for decode)
    wall_ms: float  # host wall time: schedule → sampled tokens on the host
    graph_batch_size: int | None  # bucket replayed, or None when eager
    num_preempted: int
    num_finished: int
    regions: dict[str, float] | None = None  # StepTimer.totals() in ms, with profile=True


@dataclass
class DecodeBatch:
    """Synthetic decode batch from `Engine.prepare_decode_batch` (sequences with filled caches)."""

    seqs: list[Sequence]
    context_len: int

    @property
    def batch_size(self) -> int:
        return len(self.seqs)


class Engine:
    """Serve a `ToyLlama` with continuous batching over a paged KV cache.

    Parameters
    ----------
    model : ToyLlama (its device and dtype are the engine's).
    config : EngineConfig (defaults filled from the model).
    on_step : optional hook called with a `StepStats` after every step.
    """

    def __init__(self, model: ToyLlama, config: EngineConfig | None = None, *,
                 on_step: Callable[[StepStats], None] | None = None):
        self.model = model
        self.config = cfg = (config or EngineConfig()).resolve(model)
        self.device = model.device
        self.allocator = BlockAllocator(cfg.num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens, max_seq_len=cfg.max_seq_len)
        self.runner = ModelRunner(model, cfg)
        self.on_step = on_step
        self._next_id = 0
        self._num_steps = 0
        if cfg.cuda_graph:
            self.runner.capture_graphs(cfg.graph_batch_sizes)

    # ---------------------------------------------------------------- requests
    def add_request(self, request: Request | Seq[int], sampling: SamplingParams | None = None) -> Sequence:
        """Queue a request (or a prompt with `sampling`); ValueError if it can never be served."""
        if not isinstance(request, Request):
            request = Request(list(request), sampling or SamplingParams())
        elif sampling is not None:
            raise ValueError("pass sampling inside the Request, not beside it")
        self.check_request(request)
        if request.request_id is None:
            request = dataclasses.replace(request, request_id=self._next_id)
        seq = Sequence(self._next_id, request)
        self.scheduler.add(seq)
        self._next_id += 1
        return seq

    def check_request(self, request: Request) -> None:
        """ValueError if `request` could never be served (bad token ids, too long, pool too small)."""
        vocab = self.model.config.vocab_size
        if any(not 0 <= int(t) < vocab for t in request.prompt_token_ids):
            raise ValueError(f"prompt token ids must lie in 0..{vocab - 1}")
        self.scheduler.check(Sequence(-1, request))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- the loop
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that finished in it."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        timer = StepTimer(self.device) if self.config.profile else None
        num_tokens = batch.num_tokens
        logits, bucket = self._run(batch, timer)
        tokens = sample_next_tokens(logits, batch.seqs, self.config.seed)
        finished = []
        for seq, tok in zip(batch.seqs, tokens):
            if seq.append_token(tok):
                self.scheduler.finish(seq)
                finished.append(seq.output())
        self._num_steps += 1
        if self.on_step is not None:
            self.on_step(StepStats(
                step=self._num_steps, is_prefill=batch.is_prefill, num_seqs=len(batch.seqs),
                num_tokens=num_tokens, wall_ms=(time.perf_counter() - t0) * 1e3,
                graph_batch_size=bucket, num_preempted=len(batch.preempted), num_finished=len(finished),
                regions=timer.totals() if timer is not None else None))
        return finished

    def _run(self, batch: ScheduledBatch, timer):
        if batch.block_copies:
            self.runner.copy_blocks(batch.block_copies)
        if batch.is_prefill:
            return self.runner.prefill(batch.seqs, timer), None
        graph = self.runner.graph_for(len(batch.seqs)) if self.config.cuda_graph else None
        return self.runner.decode(batch.seqs, timer), (graph.batch_size if graph else None)

    def generate(self, prompts: Iterable[Seq[int] | Request],
                 sampling: SamplingParams | Seq[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; outputs in the order given.

        Every prompt is checked before any runs (ValueError names the first bad one). With
        `progress`, a tqdm bar counts generated tokens.
        """
        prompts = list(prompts)
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling)} SamplingParams")
        reqs = [p if isinstance(p, Request) else Request(list(p), sp) for p, sp in zip(prompts, sampling)]
        for i, r in enumerate(reqs):
            try:
                self.check_request(r)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        seqs = [self.add_request(r) for r in reqs]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(s.sampling.max_new_tokens for s in seqs), unit="tok", leave=False)
        done = 0
        while self.has_unfinished():
            self.step()
            if bar is not None:
                now = sum(s.num_output_tokens if s.status != SequenceStatus.FINISHED else s.sampling.max_new_tokens
                          for s in seqs)
                bar.update(now - done)
                done = now
        if bar is not None:
            bar.close()
        return [s.output() for s in seqs]

    # ---------------------------------------------------------------- benchmark hooks
    def prepare_decode_batch(self, batch_size: int, context_len: int, *, seed: int = 0,
                             fill_cache: bool = True, shuffle_blocks: bool = True) -> DecodeBatch:
        """`batch_size` synthetic sequences of `context_len` tokens, ready for `decode_step`.

        Each holds blocks for `context_len` tokens; the last one is the step's new token (written
        by the step, at position context_len - 1). With `fill_cache` the pool is filled with random
        values (so attention reads realistic numbers); with `shuffle_blocks` the free pool is
        shuffled first, so block tables are scattered as in a long-running server. Blocks come from
        the engine's pool: call `release` afterwards.
        """
        if not 1 <= context_len <= self.config.max_seq_len:
            raise ValueError(f"context_len must be in 1..max_seq_len ({self.config.max_seq_len}), got {context_len}")
        if not 1 <= batch_size <= self.config.max_num_seqs:
            raise ValueError(f"batch_size must be in 1..max_num_seqs ({self.config.max_num_seqs}), got {batch_size}")
        need = batch_size * -(-context_len // self.config.block_size)
        if need > self.allocator.num_free:
            raise ValueError(f"batch needs {need} blocks, {self.allocator.num_free} free "
                             f"(raise num_blocks)")
        g = torch.Generator().manual_seed(seed)
        if shuffle_blocks:
            _shuffle_free_blocks(self.allocator, g)
        if fill_cache:
            self.fill_kv_cache(seed)
        vocab = self.model.config.vocab_size
        seqs = []
        for i in range(batch_size):
            ids = torch.randint(0, vocab, (context_len,), generator=g).tolist()
            seq = Sequence(-(i + 1), Request(ids, SamplingParams(max_new_tokens=1)))
            seq.block_table = BlockTable(self.allocator)
            seq.block_table.append_tokens(context_len)
            seq.status = SequenceStatus.RUNNING
            seqs.append(seq)
        return DecodeBatch(seqs, context_len)

    def decode_step(self, batch: DecodeBatch, *, timer: StepTimer | None = None,
                    use_graph: bool | None = None) -> torch.Tensor:
        """One decode step on a prepared batch, host work included: logits [batch_size, vocab].

        Re-running it re-writes the same slots (the batch does not grow). `use_graph` defaults to
        the engine's `cuda_graph`; with a timer an eager step records per-layer regions.
        """
        return self.runner.decode(batch.seqs, timer=timer, use_graph=use_graph)

    def release(self, batch: DecodeBatch) -> None:
        """Give a prepared batch's blocks back to the pool."""
        for s in batch.seqs:
            if s.block_table is not None:
                s.block_table.free()
                s.block_table = None
            s.status = SequenceStatus.FINISHED

    @torch.no_grad()
    def fill_kv_cache(self, seed: int = 0, chunk_blocks: int = 1024) -> None:
        """Fill every cache block with N(0, 1) values (cast to the cache dtype, FP8 divided by its scale)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        cfg = self.config
        for kc, vc in self.runner.kv_caches:
            for cache, scale in ((kc, cfg.k_scale), (vc, cfg.v_scale)):
                for i in range(0, cache.shape[0], chunk_blocks):
                    part = cache[i:i + chunk_blocks]
                    src = torch.randn(part.shape, generator=g, device=self.device, dtype=torch.float32)
                    if cfg.kv_cache_dtype != "auto":
                        src = (src / scale).clamp(-240, 240)
                    part.copy_(src.to(cache.dtype))


def _shuffle_free_blocks(allocator: BlockAllocator, g: torch.Generator) -> None:
    """Randomise the order in which the free pool hands out blocks (through the public API)."""
    ids = allocator.allocate(allocator.num_free)
    perm = torch.randperm(len(ids), generator=g).tolist()
    allocator.free_blocks([ids[i] for i in perm])
