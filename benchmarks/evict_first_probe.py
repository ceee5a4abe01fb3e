"""Probe (session 10): benchmarks/ab_decode.py with the decode kernel's cp.async copies tagged
L2::evict_first, to test whether do_bench's flush write-back (dirty lines the L2 holds when the
timed call starts) could stay out of the timed call.

Triton 3.6 (the GPU machine's) drops `eviction_policy` on loads it pipelines into cp.async (Triton
3.9 keeps it: `cp.async.cg.shared.global.L2::cache_hint ..., policy` after a `createpolicy`), so
session 6's evict-first run (s6r1) had no hint in its kernels. This probe rewrites the kernel's PTX
through Triton's stages hook into what 3.9 emits. Results on the H200 (benchmarks/README.md,
session 10): assembled by Triton's ptxas 12.8 or CUDA 13.0's the hinted kernels fault (illegal
instruction: the hinted LDGSTS gets uniform registers nothing writes); with CUDA 13.4's ptxas
(TRITON_PTXAS_PATH) they run, faster at small points by moving do_bench's flush write-back past the
timed call, slower by 5-30% at large ones. Only mode cg was run on the GPU.

    EVICT_FIRST=cg|ca|scoped TRITON_CACHE_DIR=/tmp/tc_evict PYTHONPATH=$PWD \
        python -P benchmarks/evict_first_probe.py evict1 >> ab.jsonl

Give each variant its own TRITON_CACHE_DIR (the hook is not part of Triton's cache key).
PROBE_SCRIPT=benchmark_paged_decode.py runs that script instead (e.g. with --flush-probe).
"""
import os
import re
import runpy
import sys

from triton import knobs

_CP = re.compile(r"(cp\.async\.c[ag]\.shared\.global)( \[[^\]]*\], \[[^\]]*\], 0x10(?:, %r\d+)?);")


MODE = os.environ.get("EVICT_FIRST", "0")


def rewrite(ptx):
    if ".entry _paged_decode_kernel(" not in ptx:
        return ptx
    if MODE == "scoped":  # a policy made next to each copy, in its own scope
        ptx, n = _CP.subn(r"{ .reg .b64 pol; createpolicy.fractional.L2::evict_first.b64 pol, 1.0; "
                          r"\1.L2::cache_hint\2, pol; }", ptx)
    else:
        ptx, n = _CP.subn(r"\1.L2::cache_hint\2, %rdevf;", ptx)
        ptx = re.sub(r"(\t\.reg \.b64 \t%rd<\d+>;\n)", r"\1\t.reg .b64 \t%rdevf;\n", ptx, count=1)
        ptx = ptx.replace("// %bb.0:\n", "// %bb.0:\n\tcreatepolicy.fractional.L2::evict_first.b64 %rdevf, 1.0;\n", 1)
    if MODE == "ca":  # L1-allocating copies (LDGSTS without .BYPASS)
        ptx = ptx.replace("cp.async.cg.shared.global.L2::cache_hint", "cp.async.ca.shared.global.L2::cache_hint")
    print(f"evict_first ({MODE}): {n} cp.async tagged", file=sys.stderr)
    return ptx


def hook(self, stages, options, language, capability):
    make_ptx = stages["ptx"]
    stages["ptx"] = lambda src, metadata: rewrite(make_ptx(src, metadata))


if MODE != "0":
    knobs.runtime.add_stages_inspection_hook = hook
here = os.path.dirname(os.path.abspath(__file__))
sys.argv = [os.path.join(here, os.environ.get("PROBE_SCRIPT", "ab_decode.py"))] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
