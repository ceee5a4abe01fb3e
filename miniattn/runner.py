"""Runs the model over one scheduled batch: inputs, KV caches, eager steps and CUDA graphs.

The runner owns the per-layer KV caches, the attention backend (`PagedAttention`), a
`SlotMappingBuilder` (slot mapping, positions, block tables, seq_lens in one pinned copy) and a
pinned buffer for the input token ids. It does not decide anything: the scheduler has already
appended this step's tokens to every sequence's block table.

CUDA graphs (decode only): for each batch-size bucket B the runner captures one decode step whose
inputs are the builder's fixed device views for (B tokens, B rows) and the fixed ids buffer; a step
of n <= B sequences fills those buffers (rows n..B-1 are padding: slot -1, seq_len 0, token 0) and
replays the graph of the smallest bucket that fits. Larger batches run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence as Seq

import torch

from .attention import AttentionMetadata, PagedAttention
from .layout import allocate_kv_caches
from .model import ToyLlama
from .slots import BatchSlots, SlotMappingBuilder, copy_blocks
from .step_timer import StepTimer, region

if TYPE_CHECKING:
    from .engine import EngineConfig
    from .sequence import Sequence

__all__ = ["DecodeGraph", "ModelRunner"]


@dataclass
class DecodeGraph:
    """One captured decode step for `batch_size` rows; `logits` is its output buffer [B, vocab]."""

    batch_size: int
    graph: "torch.cuda.CUDAGraph"
    logits: torch.Tensor
    write_repeats: int


class ModelRunner:
    """Executes prefill and decode steps of `model` against a paged KV cache.

    Parameters
    ----------
    model : ToyLlama.
    config : a resolved `EngineConfig` (see `EngineConfig.resolve`).
    """

    def __init__(self, model: ToyLlama, config: "EngineConfig"):
        self.model = model
        self.config = cfg = config
        self.device = dev = model.device
        mc = model.config
        self.kv_caches = allocate_kv_caches(cfg.kv_layout, mc.num_layers, cfg.num_blocks, cfg.block_size,
                                            mc.num_kv_heads, mc.head_size, model.dtype, cfg.kv_cache_dtype, dev)
        k_scale = v_scale = None
        if cfg.kv_cache_dtype != "auto":
            k_scale = torch.tensor([cfg.k_scale], dtype=torch.float32, device=dev)
            v_scale = torch.tensor([cfg.v_scale], dtype=torch.float32, device=dev)
        self.attn = PagedAttention(self.kv_caches, cfg.kv_layout, cfg.kv_cache_dtype, k_scale, v_scale,
                                   scale=model.scale, impl=cfg.attention_impl, num_splits=cfg.num_splits,
                                   prefill=cfg.prefill_attention)
        self.max_blocks_per_seq = -(-cfg.max_seq_len // cfg.block_size)
        self.slots = SlotMappingBuilder(cfg.block_size, cfg.max_num_seqs, self.max_blocks_per_seq,
                                        max_num_tokens=cfg.max_num_batched_tokens, device=dev)
        on_cuda = dev.type == "cuda"
        n = cfg.max_num_batched_tokens
        self._ids_host = torch.zeros(n, dtype=torch.int64, pin_memory=on_cuda)
        self._ids_dev = torch.zeros(n, dtype=torch.int64, device=dev) if dev.type != "cpu" else self._ids_host
        self._ids_np = self._ids_host.numpy()
        self._ids_copied = torch.cuda.Event() if on_cuda else None
        self.graphs: dict[int, DecodeGraph] = {}
        self._graph_pool = None

    # ---------------------------------------------------------------- inputs
    def _upload_ids(self, ids: Seq[int], pad_to: int) -> torch.Tensor:
        """Token ids [pad_to] on the device (padding 0), via the pinned buffer and one copy."""
        if self._ids_copied is not None:
            self._ids_copied.synchronize()  # the previous copy has read the host buffer
        n = len(ids)
        self._ids_np[:n] = ids
        self._ids_np[n:pad_to] = 0
        if self._ids_dev is not self._ids_host:
            self._ids_dev[:pad_to].copy_(self._ids_host[:pad_to], non_blocking=True)
            self._ids_copied.record()
        return self._ids_dev[:pad_to]

    def prepare_decode(self, seqs: Seq["Sequence"], pad_to: int | None = None):
        """(input_ids, BatchSlots) of a decode step; each sequence's newest token is the input."""
        b = self.slots.decode([s.block_table for s in seqs], pad_to=pad_to)
        ids = self._upload_ids([s.token_ids[-1] for s in seqs], pad_to or len(seqs))
        return ids, b

    def copy_blocks(self, copies) -> None:
        """Copy-on-write block copies in every layer's caches (see `BlockTable.append_tokens`)."""
        copy_blocks(self.kv_caches, copies)

    # ---------------------------------------------------------------- steps
    @torch.no_grad()
    def prefill(self, seqs: Seq["Sequence"], timer: StepTimer | None = None) -> torch.Tensor:
        """Logits [len(seqs), vocab] at each sequence's last token; writes all its tokens' K/V."""
        qlens = [s.num_tokens for s in seqs]
        b = self.slots.build([s.block_table for s in seqs], qlens)
        ids = self._upload_ids([t for s in seqs for t in s.token_ids], b.num_tokens)
        meta = AttentionMetadata(is_prefill=True, slot_mapping=b.slot_mapping, cu_seqlens=b.cu_seqlens_q,
                                 query_lens=tuple(qlens), max_query_len=b.max_query_len, timer=timer)
        with region(timer, "step"):
            hidden = self.model(ids, b.positions, self.attn, meta)
            last = hidden[b.cu_seqlens_q[1:].long() - 1]
            with region(timer, "head"):
                return self.model.compute_logits(last)

    def forward_decode(self, input_ids: torch.Tensor, b: BatchSlots, timer: StepTimer | None = None,
                       max_seq_len: int | None = None) -> torch.Tensor:
        """One decode forward over prepared inputs: logits [rows, vocab] (padding rows included).

        `max_seq_len` (a host bound of the lengths) would let the decode kernel pick its KV splits
        for this step. The engine leaves it None, in eager steps too: splits then follow the
        block-table capacity (`EngineConfig.max_seq_len`), the grid is fixed, and an eager step runs
        exactly the kernels its graph replays, so per-component eager timings explain graph steps.
        """
        meta = AttentionMetadata(is_prefill=False, slot_mapping=b.slot_mapping, block_tables=b.block_tables,
                                 seq_lens=b.seq_lens, max_seq_len=max_seq_len, timer=timer)
        hidden = self.model(input_ids, b.positions, self.attn, meta)
        with region(timer, "head"):
            return self.model.compute_logits(hidden)

    @torch.no_grad()
    def decode(self, seqs: Seq["Sequence"], timer: StepTimer | None = None,
               use_graph: bool | None = None) -> torch.Tensor:
        """Logits [len(seqs), vocab] of one decode step (the new tokens already in the tables).

        Replays a captured graph when `use_graph` (default: the engine's `cuda_graph` setting) and a
        bucket fits; otherwise runs eagerly. With a timer, an eager step records per-layer "write",
        "attn" and "layer" regions; a replayed step records only "step". The graph's logits are a
        view of its output buffer, overwritten by the next replay.
        """
        n = len(seqs)
        graph = self.graph_for(n) if (self.config.cuda_graph if use_graph is None else use_graph) else None
        if graph is not None:
            self.prepare_decode(seqs, pad_to=graph.batch_size)
            with region(timer, "step"):
                graph.graph.replay()
            return graph.logits[:n]
        ids, b = self.prepare_decode(seqs)
        with region(timer, "step"):
            return self.forward_decode(ids, b, timer)

    def decode_callable(self, seqs: Seq["Sequence"], use_graph: bool = False) -> Callable[[], torch.Tensor]:
        """A zero-argument function running only the device work of this decode step.

        Inputs are prepared once, now, into the runner's fixed buffers; each call re-runs the step
        on them (re-writing the same slots, so the cache does not grow). The callable is valid until
        the buffers are next filled: any other step, `prepare_decode` or `capture_graphs` (so make
        it after `set_write_repeats`). With `use_graph` it replays the bucket's graph (which must
        exist). Made for `miniattn.timing.time_graph` / `time_eager` in the step benchmark.
        """
        n = len(seqs)
        if use_graph:
            graph = self.graph_for(n)
            if graph is None:
                raise ValueError(f"no captured decode graph holds {n} rows (buckets: {sorted(self.graphs)})")
            self.prepare_decode(seqs, pad_to=graph.batch_size)

            def replay():
                graph.graph.replay()
                return graph.logits[:n]
            return replay
        ids, b = self.prepare_decode(seqs)
        return torch.no_grad()(lambda: self.forward_decode(ids, b))

    # ---------------------------------------------------------------- CUDA graphs
    def graph_for(self, n: int) -> DecodeGraph | None:
        """The captured graph of the smallest bucket >= n, or None."""
        fits = [b for b in self.graphs if b >= n]
        return self.graphs[min(fits)] if fits else None

    @torch.no_grad()
    def capture_graphs(self, batch_sizes: Seq[int]) -> None:
        """Capture one decode step per batch size (largest first, one shared memory pool).

        Uses the backend's current `write_repeats` and `num_splits`. Replaces existing graphs.
        """
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; use cuda_graph=False on CPU")
        for bs in batch_sizes:
            if not 1 <= bs <= self.config.max_num_seqs:
                raise ValueError(f"graph batch size {bs} not in 1..max_num_seqs ({self.config.max_num_seqs})")
        self.graphs.clear()
        # the old graphs are gone, and with them their memory pool: passing its handle to a new
        # capture trips an internal assert in PyTorch's caching allocator, so start a fresh pool
        self._graph_pool = None
        for bs in sorted(set(batch_sizes), reverse=True):
            ids, b = self.prepare_decode([], pad_to=bs)  # all padding: writes skipped, zeros attended
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: compile kernels, build the rotary table
                for _ in range(2):
                    self.forward_decode(ids, b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._graph_pool):
                logits = self.forward_decode(ids, b)
            self._graph_pool = g.pool()
            self.graphs[bs] = DecodeGraph(bs, g, logits, self.attn.write_repeats)
        torch.cuda.synchronize(self.device)

    def set_write_repeats(self, n: int) -> None:
        """Write each layer's K/V `n` times (0, 1, 2: the ablation of the step benchmark).

        Captured graphs are re-captured for the same buckets so they hold the new step.
        """
        if n not in (0, 1, 2):
            raise ValueError(f"write_repeats must be 0, 1 or 2, got {n!r}")
        self.attn.write_repeats = n
        if self.graphs:
            self.capture_graphs(list(self.graphs))
