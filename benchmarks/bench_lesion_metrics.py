"""Time the lesion-wise metrics on one BraTS-sized case (240x240x155, about 100 lesions) on one CPU core.

The benchmark lives in :mod:`medseg.bench.lesion` (also run by ``python -m medseg.bench``); this script runs
it alone from the project root::

    python benchmarks/bench_lesion_metrics.py            # full case, 5 repeats
    python benchmarks/bench_lesion_metrics.py --quick    # small case, 1 repeat (a smoke run)
"""

from __future__ import annotations

from medseg.bench.lesion import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
