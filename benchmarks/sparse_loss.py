#!/usr/bin/env python
"""The loss against a sparse teacher against the dense call, side by side: ``loss_and_gradient`` on one thread,
timed interleaved in one run (class-index labels, T=3, alpha=0.3), the cache the teacher's top K classes.

Issue 17's target: a K = 64 cache at least 1.3x faster than the dense teacher at 64x32000 and 8x128256 float32
(it reads one B x V array instead of two and takes one exponential fewer per element). The last column is the
cost of a cache whose teacher is 1e-3 per logit from the student, against that of an independent one: rows so close
are taken relative, float32 from normalisers in double, float64 in double-double (issue 20, sparse_kl.hpp).

    python benchmarks/sparse_loss.py [--shapes 64x32000:float32 ...] [--k 64] [--budget 1]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import kdloss
import numpy as np
from kdloss._bench import fmt_time, measure_interleaved

DEFAULT_SHAPES = ["64x32000:float32", "8x128256:float32", "64x32000:float64"]
TEMPERATURE, ALPHA = 3.0, 0.3
SPEEDUP_TARGET = 1.3  # dense time / sparse time, float32


def parse_shape(text: str) -> Tuple[Tuple[int, int], str]:
    shape, _, dtype = text.partition(":")
    rows, _, classes = shape.partition("x")
    if not (rows.isdigit() and classes.isdigit()) or dtype not in ("float32", "float64"):
        raise argparse.ArgumentTypeError(f"expected ROWSxCLASSES:float32|float64, got {text!r}")
    return (int(rows), int(classes)), dtype


def top_k_cache(teacher: np.ndarray, k: int) -> kdloss.SparseTeacher:
    """The k most probable classes of each row and their log-softmax at TEMPERATURE (NumPy, in float64)."""
    scaled = teacher.astype(np.float64) / TEMPERATURE
    top = scaled.max(axis=-1, keepdims=True)
    log_softmax = scaled - top - np.log(np.exp(scaled - top).sum(axis=-1, keepdims=True))
    indices = np.argpartition(-scaled, k - 1, axis=-1)[..., :k]
    logprobs = np.take_along_axis(log_softmax, indices, axis=-1)
    return kdloss.SparseTeacher(indices.astype(np.int32), logprobs.astype(teacher.dtype))


def candidates(shape: Tuple[int, int], dtype: str, k: int) -> Dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    student = (rng.normal(size=shape) * 2).astype(dtype)
    teacher = (rng.normal(size=shape) * 2).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    cache = top_k_cache(teacher, k)
    near = top_k_cache((student + rng.normal(size=shape) * 1e-3).astype(dtype), k)
    out = np.empty_like(student)
    kd = kdloss.DistillationLoss(TEMPERATURE, ALPHA, num_threads=1)
    return {
        "dense": lambda: kd.loss_and_gradient(student, teacher, labels, out=out),
        "sparse": lambda: kd.loss_and_gradient(student, cache, labels, out=out),
        "near": lambda: kd.loss_and_gradient(student, near, labels, out=out),
    }


def run_sparse(shapes: List[str], k: int, budget: float) -> List[Dict[str, Any]]:
    print(f"\nSparse teacher (top {k}) against the dense one, loss_and_gradient on one thread (labels, T=3, alpha=0.3)")
    print(f"{'shape':<19} {'dtype':<8} {'dense':>12} {'sparse':>12} {'dense/sparse':>13}       {'near/sparse':>11}")
    cells = []
    for text in shapes:
        shape, dtype = parse_shape(text)
        stats = measure_interleaved(candidates(shape, dtype, k), budget, 5, 200, 0.0)
        dense, sparse, near = (stats[name]["median_s"] for name in ("dense", "sparse", "near"))
        shape_text = f"{shape[0]}x{shape[1]}"
        verdict = "" if dtype != "float32" else ("  ok" if dense / sparse >= SPEEDUP_TARGET else "  MISS")
        times = f"{fmt_time(dense):>12} {fmt_time(sparse):>12}"
        ratios = f"{dense / sparse:12.2f}x{verdict:<6} {near / sparse:10.2f}x"
        print(f"{shape_text:<19} {dtype:<8} {times} {ratios}", flush=True)
        cells.append(
            {"shape": shape_text, "dtype": dtype, "k": k, "dense_s": dense, "sparse_s": sparse, "near_s": near}
        )
    print(f"(target, issue 17: float32 at least {SPEEDUP_TARGET}x)")
    return cells


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="ROWSxCLASSES:DTYPE")
    parser.add_argument("--k", type=int, default=64, help="classes the cache lists a row (default 64)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per candidate and shape (default 1)")
    args = parser.parse_args(argv)
    run_sparse(args.shapes, args.k, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
