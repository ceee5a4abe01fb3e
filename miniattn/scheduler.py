"""Continuous batching: which sequences run this step, and who gives up blocks when they run out.

Each step is either a prefill or a decode (prefill first, as in vLLM v0 / nano-vllm):

- prefill: waiting sequences are admitted in arrival order while the batch limits allow and the pool
  has blocks for all their tokens (a preempted sequence comes back with prompt + generated tokens and
  recomputes them). The first one that does not fit stops admission, so no request is overtaken.
- decode: every running sequence gets room for one more token. When the pool is empty, the newest
  running sequence is preempted: its blocks are freed and it goes back to the front of the queue.
  If the sequence that needs the block is itself the newest, it is the one preempted.

`check` refuses up front (ValueError) a request that could never fit: longer than `max_seq_len`,
or needing more blocks than the whole pool. Everything accepted therefore finishes: a lone running
sequence always has the whole pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .allocator import BlockAllocator, BlockTable
from .sequence import Sequence, SequenceStatus

__all__ = ["ScheduledBatch", "Scheduler"]


@dataclass
class ScheduledBatch:
    """The sequences of one step, their tokens already appended to their block tables."""

    is_prefill: bool
    seqs: list[Sequence]
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs) if self.is_prefill else len(self.seqs)


class Scheduler:
    """Waiting queue, running set, admission and preemption over one `BlockAllocator`."""

    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_seq_len: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.num_preemptions = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.allocator.block_size)

    def check(self, seq: Sequence) -> None:
        """ValueError if `seq` could never be served by this engine."""
        n, total = seq.num_prompt_tokens, seq.max_total_tokens
        if n == 0:
            raise ValueError("prompt_token_ids is empty: a request needs at least one prompt token")
        if n > self.max_seq_len:
            raise ValueError(f"prompt has {n} tokens, longer than max_seq_len={self.max_seq_len}")
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({seq.sampling.max_new_tokens}) = {total} "
                             f"exceeds max_seq_len={self.max_seq_len}")
        need = self.blocks_for(seq.max_cached_tokens)
        if need > self.allocator.num_blocks:
            raise ValueError(f"request needs up to {need} cache blocks but the pool has only "
                             f"{self.allocator.num_blocks} (block_size={self.allocator.block_size})")

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch (tokens appended to the tables), or None when nothing is left."""
        batch = self._admit()
        if batch:
            return ScheduledBatch(True, batch)
        if not self.running:
            return None
        return self._decode()

    def _admit(self) -> list[Sequence]:
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if tokens + n > self.max_num_batched_tokens:
                break
            table = BlockTable(self.allocator)
            if not table.can_append(n):
                break
            table.append_tokens(n)  # a fresh table: no copy-on-write
            seq.block_table = table
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            batch.append(seq)
            tokens += n
        if batch:  # a re-admitted preempted sequence is older than some running ones: keep arrival order
            self.running = sorted(self.running + batch, key=lambda s: s.seq_id)
        return batch

    def _decode(self) -> ScheduledBatch:
        preempted, copies = [], []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            while not seq.block_table.can_append(1):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                copies += seq.block_table.append_tokens(1)
                i += 1
                continue
            break
        for seq in preempted:  # newest first, so the oldest ends up at the front
            self.waiting.appendleft(seq)
        return ScheduledBatch(False, list(self.running), preempted, copies)

    def _preempt(self, seq: Sequence) -> None:
        seq.block_table.free()
        seq.block_table = None
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Free a finished sequence's blocks at once and drop it from the running set."""
        self.running.remove(seq)
        seq.block_table.free()
        seq.block_table = None
        seq.status = SequenceStatus.FINISHED
