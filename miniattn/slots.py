"""Per-step batch metadata: slot mapping, block tables, sequence lengths, in one host-to-device copy.

For each step the engine appends the step's tokens to every sequence's `BlockTable` (performing
any copy-on-write block copies, see `copy_blocks`), then asks a `SlotMappingBuilder` for the
tensors the kernels read:

    slot_mapping  [T] int64   cache slot of each new token, block_id * block_size + offset; -1 = padding
    positions     [T] int64   position of each new token in its sequence (0 for padding)
    block_tables  [B, W] int32  row i: blocks of sequence i, zeros after them (block 0 is valid, never read)
    seq_lens      [B] int32   tokens of sequence i after this step, new ones included (0 for padding)
    cu_seqlens_q  [B + 1] int32 new tokens of sequences < i (prefix sums; padding rows add 0)

where ``T`` (tokens) and ``B`` (sequences) may be padded up to a CUDA-graph size and ``W`` is the
builder's fixed `max_blocks_per_seq`. A decode step has one new token per sequence (T == B); a
prefill or mixed step has ``query_lens[i]`` new tokens for sequence i, the last ones it holds.

All five live at fixed offsets of one preallocated int32 buffer (pinned on the host when the target
is a CUDA device); a step fills the host buffer and copies the used prefix of it to the same-sized
device buffer with one non-blocking copy. The returned tensors are views of that device buffer, so
a given (T, B) gives the same addresses on every step, which CUDA-graph replay needs. They stay
valid until the builder's next call. On a CPU device the host buffer is the device buffer (no copy).

Example
-------
>>> from miniattn.allocator import BlockAllocator, BlockTable
>>> alloc = BlockAllocator(num_blocks=8, block_size=4)
>>> a, b = BlockTable(alloc), BlockTable(alloc)
>>> a.append_tokens(5); b.append_tokens(2)        # a: blocks [0, 1]; b: block [2]
[]
[]
>>> builder = SlotMappingBuilder(block_size=4, max_num_seqs=4, max_blocks_per_seq=3)
>>> s = builder.decode([a, b], pad_to=3)          # the last token of each, padded to 3 rows
>>> s.slot_mapping.tolist(), s.seq_lens.tolist(), s.block_tables.tolist()
([4, 9, -1], [5, 2, 0], [[0, 1, 0], [2, 0, 0], [0, 0, 0]])
"""

from __future__ import annotations

import operator
from itertools import accumulate
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["BatchSlots", "SlotMappingBuilder", "copy_blocks"]


class BatchSlots(NamedTuple):
    """Device tensors (and a few host ints) describing one batch step; see the module docstring."""

    slot_mapping: torch.Tensor  # [T] int64, -1 for padding
    positions: torch.Tensor  # [T] int64, 0 for padding
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, zero rows for padding
    seq_lens: torch.Tensor  # [B] int32, 0 for padding
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    num_tokens: int  # real (unpadded) new tokens
    num_seqs: int  # real (unpadded) sequences
    max_seq_len: int  # max of seq_lens (host int: no device sync needed to read it)
    max_query_len: int  # max new tokens of one sequence


