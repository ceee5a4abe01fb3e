"""Block allocator with reference counts, and per-sequence block tables.

The KV cache is a fixed pool of `num_blocks` blocks of `block_size` token slots each. A token at
position ``pos`` of a sequence lives in slot ``block_ids[pos // block_size] * block_size +
pos % block_size``: that number is what the write kernel's ``slot_mapping`` holds.

Blocks are reference counted. A block can be owned by several sequences (after `BlockTable.fork`,
or when a common prefix is shared); it goes back to the pool when its last owner frees it.
A shared block is never written: appending to a sequence whose last, partially filled block is
shared first gives the sequence a private copy ("copy-on-write", see `BlockTable.append_tokens`).

Every error is an `AllocatorError`, raised before anything changes: a failed call leaves the
allocator and the tables exactly as they were. `OutOfBlocksError` is its own class so that an
engine can catch it and preempt a sequence.

Example
-------
>>> alloc = BlockAllocator(num_blocks=4, block_size=16)
>>> seq = BlockTable(alloc)
>>> seq.append_tokens(20)          # 2 blocks; no copies to do
[]
>>> child = seq.fork()             # shares both blocks
>>> copies = child.append_tokens(1)  # the last block is shared and partial: copy-on-write
>>> copies                         # caller copies block 1 into block 2 in every cache, then writes
[(1, 2)]
>>> seq.free(); child.free(); alloc.num_free
4
"""

from __future__ import annotations

import operator
from collections import Counter, deque
from typing import Iterable

__all__ = [
    "AllocatorError", "OutOfBlocksError", "DoubleFreeError", "UnknownBlockError",
    "BlockAllocator", "BlockTable",
]


class AllocatorError(RuntimeError):
    """Base class of every error the allocator and block tables raise."""


class OutOfBlocksError(AllocatorError):
    """Not enough free blocks for the request (the engine may preempt a sequence and retry)."""


class DoubleFreeError(AllocatorError):
    """A block that is already free, or a block table already freed, was freed again."""


class UnknownBlockError(AllocatorError):
    """A block id that is not an integer in ``range(num_blocks)``."""


def _count(n) -> int:
    """`n` as a non-negative int (plain ValueError/TypeError: a bad argument, not a bad state)."""
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"expected a non-negative count, got {n}")
    return n


