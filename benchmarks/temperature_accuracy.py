#!/usr/bin/env python
"""How far the loss is from the truth across temperatures, float32 and float64 (needs ``pip install mpmath``).

Not a test: a measurement for choosing (and, with issue 20's reformulation, widening) the range of temperatures
in which kdloss meets its tolerances (float32 1e-5 relative, float64 1e-12). The truth is T^2 KL(p || q)
computed with 50 significant digits by mpmath, on 3 rows of 200 classes with logits ~ N(0, 3^2).

    python benchmarks/temperature_accuracy.py
"""

from __future__ import annotations

import kdloss
import mpmath as mp
import numpy as np

TEMPERATURES = (1e-300, 1e-30, 1e-8, 1e-3, 0.05, 1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e8, 1e10)


def true_loss(student: np.ndarray, teacher: np.ndarray, temperature: mp.mpf) -> mp.mpf:
    total = mp.mpf(0)
    for s_row, t_row in zip(student, teacher):
        s = [mp.mpf(float(x)) / temperature for x in s_row]
        t = [mp.mpf(float(x)) / temperature for x in t_row]
        log_zs = mp.log(mp.fsum(mp.exp(x) for x in s))
        log_zt = mp.log(mp.fsum(mp.exp(x) for x in t))
        total += mp.fsum(mp.exp(b - log_zt) * ((b - log_zt) - (a - log_zs)) for a, b in zip(s, t)) * temperature**2
    return total / len(student)


def main() -> None:
    mp.mp.dps = 50
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (3, 200)), rng.normal(0, 3, (3, 200))
    print(f"{'temperature':>12}  {'float32 rel. error':>18}  {'float64 rel. error':>18}")
    for temperature in TEMPERATURES:
        errors = []
        for dtype in (np.float32, np.float64):
            s, t = student.astype(dtype), teacher.astype(dtype)
            truth = true_loss(s, t, mp.mpf(temperature))
            got = kdloss.DistillationLoss(temperature, num_threads=1).compute_loss(s, t)
            errors.append(float(abs((mp.mpf(got) - truth) / truth)) if truth else float("nan"))
        print(f"{temperature:>12g}  {errors[0]:>18.1e}  {errors[1]:>18.1e}")


if __name__ == "__main__":
    main()
