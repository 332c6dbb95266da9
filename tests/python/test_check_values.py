"""The specification's check value (computed by the C# implementation).

The C# code adds an epsilon inside its logs, which shifts the 10th digit, so the
printed values are compared at ~1e-7 relative; the library is compared with the
independent reference at the full float64 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_grad_close, assert_loss_close
from kdloss import DistillationLoss
from reference import reference

S = np.array([1.0, 2.0, 0.5])
T = np.array([1.5, 1.8, 0.6])
Y_ONEHOT = np.array([0.0, 1.0, 0.0])
LOSS = 0.25465032
GRAD = np.array([0.05121834, -0.12252327, 0.07130493])
LOSS_NO_LABELS = 0.04493185


@pytest.mark.parametrize("layout", ["1d", "2d"])
@pytest.mark.parametrize("label_form", ["onehot", "index"])
def test_check_value_with_labels(layout, label_form):
    kd = DistillationLoss(temperature=3.0, alpha=0.5)
    s, t = (S, T) if layout == "1d" else (S[None, :], T[None, :])
    if label_form == "onehot":
        y = Y_ONEHOT if layout == "1d" else Y_ONEHOT[None, :]
    else:
        y = 1 if layout == "1d" else np.array([1])
    loss = kd.compute_loss(s, t, y)
    grad = kd.compute_gradient(s, t, y)
    assert loss == pytest.approx(LOSS, rel=1e-7)
    assert grad.shape == s.shape
    np.testing.assert_allclose(grad.reshape(-1), GRAD, rtol=0, atol=1e-8)
    ref = reference(s, t, y, temperature=3.0, alpha=0.5, reduction="mean")
    assert_loss_close(loss, ref.loss, np.float64)
    assert_grad_close(grad, ref.grad, np.float64)


@pytest.mark.parametrize("layout", ["1d", "2d"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_check_value_without_labels(layout, alpha):
    # Without labels the row is the soft term alone, whatever alpha is.
    kd = DistillationLoss(temperature=3.0, alpha=alpha)
    s, t = (S, T) if layout == "1d" else (S[None, :], T[None, :])
    loss = kd.compute_loss(s, t)
    assert loss == pytest.approx(LOSS_NO_LABELS, rel=1e-7)
    ref = reference(s, t, None, temperature=3.0, alpha=alpha, reduction="mean")
    assert_loss_close(loss, ref.loss, np.float64)
    assert_grad_close(kd.compute_gradient(s, t), ref.grad, np.float64)


def test_check_value_all_reductions_agree_for_one_row():
    s, t, y = S[None, :], T[None, :], np.array([1])
    mean = DistillationLoss(3.0, 0.5, reduction="mean").compute_loss(s, t, y)
    total = DistillationLoss(3.0, 0.5, reduction="sum").compute_loss(s, t, y)
    none = DistillationLoss(3.0, 0.5, reduction="none").compute_loss(s, t, y)
    assert none.shape == (1,)
    assert mean == pytest.approx(LOSS, rel=1e-7)
    assert total == pytest.approx(mean, rel=1e-15)
    assert float(none[0]) == pytest.approx(mean, rel=1e-15)


def test_check_value_float32():
    kd = DistillationLoss(temperature=3.0, alpha=0.5)
    s, t, y = S.astype(np.float32), T.astype(np.float32), Y_ONEHOT.astype(np.float32)
    loss = kd.compute_loss(s, t, y)
    grad = kd.compute_gradient(s, t, y)
    assert grad.dtype == np.float32
    assert loss == pytest.approx(LOSS, rel=1e-5)
    np.testing.assert_allclose(grad, GRAD, rtol=0, atol=1e-5 * np.abs(GRAD).max())
