"""The decode kernel's loops in GPU machine code, counted on any machine: no GPU needed.

Count before you tune: which instructions a loop step issues is a property of the compiled kernel,
not of the GPU it runs on, so a machine without one can answer it. For each point this builds the
plan `paged_decode_attention` would build on the GPU (split count, launch config, constexprs; `--sms`
streaming multiprocessors), compiles `_paged_decode_kernel` for `--arch` with Triton's own ptxas
through a stand-in driver (the JIT's warmup: the same specialisation a launch gets), disassembles the
cubin with Triton's cuobjdump, and counts the instructions of every loop (a backward branch closes
one), by opcode. `--tma` counts `tma_decode_probe.py`'s kernel too.

    python benchmarks/sass_loops.py --points 16x4096,64x4096 --caches auto,fp8
    python benchmarks/sass_loops.py --points 16x4096 --set PEEL_ENABLED=False --keep /tmp/sass

Run as a script it drops TRITON_INTERPRET (an interpreted kernel has no machine code). Columns:
`step` = instructions per thread in the kernel's main loop (the longest loop with MMAs), `per 64
tok` = warp instructions per 64 tokens of one program (step x warps x 64 / tokens per step).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # before triton is imported: compiled kernels, not interpreted ones
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from miniattn.layout import from_nhd  # noqa: E402
from miniattn.ops import decode as decode_mod  # noqa: E402

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


# ------------------------------------------------------------------------------------------------
# SASS listings
# ------------------------------------------------------------------------------------------------

def parse_sass(text: str) -> list:
    """[(address, instruction)] of a `cuobjdump -sass` listing (NOPs kept)."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.search, text.splitlines()) if m]


def opcode(ins: str) -> str:
    """The opcode without its predicate and modifiers: '@!P0 HMMA.16816.F32.BF16 R1, ...' -> 'HMMA'."""
    words = ins.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def loops(text: str) -> list:
    """Every loop of a listing: a branch back to an address at or before it closes [target, branch],
    unless that range holds an EXIT (then the branch returns from an out-of-line block). Returns dicts
    (start, end, instructions: count without NOPs, ops: {opcode: count}), in listing order."""
    ins = parse_sass(text)
    out = []
    for addr, op in ins:
        m = _BRANCH.search(op)
        if m is None or opcode(op) != "BRA":
            continue
        target = int(m.group(1), 16)
        if target > addr:
            continue
        body = [opcode(o) for a, o in ins if target <= a <= addr and opcode(o) != "NOP"]
        if "EXIT" in body:  # a slow path placed after the kernel's end jumping back (mbarrier waits' retries)
            continue
        ops: dict = {}
        for o in body:
            ops[o] = ops.get(o, 0) + 1
        out.append(dict(start=target, end=addr, instructions=len(body), ops=ops))
    return out


def main_loop(text: str):
    """The kernel's step loop: the longest loop that issues MMAs (None when no loop does)."""
    cands = [lp for lp in loops(text) if lp["ops"].get("HMMA", 0) + lp["ops"].get("HGMMA", 0) > 0]
    return max(cands, key=lambda lp: lp["instructions"], default=None)


# ------------------------------------------------------------------------------------------------
# compiling without a GPU
# ------------------------------------------------------------------------------------------------

class _StandInDriver:
    """What the JIT's warmup asks a driver for, answered for one GPU target (device 0, stream 0)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_for(kernel, arch: int, *args, **kwargs):
    """`kernel.warmup(*args, grid=(1,), **kwargs)` for GPU `arch` (90: sm_90) on this machine."""
    from triton.runtime import driver

    # put back what was active: `reset_active` would look for a real GPU (the default driver);
    # in older Tritons `active` was a plain attribute (a lazy proxy)
    if hasattr(driver, "_active"):
        before, attr = driver._active, "_active"
    else:  # pragma: no cover - depends on the Triton version
        before, attr = driver.active, "active"
    driver.set_active(_StandInDriver(arch))
    try:
        return kernel.warmup(*args, grid=(1,), **kwargs)
    finally:
        setattr(driver, attr, before)


def disassemble(compiled) -> tuple:
    """(SASS listing, registers per thread) of a compiled kernel's cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+)", res)
    return sass, int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------
# the decode kernel at a point
# ------------------------------------------------------------------------------------------------

