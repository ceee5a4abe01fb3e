"""One decode call per configuration, for a profiler: `ncu --kernel-name regex:_paged_decode_kernel`.

    ncu --kernel-name regex:_paged_decode_kernel --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats python benchmarks/profile_decode.py --batch 128 --ctx 4096 --fp8
    (--layout paged5d for another layout, --set NAME=VALUE for a decode module setting, --num-splits /
    --config BLOCK_N,WARPS,STAGES to force a split count / launch config, --sdpa for torch SDPA on a
    contiguous cache instead: cuDNN's kernel on the H200, `--kernel-name regex:sdpa`;
    benchmarks/ncu_decode_vs_sdpa.sh runs the session-9 comparison)

Each configuration is called 3 times (compilation, the Launcher path, the raw-address path), so
`--launch-skip 2 --launch-count 1` picks the hot path's launch of the first one.
"""

import argparse
import ast
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from miniattn.layout import from_nhd  # noqa: E402
from miniattn.ops import decode as decode_mod  # noqa: E402
from miniattn.ops.decode import paged_decode_attention  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layout", default="NHD", choices=["NHD", "HND", "paged5d"])
    p.add_argument("--num-splits", type=int, default=None, help="force the split count")
    p.add_argument("--config", default=None, metavar="BLOCK_N,WARPS,STAGES",
                   help="launch config instead of decode_launch_config's, e.g. 128,4,3")
    p.add_argument("--sdpa", action="store_true",
                   help="torch SDPA on a contiguous cache of the same size instead (ncu --kernel-name regex:sdpa)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a decode module setting for this run, e.g. --set GATHER_AHEAD_ENABLED=False")
    a = p.parse_args()
    for item in a.set:
        name, _, val = item.partition("=")
        if not hasattr(decode_mod, name):
            p.error(f"--set: miniattn.ops.decode has no setting {name!r}")
        setattr(decode_mod, name, type(getattr(decode_mod, name))(ast.literal_eval(val)))
    if a.sdpa:
        import torch.nn.functional as F
        qs = torch.randn(a.batch, a.num_q_heads, 1, a.head_size, dtype=torch.bfloat16, device="cuda")
        ks = torch.randn(a.batch, a.num_kv_heads, a.ctx, a.head_size, dtype=torch.bfloat16, device="cuda")
        vs = torch.randn_like(ks)
        for _ in range(3):
            F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)
        torch.cuda.synchronize()
        return
    if a.config:
        cfg = tuple(int(x) for x in a.config.split(",")) + (4,)
        decode_mod.decode_launch_config = lambda *args: cfg
    bs, mb = a.block_size, -(-a.ctx // a.block_size)
    nb = a.batch * mb
    k = torch.randn(nb, bs, a.num_kv_heads, a.head_size, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    bt = torch.randperm(nb, device="cuda").to(torch.int32).reshape(a.batch, mb)
    sl = torch.full((a.batch,), a.ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(a.batch, a.num_q_heads, a.head_size, dtype=torch.bfloat16, device="cuda")
    extra = {}
    if a.fp8:
        s = torch.tensor([0.25], device="cuda")
        k, v = (k / s).to(torch.float8_e4m3fn), (v / s).to(torch.float8_e4m3fn)
        extra = dict(kv_cache_dtype="fp8", k_scale=s, v_scale=s)
    if a.layout != "NHD":
        k, v = from_nhd(a.layout, k, v)
    for _ in range(3):
        paged_decode_attention(q, k, v, bt, sl, kv_layout=a.layout, num_splits=a.num_splits, **extra)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
