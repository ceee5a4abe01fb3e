"""Where the host time of one `reshape_and_cache_flash` call goes (CPU µs per call, GPU running async).

Times, per call over many back-to-back calls: a small torch op (the machine's floor for any launch),
our public op, its pieces (argument signature + plan lookup, the MINIATTN_DEBUG read), the generic
cached `Launcher` call, the compiled kernel's own `run` given tensors or raw addresses (what the op's
hot path passes), and Triton's default `kernel[grid](...)` path.
Then the CUDA-event time per call of the same back-to-back loop (`timing.time_host_loop`), which is
what the benchmarks' "host" column reports.

    python benchmarks/bench_write_host.py [--tokens 1,256,1024] [--out results/write_host.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miniattn import timing  # noqa: E402
from miniattn.layout import allocate_kv_caches  # noqa: E402
from miniattn.ops import cache_write as cw  # noqa: E402
from miniattn.ops import launch  # noqa: E402


def per_call_us(fn, calls=5000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        best = min(best, (t1 - t0) / calls * 1e6)
    return best


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,256,1024")
    ap.add_argument("--num-heads", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    dev, dt = "cuda", torch.bfloat16
    h, d, bs, nb = args.num_heads, 128, 16, 4096
    [(kc, vc)] = allocate_kv_caches("NHD", 1, nb, bs, h, d, dt, device=dev)
    x = torch.zeros(16, device=dev)
    rows = []
    print(f"# CPU: {cpu_name()}; python {platform.python_version()}; torch {torch.__version__}; "
          f"hooks installed: {launch.hooks_installed()}")
    for n in [int(t) for t in args.tokens.split(",")]:
        qkv = torch.randn(n, 4 * h, d, device=dev, dtype=dt)  # fused qkv: key/value are strided views
        key, value = qkv[:, 2 * h:3 * h], qkv[:, 3 * h:]
        slots = torch.randperm(nb * bs, device=dev)[:n]
        op = lambda: cw.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", None, None, kv_layout="NHD")  # noqa: E731
        op()
        sig = cw._signature("NHD", key, value, kc, vc, slots, "auto", None, None)
        plan = cw._PLANS[sig]
        ptrs = (key, value, kc, vc, slots, slots, slots)
        if not plan.compiled:
            raise SystemExit("the op did not take its direct-launch path (Triton without warmup/run handles?)")
        # Triton's own launcher for the same compiled kernel (the op's handle skips its Python layer)
        compiled = cw._reshape_and_cache_kernel.warmup(*ptrs, *plan.ints, *plan.consts, grid=plan.grid,
                                                       num_warps=plan.num_warps, num_stages=1)
        plan_run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        stream = torch.cuda.current_stream().cuda_stream
        g = plan.grid
        iptrs = tuple(p.data_ptr() for p in ptrs)
        r = {
            "num_tokens": n,
            "torch x.add_(1)": per_call_us(lambda: x.add_(1)),
            "op (public call)": per_call_us(op),
            "signature + plan lookup": per_call_us(lambda: cw._PLANS.get(
                cw._signature("NHD", key, value, kc, vc, slots, "auto", None, None))),
            "MINIATTN_DEBUG check": per_call_us(launch.debug_enabled),
            "os.environ.get": per_call_us(lambda: os.environ.get("MINIATTN_DEBUG", "0")),
            "Launcher call (tensors)": per_call_us(lambda: cw._LAUNCH(g, ptrs, plan.ints, plan.consts, plan.num_warps)),
            "run() tensor ptrs": per_call_us(lambda: plan_run(g[0], 1, 1, stream, function, metadata, None, None, None,
                                                             *ptrs, *plan.ints, *plan.consts)),
            "run() int ptrs": per_call_us(lambda: plan_run(g[0], 1, 1, stream, function, metadata, None, None, None,
                                                          *iptrs, *plan.ints, *plan.consts)),
            "op's direct launch": per_call_us(lambda: plan.compiled(g[0], 1, 1, stream, *iptrs, *plan.tail)),
            "direct launch kind": plan.compiled.kind,
            "triton kernel[grid]()": per_call_us(lambda: cw._reshape_and_cache_kernel[g](
                *ptrs, *plan.ints, *plan.consts, num_warps=plan.num_warps), calls=1000),
            "host loop (CUDA events), op": timing.time_host_loop(op, calls=1000),
            "host loop (CUDA events), x.add_(1)": timing.time_host_loop(lambda: x.add_(1), calls=1000),
        }
        rows.append(r)
        print(" | ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.items()), flush=True)
    cols = list(rows[0])
    print(timing.format_table(rows, cols, floatfmt="{:.2f}"))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "write_host_cost.json")
    timing.write_json(out, config=dict(vars(args), cpu=cpu_name()), rows=rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
