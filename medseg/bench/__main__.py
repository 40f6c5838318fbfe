"""``python -m medseg.bench``: run the benchmark suite, print a table, write JSON (see :mod:`medseg.bench`)."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medseg.bench import BENCHMARKS
from medseg.bench.report import SCHEMA_VERSION, BenchResult, environment, finite_json, markdown_rows, print_table
from medseg.bench.workload import DEFAULT_CACHE_DIR, BenchOptions
from medseg.io import write_json_atomic

DEFAULT_OUT = Path("outputs/bench/bench.json")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medseg.bench", description="medseg benchmark suite: side-by-side ratios as a table and a JSON file.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: checks that the suite runs (seconds), figures not meaningful")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated benchmarks to run (default: all of {','.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results file (default: {DEFAULT_OUT})")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default: each benchmark's own for the mode and device)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (default: torch's choice); lesion metrics always use 1")
    parser.add_argument("--markdown", action="store_true", help="also print the figures as rows of the README's Performance table")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help=f"generated datasets, reused between runs (default: {DEFAULT_CACHE_DIR})")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        parser.error(f"expected --only to name some of {', '.join(BENCHMARKS)}, got {args.only!r}")
    args.only = names
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"expected --repeats >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"expected --threads >= 1, got {args.threads}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"expected --device auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but no CUDA device is available; use --device cpu")
    return args


def run_suite(options: BenchOptions, names: Sequence[str]) -> tuple[dict[str, BenchResult], dict[str, str]]:
    """Run the named benchmarks in order; a failing one is reported and the others still run.

    Returns:
        name -> result of those that ran, and name -> error message of those that failed.
    """
    results: dict[str, BenchResult] = {}
    errors: dict[str, str] = {}
    for name in names:
        print(f"[medseg.bench] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            result = importlib.import_module(BENCHMARKS[name]).run(options)
        except Exception as err:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            errors[name] = f"{type(err).__name__}: {err}"
            continue
        result.seconds = time.perf_counter() - start
        results[name] = result
        print(f"[medseg.bench] {name} done in {result.seconds:.1f} s", flush=True)
    return results, errors


def payload(env: dict[str, Any], settings: dict[str, Any], results: dict[str, BenchResult], errors: dict[str, str]) -> dict[str, Any]:
    """The JSON document (layout in :mod:`medseg.bench.report`)."""
    benchmarks = {
        name: {"seconds": r.seconds, "settings": r.settings, "details": r.details, "figures": [f.to_dict() for f in r.figures]}
        for name, r in results.items()
    }
    return finite_json({"schema": SCHEMA_VERSION, "environment": env, "settings": settings, "benchmarks": benchmarks, "errors": errors})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns the exit status (1 if a benchmark failed)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    settings = {"quick": args.quick, "device": str(device), "repeats": args.repeats, "threads": torch.get_num_threads(), "only": args.only, "cache_dir": str(args.cache_dir)}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as work:
        options = BenchOptions(device=device, work_dir=Path(work), quick=args.quick, repeats=args.repeats, cache_dir=args.cache_dir)
        results, errors = run_suite(options, args.only)
    print_table(env, results, quick=args.quick)
    if args.markdown:
        print("\n".join(markdown_rows(env, results)))
    document = payload(env, settings, results, errors)
    write_json_atomic(args.out, document)
    print(f"wrote {args.out}")
    for name, message in errors.items():
        print(f"[medseg.bench] {name} failed: {message}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
