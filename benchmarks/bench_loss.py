"""Forward + backward time and peak memory: medseg ``FocalDiceLoss`` against MONAI ``DiceFocalLoss``.

The benchmark lives in :mod:`medseg.bench.loss` (also run by ``python -m medseg.bench``); this script runs
it alone::

    python benchmarks/bench_loss.py                 # full size (about a minute on 2 CPU cores)
    python benchmarks/bench_loss.py --quick         # tiny shapes, a few seconds
    python benchmarks/bench_loss.py --out bench.json --repeats 7 --device cuda
    python benchmarks/bench_loss.py --threads 1     # steadier CPU timings on a machine shared with others
"""

from __future__ import annotations

from medseg.bench.loss import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
