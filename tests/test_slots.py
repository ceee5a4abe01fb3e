"""Slot-mapping builder: hand-computed values, padding (-1 / seq_len 0 / zero rows), fixed addresses,
errors, random batches against `BlockTable.slots`, and `copy_blocks`."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings, strategies as st

from miniattn.allocator import BlockAllocator, BlockTable
from miniattn.slots import BatchSlots, SlotMappingBuilder, copy_blocks


@dataclass
class FakeTable:
    """Hand-made block table (any object with block_ids and num_tokens will do)."""

    block_ids: tuple
    num_tokens: int


def test_decode_hand_computed_with_padding():
    # block_size 4: seq A holds 6 tokens in blocks (7, 2), seq B 9 tokens in (5, 0, 11), seq C 1 in (3,)
    tables = [FakeTable((7, 2), 6), FakeTable((5, 0, 11), 9), FakeTable((3,), 1)]
    b = SlotMappingBuilder(block_size=4, max_num_seqs=8, max_blocks_per_seq=4, device="cpu")
    s = b.decode(tables, pad_to=5)
    assert isinstance(s, BatchSlots)
    # last positions 5, 8, 0 -> 2*4+1, 11*4+0, 3*4+0
    assert s.slot_mapping.tolist() == [9, 44, 12, -1, -1]
    assert s.positions.tolist() == [5, 8, 0, 0, 0]
    assert s.seq_lens.tolist() == [6, 9, 1, 0, 0]
    assert s.cu_seqlens_q.tolist() == [0, 1, 2, 3, 3, 3]
    assert s.block_tables.tolist() == [[7, 2, 0, 0], [5, 0, 11, 0], [3, 0, 0, 0], [0] * 4, [0] * 4]
    assert (s.num_tokens, s.num_seqs, s.max_seq_len, s.max_query_len) == (3, 3, 9, 1)
    assert s.slot_mapping.dtype == torch.int64 and s.positions.dtype == torch.int64
    assert s.block_tables.dtype == s.seq_lens.dtype == s.cu_seqlens_q.dtype == torch.int32
    assert all(t.device.type == "cpu" for t in s[:5])
    assert s.block_tables.is_contiguous()


def test_prefill_hand_computed():
    # A: 6 tokens in (7, 2), the last 3 new (positions 3, 4, 5); B: 9 tokens in (5, 0, 11), all new
    tables = [FakeTable((7, 2), 6), FakeTable((5, 0, 11), 9)]
    b = SlotMappingBuilder(4, max_num_seqs=4, max_blocks_per_seq=3, max_num_tokens=16)
    s = b.build(tables, [3, 9], pad_tokens_to=14, pad_seqs_to=3)
    assert s.slot_mapping.tolist() == [31, 8, 9] + [20, 21, 22, 23, 0, 1, 2, 3, 44] + [-1, -1]
    assert s.positions.tolist() == [3, 4, 5] + list(range(9)) + [0, 0]
    assert s.seq_lens.tolist() == [6, 9, 0]
    assert s.cu_seqlens_q.tolist() == [0, 3, 12, 12]
    assert s.block_tables.tolist() == [[7, 2, 0], [5, 0, 11], [0, 0, 0]]
    assert (s.num_tokens, s.num_seqs, s.max_seq_len, s.max_query_len) == (12, 2, 9, 9)
    # unpadded: exactly the real sizes
    s = b.build(tables, [3, 9])
    assert s.slot_mapping.shape == (12,) and s.block_tables.shape == (2, 3) and s.cu_seqlens_q.shape == (3,)


def test_no_stale_values_between_steps():
    b = SlotMappingBuilder(4, max_num_seqs=4, max_blocks_per_seq=3, max_num_tokens=8)
    b.build([FakeTable((1, 2, 3), 12)] * 2, [4, 4])
    s = b.decode([FakeTable((9,), 2)], pad_to=4)
    assert s.block_tables.tolist() == [[9, 0, 0]] + [[0, 0, 0]] * 3
    assert s.slot_mapping.tolist() == [37, -1, -1, -1]
    assert s.seq_lens.tolist() == [2, 0, 0, 0]
    assert s.positions.tolist() == [1, 0, 0, 0]


def test_fixed_addresses_across_steps():
    alloc = BlockAllocator(64, 8)
    seqs = [BlockTable(alloc) for _ in range(3)]
    for i, t in enumerate(seqs):
        t.append_tokens(5 * i + 3)
    b = SlotMappingBuilder(8, max_num_seqs=8, max_blocks_per_seq=8)
    ptrs = None
    for step in range(5):
        for t in seqs:
            t.append_tokens(1)
        s = b.decode(seqs, pad_to=8)
        p = [x.data_ptr() for x in s[:5]]
        assert ptrs is None or p == ptrs
        ptrs = p
        assert s.slot_mapping.tolist()[:3] == [t.slot(t.num_tokens - 1) for t in seqs]


def test_with_real_tables_and_copy_on_write():
    alloc = BlockAllocator(16, 4)
    p = BlockTable(alloc)
    p.append_tokens(6)
    c = p.fork()
    assert c.append_tokens(1) == [(1, 2)]
    p.append_tokens(1)
    b = SlotMappingBuilder(4, max_num_seqs=2, max_blocks_per_seq=4)
    s = b.decode([p, c])
    assert s.slot_mapping.tolist() == [1 * 4 + 2, 2 * 4 + 2]  # same position, different blocks
    assert s.block_tables.tolist() == [[0, 1, 0, 0], [0, 2, 0, 0]]


@pytest.mark.parametrize("kv_layout", ["NHD", "HND", "paged5d"])
def test_copy_blocks(kv_layout):
    from miniattn.layout import allocate_kv_caches

    torch.manual_seed(0)
    caches = allocate_kv_caches(kv_layout, 2, 6, 4, 2, 16, torch.float16)
    for k, v in caches:
        k.copy_(torch.randn_like(k, dtype=torch.float32))
        v.copy_(torch.randn_like(v, dtype=torch.float32))
    before = [(k.clone(), v.clone()) for k, v in caches]
    copy_blocks(caches, [(1, 4), (3, 0)])
    copy_blocks(caches, [])
    for (k, v), (k0, v0) in zip(caches, before):
        for new, old in ((k, k0), (v, v0)):
            assert torch.equal(new[4], old[1]) and torch.equal(new[0], old[3])
            assert torch.equal(new[[1, 2, 3, 5]], old[[1, 2, 3, 5]])


def test_errors():
    b = SlotMappingBuilder(4, max_num_seqs=2, max_blocks_per_seq=2, max_num_tokens=4)
    t = FakeTable((1, 2), 6)
    for bad in (
        lambda: b.decode([t, t, t]),  # too many sequences
        lambda: b.decode([t], pad_to=3),  # padded past max_num_seqs
        lambda: b.build([t, t], [3, 2]),  # too many tokens
        lambda: b.build([t], [2], pad_tokens_to=1),  # padding smaller than the batch
        lambda: b.build([t], [7]),  # more new tokens than the sequence holds
        lambda: b.build([t], [0]),
        lambda: b.build([t], [1, 1]),  # lengths disagree
        lambda: b.decode([FakeTable((1, 2, 3), 9)]),  # wider than max_blocks_per_seq
        lambda: b.decode([BlockTable(BlockAllocator(4, 8))]),  # other block size
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        SlotMappingBuilder(0, 1, 1)


def check_batch(s, tables, qlens, pad_seqs, pad_tokens, width):
    """Compare every field of `s` with values recomputed from the tables' own `slots`."""
    want_slots, want_pos, cu = [], [], [0]
    for t, q in zip(tables, qlens):
        want_slots += t.slots(t.num_tokens - q, t.num_tokens)
        want_pos += list(range(t.num_tokens - q, t.num_tokens))
    for q in list(qlens) + [0] * pad_seqs:
        cu.append(cu[-1] + q)
    assert s.slot_mapping.tolist() == want_slots + [-1] * pad_tokens
    assert s.positions.tolist() == want_pos + [0] * pad_tokens
    assert s.seq_lens.tolist() == [t.num_tokens for t in tables] + [0] * pad_seqs
    assert s.cu_seqlens_q.tolist() == cu
    rows = s.block_tables.tolist()
    assert rows == [list(t.block_ids) + [0] * (width - len(t.block_ids)) for t in tables] + [[0] * width] * pad_seqs


