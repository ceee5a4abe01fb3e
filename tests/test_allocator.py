"""Block allocator and block tables: hand-checked cases, every error leaves the state unchanged,
and a hypothesis state machine that simulates the cache contents to check copy-on-write."""

from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from miniattn.allocator import (
    AllocatorError, BlockAllocator, BlockTable, DoubleFreeError, OutOfBlocksError, UnknownBlockError,
)


def snapshot(alloc: BlockAllocator, *tables: BlockTable):
    """Everything observable about the allocator and the tables, for before/after comparisons."""
    return (
        tuple(alloc.ref_count(b) for b in range(alloc.num_blocks)),
        tuple(alloc._free),  # the order blocks would be handed out in
        tuple((t.block_ids, t.num_tokens, t.freed) for t in tables),
    )


def raises_unchanged(exc, fn, alloc, *tables):
    before = snapshot(alloc, *tables)
    with pytest.raises(exc):
        fn()
    assert snapshot(alloc, *tables) == before


# ---------------------------------------------------------------------------------------- allocator

def test_allocate_free_refcounts():
    a = BlockAllocator(5, 16)
    assert a.num_free == 5 and a.can_allocate(5) and not a.can_allocate(6)
    ids = a.allocate(3)
    assert ids == [0, 1, 2] and a.num_free == 2
    assert [a.ref_count(b) for b in range(5)] == [1, 1, 1, 0, 0]
    a.incref(1)
    a.free(1)
    assert a.ref_count(1) == 1 and a.num_free == 2
    a.free(1)
    assert a.ref_count(1) == 0 and a.num_free == 3
    assert a.allocate(0) == []
    assert a.allocate(3) == [3, 4, 1]  # first in, first out
    assert not a.can_allocate(1)


def test_free_blocks_counts_repeats():
    a = BlockAllocator(4, 8)
    a.allocate(2)
    a.incref(0)
    a.free_blocks([0, 0, 1])
    assert a.num_free == 4


def test_allocator_errors_leave_state_unchanged():
    a = BlockAllocator(4, 8)
    a.allocate(3)
    a.free(1)
    a.incref(0)
    assert issubclass(OutOfBlocksError, AllocatorError)
    raises_unchanged(OutOfBlocksError, lambda: a.allocate(3), a)
    raises_unchanged(DoubleFreeError, lambda: a.free(1), a)  # already free
    raises_unchanged(DoubleFreeError, lambda: a.free(3), a)  # never allocated
    raises_unchanged(DoubleFreeError, lambda: a.free_blocks([2, 2]), a)  # one owner, two frees
    raises_unchanged(DoubleFreeError, lambda: a.free_blocks([0, 2, 1]), a)  # 0, 2 fine, 1 not
    raises_unchanged(DoubleFreeError, lambda: a.free_blocks([0, 0, 0]), a)  # 2 owners, 3 frees
    for bad in (-1, 4, 10**9, "0", 1.0, None):
        raises_unchanged(UnknownBlockError, lambda: a.free(bad), a)
        raises_unchanged(UnknownBlockError, lambda: a.incref(bad), a)
        raises_unchanged(UnknownBlockError, lambda: a.ref_count(bad), a)
    raises_unchanged(UnknownBlockError, lambda: a.free_blocks([0, 2, 99]), a)
    raises_unchanged(AllocatorError, lambda: a.incref(1), a)  # free block
    raises_unchanged(ValueError, lambda: a.allocate(-1), a)
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)


# ------------------------------------------------------------------------------------- block table

def test_table_grows_one_block_at_a_time_and_slots():
    a = BlockAllocator(8, 4)
    t = BlockTable(a)
    assert t.blocks_needed(0) == 0 and t.blocks_needed(1) == 1 and t.blocks_needed(9) == 3
    assert t.append_tokens(3) == [] and t.block_ids == (0,)
    assert t.blocks_needed(1) == 0 and t.blocks_needed(2) == 1
    t.append_tokens(1)
    assert t.block_ids == (0,) and t.num_tokens == 4  # full, no extra block yet
    other = BlockTable(a)
    other.append_tokens(1)  # takes block 1, so t's next block is 2
    t.append_tokens(6)
    assert t.block_ids == (0, 2, 3) and t.num_tokens == 10 and len(t) == 10
    # slot = block_id * block_size + offset, by hand
    assert [t.slot(p) for p in (0, 3, 4, 7, 8, 9)] == [0, 3, 8, 11, 12, 13]
    assert t.slots() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13]
    assert t.slots(5, 9) == [9, 10, 11, 12]
    for bad in (-1, 10):
        with pytest.raises(IndexError):
            t.slot(bad)
    with pytest.raises(IndexError):
        t.slots(3, 11)
    t.free()
    other.free()
    assert a.num_free == 8


def test_fork_shares_and_copy_on_write():
    a = BlockAllocator(8, 4)
    p = BlockTable(a)
    p.append_tokens(6)  # blocks 0 (full), 1 (2 of 4)
    c = p.fork()
    assert c.block_ids == p.block_ids == (0, 1) and c.num_tokens == 6
    assert a.ref_count(0) == a.ref_count(1) == 2 and a.num_free == 6
    assert c.blocks_needed(1) == 1  # the copy-on-write block
    assert c.append_tokens(1) == [(1, 2)]  # child writes slot 2 of a private copy of block 1
    assert c.block_ids == (0, 2) and p.block_ids == (0, 1)
    assert a.ref_count(1) == 1 and a.ref_count(2) == 1 and a.ref_count(0) == 2
    assert p.blocks_needed(1) == 0 and p.append_tokens(1) == []  # parent now sole owner of 1
    assert c.slot(6) == 2 * 4 + 2 and p.slot(6) == 1 * 4 + 2
    c.free()
    assert a.ref_count(0) == 1 and a.ref_count(2) == 0
    p.free()
    assert a.num_free == 8


