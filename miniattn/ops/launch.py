"""A cheap way to launch a Triton kernel again and again.

`kernel[grid](...)` costs tens of µs of Python per call (binding, specialisation, cache lookup).
`Launcher` compiles through that path once per specialisation key, keeps the compiled kernel, and
afterwards calls its C launcher directly, which costs a few µs like a CUDA op.

The key must capture everything Triton specialises on. Kernels launched this way take their
arguments positionally in the order (pointers..., ints..., constexprs...) and the key is built from
every int and constexpr value plus each pointer's dtype and 16-byte alignment: that is a superset
of what Triton itself specialises on (ints equal to 1 or divisible by 16, pointer alignment), so a
cached kernel is never reused for arguments it was not compiled for.

`compiled_handle` goes one step further for the ops' hot paths: a function that takes raw addresses
and calls the C function under Triton's Python launcher directly (see `_c_launch`).

Under TRITON_INTERPRET=1, on CPU tensors, or while a Triton launch hook is installed (profilers),
every call simply goes through `kernel[grid](...)`.
"""

from __future__ import annotations

import copy
import os

import torch

try:  # Triton is optional: without it the ops fall back to their torch references.
    import triton
    from triton import knobs as _knobs
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    _knobs = None


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def hooks_installed() -> bool:
    """True when a launch hook is set (Triton >= 3.4 keeps them in `HookChain`s that may be empty).

    Read at every hot-path call (a profiler may install hooks at any time), so kept to a few lookups.
    """
    rt = getattr(_knobs, "runtime", None)
    if rt is None:
        return False
    enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (exit_ is not None and getattr(exit_, "calls", True)))


