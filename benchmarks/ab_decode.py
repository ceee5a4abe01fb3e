"""A/B of whole source trees: paged decode graph µs at fixed points, for whichever miniattn is first on
PYTHONPATH, one JSON line per cell (the first line: device, versions, the tree's path).

Run it for each tree in turn on one machine, alternating, so drift hits every tree alike; `-P` keeps
Python from putting this script's directory (a checkout's root) ahead of PYTHONPATH:

    git archive <commit> miniattn | tar -x -C /tmp/old
    for r in 1 2; do
      PYTHONPATH=/tmp/old python -P benchmarks/ab_decode.py old$r >> ab.jsonl
      PYTHONPATH=$PWD python -P benchmarks/ab_decode.py new$r >> ab.jsonl
    done
    python benchmarks/ab_decode.py --summary ab.jsonl

Inputs are benchmark_paged_decode.py's (`decode_inputs.make_inputs`, loaded by file path so that
no checkout goes on sys.path: 32 q / 8 kv heads x 128, block 16, bf16, and FP8 e4m3 with per-tensor
scales, random block tables over the whole pool); torch SDPA on a contiguous cache at b16 x 4096 as
the yardstick of the run.
"""

import collections
import importlib.util
import json
import os
import sys
import types

import torch
import torch.nn.functional as F

POINTS = [(1, 512), (1, 4096), (1, 16384), (16, 512), (16, 4096), (16, 16384), (64, 4096), (128, 4096),
          (64, 16384), (16, 4101), (64, 4101)]  # 4101: rows ending inside a step (the peeled last step)
PAGED5D_POINTS = ((16, 4096), (64, 4096))
FP8 = torch.float8_e4m3fn
SHAPE = types.SimpleNamespace(dtype="bf16", block_size=16, num_q_heads=32, num_kv_heads=8, head_size=128)


def _make_inputs():
    """`decode_inputs.make_inputs`, from the file next to this script (sys.path untouched)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_inputs.py")
    spec = importlib.util.spec_from_file_location("decode_inputs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_inputs


def run(label):
    from miniattn import timing
    from miniattn.layout import from_nhd
    from miniattn.ops import decode as d

    print(json.dumps(dict(label=label, env=timing.env_info(), tree=d.__file__)), flush=True)
    make_inputs = _make_inputs()
    for b, c in POINTS:
        inp = make_inputs(b, c, SHAPE)
        k, v, bt, sl, q = inp["k"], inp["v"], inp["block_tables"], inp["seq_lens"], inp["query"]
        del inp
        s1 = torch.tensor([0.25], device="cuda")
        k8, v8 = (k / s1).to(FP8), (v / s1).to(FP8)
        for lay in ["NHD"] + (["paged5d"] if (b, c) in PAGED5D_POINTS else []):
            for cdt in ("auto", "fp8"):
                kk, vv = (k, v) if cdt == "auto" else (k8, v8)
                if lay != "NHD":
                    kk, vv = from_nhd(lay, kk, vv)
                extra = {} if cdt == "auto" else dict(kv_cache_dtype="fp8", k_scale=s1, v_scale=s1)
                d._PLANS.clear()
                fn = lambda: d.paged_decode_attention(q, kk, vv, bt, sl, kv_layout=lay, **extra)  # noqa: E731
                fn()
                us = timing.time_graph(fn)
                d._PLANS.clear()
                print(json.dumps(dict(label=label, b=b, ctx=c, layout=lay, cache=cdt, us=round(us, 2))), flush=True)
                del kk, vv
        if (b, c) == (16, 4096):
            q4 = q[:, :, None]
            kc, vc = k.new_empty(b, 8, c, 128).normal_(), v.new_empty(b, 8, c, 128).normal_()
            us = timing.time_graph(lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True))
            print(json.dumps(dict(label=label, b=b, ctx=c, layout="contig", cache="auto", sdpa=True,
                                  us=round(us, 2))), flush=True)
            del kc, vc
        del k, v, k8, v8
        torch.cuda.empty_cache()


def summary(path):
    """One line per cell: each tree's times (labels minus their trailing round digit, plus a
    `variant` where the line has one), rounds in order."""
    cells = collections.defaultdict(lambda: collections.defaultdict(list))
    for line in open(path):
        r = json.loads(line)
        if "us" in r:
            tree = r["label"].rstrip("0123456789") + (f":{r['variant']}" if "variant" in r else "")
            cells[(r["b"], r["ctx"], r["layout"], r["cache"])][tree].append(r["us"])
    for (b, c, lay, cdt), trees in cells.items():
        print(f"b{b} x {c} {lay} {cdt}: " + "  ".join(f"{t} {'/'.join(f'{u:.2f}' for u in us)}"
                                                    for t, us in trees.items()))


if __name__ == "__main__":
    if sys.argv[1] == "--summary":
        summary(sys.argv[2])
    else:
        run(sys.argv[1])
