"""Timing helpers shared by every benchmark (benchmarks/ and `miniattn bench`).

Method (the same as ../shared/peers-h100.md, so numbers compare):
- ``graph``: median of `triton.testing.do_bench` over replays of a CUDA graph holding ONE call
  (do_bench flushes L2 before every rep, so each rep sees a cold L2 plus one graph launch);
- ``eager``: the same around a direct Python call;
- ``host``: CUDA-event time per call of N back-to-back eager calls (what a Python loop sees: host
  launch cost when the kernel is short).
Ceilings are measured in the same process: `copy_bandwidth` (device-to-device copy, bytes read +
written) and `read_bandwidth` (reductions over a buffer, bytes read).
On a CPU every mode falls back to wall-clock medians, and results are labelled as CPU numbers.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable

import torch

MODES = ("graph", "eager", "host")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _do_bench(fn: Callable[[], None], warmup_ms: int, rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def _cpu_median_us(fn: Callable[[], None], reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def capture_graph(fn: Callable[[], None], warmup_calls: int = 2,
                  warmup: Callable[[], None] | None = None) -> "torch.cuda.CUDAGraph":
    """A CUDA graph holding one call of `fn`, after `warmup_calls` calls of `warmup` (default: `fn`)
    on a side stream (compilation, allocator pools, plans: nothing of that may happen in a capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup_calls):
            (warmup or fn)()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def time_graph(fn: Callable[[], None], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """µs per replay of a CUDA graph holding one call of `fn` (median, cold L2)."""
    if not has_cuda():
        return _cpu_median_us(fn)
    g = capture_graph(fn)
    return _do_bench(g.replay, warmup_ms, rep_ms)


def time_eager(fn: Callable[[], None], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """µs per direct call of `fn` (median, cold L2)."""
    if not has_cuda():
        return _cpu_median_us(fn)
    return _do_bench(fn, warmup_ms, rep_ms)


def per_call_us(fn: Callable[[], None], calls: int) -> float:
    """µs per call of `calls` back-to-back calls of `fn`: CUDA events on a GPU (after a sync),
    perf_counter on a CPU. No warm-up."""
    if not has_cuda():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e6 / calls
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def time_host_loop(fn: Callable[[], None], calls: int = 200, warmup_calls: int = 20, blocks: int = 5) -> float:
    """µs per call of back-to-back eager calls (launch-bound when small): the median over `blocks`
    blocks of `calls` calls each, every block timed with CUDA events, so one host hiccup (a GC pass,
    the VM's CPU taken away for a ms) moves one block, not the result."""
    if not has_cuda():
        return _cpu_median_us(fn)
    for _ in range(warmup_calls):
        fn()
    return statistics.median(per_call_us(fn, calls) for _ in range(blocks))


def time_modes(fn: Callable[[], None], modes: Iterable[str] = MODES, **kw) -> dict:
    """{mode: µs} for the requested modes (see module docstring)."""
    timers = {"graph": time_graph, "eager": time_eager, "host": time_host_loop}
    out = {}
    for m in modes:
        if m not in timers:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
        out[m] = timers[m](fn, **kw) if m != "host" else timers[m](fn)
    return out


def copy_bandwidth(nbytes: int = 1 << 30, mode: str = "eager") -> float:
    """Device-to-device copy ceiling in GB/s, counting bytes read + written (`nbytes` each way).

    Eager by default: a memcpy captured in a CUDA graph becomes a copy-engine node, which on the
    H100 moves ~2.4 TB/s against ~3.0 TB/s for the SM copy kernel that an eager `copy_` runs.
    """
    if not has_cuda():
        return float("nan")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = (time_graph if mode == "graph" else time_eager)(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / us / 1e3


def read_bandwidth(nbytes: int = 1 << 30, mode: str = "graph") -> float:
    """Read ceiling in GB/s: the faster of torch's `sum` over `nbytes` of bf16 and a Triton read
    (each program sums 16 KiB; outputs negligible). On an H200 the Triton read moves 4.35 TB/s over
    1 GiB against the `sum`'s 4.0 (benchmarks/copy_probe.py, results/copy_probe_h200.json)."""
    if not has_cuda():
        return float("nan")
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    timer = time_graph if mode == "graph" else time_eager
    us = timer(lambda: src.sum(dtype=torch.float32))
    words = src.view(torch.int32) if src.numel() % 2 == 0 else None
    if words is not None:
        part = torch.empty(-(-words.numel() // _READ_BLOCK), dtype=torch.int32, device="cuda")
        us = min(us, timer(lambda: triton_read(words, part)))
        del part
    del src, words
    torch.cuda.empty_cache()
    return nbytes / us / 1e3


_READ_BLOCK = 4096  # int32 words per program of `triton_read`'s default: 16 KiB
_KERNELS: dict = {}


def _streaming_kernels() -> dict:
    """The Triton copy and read kernels of the ceilings, compiled on first use."""
    if not _KERNELS:
        import triton
        import triton.language as tl

        @triton.jit
        def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)

        @triton.jit
        def _read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(src_ptr + offs, mask=offs < n, other=0), 0))

        _KERNELS.update(copy=_copy_kernel, read=_read_kernel)
    return _KERNELS


def triton_copy(dst: torch.Tensor, src: torch.Tensor, block: int = 1024, warps: int = 8) -> None:
    """dst = src (int32, same size) with `block` words per program. The default, 4 KiB per program and
    one 16-byte vector per lane, equals memcpy on an H200 (4216-4260 against 4228-4251 GB/s over
    1 GiB each way); 16 KiB programs reach 4035-4057 (benchmarks/copy_probe.py)."""
    n = src.numel()
    _streaming_kernels()["copy"][(-(-n // block),)](src, dst, n, BLOCK=block, num_warps=warps)


def triton_read(words: torch.Tensor, part: torch.Tensor, block: int = _READ_BLOCK, warps: int = 8) -> None:
    """Each program sums `block` int32 words (wrapping) into `part` (>= cdiv(n, block) words): a
    pure streaming read, 4.35 TB/s over 1 GiB on an H200 against 4.0 for torch's `sum`."""
    n = words.numel()
    _streaming_kernels()["read"][(-(-n // block),)](words, part, n, BLOCK=block, num_warps=warps)


def gbps(nbytes: int, us: float) -> float:
    return nbytes / us / 1e3 if us > 0 else float("nan")


def device_tag(device_name: str | None = None) -> str:
    """Short lower-case device name for result file names: 'h100', 'h200', 'a100', else a slug; 'cpu'."""
    if device_name is None:
        device_name = torch.cuda.get_device_name() if has_cuda() else "cpu"
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", device_name.lower())
    return m.group(1) if m else (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu")


def env_info() -> dict:
    """Device, versions and git commit, for the JSON next to every table."""
    import triton

    info = {
        "device": torch.cuda.get_device_name() if has_cuda() else f"CPU ({platform.processor() or platform.machine()})",
        "cpu_only": not has_cuda(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if has_cuda():
        p = torch.cuda.get_device_properties(0)
        info["sm_count"] = p.multi_processor_count
        info["l2_bytes"] = getattr(p, "L2_cache_size", None)
    # MINIATTN_GIT_COMMIT names the commit where the tree has no .git (the GPU machine's copy)
    info["git_commit"] = os.environ.get("MINIATTN_GIT_COMMIT")
    if not info["git_commit"]:
        try:
            r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
            info["git_commit"] = r.stdout.strip() if r.returncode == 0 else None
        except Exception:
            info["git_commit"] = None
    return info


def format_table(rows: list[dict], columns: list[str], floatfmt: str = "{:.1f}") -> str:
    """A Markdown table of `rows` (dicts) over `columns`."""
    def cell(v):
        return floatfmt.format(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_json(path: str, config: dict, rows: list[dict], extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"env": env_info(), "config": config, "rows": rows}
    if extra:
        doc.update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def progress(it, **kw):
    """tqdm when installed and stderr is a terminal-ish stream, else the iterable itself."""
    try:
        from tqdm import tqdm

        return tqdm(it, **kw)
    except Exception:
        return it
