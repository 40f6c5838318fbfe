"""Measuring helpers shared by the benchmarks: alternating timings, CUDA synchronisation, peak memory.

Timing: every contender runs ``warmup`` times first (allocator, oneDNN primitives, cuDNN algorithm search),
then the contenders take turns step by step, in ABBA order, so that load from other processes and cache
effects hit all of them alike; the median and the minimum of each contender's times are reported.

Peak memory: the largest amount of tensor memory allocated inside a window beyond what was allocated when
it opened (tensors that exist before, such as inputs and weights, are excluded; everything the window
creates, gradients included, counts). CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation and
free events that ``torch.profiler`` records with ``profile_memory=True`` (every tensor allocation through
torch's CPU allocator), summed in time order. Process RSS is not used for this: it never shrinks and
counts the allocator's caching; NumPy buffers are not torch tensors and are not counted (see
:func:`peak_rss_growth` for a whole-process figure).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK_RSS = "5"  # writing this to clear_refs resets the process's peak RSS (Linux >= 4.0)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    sync(device)
    return time.perf_counter()


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed runs of one contender (warm-up runs excluded)."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)


def time_alternating(contenders: Mapping[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time contenders that take turns: ``warmup`` untimed runs each, then ``repeats`` timed runs each.

    The order alternates every round (A B, B A, A B, ...), so that neither contender always runs right
    after the other.

    Args:
        contenders: name -> a function doing one unit of work (a training step, a case, ...).
        device: where the work runs (CUDA is synchronised before and after each run).
        repeats: timed runs per contender, >= 1.
        warmup: untimed runs per contender first, >= 0.

    Returns:
        name -> its :class:`Timing`.

    Raises:
        ValueError: ``repeats < 1``, ``warmup < 0`` or no contender.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"expected repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not contenders:
        raise ValueError("expected at least one contender, got none")
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    order = list(contenders.items())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            start = clock(device)
            fn()
            times[name].append(clock(device) - start)
    return {name: Timing(tuple(t)) for name, t in times.items()}


class PeakMemory:
    """Peak tensor bytes allocated between :meth:`start` and :meth:`stop` beyond those allocated at start.

    Usable as a context manager (``with PeakMemory(device) as peak: ...; peak.bytes``) or, where the window
    opens and closes in different hooks (a Lightning callback), with ``start()`` and ``stop()``. ``bytes``
    is ``None`` when this torch cannot record CPU allocation events.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self._before = 0
        self._profiler = None

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
            return self.bytes
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            raise RuntimeError("PeakMemory.stop() called before start()")
        profiler.__exit__(None, None, None)
        self.bytes = _cpu_peak(profiler)
        return self.bytes

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak tensor bytes allocated while ``fn()`` runs beyond those allocated before (see module doc)."""
    with PeakMemory(device) as peak:
        fn()
    return peak.bytes


def _cpu_peak(profiler: torch.profiler.profile) -> int | None:
    """Peak of the running sum of the CPU allocation events a finished profiler recorded.

    Only blocks allocated inside the window count: the free of a block allocated before it is left out
    (torch records it as a negative size when an earlier profiling session saw the allocation).
    """
    try:  # the event tree is torch's own (semi-private) view of the recorded events
        from torch._C._profiler import _EventType

        events: list[tuple[int, int, int]] = []  # (time ns, address, bytes; negative: freed)
        stack = list(profiler.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
            stack.extend(event.children)
    except (AttributeError, ImportError, RuntimeError) as error:  # a torch without this API
        print(f"warning: CPU peak memory not measured ({error})", file=sys.stderr)
        return None
    live: dict[int, int] = {}  # address -> bytes of the blocks allocated in the window and not yet freed
    current = peak = 0
    for _, address, size in sorted(events):
        if size > 0:
            live[address] = size
            current += size
        elif address in live:
            current -= live.pop(address)
        peak = max(peak, current)
    return peak


def peak_rss_growth(fn: Callable[[], object]) -> int | None:
    """How far the process's resident memory rose above its level at the start while ``fn()`` ran.

    Counts everything (NumPy buffers, torch tensors, allocator caches, freshly imported code), so it is
    context for whole-pipeline steps, not a tensor-memory figure. Linux only (the peak is reset through
    ``/proc/self/clear_refs``); ``None`` elsewhere.
    """
    try:
        _PROC_CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        before = _proc_status_kib("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def _proc_status_kib(key: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise OSError(f"expected {key} in {_PROC_STATUS}, got none")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (``None``: unchanged), restored after it."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