class BlockAllocator:
    """A fixed pool of `num_blocks` KV-cache blocks of `block_size` slots, with reference counts.

    Free blocks are handed out first-in first-out. `allocate` returns blocks with ref count 1;
    `incref` adds an owner; `free` removes one and returns the block to the pool at 0.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = operator.index(num_blocks)
        self.block_size = operator.index(block_size)
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self._refs = [0] * self.num_blocks  # owners per block; 0 = in the free pool
        self._free = deque(range(self.num_blocks))

    @property
    def num_free(self) -> int:
        """Number of blocks in the free pool."""
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        """True if `allocate(n)` would succeed."""
        return _count(n) <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the pool (ref count 1 each); OutOfBlocksError if fewer are free."""
        n = _count(n)
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} blocks, {len(self._free)} of {self.num_blocks} free")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self._refs[b] = 1
        return ids

    def _check(self, block_id) -> int:
        try:
            b = operator.index(block_id)
        except TypeError:
            raise UnknownBlockError(f"block id must be an int, got {block_id!r}") from None
        if not 0 <= b < self.num_blocks:
            raise UnknownBlockError(f"block id {b} not in range({self.num_blocks})")
        return b

    def ref_count(self, block_id: int) -> int:
        """Number of owners of `block_id` (0 when it is free)."""
        return self._refs[self._check(block_id)]

    def incref(self, block_id: int) -> None:
        """Add an owner to an allocated block (AllocatorError if the block is free)."""
        b = self._check(block_id)
        if self._refs[b] == 0:
            raise AllocatorError(f"incref of block {b}, which is free")
        self._refs[b] += 1

    def free(self, block_id: int) -> None:
        """Drop one owner of `block_id`; the block returns to the pool when none is left."""
        self.free_blocks((block_id,))

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one owner per occurrence of each id, all or nothing (a repeated id drops several)."""
        drops = Counter(self._check(b) for b in block_ids)
        for b, k in drops.items():
            if self._refs[b] < k:
                raise DoubleFreeError(f"block {b} freed {k} time(s) but has {self._refs[b]} owner(s)")
        for b, k in drops.items():
            self._refs[b] -= k
            if self._refs[b] == 0:
                self._free.append(b)

    def __repr__(self) -> str:
        return f"BlockAllocator(num_blocks={self.num_blocks}, block_size={self.block_size}, num_free={self.num_free})"


class BlockTable:
    """The blocks holding one sequence's tokens, grown as tokens are appended.

    Invariant: ``len(block_ids) == ceil(num_tokens / block_size)``; a new block is taken only when
    the last one is full. The table owns one reference to each of its blocks.
    """

    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.block_size = allocator.block_size
        self._blocks: list[int] = []
        self._num_tokens = 0
        self._freed = False

    @property
    def num_tokens(self) -> int:
        """Tokens stored so far (positions 0 .. num_tokens - 1)."""
        return self._num_tokens

    @property
    def block_ids(self) -> tuple[int, ...]:
        """The table's blocks in position order (a copy)."""
        return tuple(self._blocks)

    @property
    def freed(self) -> bool:
        return self._freed

    def _alive(self) -> None:
        if self._freed:
            raise DoubleFreeError("block table was already freed")

    def _cow_needed(self) -> bool:
        """True if the next token would land in a partially filled block that someone else owns."""
        return self._num_tokens % self.block_size != 0 and self.allocator._refs[self._blocks[-1]] > 1

    def blocks_needed(self, n: int) -> int:
        """Blocks `append_tokens(n)` would take from the pool (including a copy-on-write block)."""
        n = _count(n)
        if n == 0:
            return 0
        room = len(self._blocks) * self.block_size - self._num_tokens
        grow = -(-max(0, n - room) // self.block_size)
        return grow + (1 if self._cow_needed() else 0)

    def can_append(self, n: int) -> bool:
        """True if `append_tokens(n)` would succeed now."""
        return not self._freed and self.allocator.can_allocate(self.blocks_needed(n))

    def append_tokens(self, n: int) -> list[tuple[int, int]]:
        """Make room for `n` more tokens, all or nothing; returns the block copies to perform.

        Copy-on-write: if the last block is partially filled and shared (ref count > 1), the table
        first swaps it for a fresh private block and drops its reference to the shared one. The
        returned list then holds one ``(src, dst)`` pair: before writing this step's tokens, the
        caller must copy block `src` into block `dst` in every layer's key and value cache (the
        whole block may be copied; at least its first ``num_tokens % block_size`` slots must be).
        Otherwise the list is empty. Raises OutOfBlocksError, changing nothing, if the pool is short.
        """
        self._alive()
        need = self.blocks_needed(n)
        if need == 0:  # most decode steps: room in a private last block
            self._num_tokens += n
            return []
        new = self.allocator.allocate(need)  # raises before any change
        copies = []
        if self._cow_needed():
            src, dst = self._blocks[-1], new.pop(0)
            self.allocator.free(src)  # others still own it: ref count stays >= 1
            self._blocks[-1] = dst
            copies.append((src, dst))
        self._blocks.extend(new)
        self._num_tokens += n
        return copies

    def slot(self, pos: int) -> int:
        """Cache slot of token `pos`: ``block_ids[pos // block_size] * block_size + pos % block_size``."""
        pos = operator.index(pos)
        if not 0 <= pos < self._num_tokens:
            raise IndexError(f"position {pos} not in range({self._num_tokens})")
        return self._blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Cache slots of positions ``start .. stop - 1`` (default: every stored token)."""
        stop = self._num_tokens if stop is None else stop
        if not 0 <= start <= stop <= self._num_tokens:
            raise IndexError(f"positions [{start}, {stop}) not within [0, {self._num_tokens})")
        bs, ids = self.block_size, self._blocks
        return [ids[p // bs] * bs + p % bs for p in range(start, stop)]

    def fork(self, num_tokens: int | None = None) -> "BlockTable":
        """A new table sharing this one's first `num_tokens` tokens (default: all of them).

        The child takes a reference to each block covering those tokens; nothing is copied. Either
        sequence may then append: a shared partial last block is copied on write (`append_tokens`).
        Forking only a prefix is how a common prompt prefix is shared between requests.
        """
        self._alive()
        k = self._num_tokens if num_tokens is None else _count(num_tokens)
        if k > self._num_tokens:
            raise ValueError(f"cannot fork {k} tokens from a sequence of {self._num_tokens}")
        child = BlockTable(self.allocator)
        child._blocks = self._blocks[: -(-k // self.block_size)]
        child._num_tokens = k
        for b in child._blocks:
            self.allocator.incref(b)
        return child

    def free(self) -> None:
        """Release every block of the table; freeing it twice raises DoubleFreeError."""
        self._alive()
        self.allocator.free_blocks(self._blocks)
        self._blocks = []
        self._num_tokens = 0
        self._freed = True

    def __len__(self) -> int:
        return self._num_tokens

    def __repr__(self) -> str:
        return f"BlockTable(num_tokens={self._num_tokens}, block_ids={self._blocks})"