def _inputs(batch, ctx, cache, layout, a):
    """Inputs of the decode benchmark's shape; `torch.empty` for the caches (their pages are never
    touched, so a multi-GB cache costs nothing here)."""
    dt = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    pages = -(-ctx // a.block_size)
    nb = batch * pages
    cdt = dt if cache == "auto" else torch.float8_e4m3fn
    k = torch.empty(nb, a.block_size, a.num_kv_heads, a.head_size, dtype=cdt)
    v = torch.empty_like(k)
    if layout != "NHD":
        k, v = from_nhd(layout, k, v)
    bt = torch.randperm(nb).to(torch.int32).reshape(batch, pages)
    sl = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.empty(batch, a.num_q_heads, a.head_size, dtype=dt)
    return q, k, v, bt, sl


@contextlib.contextmanager
def _planned_as_gpu(a):
    """While inside: plans built on CPU tensors take what the GPU of `a` (arch, SMs) would get: its SM
    count for the split heuristic, the pinned FP8 widening (sm_89+) and PDL (sm_90+)."""
    saved = decode_mod._v_widen, decode_mod._pdl_available, dict(decode_mod._SM_COUNT)
    decode_mod._SM_COUNT[torch.device("cpu")] = a.sms
    widen = a.arch >= 89 and decode_mod.PINNED_WIDEN_ENABLED
    decode_mod._v_widen = lambda device, kv: (2 if kv == "fp8_e5m2" else 1) if widen else 0
    decode_mod._pdl_available = lambda device: a.arch >= 90 and decode_mod.PDL_ENABLED and decode_mod._HAS_GDC
    try:
        yield
    finally:
        decode_mod._v_widen, decode_mod._pdl_available = saved[0], saved[1]
        decode_mod._SM_COUNT.clear()
        decode_mod._SM_COUNT.update(saved[2])


def decode_kernel_sass(batch, ctx, cache, layout, a):
    """(row dict, SASS listing) of the main decode kernel that a call at this point launches on the GPU
    (the capture plan where eager calls take a one-launch plan: what a graph replays)."""
    q, k, v, bt, sl = _inputs(batch, ctx, cache, layout, a)
    one = torch.ones(1, dtype=torch.float32)
    fp8 = cache != "auto"
    with _planned_as_gpu(a):
        plan = decode_mod._build_plan(q, k, v, bt, sl, layout, None, "fp8" if fp8 else "auto", one if fp8 else None,
                                      one if fp8 else None, None, a.num_splits, None)
    plan = plan.capture_plan or plan
    kern = decode_mod._paged_decode_kernel
    names = [p.name for p in kern.params]
    consts = dict(zip(names[-len(plan.consts):], plan.consts))
    consts["DOT_F32"] = False  # the interpreter's widening; a GPU's dots take bf16 as it is
    scales = (one, one) if fp8 else (plan.dummy, plan.dummy)
    out = torch.empty(plan.out_shape, dtype=q.dtype)
    compiled = compile_for(kern, a.arch, q, k, v, bt, sl, *scales, out, plan.part_acc, plan.part_max, plan.part_sum,
                           plan.arrivals, *plan.ints, **consts, num_warps=plan.warps, num_stages=plan.stages,
                           **({"maxnreg": plan.maxnreg} if plan.maxnreg else {}))
    sass, regs = disassemble(compiled)
    row = dict(kernel="miniattn", batch=batch, ctx=ctx, cache=cache, layout=layout, splits=plan.splits,
               block_n=consts["BLOCK_N"], warps=plan.warps, stages=plan.stages, regs=regs,
               shared=compiled.metadata.shared, fused_merge=bool(consts["FUSED_MERGE"]))
    return row, sass


def tma_probe_sass(batch, ctx, cache, layout, a, cfg, num_splits):
    """(row dict, SASS listing) of tma_decode_probe.py's kernel at this point; cfg = (pages, stages, warps)."""
    import tma_decode_probe as probe

    q, k, v, bt, sl = _inputs(batch, ctx, cache, layout, a)
    with _planned_as_gpu(a):
        p = probe.TmaDecode(q, k, v, bt, sl, layout, num_splits, *cfg)
    qq, kd, vd, bt_, sl_ = p.args
    compiled = compile_for(probe._tma_decode_kernel, a.arch, qq, kd, vd, bt_, sl_, p.out, p.part_acc, p.part_max,
                           p.part_sum, p.arrivals, p.v_scale, *p.ints, **p.consts)
    sass, regs = disassemble(compiled)
    pages, stages, warps = cfg
    row = dict(kernel=f"tma p{pages}", batch=batch, ctx=ctx, cache=cache, layout=layout, splits=p.grid[0],
               block_n=pages * a.block_size, warps=warps, stages=stages, regs=regs, shared=compiled.metadata.shared,
               fused_merge=p.grid[0] > 1)
    return row, sass


def _finish(row, sass, keep):
    lp = main_loop(sass)
    row["step"] = lp["instructions"] if lp else None
    row["per_64_tokens"] = round(lp["instructions"] * row["warps"] * 64 / row["block_n"]) if lp else None
    row["ops"] = dict(sorted(lp["ops"].items(), key=lambda kv: -kv[1])) if lp else {}
    row["all_loops"] = [dict(start=hex(x["start"]), instructions=x["instructions"]) for x in loops(sass)]
    if keep:
        os.makedirs(keep, exist_ok=True)
        name = f"{row['kernel'].replace(' ', '_')}_b{row['batch']}x{row['ctx']}_{row['cache']}_{row['layout']}.sass"
        with open(os.path.join(keep, name), "w") as f:
            f.write(sass)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="16x4096,64x4096,1x16384", help="BATCHxCTX, comma separated")
    ap.add_argument("--caches", default="auto,fp8", help="auto (the model dtype) and / or fp8 (e4m3)")
    ap.add_argument("--layouts", default="NHD")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (the split heuristic's)")
    ap.add_argument("--num-splits", type=int, default=None, help="force the split count")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a decode module setting, e.g. --set PEEL_ENABLED=False")
    ap.add_argument("--tma", default="", metavar="PxSxW,...",
                    help="also count tma_decode_probe.py's kernel: pages per step x stages x warps")
    ap.add_argument("--keep", default=None, metavar="DIR", help="write each listing there")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    a = ap.parse_args(argv)
    for item in a.set:
        name, _, val = item.partition("=")
        if not hasattr(decode_mod, name):
            ap.error(f"--set: miniattn.ops.decode has no setting {name!r}")
        setattr(decode_mod, name, type(getattr(decode_mod, name))(ast.literal_eval(val)))
    rows = []
    for point in a.points.split(","):
        batch, ctx = (int(x) for x in point.split("x"))
        for cache in a.caches.split(","):
            for layout in a.layouts.split(","):
                rows.append(_finish(*decode_kernel_sass(batch, ctx, cache, layout, a), a.keep))
                for cfg in filter(None, a.tma.split(",")):
                    if layout == "paged5d":
                        continue
                    cfg = tuple(int(x) for x in cfg.split("x"))
                    splits = rows[-1]["splits"] if a.num_splits is None else a.num_splits
                    rows.append(_finish(*tma_probe_sass(batch, ctx, cache, layout, a, cfg, splits), a.keep))
    import triton

    print(f"sm_{a.arch} SASS, Triton {triton.__version__}, {a.sms} SMs for the split heuristic"
          + (f", settings {a.set}" if a.set else ""))
    hdr = f"{'kernel':<9} {'point':<11} {'cache':<5} {'layout':<7} {'split':>5} {'cfg':<11} {'regs':>4} " \
          f"{'smem':>6} {'step':>5} {'per 64 tok':>10}  top opcodes"
    print(hdr)
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["ops"].items())[:8])
        cfg = f"{r['block_n']}/{r['warps']}w/{r['stages']}s"
        print(f"{r['kernel']:<9} {str(r['batch']) + 'x' + str(r['ctx']):<11} {r['cache']:<5} {r['layout']:<7} "
              f"{r['splits']:>5} {cfg:<11} {r['regs'] or '-':>4} {r['shared']:>6} {r['step'] or '-':>5} "
              f"{r['per_64_tokens'] or '-':>10}  {top}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(config=vars(a), triton=triton.__version__, torch=torch.__version__, rows=rows), f, indent=1)
        print(f"wrote {a.out}")
    return rows


if __name__ == "__main__":
    main()
