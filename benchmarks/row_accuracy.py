#!/usr/bin/env python
"""Each row's float32 loss and gradient against a long-double truth, over rows from near matches to independent
logits (issue 20): per divergence and kind of row, the worst loss error over the tolerance (1e-5 relative) and the
worst gradient error over the tolerance of the row's own largest entry, across C in {5, 40, 161, 1000} and
T in {0.3, 1, 4, 20}.

Kinds of row: a teacher 1e-3 to 1 per logit from the student (students ~N(0, 3^2)); independent logits; a near match
(1e-3) with one class masked (-inf) on the teacher's or the student's side, or moved by 3, where the student has
1e-4 to 1e-1 of its mass. The truth is numpy's long double (64-bit mantissa on x86-64): enough for float32's
tolerance wherever a row's largest gradient entry is above ~1e-12 of the probabilities, not for float64's (the test
suite holds float64 to mpmath). A survey, not a test: tests/python/test_exact_rows.py holds the cases it found.

    python benchmarks/row_accuracy.py [--seed 0] [--rows 32]
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
from kdloss import DistillationLoss

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]
KINDS = ["1e-3", "1e-2", "0.1", "0.3", "1.0", "independent", "teacher masked", "student masked", "one moved"]
TOLERANCE = 1e-5
BETA, SKEW = 0.5, 0.1
# Where the KL is infinite: not a finite number to compare.
INFINITE = {("forward_kl", "student masked"), ("reverse_kl", "teacher masked")}


def truth(student: np.ndarray, teacher: np.ndarray, temperature: float, divergence: str) -> Tuple[np.ndarray, ...]:
    """Each row's T^2 D and its gradient, in long double, from the definitions."""
    ld = np.longdouble
    s, t = student.astype(ld) / ld(temperature), teacher.astype(ld) / ld(temperature)
    log_q = s - s.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    log_p = t - t.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    q, p = np.exp(log_q), np.exp(log_p)
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence == "forward_kl":
            d = np.where(p > 0, p * (log_p - log_q), 0).sum(1)
            gradient = temperature * (q - p)
        elif divergence == "reverse_kl":
            d = np.where(q > 0, q * (log_q - log_p), 0).sum(1)
            gradient = np.where(q > 0, temperature * q * ((log_q - log_p) - d[:, None]), 0)
        else:
            # m = a p + (1 - a) q; D = w_p KL(p || m) + w_q KL(q || m); G = dD/dq with q free.
            a, w_p, w_q = {
                "jsd": (BETA, BETA, 1 - BETA),
                "skew_forward_kl": (SKEW, 1, 0),
                "skew_reverse_kl": (1 - SKEW, 0, 1),
            }[divergence]
            a = ld(a)
            m = a * p + (1 - a) * q
            d = (w_p * np.where(p > 0, p * np.log(p / m), 0) + w_q * np.where(q > 0, q * np.log(q / m), 0)).sum(1)
            g = np.where(q > 0, w_q * (np.log(q / m) + 1), 0) - (1 - a) * (w_p * p + w_q * q) / m
            gradient = temperature * q * (g - (q * g).sum(1, keepdims=True))
    return d * ld(temperature) ** 2, gradient


def rows_of(kind: str, rng: np.random.Generator, rows: int, classes: int, temperature: float) -> Tuple[np.ndarray, ...]:
    student = rng.normal(0, 3, (rows, classes))
    if kind == "independent":
        return student, rng.normal(0, 3, (rows, classes))
    if kind not in ("teacher masked", "student masked", "one moved"):
        return student, student + rng.normal(0, float(kind), (rows, classes))
    teacher = student + rng.normal(0, 1e-3, (rows, classes))
    for row in range(rows):
        q = np.exp(student[row] / temperature - (student[row] / temperature).max())
        q /= q.sum()
        c = int(np.argmin(np.abs(np.log(q) - np.log(10 ** rng.uniform(-4, -1)))))
        if kind == "one moved":
            teacher[row, c] += rng.choice([-3.0, 3.0])
        elif kind == "teacher masked":
            teacher[row, c] = -np.inf
        else:
            student[row, c] = -np.inf
    return student, teacher


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=32, help="rows per (divergence, kind, C, T) (default 32)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    worst: Dict[Tuple[str, str], Tuple[float, float, str]] = {}
    for divergence in DIVERGENCES:
        kd_args = dict(reduction="none", divergence=divergence, beta=BETA, skew=SKEW)
        for classes in (5, 40, 161, 1000):
            for temperature in (0.3, 1.0, 4.0, 20.0):
                for kind in KINDS:
                    if (divergence, kind) in INFINITE:
                        continue
                    student, teacher = (
                        x.astype(np.float32) for x in rows_of(kind, rng, args.rows, classes, temperature)
                    )
                    true_loss, true_gradient = truth(student, teacher, temperature, divergence)
                    loss, gradient = DistillationLoss(temperature, **kd_args).loss_and_gradient(student, teacher)
                    scale = np.abs(true_gradient).max(1)
                    gradient_off = float((np.abs(gradient - true_gradient).max(1) / scale).max()) / TOLERANCE
                    loss_off = float((np.abs(loss - true_loss) / np.abs(true_loss)).max()) / TOLERANCE
                    before = worst.get((divergence, kind), (0.0, 0.0, ""))
                    where = f"C={classes}, T={temperature:g}"
                    worst[(divergence, kind)] = (
                        max(before[0], loss_off),
                        max(before[1], gradient_off),
                        where if max(loss_off, gradient_off) > max(before[0], before[1]) else before[2],
                    )
    print("float32, worst over rows: loss error / 1e-5 relative; gradient error / 1e-5 of the row's largest entry")
    print(f"{'divergence':<16} {'rows':<15} {'loss':>9} {'gradient':>10}  worst at")
    for (divergence, kind), (loss_off, gradient_off, where) in worst.items():
        mark = "  over" if max(loss_off, gradient_off) > 1 else ""
        print(f"{divergence:<16} {kind:<15} {loss_off:9.3f} {gradient_off:10.3f}  {where}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
