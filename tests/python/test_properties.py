"""Hypothesis property tests: random shapes, parameters and label forms against
the independent reference, plus structural invariants."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_grad_close, assert_loss_close, check_types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kdloss import DistillationLoss
from reference import reference

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def problems(draw):
    B = draw(st.integers(0, 6))
    C = draw(st.integers(1, 40))
    one_d = draw(st.booleans()) and B == 1
    temperature = draw(st.floats(0.1, 20.0, allow_nan=False, allow_infinity=False))
    alpha = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    form = draw(st.sampled_from(["none", "index", "soft", "onehot"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([0.01, 1.0, 5.0, 50.0, 1e3]))
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((B, C)) * scale).astype(dtype)
    t = (rng.standard_normal((B, C)) * scale).astype(dtype)
    if draw(st.booleans()):  # correlated teacher/student, as after some training
        t = (s + rng.standard_normal((B, C)) * scale * 0.1).astype(dtype)
    if form == "none":
        y = None
    elif form == "index":
        lo = 1 if ignore_index == 0 else 0
        y = rng.integers(lo, C, size=B) if C > lo else np.full(B, ignore_index)
        y[rng.random(B) < 0.3] = ignore_index
    elif form == "onehot":
        y = np.eye(C, dtype=dtype)[rng.integers(0, C, size=B)]
    else:
        y = rng.random((B, C)).astype(dtype) * draw(st.sampled_from([0.1, 1.0, 3.0]))
        y[:, rng.random(C) < 0.3] = 0
    if one_d:
        s, t = s[0], t[0]
        if y is not None:
            y = int(y[0]) if y.ndim == 1 else y[0]
    kd = DistillationLoss(temperature, alpha, reduction=reduction, ignore_index=ignore_index)
    return kd, s, t, y, dtype


@SETTINGS
@given(problems())
def test_matches_reference(problem):
    kd, s, t, y, dtype = problem
    ref = reference(
        s, t, y, temperature=kd.temperature, alpha=kd.alpha, reduction=kd.reduction, ignore_index=kd.ignore_index
    )
    loss, grad = kd.loss_and_gradient(s, t, y)
    check_types(loss, grad, s, np.dtype(dtype), kd.reduction)
    # conditioned tolerance: the spec's relative bound plus a few ulps of the
    # magnitudes involved (matters only when the loss is a tiny difference of
    # large log-probabilities, e.g. a near-identical teacher and student)
    assert_loss_close(loss, ref.loss, dtype, mag=ref.loss_mag)
    assert_grad_close(grad, ref.grad, dtype, mag=ref.grad_mag)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@SETTINGS
@given(problems())
def test_structural_invariants(problem):
    kd, s, t, y, dtype = problem
    loss = kd.compute_loss(s, t, y)
    grad = kd.compute_gradient(s, t, y)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    # KL >= 0 and cross-entropy >= 0 (up to rounding)
    assert np.all(np.asarray(loss) >= -tol * (1 + np.abs(np.asarray(loss))) - tol)
    if grad.size:
        # the soft gradient T*(q - p) sums to 0 over a row, and so does the hard
        # part p*sum(y) - y: every gradient row sums to ~0 (up to rounding of the
        # probabilities, whose scale the reference's grad_mag bounds)
        ref = reference(
            s, t, y, temperature=kd.temperature, alpha=kd.alpha, reduction=kd.reduction, ignore_index=kd.ignore_index
        )
        C = s.shape[-1]
        row_sums = np.abs(grad.reshape(-1, C).astype(np.float64).sum(-1))
        scale = ref.grad_mag.reshape(-1, C).sum(-1)
        eps = np.finfo(dtype).eps
        assert np.all(row_sums <= 64 * eps * scale + 1e-300), row_sums
    # shift invariance of each row (softmax is invariant to adding a constant)
    if dtype == np.float64 and np.all(np.abs(s) < 1e5):
        shift = 3.0
        loss2 = kd.compute_loss(s + shift, t - shift, y)
        np.testing.assert_allclose(np.asarray(loss2), np.asarray(loss), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    B=st.integers(1, 5),
    C=st.integers(2, 30),
    temperature=st.floats(0.1, 20.0),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_reductions_are_consistent(B, C, temperature, alpha, seed):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((B, C)) * 3
    t = rng.standard_normal((B, C)) * 3
    y = rng.integers(0, C, size=B)
    y[rng.random(B) < 0.3] = -100
    n = int(np.count_nonzero(y != -100))
    ln, gn = DistillationLoss(temperature, alpha, reduction="none").loss_and_gradient(s, t, y)
    ls, gs = DistillationLoss(temperature, alpha, reduction="sum").loss_and_gradient(s, t, y)
    lm, gm = DistillationLoss(temperature, alpha, reduction="mean").loss_and_gradient(s, t, y)
    assert ls == pytest.approx(float(np.sum(ln)), rel=1e-13, abs=1e-14)
    np.testing.assert_allclose(gn, gs, rtol=1e-13, atol=1e-16)
    if n:
        assert lm == pytest.approx(ls / n, rel=1e-13, abs=1e-14)
        np.testing.assert_allclose(gm, gs / n, rtol=1e-13, atol=1e-16)
    else:
        assert lm == 0.0 and not gm.any()
