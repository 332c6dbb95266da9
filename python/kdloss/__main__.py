"""``python -m kdloss``: show that the installed library computes the published check value."""

from __future__ import annotations

import sys

import numpy as np

from . import DistillationLoss, __version__

# The check case of the specification, computed by the C# DistillationLoss<T> this library follows. Its
# epsilon inside the logarithms moves the 10th digit, so agreement is expected to about 1e-8.
STUDENT = np.array([1.0, 2.0, 0.5])
TEACHER = np.array([1.5, 1.8, 0.6])
ONE_HOT = np.array([0.0, 1.0, 0.0])
REFERENCE_LOSS = 0.25465032
REFERENCE_GRADIENT = np.array([0.05121834, -0.12252327, 0.07130493])
REFERENCE_SOFT_LOSS = 0.04493185


def main() -> int:
    kd = DistillationLoss(temperature=3.0, alpha=0.5)
    loss, gradient = kd.loss_and_gradient(STUDENT, TEACHER, ONE_HOT)
    soft_loss = kd.compute_loss(STUDENT, TEACHER)
    print(f"kdloss {__version__}: {kd!r}")
    print(f"student {STUDENT.tolist()}, teacher {TEACHER.tolist()}, one-hot label {ONE_HOT.tolist()}\n")
    rows = [
        ("loss (with labels)", [loss], [REFERENCE_LOSS]),
        ("gradient", gradient, REFERENCE_GRADIENT),
        ("loss (no labels)", [soft_loss], [REFERENCE_SOFT_LOSS]),
    ]
    print(f"{'quantity':<20}{'kdloss':>16}{'reference':>14}")
    ok = True
    for name, values, expected in rows:
        for value, reference in zip(values, expected):
            print(f"{name:<20}{value:>16.10f}{reference:>14.8f}")
            name = ""
            ok &= abs(value - reference) <= 1e-8
    print("\nagrees with the reference to 1e-8" if ok else "\nDISAGREES with the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
