"""The returned gradient is the derivative of the returned (reduced) loss.

Central finite differences in float64 on the library's own loss; for "none"
the differentiated function is the sum of the per-row losses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import SEEDS, TEMPERATURES, cases, with_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kdloss import DistillationLoss

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


def fd_gradient(kd, s, t, y, h):
    def f(x):
        return float(np.sum(kd.compute_loss(x, t, y)))

    g = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        if not np.isfinite(s[idx]):
            continue
        sp = s.copy()
        sm = s.copy()
        sp[idx] += h
        sm[idx] -= h
        g[idx] = (f(sp) - f(sm)) / (2 * h)
    return g


def assert_fd_close(kd, s, t, y, h=None):
    h = h if h is not None else 1e-5 * min(1.0, kd.temperature)
    grad = kd.compute_gradient(s, t, y)
    assert grad.dtype == np.float64 and grad.shape == s.shape
    assert np.all(np.isfinite(grad))
    fd = fd_gradient(kd, s, t, y, h)
    finite = np.isfinite(s)
    scale = max(np.abs(grad).max(initial=0.0), 1e-3)
    err = np.abs(grad[finite] - fd[finite])
    assert err.max(initial=0.0) <= 2e-6 * scale, f"max |grad - fd| = {err.max():.3e}, scale {scale:.3e}"
    # the gradient with respect to a masked (-inf) student logit is exactly 0
    if not finite.all():
        assert not grad[~finite].any()


def _labels(rng, form, B, C):
    if form == "none":
        return None
    if form == "index":
        y = rng.integers(0, C, size=B)
        y[1] = -100
        return y
    if form == "onehot":
        return np.eye(C)[rng.integers(0, C, size=B)]
    return rng.random((B, C)) * 2  # unnormalised soft targets


@settings(max_examples=20)
@given(
    reduction=st.sampled_from(["mean", "sum", "none"]),
    form=st.sampled_from(["none", "index", "onehot", "soft"]),
    temperature=TEMPERATURES,
    alpha=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    seed=SEEDS,
)
@with_examples(
    cases(
        [
            dict(form=form, temperature=temperature, alpha=alpha)
            for form, (temperature, alpha) in itertools.product(
                ["none", "index", "onehot", "soft"], [(3.0, 0.3), (0.5, 0.7), (1.0, 0.0), (2.0, 1.0)]
            )
        ],
        reduction=["mean", "sum", "none"],
        seed=[0],
    )
)
def test_gradient_matches_finite_differences(reduction, form, temperature, alpha, seed):
    """The gradient is the central finite difference of the returned loss (the sum of the rows for "none"),
    for every reduction and label form (class indices with an ignored row, one-hot, unnormalised soft
    targets), temperature and alpha, the endpoints included."""
    B, C = 3, 5
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((B, C)) * 2
    t = rng.standard_normal((B, C)) * 2
    y = _labels(rng, form, B, C)
    kd = DistillationLoss(temperature, alpha, reduction=reduction)
    assert_fd_close(kd, s, t, y)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["none", "index", "soft"])
def test_gradient_fd_1d(rng, reduction, form):
    C = 6
    s = rng.standard_normal(C)
    t = rng.standard_normal(C)
    y = {"none": None, "index": 2, "soft": rng.random(C)}[form]
    kd = DistillationLoss(2.0, 0.4, reduction=reduction)
    assert_fd_close(kd, s, t, y)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_fd_with_masks(rng, reduction):
    # teacher masks anywhere; student masks only where the teacher is masked too
    # (so the loss stays finite and can be differentiated numerically)
    B, C = 3, 6
    s = rng.standard_normal((B, C))
    t = rng.standard_normal((B, C))
    t[0, 1] = -np.inf
    t[1, [0, 4]] = -np.inf
    s[1, 4] = -np.inf
    t[2, 5] = -np.inf
    s[2, 5] = -np.inf
    y = np.array([0, 2, 1])
    kd = DistillationLoss(1.5, 0.3, reduction=reduction)
    assert_fd_close(kd, s, t, y)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_fd_large_logits(rng, reduction):
    B, C = 2, 4
    s = rng.uniform(-30, 30, (B, C))
    t = rng.uniform(-30, 30, (B, C))
    kd = DistillationLoss(4.0, 0.2, reduction=reduction)
    assert_fd_close(kd, s, t, np.array([1, 3]), h=1e-5)