class Launcher:
    """Launch `kernel` with arguments (pointers, ints, constexprs), caching the compiled kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict = {}

    def __call__(self, grid: tuple, ptrs: tuple, ints: tuple, consts: tuple, num_warps: int, num_stages: int = 1,
                 launch_pdl: bool = False, maxnreg: int | None = None):
        """`launch_pdl`: programmatic dependent launch (CUDA only; the kernel must `gdc_wait` first).
        `maxnreg`: a cap on registers per thread (ptxas spills above it)."""
        dev = ptrs[0].device
        if dev.type != "cuda":
            self.kernel[grid](*ptrs, *ints, *consts, num_warps=num_warps, num_stages=num_stages)
            return
        align = 0
        for p in ptrs:
            align = (align << 1) | (p.data_ptr() & 15 == 0)
        key = (dev.index, align, ints, consts, num_warps, num_stages, launch_pdl, maxnreg,
               tuple(p.dtype for p in ptrs))
        hit = self._compiled.get(key)
        if hit is None or hooks_installed():
            opts = _options(launch_pdl, maxnreg)
            compiled = self.kernel[grid](*ptrs, *ints, *consts, num_warps=num_warps, num_stages=num_stages, **opts)
            if hit is None and compiled is not None and hasattr(compiled, "run"):
                self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata)
            return
        run, function, metadata = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(dev.index)
        run(grid[0], g1, g2, stream, function, metadata, None, None, None, *ptrs, *ints, *consts)


def _options(launch_pdl: bool, maxnreg) -> dict:
    opts = {"launch_pdl": True} if launch_pdl else {}
    if maxnreg is not None:
        opts["maxnreg"] = maxnreg
    return opts


def compiled_handle(kernel, grid, ptrs, ints, consts, num_warps, num_stages=1, launch_pdl=False, maxnreg=None):
    """A launch function for `kernel` as compiled for these arguments, or False.

    For raw-address launches on a hot path: ``fn(g0, g1, g2, stream, *addresses, *ints, *consts)``.
    The kernel comes from Triton's own cache (no recompilation). False when this Triton does not
    expose what is needed (then stay on `Launcher`). The caller must only use it for arguments with
    the same ints/consts and 16-byte aligned pointers, and not while launch hooks are installed.
    """
    try:
        opts = _options(launch_pdl, maxnreg)
        k = kernel.warmup(*ptrs, *ints, *consts, grid=grid, num_warps=num_warps, num_stages=num_stages, **opts)
        run = k.run  # first: this loads the module, which sets `function`
        function, metadata = k.function, k.packed_metadata
    except Exception:  # pragma: no cover - depends on the Triton version
        return False
    args = tuple(p.data_ptr() for p in ptrs) + tuple(ints) + tuple(consts)
    fast = _c_launch(run, function, metadata, args)
    return fast if fast is not None else DirectLaunch(run, (function, metadata, None, None, None), True, "run")


class DirectLaunch:
    """``fn(g0, g1, g2, stream, *head, *args)`` (``spread``) or ``fn(g0, g1, g2, stream, *head, args)``.

    Calling the object launches with raw addresses: ``launch(g0, g1, g2, stream, *args)``. A hot path
    may instead call ``fn`` itself with `head` and `spread` (one Python frame less per launch).
    `kind` says which function `fn` is: ``"launch_c"`` (the C launch under Triton's Python launcher)
    or ``"run"`` (that Python launcher, when the C call could not be recorded).
    """

    __slots__ = ("fn", "head", "spread", "kind")

    def __init__(self, fn, head: tuple, spread: bool, kind: str):
        self.fn, self.head, self.spread, self.kind = fn, head, spread, kind

    def __call__(self, g0, g1, g2, stream, *args):
        if self.spread:
            self.fn(g0, g1, g2, stream, *self.head, *args)
        else:
            self.fn(g0, g1, g2, stream, *self.head, args)


def _record_launch(run, grid, stream, function, metadata, args):
    """The arguments `run` (Triton's CudaLauncher) hands its C `launch`, recorded on a copy of it."""
    calls = []
    probe = copy.copy(run)  # the shared launcher is never modified (other threads may be launching)
    probe.launch = lambda *a: calls.append(a)
    type(run).__call__(probe, *grid, stream, function, metadata, None, None, None, *args)
    return calls[0] if len(calls) == 1 else None


#: (grid, stream) of the two recorded calls: distinct values, so call-dependent arguments show
_PROBES = (((3, 5, 7), 11), ((13, 17, 19), 23))


def _c_launch(run, function, metadata, args):
    """Skip the Python layer of Triton's CUDA launcher (about 1 µs per launch) when it is pure plumbing.

    `CudaLauncher.__call__` allocates scratch buffers when the kernel needs them, then calls its C
    `launch` with the grid, stream, function, some per-kernel constants and the kernel arguments. For
    kernels without scratch those constants do not depend on the call, so they are recorded once (the
    call is made on a copy of the launcher whose `launch` only records) and passed straight to the C
    function afterwards. Two recordings with different grids and streams must agree on them, and the
    recorded call must start with (grid, stream, function) and end with the arguments, as a tuple or
    spread out; anything else (another Triton, scratch, sanitizer instrumentation) returns None and
    the caller keeps `run`.
    """
    try:
        if "launch" not in vars(run) or not callable(run.launch):
            return None
        if any(getattr(run, a, 0) for a in ("global_scratch_size", "profile_scratch_size", "gsan_enabled")):
            return None
        rec = [_record_launch(run, g, s, function, metadata, args) for g, s in _PROBES]
    except Exception:  # pragma: no cover - depends on the Triton version
        return None
    if any(r is None or len(r) < 6 or r[:5] != (*g, s, function) for r, (g, s) in zip(rec, _PROBES)):
        return None
    if all(r[-1] == args for r in rec) and all(type(r[-1]) is tuple for r in rec):
        spread, mids = False, [r[5:-1] for r in rec]
    elif all(r[len(r) - len(args):] == args for r in rec):
        spread, mids = True, [r[5:len(r) - len(args)] for r in rec]
    else:
        return None
    if len(mids[0]) != len(mids[1]) or not all(x is y or (type(x) is int and x == y) for x, y in zip(*mids)):
        return None
    return DirectLaunch(run.launch, (function, *mids[0]), spread, "launch_c")


try:  # MINIATTN_DEBUG is read at every call, straight from the environment's dict (os.environ.get
    # costs a raised-and-caught KeyError when the variable is unset)
    _ENV, _DEBUG_KEY = os.environ._data, os.environ.encodekey("MINIATTN_DEBUG")
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _ENV = None


def debug_enabled() -> bool:
    """True when MINIATTN_DEBUG is set to something other than "" or "0" (read now, cheaply)."""
    v = _ENV.get(_DEBUG_KEY) if _ENV is not None else os.environ.get("MINIATTN_DEBUG")
    return v not in (None, b"", b"0", "", "0")
