"""Where the host time of one eager `paged_decode_attention` call goes, on a CUDA machine.

Per configuration: the whole call (fresh output, then `out=`), the Python side alone (the compiled
kernels' C launchers replaced by no-ops), one raw C launch of the main kernel; then, for scale, a
`torch.empty` and a `torch.add` (a native CUDA op) on the same machine. Host wall time per call of
back-to-back calls (the GPU keeps up: these kernels take a few µs).

    python benchmarks/decode_host_breakdown.py > benchmarks/results/paged_decode_host_h100.log
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from miniattn.ops import decode as D  # noqa: E402
from miniattn.ops.launch import DirectLaunch  # noqa: E402


def per_call(fn, n=3000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return us


def main():
    qh, kvh, hd, bs = 32, 8, 128, 16
    for batch, ctx in [(1, 512), (16, 512)]:
        mb = ctx // bs
        k = torch.randn(batch * mb, bs, kvh, hd, dtype=torch.bfloat16, device="cuda")
        bt = torch.randperm(batch * mb, device="cuda").to(torch.int32).reshape(batch, mb)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, qh, hd, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(batch, qh, hd, dtype=torch.bfloat16, device="cuda")
        D._PLANS.clear()
        fresh = lambda: D.paged_decode_attention(q, k, k, bt, sl)  # noqa: E731
        given = lambda: D.paged_decode_attention(q, k, k, bt, sl, out=out)  # noqa: E731
        fresh(), given()
        plan = next(iter(D._PLANS.values()))
        print(f"b={batch} ctx={ctx} splits={plan.splits} ({1 + plan.merges} launches), "
              f"raw-address path={bool(plan.direct)}")
        print(f"  whole call: {per_call(fresh):.2f} us; with out=: {per_call(given):.2f} us")
        real = plan.direct, plan.rdirect
        plan.direct = plan.rdirect = DirectLaunch(lambda *a: None, (), True, "stub")
        print(f"  Python side (C launches stubbed): {per_call(fresh):.2f} us")
        plan.direct, plan.rdirect = real
        stream = torch._C._cuda_getCurrentRawStream(0)
        addrs = (q.data_ptr(), k.data_ptr(), k.data_ptr(), bt.data_ptr(), sl.data_ptr(), plan.dummy.data_ptr(),
                 plan.dummy.data_ptr(), out.data_ptr())
        g = plan.grid
        one = lambda: plan.direct(g[0], g[1], g[2], stream, *addrs, *plan.tail)  # noqa: E731
        print(f"  one direct launch of the main kernel ({plan.direct.kind}): {per_call(one):.2f} us")
    print(f"torch.empty: {per_call(lambda: torch.empty((16, 32, 128), dtype=torch.bfloat16, device='cuda')):.2f} us")
    print(f"torch.add (a CUDA op): {per_call(lambda: torch.add(q, q)):.2f} us")
    print(f"os.environ.get: {per_call(lambda: os.environ.get('MINIATTN_DEBUG', '0')):.2f} us")


if __name__ == "__main__":
    main()
