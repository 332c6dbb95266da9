#!/usr/bin/env python
"""The exact pass's cost (issue 20): ``loss_and_gradient`` where every row is computed again (a student within 1e-3
of the teacher per logit at T = 1, and independent logits at T = 1e3), and where some are (a teacher 0.3 per logit
from the student, T = 1), against an ordinary call (independent logits, T = 3), per divergence, on one thread, timed
interleaved in one run (class-index labels, alpha 0.3).

    python benchmarks/exact_rows.py [--shape 64x32000] [--dtype float32] [--budget 1]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional

import kdloss
import numpy as np
from kdloss._bench import fmt_time, measure_interleaved

CASES = ["close, T=1", "near match, T=1", "T=1e3"]


def candidates(shape: tuple, dtype: str, divergence: str) -> Dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    teacher = (rng.normal(size=shape) * 2).astype(dtype)
    near = (teacher + rng.normal(size=shape) * 1e-3).astype(dtype)
    close = (teacher + rng.normal(size=shape) * 0.3).astype(dtype)
    independent = (rng.normal(size=shape) * 2).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    out = np.empty_like(teacher)

    def call(temperature: float, student: np.ndarray) -> Callable[[], Any]:
        kd = kdloss.DistillationLoss(temperature, 0.3, num_threads=1, divergence=divergence)
        return lambda: kd.loss_and_gradient(student, teacher, labels, out=out)

    return {
        "ordinary, T=3": call(3.0, independent),
        "close, T=1": call(1.0, close),
        "near match, T=1": call(1.0, near),
        "T=1e3": call(1e3, independent),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="64x32000", help="ROWSxCLASSES (default 64x32000)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per candidate (default 1)")
    args = parser.parse_args(argv)
    rows, _, classes = args.shape.partition("x")
    shape = (int(rows), int(classes))
    print(f"loss_and_gradient, {args.shape} {args.dtype}, one thread: some rows of the first case computed again,")
    print("every row of the last two")
    print(f"{'divergence':<16} {'ordinary, T=3':>14}" + "".join(f" {name:>16} {'ratio':>6}" for name in CASES))
    for divergence in kdloss._core.divergence_names:
        stats = measure_interleaved(candidates(shape, args.dtype, divergence), args.budget, 3, 15, 0.0)
        ordinary = stats["ordinary, T=3"]["median_s"]
        cells = "".join(
            f" {fmt_time(stats[name]['median_s']):>16} {stats[name]['median_s'] / ordinary:5.1f}x" for name in CASES
        )
        print(f"{divergence:<16} {fmt_time(ordinary):>14}{cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
