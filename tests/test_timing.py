"""The ceilings' Triton kernels (`timing.triton_copy`, `timing.triton_read`) move the right bytes.

They time the copy and read ceilings every benchmark compares against, so a wrong copy or a read
that skips words would inflate every "% of ceiling". CPU: under the interpreter, small sizes.
"""

import pytest
import torch

from miniattn import timing
from miniattn.ops.launch import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")


@pytest.mark.parametrize("n,block,warps", [(5000, 1024, 8), (4096, 1024, 8), (777, 256, 2)])
def test_triton_copy(n, block, warps):
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device=DEVICE)
    dst = torch.full_like(src, -1)
    timing.triton_copy(dst, src, block, warps)
    assert torch.equal(dst, src)


@pytest.mark.parametrize("n,block", [(9000, 4096), (4096, 4096), (300, 128)])
def test_triton_read_sums_every_word(n, block):
    words = torch.randint(-1000, 1000, (n,), dtype=torch.int32, device=DEVICE)
    part = torch.full((-(-n // block),), 12345, dtype=torch.int32, device=DEVICE)
    timing.triton_read(words, part, block, 4)
    want = torch.nn.functional.pad(words, (0, part.numel() * block - n)).view(-1, block).sum(1, dtype=torch.int64)
    assert torch.equal(part.long(), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_capture_graph_warms_up_with_its_own_function():
    """`warmup` runs (twice, before the capture) where `fn` would; the graph holds `fn` alone."""
    calls = []
    x = torch.zeros(4, device="cuda")

    def warm():
        calls.append("warmup")
        x.add_(10)

    def fn():
        calls.append("capture")
        x.add_(1)

    g = timing.capture_graph(fn, warmup=warm)
    assert calls == ["warmup", "warmup", "capture"]
    before = x.clone()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, before + 1)
