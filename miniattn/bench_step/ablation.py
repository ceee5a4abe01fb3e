"""Method (b): the whole step with its cache writes removed (0), normal (1), doubled (2) and repeated.

For each setting of ``runner.attn.write_repeats`` the device work of the step
(`ModelRunner.decode_callable`) is captured in a CUDA graph (or, for a step that cannot be
captured, called eagerly). The settings are then timed *interleaved*: in each round every variant
runs `reps` back-to-back replays between two events, in a rotating order, so clock and thermal
drift hit all variants alike; the write cost is the median over rounds of the paired difference
``T1 - T0`` (the check: ``T2 - T1``). A single write is a few µs inside a step of milliseconds, so
timing the variants one after another would bury it in run-to-run noise.

A write of a few µs is about what the step's run-to-run noise is. With a setting ``1 + K`` (K extra
writes per layer, e.g. 9) the *slope* ``(T[1+K] - T1) / K`` measures one more write per layer with K
times the signal: the same paired noise spread over K writes. It is not the same quantity as
removal (T1 - T0): the extra writes find their cache lines in L2 and follow a write, not the
projection kernel (on an H200 the slope read 15-55% below T1 - T0), so the benchmark reports both
and takes T1 - T0 as method (b).

The replays are back to back without an L2 flush: a step reads the model's weights (gigabytes),
which flushes the 50 MB L2 by itself. On a CPU the same runs are wall-clock times.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..timing import capture_graph, per_call_us

__all__ = ["Ablation", "ablate_writes", "ablate_writes_queued", "interleaved_us"]


@dataclass
class Ablation:
    """Step µs per write setting and the paired differences (µs).

    t_us : {repeats: median µs per step}.
    write_us : median over rounds of T1 - T0 (the step's writes, all layers).
    check_us : median over rounds of T2 - T1 (NaN when doubling is not supported).
    noise_us : standard error of `write_us` (1.4826 * MAD of the paired differences / sqrt(rounds)).
    mode : "graph" or "eager".
    slope_us, slope_noise_us : ``(T[1+K] - T1) / K`` over rounds and its standard error, with
        ``1 + K`` the largest setting when it is above 2 (else NaN); `extra` = K.
    """

    t_us: dict[int, float]
    write_us: float
    check_us: float
    noise_us: float
    mode: str
    rounds: int
    reps: int
    rounds_us: dict[int, list[float]] = field(default_factory=dict)
    slope_us: float = float("nan")
    slope_noise_us: float = float("nan")
    extra: int = 0

    def to_dict(self) -> dict:
        return {"t_us": {str(k): v for k, v in self.t_us.items()}, "write_us": self.write_us,
                "check_us": self.check_us, "noise_us": self.noise_us, "mode": self.mode,
                "rounds": self.rounds, "reps": self.reps, "slope_us": self.slope_us,
                "slope_noise_us": self.slope_noise_us, "extra": self.extra,
                "rounds_us": {str(k): v for k, v in self.rounds_us.items()}}


def interleaved_us(fns: dict, rounds: int, reps: int) -> dict:
    """{key: [µs per call in each round]}, the variants run in a rotating order in every round."""
    keys = list(fns)
    for k in keys:  # warm-up
        fns[k]()
    out = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            out[k].append(per_call_us(fns[k], reps))
    return out


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Median of b - a over rounds and its standard error (MAD based)."""
    d = [y - x for x, y in zip(a, b)]
    med = statistics.median(d)
    mad = statistics.median(abs(x - med) for x in d)
    return med, 1.4826 * mad / math.sqrt(len(d))


def ablate_writes(engine, batch, *, graph: bool, repeats=(0, 1, 2), rounds: int = 7,
                  target_ms: float = 30.0, step_us_hint: float | None = None) -> Ablation:
    """Time the step on `batch` with each write setting in `repeats` (must include 0 and 1).

    `target_ms` sets `reps` so that one timed block lasts about that long (from `step_us_hint`).
    Leaves ``write_repeats`` at 1.
    """
    if 0 not in repeats or 1 not in repeats:
        raise ValueError(f"repeats must include 0 and 1, got {repeats}")
    runner = engine.runner
    attn = runner.attn
    fns, graphs = {}, []
    try:
        for n in repeats:
            attn.write_repeats = n
            fn = runner.decode_callable(batch.seqs, use_graph=False)
            if graph:
                g = capture_graph(fn)
                graphs.append(g)
                fns[n] = g.replay
            else:
                fns[n] = _with_repeats(attn, n, fn)
        attn.write_repeats = 1
        hint = step_us_hint if step_us_hint and step_us_hint > 0 else per_call_us(fns[1], 1)
        reps = max(1, min(1000, math.ceil(target_ms * 1e3 / hint)))
        runs = interleaved_us(fns, rounds, reps)
    finally:
        attn.write_repeats = 1
        del fns, graphs
    return _result(runs, mode="graph" if graph else "eager", rounds=rounds, reps=reps)


def _result(runs: dict, *, mode: str, rounds: int, reps: int) -> Ablation:
    """The Ablation of interleaved per-round times {setting: [µs, ...]} (settings 0 and 1 at least)."""
    write, noise = _paired(runs[0], runs[1])
    check = _paired(runs[1], runs[2])[0] if 2 in runs else float("nan")
    top = max(runs)
    slope = noise_slope = float("nan")
    if top > 2:
        d, e = _paired(runs[1], runs[top])
        slope, noise_slope = d / (top - 1), e / (top - 1)
    return Ablation(t_us={n: statistics.median(v) for n, v in runs.items()}, write_us=write, check_us=check,
                    noise_us=noise, mode=mode, rounds=rounds, reps=reps, rounds_us=runs, slope_us=slope,
                    slope_noise_us=noise_slope, extra=max(0, top - 1) if top > 2 else 0)


def _with_repeats(attn, n: int, fn):
    """An eager call of `fn` with ``attn.write_repeats = n`` (restored to 1 after)."""
    def call():
        attn.write_repeats = n
        try:
            return fn()
        finally:
            attn.write_repeats = 1
    return call


def ablate_writes_queued(engine, batch, *, repeats=(0, 1, 2), rounds: int = 7) -> Ablation:
    """Method (b) on the *eager* step, queued ahead of the GPU like method (a)'s events.

    Each timed step is launched eagerly behind a GPU sleep long enough for the host to enqueue all
    of it, between two events and with no events inside: T1 - T0 is what the writes add to the
    eager step's device time (each kernel with its own launch and drain, as (a) sees them), and
    comparing it with (a) checks the events against an independent measurement of the same step.
    CUDA only; rounds rotate the order of the settings as in `ablate_writes`.
    """
    from .events import sleep_cycles_per_us  # noqa: PLC0415 - events imports nothing from here

    if 0 not in repeats or 1 not in repeats:
        raise ValueError(f"repeats must include 0 and 1, got {repeats}")
    attn = engine.runner.attn
    fn = engine.runner.decode_callable(batch.seqs, use_graph=False)

    def timed(n: int, hold_us: float) -> tuple[float, float]:
        attn.write_repeats = n
        try:
            if hold_us:
                torch.cuda._sleep(int(hold_us * sleep_cycles_per_us()))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            host_us = (time.perf_counter() - t0) * 1e6
            end.synchronize()
            return start.elapsed_time(end) * 1e3, host_us
        finally:
            attn.write_repeats = 1

    keys = list(repeats)
    host = max(timed(n, 0.0)[1] for n in keys)  # warm-up, and how long one step takes to enqueue
    hold = 3.0 * host + 2000.0
    runs = {n: [] for n in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for n in keys[shift:] + keys[:shift]:
            runs[n].append(timed(n, hold)[0])
    return _result(runs, mode="eager-queued", rounds=rounds, reps=1)
