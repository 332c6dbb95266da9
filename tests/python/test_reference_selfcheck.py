"""Checks of the test suite's own float64 reference (no kdloss involved).

If the reference were wrong, every agreement test would be meaningless, so it
is anchored here against the specification's check values, a brute-force
per-element implementation, central finite differences and closed forms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import brute_force_loss, log_softmax, reference

CHECK_S = np.array([1.0, 2.0, 0.5])
CHECK_T = np.array([1.5, 1.8, 0.6])
CHECK_Y = np.array([0.0, 1.0, 0.0])


def test_reference_check_values():
    r = reference(CHECK_S, CHECK_T, CHECK_Y, temperature=3.0, alpha=0.5)
    assert r.loss == pytest.approx(0.25465032, rel=1e-7)
    np.testing.assert_allclose(r.grad, [0.05121834, -0.12252327, 0.07130493], rtol=0, atol=1e-8)
    r = reference(CHECK_S, CHECK_T, None, temperature=3.0, alpha=0.5)
    assert r.loss == pytest.approx(0.04493185, rel=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["none", "index", "soft"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_reference_matches_brute_force(reduction, form, alpha, divergence):
    rng = np.random.default_rng(1234)
    B, C = 5, 7
    s = rng.normal(size=(B, C)) * 3
    t = rng.normal(size=(B, C)) * 3
    if form == "none":
        y = None
    elif form == "index":
        y = rng.integers(0, C, size=B)
        y[1] = -100
    else:
        y = rng.random((B, C))
    kw = dict(temperature=2.5, alpha=alpha, reduction=reduction, divergence=divergence)
    r = reference(s, t, y, **kw)
    bl, bg = brute_force_loss(s, t, y, **kw)
    np.testing.assert_allclose(r.loss, bl, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(r.grad, bg, rtol=1e-12, atol=1e-15)


def test_reference_gradient_finite_differences():
    rng = np.random.default_rng(99)
    B, C = 3, 6
    s = rng.normal(size=(B, C))
    t = rng.normal(size=(B, C))
    y = rng.random((B, C))
    for reduction in ("mean", "sum", "none"):
        kw = dict(temperature=1.7, alpha=0.4, reduction=reduction)
        g = reference(s, t, y, **kw).grad
        h = 1e-6
        fd = np.zeros_like(s)
        for idx in np.ndindex(s.shape):
            sp, sm = s.copy(), s.copy()
            sp[idx] += h
            sm[idx] -= h
            fp = np.sum(reference(sp, t, y, **kw).loss)
            fm = np.sum(reference(sm, t, y, **kw).loss)
            fd[idx] = (fp - fm) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=0, atol=1e-7)


def test_reference_log_softmax_edge_rows():
    x = np.array(
        [
            [0.0, -np.inf, 1.0],
            [-np.inf, -np.inf, -np.inf],
            [np.nan, 0.0, 1.0],
            [np.inf, 0.0, 1.0],
            [1e4, -1e4, 0.0],
        ]
    )
    ls = log_softmax(x)
    assert ls[0, 1] == -np.inf
    np.testing.assert_allclose(np.exp(ls[0, [0, 2]]).sum(), 1.0, rtol=1e-15)
    assert np.isnan(ls[1]).all() and np.isnan(ls[2]).all() and np.isnan(ls[3]).all()
    assert ls[4, 0] == 0.0 and ls[4, 1] == -2e4


def test_reference_masks():
    s = np.array([[0.3, -np.inf, 1.0, 0.2]])
    t = np.array([[0.1, -np.inf, 0.5, -np.inf]])
    r = reference(s, t, np.array([0]), temperature=2.0, alpha=0.3, reduction="sum")
    assert np.isfinite(r.loss) and np.all(np.isfinite(r.grad))
    # closed form with masked classes simply removed
    keep_s = np.array([0.3, 1.0, 0.2])
    lq = log_softmax(keep_s / 2.0)
    lp = log_softmax(np.array([0.1, 0.5]) / 2.0)
    soft = 4.0 * np.sum(np.exp(lp) * (lp - lq[:2]))
    hard = -log_softmax(keep_s)[0]
    assert r.loss == pytest.approx(0.3 * hard + 0.7 * soft, rel=1e-14)
    # student mask where the teacher has mass: +inf soft loss, finite gradient
    s2 = np.array([[0.3, 0.1, -np.inf]])
    t2 = np.array([[0.1, 0.2, 0.3]])
    r2 = reference(s2, t2, None, temperature=2.0, alpha=0.3, reduction="none")
    assert r2.loss[0] == np.inf and np.all(np.isfinite(r2.grad))
    # alpha == 1 removes the soft term entirely, so the loss is finite
    r3 = reference(s2, t2, np.array([0]), temperature=2.0, alpha=1.0, reduction="none")
    assert np.isfinite(r3.loss[0])
    assert r3.loss[0] == pytest.approx(-log_softmax(s2[0, :2])[0], rel=1e-15)


def test_reference_ignore_and_empty():
    s = np.ones((0, 4))
    r = reference(s, s, None, temperature=1.0, alpha=0.5, reduction="mean")
    assert r.loss == 0.0 and r.grad.shape == (0, 4)
    s = np.arange(8.0).reshape(2, 4)
    r = reference(s, s[::-1], np.array([-100, -100]), temperature=1.0, alpha=0.5)
    assert r.loss == 0.0 and not r.grad.any()
    assert math.isfinite(r.loss)