class SlotMappingBuilder:
    """Builds `BatchSlots` for one step with a single host-to-device copy into fixed buffers.

    Parameters
    ----------
    block_size : int
        Slots per cache block (must match the tables' allocator).
    max_num_seqs : int
        Most sequences (rows, padding included) in one step.
    max_blocks_per_seq : int
        Width W of `block_tables`, e.g. ``ceil(max_model_len / block_size)``.
    max_num_tokens : int, optional
        Most new tokens (padding included) in one step; default `max_num_seqs` (decode only).
    device : str or torch.device
        Where the tensors go; ``"cpu"`` works (no pinned memory, no copy).
    """

    def __init__(self, block_size: int, max_num_seqs: int, max_blocks_per_seq: int,
                 max_num_tokens: int | None = None, device="cpu"):
        self.block_size = operator.index(block_size)
        self.max_num_seqs = S = operator.index(max_num_seqs)
        self.max_blocks_per_seq = W = operator.index(max_blocks_per_seq)
        self.max_num_tokens = T = S if max_num_tokens is None else operator.index(max_num_tokens)
        if min(self.block_size, S, W, T) < 1:
            raise ValueError("block_size, max_num_seqs, max_blocks_per_seq, max_num_tokens must be >= 1")
        self.device = torch.device(device)
        # int32 offsets of the regions; the two int64 regions come first, so they are 8-byte aligned
        self._off_slot, self._off_pos = 0, 2 * T
        self._off_lens = 4 * T
        self._off_cu = self._off_lens + S
        self._off_bt = self._off_cu + S + 1  # last: a step copies only the rows it uses
        size = self._off_bt + S * W
        on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=on_cuda)
        self._dev = self._host if self.device.type == "cpu" else \
            torch.zeros(size, dtype=torch.int32, device=self.device)
        self._copied = torch.cuda.Event() if on_cuda else None  # host buffer is reusable once done
        h = self._host.numpy()
        self._np_slot = h[: 2 * T].view(np.int64)
        self._np_pos = h[2 * T: 4 * T].view(np.int64)
        self._np_lens = h[self._off_lens: self._off_cu]
        self._np_cu = h[self._off_cu: self._off_bt]
        self._np_bt = h[self._off_bt:].reshape(S, W)
        d = self._dev
        self._d_slot = d[: 2 * T].view(torch.int64)
        self._d_pos = d[2 * T: 4 * T].view(torch.int64)
        self._row_table = [None] * S  # the table whose blocks host row i holds (see _write_row)
        self._row_len = [0] * S  # how many of its entries are non-padding
        self._row_last = [None] * S  # its last entry

    def decode(self, tables: Sequence, pad_to: int | None = None) -> BatchSlots:
        """A decode step: each table's last token is new (append it first); pad rows up to `pad_to`."""
        return self.build(tables, [1] * len(tables), pad_tokens_to=pad_to, pad_seqs_to=pad_to)

    def build(self, tables: Sequence, query_lens: Sequence[int], *,
              pad_tokens_to: int | None = None, pad_seqs_to: int | None = None) -> BatchSlots:
        """A prefill, decode or mixed step: the last ``query_lens[i]`` tokens of ``tables[i]`` are new.

        `tables` are `BlockTable`s (or anything with `block_ids`, `num_tokens` whose block list, like a
        BlockTable's, only grows or has its last entry replaced) whose tokens for this step were
        already appended. The token count is padded to `pad_tokens_to` with slot -1, the
        sequence count to `pad_seqs_to` with seq_len 0 and zero block-table rows. ValueError, before
        anything is written, when a limit of the builder is exceeded or a query length is not in
        ``1..num_tokens``.
        """
        n, bs, W = len(tables), self.block_size, self.max_blocks_per_seq
        if len(query_lens) != n:
            raise ValueError(f"got {n} tables but {len(query_lens)} query_lens")
        total = sum(query_lens)
        B = n if pad_seqs_to is None else pad_seqs_to
        T = total if pad_tokens_to is None else pad_tokens_to
        if not n <= B <= self.max_num_seqs:
            raise ValueError(f"need {n} <= padded sequences ({B}) <= max_num_seqs ({self.max_num_seqs})")
        if not total <= T <= self.max_num_tokens:
            raise ValueError(f"need {total} <= padded tokens ({T}) <= max_num_tokens ({self.max_num_tokens})")
        ids_list = [t.block_ids for t in tables]
        lens_list = [t.num_tokens for t in tables]
        for i, (t, ids, L, q) in enumerate(zip(tables, ids_list, lens_list, query_lens)):
            if getattr(t, "block_size", bs) != bs:
                raise ValueError(f"tables[{i}] has block_size {t.block_size}, builder has {bs}")
            if not 1 <= q <= L:
                raise ValueError(f"query_lens[{i}]={q} not in 1..num_tokens ({L})")
            if len(ids) > W or len(ids) * bs < L:
                raise ValueError(f"tables[{i}]: {len(ids)} blocks for {L} tokens, max_blocks_per_seq={W}")

        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has finished reading the host buffer
        for i in range(n):
            self._write_row(i, tables[i], ids_list[i])
        for i in range(n, B):
            self._write_row(i, None, ())
        slot, pos = self._np_slot, self._np_pos
        max_q = max(query_lens, default=0)
        if max_q == 1:  # decode: plain Python ints, two array writes
            last = [L - 1 for L in lens_list]
            slot[:n] = [ids[p // bs] * bs + p % bs for ids, p in zip(ids_list, last)]
            pos[:n] = last
        else:
            off = 0
            for i, (L, q) in enumerate(zip(lens_list, query_lens)):
                p = np.arange(L - q, L)
                slot[off: off + q] = self._np_bt[i, p // bs].astype(np.int64) * bs + p % bs
                pos[off: off + q] = p
                off += q
        slot[total:T] = -1
        pos[total:T] = 0
        self._np_lens[:n] = lens_list
        self._np_lens[n:B] = 0
        self._np_cu[0] = 0
        self._np_cu[1: B + 1] = total
        self._np_cu[1: n + 1] = list(accumulate(query_lens))

        if self._dev is not self._host:
            end = self._off_bt + B * W
            self._dev[:end].copy_(self._host[:end], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
        d = self._dev
        return BatchSlots(
            slot_mapping=self._d_slot[:T],
            positions=self._d_pos[:T],
            block_tables=d[self._off_bt: self._off_bt + B * W].view(B, W),
            seq_lens=d[self._off_lens: self._off_lens + B],
            cu_seqlens_q=d[self._off_cu: self._off_cu + B + 1],
            num_tokens=total, num_seqs=n, max_seq_len=max(lens_list, default=0), max_query_len=max_q,
        )

    def _write_row(self, i: int, table, ids: tuple) -> None:
        """Make host row i of block_tables hold `ids` then zeros, writing only what changed.

        Rows persist across steps (converting every block id of every row from Python each step is
        the builder's main cost). If row i held the same table last time, its first k-1 blocks are
        still right: a table only appends blocks, and copy-on-write replaces only its last one.
        """
        k, last = self._row_len[i], ids[-1] if ids else None
        if self._row_table[i] is table:
            if k == len(ids) and self._row_last[i] == last:
                return  # most decode steps: nothing changed
            start = max(k - 1, 0)
        else:
            start = 0
        row = self._np_bt[i]
        if start < len(ids):
            row[start: len(ids)] = ids[start:]
        if k > len(ids):
            row[len(ids): k] = 0
        self._row_table[i], self._row_len[i], self._row_last[i] = table, len(ids), last


def copy_blocks(kv_caches, copies: Sequence[tuple[int, int]]) -> None:
    """Perform the copy-on-write copies `BlockTable.append_tokens` returned, in every cache.

    `kv_caches` is a list of ``(key_cache, value_cache)`` per layer in any layout of `miniattn.layout`
    (all of them put the block index first). Each ``(src, dst)`` copies block src into block dst.
    """
    for k, v in kv_caches:
        for cache in (k, v):
            for src, dst in copies:  # rare (only after a fork), so a plain loop is fine
                cache[dst].copy_(cache[src])
