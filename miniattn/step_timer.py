"""Named time regions inside one model step: CUDA events on the GPU, perf_counter on the CPU.

A `StepTimer` is passed explicitly (in `AttentionMetadata.timer`, or to `ModelRunner.decode`); the
timed code wraps its parts in ``with region(timer, "write", layer):``. With ``timer=None`` that is a
shared no-op context, so the untimed hot path pays one function call per region.

Regions recorded by the model and the attention backend:

    "step"              a whole forward (embedding to logits), or a whole graph replay
    "embed", "head"     token embedding; final norm + LM head
    "layer" (per layer) one decoder layer, which holds
    "write" (per layer) the KV-cache write(s)
    "attn"  (per layer) attention (prefill kernel or paged decode)

so a layer's "other" time (projections, rotary, MLP, norms) is ``layer - write - attn``. On CUDA a
region records two events and never synchronises; `results` synchronises once. Events cannot time
the inside of a CUDA graph: time a captured step as a whole and get the split from an eager step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

__all__ = ["StepTimer", "TimedRegion", "region"]

_NULL = nullcontext()


@dataclass(frozen=True)
class TimedRegion:
    """One finished region: its name, layer index (None outside layers) and time in ms."""

    name: str
    layer: int | None
    ms: float


class StepTimer:
    """Collects named, optionally per-layer, regions over one or more steps.

    Parameters
    ----------
    device : the device whose work is timed; a CUDA device uses events, anything else perf_counter.

    Example
    -------
    >>> t = StepTimer("cpu")
    >>> with t.region("write", 0):
    ...     pass
    >>> [(r.name, r.layer) for r in t.results()]
    [('write', 0)]
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._pending: list[tuple[str, int | None, object, object]] = []
        self._done: list[TimedRegion] = []

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    @contextmanager
    def region(self, name: str, layer: int | None = None):
        """Time the body of the ``with`` as region `name` (of `layer`)."""
        start = self._mark()
        try:
            yield
        finally:
            self._pending.append((name, layer, start, self._mark()))

    def results(self) -> list[TimedRegion]:
        """Every region so far, in the order they ended (synchronises the device once)."""
        if self._pending:
            if self.cuda:
                self._pending[-1][3].synchronize()
                self._done += [TimedRegion(n, l, s.elapsed_time(e)) for n, l, s, e in self._pending]
            else:
                self._done += [TimedRegion(n, l, (e - s) * 1e3) for n, l, s, e in self._pending]
            self._pending.clear()
        return list(self._done)

    def reset(self) -> None:
        """Forget everything recorded."""
        self._pending.clear()
        self._done.clear()

    def totals(self) -> dict[str, float]:
        """ms summed per region name (all layers, all recorded steps)."""
        out: dict[str, float] = defaultdict(float)
        for r in self.results():
            out[r.name] += r.ms
        if "layer" in out:
            out["other"] = out["layer"] - out.get("write", 0.0) - out.get("attn", 0.0)
        return dict(out)

    def per_layer(self) -> dict[int, dict[str, float]]:
        """``{layer: {"layer", "write", "attn", "other"}}`` in ms summed over recorded steps."""
        acc: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for r in self.results():
            if r.layer is not None:
                acc[r.layer][r.name] += r.ms
        out = {}
        for layer, d in sorted(acc.items()):
            d["other"] = d.get("layer", 0.0) - d.get("write", 0.0) - d.get("attn", 0.0)
            out[layer] = dict(d)
        return out


def region(timer: StepTimer | None, name: str, layer: int | None = None):
    """``timer.region(name, layer)``, or a shared no-op context when `timer` is None."""
    return _NULL if timer is None else timer.region(name, layer)
