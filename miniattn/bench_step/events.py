"""Method (a): CUDA events around each component inside the real eager decode step.

`event_split` runs ``engine.decode_step(batch, timer=StepTimer, use_graph=False)`` a few times and
takes, per layer, the median of each region ("write", "attn", "layer"; rest = layer - write -
attn) and of the whole step.

Eager launches come from Python, so when the GPU is faster than the host it waits between kernels
and an event pair times that wait too: a 4 µs write kernel can read as 15 µs. With
``queue_ahead=True`` the step is queued behind a GPU sleep (`torch.cuda._sleep`) long enough for
the host to enqueue the whole step first, so the regions time device work alone (plus the events
themselves). Whether the queue really stayed ahead is checked (the sleep must still be running when
the last launch returns) and reported as ``queued_ahead``; a step that synchronises inside (the
torch reference reads lengths on the host) cannot be queued ahead. On a CPU the regions are
wall-clock times of synchronous work.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..step_timer import StepTimer

__all__ = ["EventSplit", "event_split", "sleep_cycles_per_us"]

_CYCLES_PER_US: float | None = None


def sleep_cycles_per_us() -> float:
    """GPU clock cycles of `torch.cuda._sleep` per µs, measured once per process."""
    global _CYCLES_PER_US
    if _CYCLES_PER_US is None:
        cycles = 2_000_000
        torch.cuda._sleep(cycles // 10)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES_PER_US = cycles / (start.elapsed_time(end) * 1e3)
    return _CYCLES_PER_US


@dataclass
class EventSplit:
    """Median per-layer regions (µs) of `reps` eager steps, and the step's own region.

    layers : per layer ``{"write", "attn", "rest", "layer"}`` in µs.
    step_us : the forward's "step" region (embedding to logits).
    outside_us : step minus the layers (embedding, final norm, LM head, gaps between them).
    queued_ahead : every timed step was fully queued before the GPU reached it (CUDA only).
    """

    layers: list[dict[str, float]]
    step_us: float
    outside_us: float
    queued_ahead: bool
    reps: int
    host_enqueue_us: float = float("nan")
    per_rep_step_us: list[float] = field(default_factory=list)

    def total(self, name: str) -> float:
        """A component summed over layers (µs)."""
        return sum(d[name] for d in self.layers)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "step_us": self.step_us, "outside_us": self.outside_us,
                "queued_ahead": self.queued_ahead, "reps": self.reps, "host_enqueue_us": self.host_enqueue_us,
                "per_rep_step_us": self.per_rep_step_us}


def _one_step(engine, batch, hold_us: float | None):
    """Timer of one eager step; with `hold_us` the GPU sleeps that long before it (queue ahead)."""
    timer = StepTimer(engine.device)
    gate = None
    if hold_us is not None:
        torch.cuda._sleep(int(hold_us * sleep_cycles_per_us()))
        gate = torch.cuda.Event()
        gate.record()
    t0 = time.perf_counter()
    engine.decode_step(batch, timer=timer, use_graph=False)
    host_us = (time.perf_counter() - t0) * 1e6
    ahead = gate is not None and not gate.query()  # the GPU was still asleep when the last launch returned
    timer.results()  # synchronises
    return timer, ahead, host_us


def event_split(engine, batch, reps: int = 5, queue_ahead: bool = True) -> EventSplit:
    """Per-layer write / attention / rest of the eager step on `batch` (see the module docstring).

    The caller has warmed the step up (kernels compiled). `queue_ahead` applies on CUDA only.
    """
    cuda = engine.device.type == "cuda"
    hold_us = None
    host = float("nan")
    if cuda and queue_ahead:
        _, _, host = _one_step(engine, batch, None)  # how long the host takes to enqueue one step
        hold_us = 2.0 * host + 500.0
    steps, layer_runs, ahead_all = [], [], True
    for _ in range(reps):
        timer, ahead, host_us = _one_step(engine, batch, hold_us)
        ahead_all &= ahead
        tot = timer.totals()
        steps.append(tot["step"] * 1e3)
        layer_runs.append({i: {k: v * 1e3 for k, v in d.items()} for i, d in timer.per_layer().items()})
    layers = []
    for i in sorted(layer_runs[0]):
        d = {k: statistics.median(run[i].get(k, 0.0) for run in layer_runs) for k in ("write", "attn", "layer")}
        d["rest"] = d["layer"] - d["write"] - d["attn"]
        layers.append(d)
    step = statistics.median(steps)
    return EventSplit(layers=layers, step_us=step, outside_us=step - sum(d["layer"] for d in layers),
                      queued_ahead=bool(cuda and queue_ahead and ahead_all), reps=reps,
                      host_enqueue_us=host, per_rep_step_us=steps)
