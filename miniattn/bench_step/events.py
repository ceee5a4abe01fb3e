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

`graph_event_split` times the same regions inside the CUDA-graph-replayed step instead, with
"external" timing events captured as event-record nodes of the graph (`GraphRegions`). Both record
an empty region first: what an event pair costs by itself (``empty_us``).

In the graph an event pair is not free (about 2 µs on an H100), and worse, it is not the same
cost as the kernel-to-kernel hand-over it replaces: a kernel that follows an event-record node
starts later than one that follows a kernel. Bracketing a 1.5 µs write with events read ~2.7 µs
over an empty pair on an H200, twice what the ablation finds. So `GraphRegions` guards and
calibrates in place. For each "write" and "attn" region the graph holds

    E0  N  N  E1  N  [region]  N  E2        (N: a null kernel, E: an event-record node)

and ``<name>_net = (E2 - E1) - (E1 - E0)``, replay by replay. Every hand-over around the region
is then kernel-to-kernel, as in the step without events, and the calibration has the same event
and null-kernel hand-overs: what is left is the region's kernels plus one kernel-to-kernel gap,
which is what removing them from the graph would save if a kernel's cost did not depend on its
neighbours. At ~2 µs it does (benchmarks/README.md, "Session 3"): guarded events read 1.8-2.4 µs
for the H200's NHD write, against 2.5-3.4 unguarded and 1.0-2.3 by the ablations.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..step_timer import StepTimer
from ..timing import capture_graph

__all__ = ["EventSplit", "event_split", "graph_event_split", "GraphRegions", "CALIBRATED", "sleep_cycles_per_us"]

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
    mode: str = "eager"  # "eager", or "graph" (events captured in the replayed graph)
    empty_us: float = float("nan")  # an empty region: the event pair's own cost
    host_enqueue_us: float = float("nan")
    per_rep_step_us: list[float] = field(default_factory=list)

    def total(self, name: str) -> float:
        """A component summed over layers (µs); NaN when a layer lacks it (no calibration regions)."""
        return sum(d.get(name, float("nan")) for d in self.layers)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "step_us": self.step_us, "outside_us": self.outside_us,
                "queued_ahead": self.queued_ahead, "reps": self.reps, "mode": self.mode, "empty_us": self.empty_us,
                "host_enqueue_us": self.host_enqueue_us, "per_rep_step_us": self.per_rep_step_us}


def _one_step(engine, batch, hold_us: float | None):
    """Timer of one eager step; with `hold_us` the GPU sleeps that long before it (queue ahead)."""
    timer = StepTimer(engine.device)
    gate = None
    if hold_us is not None:
        torch.cuda._sleep(int(hold_us * sleep_cycles_per_us()))
        gate = torch.cuda.Event()
        gate.record()
    t0 = time.perf_counter()
    with timer.region("empty"):
        pass
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
        hold_us = 3.0 * host + 2000.0  # margin for a host hiccup (GC, page faults)
    runs, ahead_all = [], True
    for _ in range(reps):
        timer, ahead, host_us = _one_step(engine, batch, hold_us)
        ahead_all &= ahead
        runs.append([(r.name, r.layer, r.ms * 1e3) for r in timer.results()])
    return _summarise(runs, mode="eager", queued_ahead=bool(cuda and queue_ahead and ahead_all), host_us=host)


