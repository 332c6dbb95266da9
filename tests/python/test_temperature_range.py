"""Temperatures across the accepted range [1e-30, 1e6] meet the stated tolerances; just outside it, a clear error.

The truth is computed by mpmath with 50 significant digits (an independent formula: log-probabilities from
log-sum-exp, and the gradient T (q - p) + alpha (h - y), per row), so that float64's 1e-12 can be checked where a
float64 reference would itself be off by more than that (from T = 100 on, the soft loss is a small difference of its
terms, and the kernels compute every row again: exact_row.hpp).
"""

from __future__ import annotations

import re

import mpmath as mp
import numpy as np
import pytest
from kdloss import DistillationLoss

ROWS, CLASSES, ALPHA = 3, 200, 0.3
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}
RANGE_MESSAGE = "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got "


def softmax(logits: list, scale: mp.mpf) -> list:
    scaled = [x / scale for x in logits]
    log_z = mp.log(mp.fsum(mp.exp(x) for x in scaled))
    return [mp.exp(x - log_z) for x in scaled]


def true_loss_and_gradient(student: np.ndarray, teacher: np.ndarray, labels, temperature: float):
    """Mean over rows of (1 - alpha) T^2 KL(p || q) + alpha CE (without labels: T^2 KL), and its gradient."""
    T = mp.mpf(temperature)
    total, gradient = mp.mpf(0), np.zeros(student.shape)
    for row, (s_row, t_row) in enumerate(zip(student, teacher)):
        s, t = [mp.mpf(float(x)) for x in s_row], [mp.mpf(float(x)) for x in t_row]
        q, p = softmax(s, T), softmax(t, T)
        soft = T**2 * mp.fsum(pc * (mp.log(pc) - mp.log(qc)) for pc, qc in zip(p, q) if pc != 0)
        soft_gradient = [T * (qc - pc) for qc, pc in zip(q, p)]
        if labels is None:
            total += soft
            gradient[row] = [float(g) for g in soft_gradient]
            continue
        h = softmax(s, mp.mpf(1))
        label = int(labels[row])
        total += (1 - ALPHA) * soft - ALPHA * mp.log(h[label])
        hard_gradient = [hc - (1 if c == label else 0) for c, hc in enumerate(h)]
        gradient[row] = [float((1 - ALPHA) * sg + ALPHA * hg) for sg, hg in zip(soft_gradient, hard_gradient)]
    return total / len(student), gradient / len(student)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("temperature", [1e-30, 1e-3, 0.05, 1.0, 2.0, 2.5, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("with_labels", [False, True], ids=["soft", "labels"])
def test_loss_and_gradient_meet_the_tolerance_across_the_range(dtype, temperature, with_labels):
    mp.mp.dps = 50
    rng = np.random.default_rng(0)
    student = rng.normal(0, 3, (ROWS, CLASSES)).astype(dtype)
    teacher = rng.normal(0, 3, (ROWS, CLASSES)).astype(dtype)
    labels = rng.integers(0, CLASSES, ROWS) if with_labels else None
    truth, true_gradient = true_loss_and_gradient(student, teacher, labels, temperature)

    loss, gradient = DistillationLoss(temperature, ALPHA).loss_and_gradient(student, teacher, labels)

    tolerance = TOLERANCE[dtype]
    assert abs(loss - float(truth)) <= tolerance * abs(float(truth))
    scale = np.abs(true_gradient).max()
    assert np.abs(gradient - true_gradient).max() <= tolerance * scale


@pytest.mark.parametrize(
    "temperature, shown",
    [(9.99e-31, "9.99e-31"), (1000000.0000000001, "1000000.0000000001"), (1e155, "1e+155"), (1e-310, "1e-310")],
)
def test_just_outside_the_range_is_refused_by_name(temperature, shown):
    with pytest.raises(ValueError, match=re.escape(RANGE_MESSAGE + shown)):
        DistillationLoss(temperature)
    kd = DistillationLoss()
    with pytest.raises(ValueError, match=re.escape(RANGE_MESSAGE + shown)):
        kd.temperature = temperature
    assert kd.temperature == 3.0