@settings(max_examples=60, deadline=None)
@given(data=st.data(), block_size=st.sampled_from([1, 3, 8, 16]))
def test_random_batches_match_block_tables(data, block_size):
    alloc = BlockAllocator(256, block_size)
    n = data.draw(st.integers(0, 6), label="num_seqs")
    tables, qlens = [], []
    for _ in range(n):
        t = BlockTable(alloc)
        t.append_tokens(data.draw(st.integers(1, 40)))
        tables.append(t)
        qlens.append(data.draw(st.integers(1, t.num_tokens)))
    extra_seqs, extra_tok = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 5))
    b = SlotMappingBuilder(block_size, max_num_seqs=8, max_blocks_per_seq=40, max_num_tokens=250)
    s = b.build(tables, qlens, pad_seqs_to=n + extra_seqs, pad_tokens_to=sum(qlens) + extra_tok)
    check_batch(s, tables, qlens, extra_seqs, extra_tok, 40)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), block_size=st.sampled_from([1, 2, 4]))
def test_builder_reused_across_steps(data, block_size):
    """One builder over many steps while tables grow, fork (copy-on-write), die, and change rows:
    the rows it keeps between steps must never leave stale block ids behind."""
    alloc = BlockAllocator(400, block_size)
    b = SlotMappingBuilder(block_size, max_num_seqs=6, max_blocks_per_seq=48, max_num_tokens=40)
    live = []
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        action = data.draw(st.sampled_from(["new", "fork", "free", "none"]))
        if action == "new" or not live:
            t = BlockTable(alloc)
            t.append_tokens(data.draw(st.integers(1, 6)))
            live.append(t)
        elif action == "fork":
            live.append(data.draw(st.sampled_from(live)).fork())
        elif action == "free" and len(live) > 1:
            live.pop(data.draw(st.integers(0, len(live) - 1))).free()
        batch = data.draw(st.permutations(live))[: data.draw(st.integers(1, min(len(live), 5)))]
        decode = data.draw(st.booleans())
        qlens = [1 if decode else data.draw(st.integers(1, 3)) for _ in batch]
        for t, q in zip(batch, qlens):
            t.append_tokens(q)
        pad = data.draw(st.integers(0, 6 - len(batch)))
        if decode:
            s = b.decode(batch, pad_to=len(batch) + pad)
            check_batch(s, batch, qlens, pad, pad, 48)
        else:
            s = b.build(batch, qlens, pad_seqs_to=len(batch) + pad, pad_tokens_to=sum(qlens) + 1)
            check_batch(s, batch, qlens, pad, 1, 48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_pinned_copy():
    b = SlotMappingBuilder(4, max_num_seqs=4, max_blocks_per_seq=3, device="cuda")
    assert b._host.is_pinned()
    tables = [FakeTable((7, 2), 6), FakeTable((5,), 3)]
    s1 = b.decode(tables, pad_to=4)
    assert s1.slot_mapping.is_cuda and s1.slot_mapping.tolist() == [9, 22, -1, -1]
    ptrs = [x.data_ptr() for x in s1[:5]]
    s2 = b.decode([FakeTable((1,), 1)], pad_to=4)
    assert [x.data_ptr() for x in s2[:5]] == ptrs
    assert s2.slot_mapping.tolist() == [4, -1, -1, -1] and s2.seq_lens.tolist() == [1, 0, 0, 0]