def test_fork_on_block_boundary_needs_no_copy():
    a = BlockAllocator(8, 4)
    p = BlockTable(a)
    p.append_tokens(8)
    c = p.fork()
    assert c.blocks_needed(3) == 1 and c.append_tokens(3) == [] and c.block_ids == (0, 1, 2)
    assert p.append_tokens(1) == [] and p.block_ids == (0, 1, 3)


def test_fork_prefix_shares_common_prompt():
    a = BlockAllocator(8, 4)
    p = BlockTable(a)
    p.append_tokens(7)  # blocks 0, 1
    c = p.fork(5)  # positions 0..4: block 0 and the first slot of block 1
    assert c.block_ids == (0, 1) and c.num_tokens == 5
    assert c.append_tokens(2) == [(1, 2)]  # block 1 slots 1..3 hold p's tokens: copy, don't overwrite
    assert c.block_ids == (0, 2)
    c2 = p.fork(4)
    assert c2.block_ids == (0,) and a.ref_count(0) == 3
    assert p.fork(0).block_ids == ()
    with pytest.raises(ValueError):
        p.fork(8)


def test_table_errors_leave_state_unchanged():
    a = BlockAllocator(3, 4)
    t = BlockTable(a)
    t.append_tokens(6)  # blocks 0, 1
    u = t.fork()
    other = BlockTable(a)
    other.append_tokens(1)  # block 2: pool is empty now
    assert a.num_free == 0
    # copy-on-write needs a block and there is none: nothing changes
    assert not u.can_append(1)
    raises_unchanged(OutOfBlocksError, lambda: u.append_tokens(1), a, t, u, other)
    raises_unchanged(OutOfBlocksError, lambda: t.append_tokens(3), a, t, u, other)
    raises_unchanged(ValueError, lambda: t.append_tokens(-1), a, t, u, other)
    assert u.append_tokens(0) == []  # appending nothing never copies
    other.free()
    raises_unchanged(DoubleFreeError, other.free, a, t, u, other)  # freeing a sequence twice
    raises_unchanged(AllocatorError, lambda: other.append_tokens(1), a, t, u, other)
    raises_unchanged(AllocatorError, other.fork, a, t, u, other)
    assert not other.can_append(1)
    # a table whose block was freed behind its back: its free() fails, changing nothing
    w = BlockTable(a)
    w.append_tokens(1)
    a.free(w.block_ids[0])
    raises_unchanged(DoubleFreeError, w.free, a, t, u, w)


# -------------------------------------------------------------------------- property (state machine)

NUM_BLOCKS, BLOCK_SIZE = 12, 4


class AllocatorMachine(RuleBasedStateMachine):
    """Random new / append / fork / free; a model cache checks that no sequence sees another's writes.

    Every appended token gets a unique value written to its slot in `cache` (after performing the
    copy-on-write copies `append_tokens` returns), so a sequence reading back anything but its own
    tokens means a block was handed out twice or shared wrongly.
    """

    def __init__(self):
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
        self.cache = [None] * (NUM_BLOCKS * BLOCK_SIZE)
        self.seqs: list[tuple[BlockTable, list[int]]] = []  # live tables and their expected tokens
        self.next_token = 0

    @rule()
    def new_seq(self):
        self.seqs.append((BlockTable(self.alloc), []))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), n=st.integers(0, 2 * BLOCK_SIZE + 1))
    def append(self, i, n):
        t, toks = self.seqs[i % len(self.seqs)]
        need = t.blocks_needed(n)
        if not self.alloc.can_allocate(need):
            assert not t.can_append(n)
            raises_unchanged(OutOfBlocksError, lambda: t.append_tokens(n), self.alloc, *[s for s, _ in self.seqs])
            return
        free_before = self.alloc.num_free
        copies = t.append_tokens(n)
        assert self.alloc.num_free == free_before - need  # a CoW source block stays owned by others
        assert len(copies) <= 1
        for src, dst in copies:
            b = BLOCK_SIZE
            self.cache[dst * b:(dst + 1) * b] = self.cache[src * b:(src + 1) * b]
        for p in range(t.num_tokens - n, t.num_tokens):
            self.cache[t.slot(p)] = self.next_token
            toks.append(self.next_token)
            self.next_token += 1

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), frac=st.floats(0, 1))
    def fork(self, i, frac):
        t, toks = self.seqs[i % len(self.seqs)]
        k = int(frac * t.num_tokens)
        self.seqs.append((t.fork(k), toks[:k]))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def free(self, i):
        t, _ = self.seqs.pop(i % len(self.seqs))
        t.free()
        with pytest.raises(DoubleFreeError):
            t.free()

    @invariant()
    def consistent(self):
        owners = [0] * NUM_BLOCKS
        for t, toks in self.seqs:
            assert len(t.block_ids) == -(-t.num_tokens // BLOCK_SIZE)
            assert [self.cache[s] for s in t.slots()] == toks
            for b in t.block_ids:
                owners[b] += 1
        assert [self.alloc.ref_count(b) for b in range(NUM_BLOCKS)] == owners
        free = list(self.alloc._free)
        assert len(set(free)) == len(free) == self.alloc.num_free  # no block twice in the pool
        assert sorted(free) == [b for b in range(NUM_BLOCKS) if owners[b] == 0]  # none lost

    def teardown(self):
        for t, _ in self.seqs:
            t.free()
        assert self.alloc.num_free == NUM_BLOCKS
        assert all(self.alloc.ref_count(b) == 0 for b in range(NUM_BLOCKS))


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase
