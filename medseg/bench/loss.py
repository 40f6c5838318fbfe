"""Loss: forward + backward time and peak memory of medseg's ``FocalDiceLoss`` against MONAI's
``DiceFocalLoss``.

Two cases, as in issue 3: sigmoid logits ``(2, 3, 128, 128, 128)`` with a multi-hot target, and softmax
logits ``(2, 4, 128, 128, 128)`` with class indices ``(2, 1, 128, 128, 128)`` (stored as float, as MONAI
pipelines give them). Both losses run with gamma = 2, lambdas 1, every channel in both terms. In softmax
mode MONAI's focal term is still sigmoid-based (MONAI issue #8242): same inputs, not the same loss.

What is measured, per case and implementation (helpers of :mod:`medseg.bench.timing`):

- time: wall-clock seconds of ``loss = fn(logits, target); loss.backward()`` (CUDA synchronised), after
  one warm-up step; the two implementations alternate; median and minimum over ``repeats`` steps.
- peak memory: tensor memory allocated during one such step beyond what was allocated before it (inputs
  excluded; the logits' gradient, which both must produce, included).

Alone: ``python benchmarks/bench_loss.py [--quick] [--repeats N] [--device cuda] [--threads 1] [--out FILE]``;
in the suite: ``python -m medseg.bench --only loss``. On a loaded machine every multi-threaded op may wait
for a descheduled worker thread (milliseconds), which adds noise to both implementations; ``--threads 1``
measures the arithmetic alone.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from medseg.bench.report import BenchResult, Contender, Figure, Goal
from medseg.bench.timing import Timing, peak_memory, time_alternating, torch_threads
from medseg.bench.workload import BenchOptions

NAME = "loss"
FULL_SIZE = (128, 128, 128)
QUICK_SIZE = (16, 16, 16)
MODES = ("sigmoid", "softmax")
REPEATS = {"quick": 3, "cpu": 5, "gpu": 20}
# Not slower and not larger than the library loss it replaces.
GOAL = Goal("<=", 1.0)


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


def step(fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> float:
    """One forward + backward; returns the loss value."""
    loss = fn(logits, target)
    loss.backward()
    logits.grad = None
    return float(loss.detach())


def bench_case(mode: str, size: tuple[int, ...], device: torch.device, repeats: int) -> dict:
    """Times, peak memory and loss values of both implementations for one case."""
    logits, target = make_case(mode, size, device)
    losses = make_losses(mode)
    result: dict = {"mode": mode, "logits_shape": list(logits.shape), "target_shape": list(target.shape), "impls": {}}
    for name, fn in losses.items():  # warm-up, and the values for the record
        result["impls"][name] = {"loss": step(fn, logits, target)}
    steps = {name: (lambda fn=fn: step(fn, logits, target)) for name, fn in losses.items()}
    times = time_alternating(steps, device, repeats, warmup=0)
    for name, run_step in steps.items():
        result["impls"][name].update(
            time_median_s=times[name].median_s,
            time_min_s=times[name].min_s,
            times_s=list(times[name].times_s),
            peak_bytes=peak_memory(run_step, device),
        )
    ours, theirs = result["impls"]["medseg"], result["impls"]["monai"]
    result["ratio_time_median"] = ours["time_median_s"] / theirs["time_median_s"]
    result["ratio_time_min"] = ours["time_min_s"] / theirs["time_min_s"]
    both = ours["peak_bytes"] is not None and theirs["peak_bytes"] is not None and theirs["peak_bytes"] > 0
    result["ratio_peak_memory"] = ours["peak_bytes"] / theirs["peak_bytes"] if both else None
    return result


def figures(cases: list[dict]) -> list[Figure]:
    """One figure per case: medseg against MONAI (time; peak memory in the ratio columns)."""
    rows = []
    for case in cases:
        impls = {name: Contender.from_timing(label, Timing(tuple(r["times_s"])), r["peak_bytes"]) for (name, r), label in zip(case["impls"].items(), ("medseg FocalDiceLoss", "MONAI DiceFocalLoss"))}
        note = "same loss value" if case["mode"] == "sigmoid" else "MONAI's focal term stays sigmoid (MONAI #8242)"
        rows.append(Figure.compare(NAME, f"forward + backward, {case['mode']} {'x'.join(map(str, case['logits_shape']))}", impls["medseg"], impls["monai"], GOAL, note))
    return rows


def run(options: BenchOptions) -> BenchResult:
    """Both cases at full size (quick: 16^3)."""
    size = QUICK_SIZE if options.quick else FULL_SIZE
    repeats = options.repeats_or(REPEATS[options.tier])
    cases = [bench_case(mode, size, options.device, repeats) for mode in MODES]
    return BenchResult(figures(cases), settings={"size": list(size), "repeats": repeats, "gamma": 2.0}, details={"cases": cases})


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
    """The loss benchmark alone: print a table and the ratios, optionally write JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"spatial size {QUICK_SIZE} instead of {FULL_SIZE}")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per implementation (default 5, quick 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: leave torch's setting)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else REPEATS["quick" if args.quick else "cpu"]
    if repeats < 1:
        parser.error(f"expected --repeats >= 1, got {repeats}")
    device = torch.device(args.device)
    size = QUICK_SIZE if args.quick else FULL_SIZE

    import monai

    with torch_threads(args.threads):
        results = {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "python": platform.python_version(),
            "repeats": repeats,
            "quick": args.quick,
            "memory_measure": "cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocation events",
            "cases": [bench_case(mode, size, device, repeats) for mode in MODES],
        }

    _print(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results