def _summarise(runs, *, mode: str, queued_ahead: bool, host_us: float = float("nan")) -> EventSplit:
    """Medians over reps of per-layer regions; `runs` holds one [(name, layer, µs)] list per step."""
    steps = [sum(us for n, l, us in run if n == "step" and l is None) for run in runs]
    empty = statistics.median(sum(us for n, _, us in run if n == "empty") for run in runs)
    per_layer = []
    for run in runs:
        acc: dict = {}
        for name, layer, us in run:
            if layer is not None:
                acc.setdefault(layer, {}).setdefault(name, 0.0)
                acc[layer][name] += us
        per_layer.append(acc)
    layers = []
    for i in sorted(per_layer[0]):
        d = {k: statistics.median(run[i].get(k, 0.0) for run in per_layer) for k in ("write", "attn", "layer")}
        d["rest"] = d["layer"] - d["write"] - d["attn"]
        for k in CALIBRATED:  # region minus the empty region just before it, per replay, then the median
            if f"{k}:empty" in per_layer[0][i]:
                d[f"{k}_empty"] = statistics.median(run[i][f"{k}:empty"] for run in per_layer)
                d[f"{k}_net"] = statistics.median(run[i][k] - run[i][f"{k}:empty"] for run in per_layer)
        if "write:empty" in per_layer[0][i]:  # the calibration regions belong to neither write nor attn
            d["rest"] -= d["write_empty"] + d.get("attn_empty", 0.0)
        layers.append(d)
    step = statistics.median(steps)
    return EventSplit(layers=layers, step_us=step, outside_us=step - sum(d["layer"] for d in layers),
                      queued_ahead=queued_ahead, reps=len(runs), mode=mode, empty_us=empty,
                      host_enqueue_us=host_us, per_rep_step_us=steps)


#: regions that get an empty calibration region just before them in the graph ("<name>:empty")
CALIBRATED = ("write", "attn")


class GraphRegions:
    """`StepTimer`'s ``region(name, layer)`` with external timing events, so a graph can hold them.

    While `active` is False regions record nothing (warm-up runs). After a replay and a synchronize,
    `read` gives ``[(name, layer, µs)]`` of that replay. A region named in `CALIBRATED` is preceded
    by an empty one, ``"<name>:empty"``, whose end event is the region's start event; `guard`
    (a null-kernel launch) puts kernels between every event and the regions' own kernels.
    """

    def __init__(self, guard=None):
        self.active = False
        self.guard = guard  # launches a null kernel (None: calibrate without guards)
        self.marks: list[tuple[str, int | None, object, object]] = []

    @staticmethod
    def _event():
        ev = torch.cuda.Event(enable_timing=True, external=True)
        ev.record()
        return ev

    @contextmanager
    def region(self, name: str, layer: int | None = None):
        if not self.active:
            yield
            return
        start = self._event()
        calibrated, guard = name in CALIBRATED, self.guard or (lambda: None)
        if calibrated:  # E0 N N E1 N [region] N E2 (see the module docstring)
            guard()
            guard()
            empty_end = self._event()
            self.marks.append((f"{name}:empty", layer, start, empty_end))
            start = empty_end
            guard()
        try:
            yield
        finally:
            if calibrated:
                guard()
            self.marks.append((name, layer, start, self._event()))

    def read(self) -> list[tuple[str, int | None, float]]:
        return [(n, l, s.elapsed_time(e) * 1e3) for n, l, s, e in self.marks]


def null_kernel() -> None:
    """Launch a kernel that does nothing (one thread; `torch.cuda._sleep` of 0 cycles)."""
    torch.cuda._sleep(0)


def graph_event_split(engine, batch, reps: int = 5) -> EventSplit:
    """The per-layer regions of the step replayed from a CUDA graph that holds the events.

    The event-record nodes sit between the kernels of the graph, so each region times its nodes as
    the graph runs them (no launch gaps); "write" and "attn" are guarded and calibrated in place.
    """
    runner = engine.runner
    ids, b = runner.prepare_decode(batch.seqs)
    timer = GraphRegions(guard=null_kernel)

    @torch.no_grad()
    def step():
        with timer.region("empty"):
            pass
        with timer.region("step"):
            return runner.forward_decode(ids, b, timer)

    def timed_step():  # the events go into the graph only: the warm-up steps record none
        timer.active = True
        try:
            return step()
        finally:
            timer.active = False

    g = capture_graph(timed_step, warmup=step)
    runs = []
    for _ in range(reps + 1):
        g.replay()
        torch.cuda.synchronize()
        runs.append(timer.read())
    return _summarise(runs[1:], mode="graph", queued_ahead=True)
