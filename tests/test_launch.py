"""The direct launch path: skipping the Python layer of Triton's CUDA launcher, or refusing to.

Triton's launchers are imitated by small classes with the same calling convention (a `launch`
attribute that the object's `__call__` hands grid, stream, function, per-kernel constants and the
kernel arguments), so this runs on the CPU; the GPU suite runs the real thing through the ops.
"""

from __future__ import annotations

from miniattn.ops import launch

FUNCTION, METADATA = 0xF00, ("packed",)
ARGS = (0x1000, 0x2000, 7, 128, True)


def _record(calls):
    return lambda *a: calls.append(a)


class TupleLauncher:
    """Like Triton >= 3.5: the kernel arguments arrive as one tuple at the end."""

    global_scratch_size = profile_scratch_size = 0

    def __init__(self, calls):
        self.launch = _record(calls)
        self.annotations = object()  # a per-kernel constant passed on every call

    def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
        self.launch(gx, gy, gz, stream, function, False, False, metadata, launch_metadata, enter, exit_,
                    None, None, self.annotations, args)


class SpreadLauncher(TupleLauncher):
    """Like older Tritons: the kernel arguments spread out at the end."""

    def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
        self.launch(gx, gy, gz, stream, function, False, metadata, enter, exit_, None, *args)


class ScratchLauncher(TupleLauncher):
    """A kernel with global scratch: the buffer depends on the grid, so no direct path."""

    global_scratch_size = 256


class GridDependentLauncher(TupleLauncher):
    """Something in the middle depends on the call: the two recordings disagree."""

    def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
        self.launch(gx, gy, gz, stream, function, [gx * gy * gz], args)


def test_direct_path_passes_what_the_launcher_would():
    for cls in (TupleLauncher, SpreadLauncher):
        calls = []
        run = cls(calls)
        fast = launch._c_launch(run, FUNCTION, METADATA, ARGS)
        assert fast is not None and fast.kind == "launch_c"
        assert calls == []  # recording happened on copies: nothing was launched
        fast(4, 2, 1, 99, *ARGS)
        run(4, 2, 1, 99, FUNCTION, METADATA, None, None, None, *ARGS)  # Triton's own path
        assert len(calls) == 2
        assert calls[0] == calls[1]
        assert all(a is b for a, b in zip(calls[0], calls[1]) if not isinstance(a, (int, tuple)))


def test_direct_path_refused_when_the_launcher_is_not_pure_plumbing():
    for cls in (ScratchLauncher, GridDependentLauncher):
        calls = []
        assert launch._c_launch(cls(calls), FUNCTION, METADATA, ARGS) is None
        assert calls == []

    class NoLaunchAttribute:  # e.g. a launcher that is a C function itself
        def __call__(self, *a):
            raise AssertionError("must not be called")

    assert launch._c_launch(NoLaunchAttribute(), FUNCTION, METADATA, ARGS) is None

    class Raises(TupleLauncher):
        def __call__(self, *a):
            raise RuntimeError("something this code does not know")

    assert launch._c_launch(Raises([]), FUNCTION, METADATA, ARGS) is None


def test_shared_launcher_untouched_by_recording():
    calls = []
    run = TupleLauncher(calls)
    before = dict(vars(run))
    launch._c_launch(run, FUNCTION, METADATA, ARGS)
    assert vars(run) == before
