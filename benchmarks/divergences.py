#!/usr/bin/env python
"""The divergences' cost, side by side: each one's ``loss_and_gradient`` against forward KL's, and ``loss_parts``
against ``compute_loss``, on one thread, timed interleaved in one run (class-index labels, T=3, alpha=0.3).

Issue 16's targets: every divergence within 2x of forward KL's time; ``loss_parts`` no dearer than one loss call.
Also the last section of ``bench.py``.

    python benchmarks/divergences.py [--shapes 256x1000:float32 ...] [--budget 1]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import kdloss
import numpy as np
from kdloss._bench import fmt_time, measure_interleaved

DEFAULT_SHAPES = ["256x1000:float32", "8x128256:float32", "64x32000:float64"]
TEMPERATURE, ALPHA = 3.0, 0.3
DIVERGENCE_LIMIT = 2.0  # x forward KL's time
PARTS_LIMIT = 1.1  # x compute_loss's time (one call, within noise)


def parse_shape(text: str) -> Tuple[Tuple[int, int], str]:
    shape, _, dtype = text.partition(":")
    rows, _, classes = shape.partition("x")
    if not (rows.isdigit() and classes.isdigit()) or dtype not in ("float32", "float64"):
        raise argparse.ArgumentTypeError(f"expected ROWSxCLASSES:float32|float64, got {text!r}")
    return (int(rows), int(classes)), dtype


def candidates(shape: Tuple[int, int], dtype: str) -> Dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    student = (rng.normal(size=shape) * 2).astype(dtype)
    teacher = (rng.normal(size=shape) * 2).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    out = np.empty_like(student)
    calls: Dict[str, Callable[[], Any]] = {}
    for name in kdloss._core.divergence_names:
        kd = kdloss.DistillationLoss(TEMPERATURE, ALPHA, num_threads=1, divergence=name)
        calls[name] = lambda kd=kd: kd.loss_and_gradient(student, teacher, labels, out=out)
    kd = kdloss.DistillationLoss(TEMPERATURE, ALPHA, num_threads=1)
    calls["compute_loss"] = lambda: kd.compute_loss(student, teacher, labels)
    calls["loss_parts"] = lambda: kd.loss_parts(student, teacher, labels)
    return calls


def run_divergences(shapes: List[str], budget: float, rounds: Tuple[int, int]) -> List[Dict[str, Any]]:
    names = list(kdloss._core.divergence_names)
    print("\nDivergences, loss_and_gradient on one thread (class-index labels, T=3, alpha=0.3)")
    print(f"{'shape':<19} {'dtype':<8}" + "".join(f" {name:>12}" for name in names) + "   worst/fwd  parts/loss")
    cells, verdicts = [], []
    for text in shapes:
        shape, dtype = parse_shape(text)
        stats = measure_interleaved(candidates(shape, dtype), budget, rounds[0], rounds[1], 0.0)
        medians = {name: entry["median_s"] for name, entry in stats.items()}
        worst = max(medians[name] / medians["forward_kl"] for name in names)
        parts = medians["loss_parts"] / medians["compute_loss"]
        shape_text = f"{shape[0]}x{shape[1]}"
        print(
            f"{shape_text:<19} {dtype:<8}"
            + "".join(f" {fmt_time(medians[name]):>12}" for name in names)
            + f"   {worst:9.2f}  {parts:10.2f}",
            flush=True,
        )
        cells.append({"shape": shape_text, "dtype": dtype, "median_s": medians, "worst_over_forward": worst,
                      "parts_over_loss": parts})  # fmt: skip
        verdicts.append(f"  {shape_text:<19} {dtype:<8} every divergence {worst:.2f}x forward KL "
                        f"(<= {DIVERGENCE_LIMIT}) {'ok' if worst <= DIVERGENCE_LIMIT else 'MISS'}; "
                        f"loss_parts {parts:.2f}x compute_loss (<= {PARTS_LIMIT}) "
                        f"{'ok' if parts <= PARTS_LIMIT else 'MISS'}")  # fmt: skip
    print("\ntargets (issue 16):")
    print("\n".join(verdicts))
    return cells


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="ROWSxCLASSES:DTYPE")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per candidate and shape (default 1)")
    args = parser.parse_args(argv)
    run_divergences(args.shapes, args.budget, (5, 200))
    return 0


if __name__ == "__main__":
    sys.exit(main())
