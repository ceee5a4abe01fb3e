"""benchmarks/paged_read_probe.py's kernel reads exactly the bytes the decode op reads: its per-piece
sums equal the float64 sums of each row's tokens through the block table, 16-bit and 1-byte caches,
one piece and several, each load discipline, with every block no row uses poisoned (NaN / 0xFF
bytes would show)."""

import os
import sys

import pytest
import torch

from conftest import DEVICE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import paged_read_probe as probe  # noqa: E402

BS, KVH, D, CTX, BATCH = 16, 2, 64, 128, 2


def _inputs(one_byte):
    g = torch.Generator().manual_seed(0)
    nb = BATCH * CTX // BS + 3  # three blocks no row uses
    perm = torch.randperm(nb, generator=g)[: BATCH * CTX // BS]
    bt = perm.to(torch.int32).reshape(BATCH, CTX // BS)
    unused = torch.ones(nb, dtype=torch.bool)
    unused[perm] = False
    if one_byte:
        k = torch.randint(0, 120, (nb, BS, KVH, D), dtype=torch.uint8, generator=g)
        v = torch.randint(0, 120, (nb, BS, KVH, D), dtype=torch.uint8, generator=g)
        k[unused], v[unused] = 255, 255
    else:
        k = torch.randn(nb, BS, KVH, D, generator=g).to(torch.bfloat16)
        v = torch.randn(nb, BS, KVH, D, generator=g).to(torch.bfloat16)
        k[unused], v[unused] = float("nan"), float("nan")
    return [t.to(DEVICE) for t in (k, v, bt)]


@pytest.mark.parametrize("mode", list(probe.MODES))
@pytest.mark.parametrize("one_byte", [False, True])
@pytest.mark.parametrize("pieces,block_n", [(1, 32), (2, 32), (4, 16)])
def test_paged_read_sums(mode, one_byte, pieces, block_n):
    k, v, bt = _inputs(one_byte)
    out = torch.full((BATCH, KVH, pieces), float("nan"), device=DEVICE)
    probe.paged_read(k, v, bt, CTX, pieces, block_n, mode=mode, out=out)
    ref = probe.paged_read_ref(k, v, bt, CTX, pieces)
    assert out.shape == ref.shape == (BATCH, KVH, pieces)
    assert torch.isfinite(out).all()
    tol = 0 if one_byte else 1e-4 * float(ref.abs().max())
    assert float((out.double() - ref).abs().max()) <= tol


def test_paged_read_rejects_uneven_pieces():
    k, v, bt = _inputs(False)
    with pytest.raises(ValueError, match="pieces"):
        probe.paged_read(k, v, bt, CTX, 3, 32)
