"""The write benchmarks' Targets table (`benchmarks/_write_common.check_targets`) on hand-made rows:
which targets a run's configuration covers, and where each bound lies."""

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import _write_common as wc  # noqa: E402


def args(**kw):
    base = dict(head_size=128, block_size=16, dtype="bfloat16", num_heads=8, kv_cache_dtype="auto")
    return argparse.Namespace(**{**base, **kw})


def row(n, impl, us, pct=50.0, layout="NHD", host=None):
    r = dict(num_tokens=n, layout=layout, impl=impl, graph_us=us, pct_copy=pct)
    if host is not None:
        r["host_us"] = host
    return r


def verdicts(a, rows, name="reshape_and_cache_flash", modes=("graph", "eager", "host")):
    return {t["target"]: t["ok"] for t in wc.check_targets(a, name, rows, modes)}


def test_copy_shares_peers_and_host_at_8_heads():
    rows = [row(16384, "triton", 39.7, 79.9), row(16384, "flashinfer", 41.8), row(16384, "torch", 10.0),
            row(65536, "triton", 139.7, 90.1), row(65536, "flashinfer", 139.0),
            row(1024, "triton", 7.6, host=9.9), row(1, "triton", 5.0, host=10.5),
            row(65536, "triton[8x4]", 120.0)]  # a config row is ours, not a peer
    v = verdicts(args(), rows)
    assert v == {
        "NHD 16384 tokens: >= 80% of copy": False,
        "NHD 16384 tokens: <= fastest peer (flashinfer)": True,  # the torch reference is not a peer
        "NHD 65536 tokens: >= 90% of copy": True,
        "NHD 65536 tokens: <= fastest peer (flashinfer)": False,
        "NHD 1024 tokens: host loop <= 10 us or kernel-bound": True,
        "NHD 1 tokens: host loop <= 10 us or kernel-bound": False,
    }


def test_fp8_against_the_same_write_into_auto_caches():
    rows = [row(4096, "triton", 11.8, layout="HND"), row(4096, wc.AUTO_REF, 13.2, layout="HND"),
            row(8192, "triton", 19.0, layout="HND"), row(8192, wc.AUTO_REF, 20.0, layout="HND"),
            row(1024, "triton", 7.0, layout="HND"), row(1024, wc.AUTO_REF, 9.0, layout="HND")]
    v = verdicts(args(kv_cache_dtype="fp8"), rows, modes=("graph",))
    assert v == {"HND 4096 tokens: fp8 <= 0.9 x auto": True, "HND 8192 tokens: fp8 <= 0.9 x auto": False}


def test_128_heads_paged5d_and_kernel_bound_host():
    rows = [row(16384, "triton", 537.0, 94.0), row(4096, "triton", 139.0, 90.6), row(1024, "triton", 39.5, host=37.6)]
    assert verdicts(args(num_heads=128), rows) == {"NHD 16384 tokens, 128 heads: >= 95% of copy": False}
    p5 = [row(65536, "triton", 1690.0, layout="paged5d"), row(65536, "vllm_cuda", 4398.0, layout="paged5d"),
          row(1024, "triton", 34.3, layout="paged5d", host=21.0)]
    assert verdicts(args(), p5, name="reshape_and_cache") == {
        "paged5d 65536 tokens: <= 0.5 x vLLM CUDA": True,
        "paged5d 65536 tokens: <= fastest peer (vllm_cuda)": True,
        "paged5d 1024 tokens: host loop <= 10 us or kernel-bound": True,  # 21.0 <= 1.05 x 34.3
    }


@pytest.mark.parametrize("other", [dict(head_size=64), dict(block_size=32), dict(dtype="float16")])
def test_other_configurations_check_nothing(other):
    assert wc.check_targets(args(**other), "reshape_and_cache_flash", [row(65536, "triton", 1.0, 10.0)],
                            ("graph",)) == []
