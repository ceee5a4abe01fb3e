"""What SM-driven Triton copies and reads reach on this GPU, against memcpy and torch's `sum`: the
ceilings the write and decode kernels can hope for. Block copies (one tile per program) over tile
sizes and warps, grid-stride ("persistent") copies with a few programs per SM, and block reads (each
program sums its tile); 1 GiB each way, graph-replayed, do_bench medians.

    python benchmarks/copy_probe.py [--mib 1024] [--out results/copy_probe_<gpu>.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from miniattn import timing  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _stride_copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="bytes each way, MiB")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not timing.has_cuda():
        print("copy_probe: needs a CUDA GPU")
        return
    nbytes = a.mib << 20
    src = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
    dst = torch.empty_like(src)
    n = src.numel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []

    def record(name, fn, check=True):
        dst.fill_(-1)
        fn()
        if check:
            assert torch.equal(src, dst), name
        us = [timing.time_graph(fn) for _ in range(2)]
        gbps = 2 * nbytes / min(us) / 1e3
        rows.append(dict(name=name, us=us, gbps=gbps))
        print(f"| {name} | {us[0]:.1f} / {us[1]:.1f} | {gbps:.0f} |", flush=True)

    print(f"| copy ({a.mib} MiB each way) | µs (twice) | GB/s |\n|---|---|---|")
    rows.append(dict(name="memcpy eager", gbps=timing.copy_bandwidth(nbytes, "eager")))
    print(f"| memcpy eager | | {rows[-1]['gbps']:.0f} |")
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            if block // (warps * 32) < 4:  # fewer than one 16-byte vector per lane
                continue
            record(f"block {block * 4 // 1024} KiB x {warps} warps",
                   lambda b=block, w=warps: timing.triton_copy(dst, src, b, w))
    for per_sm in (2, 4, 8, 16):
        for block, warps in ((4096, 8), (2048, 4)):
            record(f"grid-stride {per_sm}/SM, {block * 4 // 1024} KiB x {warps} warps",
                   lambda b=block, w=warps, k=per_sm: _stride_copy[(k * sms,)](src, dst, n, BLOCK=b, num_warps=w))
    best = max(rows, key=lambda r: r["gbps"])
    print(f"best copy: {best['name']} {best['gbps']:.0f} GB/s; memcpy {rows[0]['gbps']:.0f}")

    print(f"\n| read ({a.mib} MiB) | µs (twice) | GB/s |\n|---|---|---|")
    as_bf16 = src.view(torch.bfloat16)
    reads = [dict(name="torch sum (bf16 -> fp32)",
                  gbps=nbytes / timing.time_graph(lambda: as_bf16.sum(dtype=torch.float32)) / 1e3)]
    print(f"| {reads[0]['name']} | | {reads[0]['gbps']:.0f} |")
    part = torch.empty(n // 256, dtype=torch.int32, device="cuda")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            if block // (warps * 32) < 4:
                continue
            fn = lambda b=block, w=warps: timing.triton_read(src, part, b, w)  # noqa: E731
            us = [timing.time_graph(fn) for _ in range(2)]
            reads.append(dict(name=f"read {block * 4 // 1024} KiB x {warps} warps", us=us, gbps=nbytes / min(us) / 1e3))
            print(f"| {reads[-1]['name']} | {us[0]:.1f} / {us[1]:.1f} | {reads[-1]['gbps']:.0f} |", flush=True)
    best_r = max(reads, key=lambda r: r["gbps"])
    print(f"best read: {best_r['name']} {best_r['gbps']:.0f} GB/s; torch sum {reads[0]['gbps']:.0f}")
    rows += [dict(r, kind="read") for r in reads]
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"copy_probe_{timing.device_tag()}.json")
    timing.write_json(out, dict(mib=a.mib, sm_count=sms), rows)
    print(f"json: {out}")


if __name__ == "__main__":
    main()
