"""Forward + backward time and peak memory: medseg ``FocalDiceLoss`` against MONAI ``DiceFocalLoss``.

Two cases, as in issue 3: sigmoid logits ``(2, 3, 128, 128, 128)`` with a multi-hot target, and softmax
logits ``(2, 4, 128, 128, 128)`` with class indices ``(2, 1, 128, 128, 128)`` (stored as float, as MONAI
pipelines give them). Both losses run with gamma = 2, lambdas 1, every channel in both terms. In softmax
mode MONAI's focal term is still sigmoid-based (MONAI issue #8242): same inputs, not the same loss.

What is measured, per case and implementation:

- time: wall-clock seconds of ``loss = fn(logits, target); loss.backward()`` (CUDA synchronised), after
  one warm-up step; the two implementations alternate, so that load from other processes hits both; the
  median and the minimum over ``--repeats`` steps are reported.
- peak memory: the largest amount of tensor memory allocated during one such step beyond what was
  allocated before it (inputs excluded; the logits' gradient, which both must produce, included).
  CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events that
  ``torch.profiler`` records with ``profile_memory=True`` (every tensor allocation through torch's CPU
  allocator), summed in time order; process RSS is not used (it never shrinks and counts the allocator's
  caching).

Usage::

    python benchmarks/bench_loss.py                 # full size (about a minute on 2 CPU cores)
    python benchmarks/bench_loss.py --quick         # tiny shapes, a few seconds (used by the tests)
    python benchmarks/bench_loss.py --out bench.json --repeats 7 --device cuda
    python benchmarks/bench_loss.py --threads 1     # steadier CPU timings on a machine shared with others

On a loaded machine every multi-threaded op may wait for a descheduled worker thread (milliseconds), which
adds noise to both implementations; ``--threads 1`` measures the arithmetic alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

FULL_SIZE = (128, 128, 128)
QUICK_SIZE = (16, 16, 16)


def make_case(mode: str, size: tuple[int, ...], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and target for one case: about 15% foreground, the rest background."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "sigmoid":
        logits = torch.randn((2, 3, *size), generator=generator)  # (B, C, D, H, W)
        target = (torch.rand((2, 3, *size), generator=generator) < 0.15).float()  # (B, C, D, H, W) multi-hot
    else:
        logits = torch.randn((2, 4, *size), generator=generator)  # (B, C, D, H, W)
        fg = torch.rand((2, 1, *size), generator=generator) < 0.15
        target = torch.where(fg, torch.randint(1, 4, (2, 1, *size), generator=generator), 0).float()  # (B, 1, D, H, W)
    return logits.to(device).requires_grad_(), target.to(device)


def make_losses(mode: str) -> dict[str, Callable]:
    """The two implementations with matching settings."""
    from monai.losses import DiceFocalLoss

    from medseg.losses import FocalDiceLoss

    ours = FocalDiceLoss(mode, gamma=2.0, include_background=True)
    if mode == "sigmoid":
        monai = DiceFocalLoss(sigmoid=True, gamma=2.0)
    else:
        monai = DiceFocalLoss(softmax=True, to_onehot_y=True, gamma=2.0)
    return {"medseg": ours, "monai": monai}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> float:
    """One forward + backward; returns the loss value."""
    loss = fn(logits, target)
    loss.backward()
    logits.grad = None
    return float(loss.detach())


def peak_memory(fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> int | None:
    """Peak tensor bytes allocated during one step beyond those allocated before it (see module doc)."""
    device = logits.device
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(fn, logits, target)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak(lambda: step(fn, logits, target))


def _cpu_peak(run: Callable[[], object]) -> int | None:
    """Peak of the running sum of the CPU allocation events torch.profiler records during ``run``."""
    from torch.profiler import ProfilerActivity, profile

    try:  # the event tree is torch's own (semi-private) view of the recorded events
        from torch._C._profiler import _EventType

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        events: list[tuple[int, int]] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.alloc_size))
            stack.extend(event.children)
    except (AttributeError, ImportError, RuntimeError) as error:  # a torch without this API
        print(f"warning: CPU peak memory not measured ({error})", file=sys.stderr)
        return None
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def bench_case(mode: str, size: tuple[int, ...], device: torch.device, repeats: int) -> dict:
    """Times, peak memory and loss values of both implementations for one case."""
    logits, target = make_case(mode, size, device)
    losses = make_losses(mode)
    result: dict = {"mode": mode, "logits_shape": list(logits.shape), "target_shape": list(target.shape), "impls": {}}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for name, fn in losses.items():  # warm-up, and the values for the record
        result["impls"][name] = {"loss": step(fn, logits, target)}
    for _ in range(repeats):
        for name, fn in losses.items():
            _sync(device)
            start = time.perf_counter()
            step(fn, logits, target)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for name, fn in losses.items():
        peak = peak_memory(fn, logits, target)
        result["impls"][name].update(
            time_median_s=statistics.median(times[name]),
            time_min_s=min(times[name]),
            times_s=times[name],
            peak_bytes=peak,
        )
    ours, theirs = result["impls"]["medseg"], result["impls"]["monai"]
    result["ratio_time_median"] = ours["time_median_s"] / theirs["time_median_s"]
    result["ratio_time_min"] = ours["time_min_s"] / theirs["time_min_s"]
    both = ours["peak_bytes"] is not None and theirs["peak_bytes"] is not None and theirs["peak_bytes"] > 0
    result["ratio_peak_memory"] = ours["peak_bytes"] / theirs["peak_bytes"] if both else None
    return result


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _print(results: dict) -> None:
    versions = f"torch {results['torch']}, monai {results['monai']}"
    print(f"device {results['device']}, {results['threads']} threads, {versions}, {results['repeats']} repeats")
    print(f"{'case':<30} {'impl':<7} {'loss':>9} {'median ms':>10} {'min ms':>9} {'peak MiB':>9}")
    for case in results["cases"]:
        label = f"{case['mode']} {tuple(case['logits_shape'])}"
        for name, r in case["impls"].items():
            times = f"{1e3 * r['time_median_s']:>10.1f} {1e3 * r['time_min_s']:>9.1f}"
            print(f"{label:<30} {name:<7} {r['loss']:>9.5f} {times} {_mib(r['peak_bytes']):>9}")
        memory = "n/a" if case["ratio_peak_memory"] is None else f"{case['ratio_peak_memory']:.2f}"
        time_ratios = f"{case['ratio_time_median']:.2f} (median), {case['ratio_time_min']:.2f} (min)"
        print(f"{'':<30} medseg/monai: time {time_ratios}; peak memory {memory}")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table and the ratios, optionally write JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"spatial size {QUICK_SIZE} instead of {FULL_SIZE}")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per implementation (default 5, quick 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: leave torch's setting)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if repeats < 1:
        parser.error(f"expected --repeats >= 1, got {repeats}")
    device = torch.device(args.device)
    size = QUICK_SIZE if args.quick else FULL_SIZE

    import monai

    results = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "repeats": repeats,
        "quick": args.quick,
        "memory_measure": "cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocation events",
        "cases": [bench_case(mode, size, device, repeats) for mode in ("sigmoid", "softmax")],
    }

    _print(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
