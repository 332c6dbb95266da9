"""The soft term's divergences other than forward KL, against the independent reference (reference.py).

Forward KL is what the rest of the suite tests; each divergence here gets the same checks in fewer cases:
agreement in float32 and float64 across row lengths (blocks of short rows and long rows, read from the
library's own limits), label forms and reductions; finite differences; masks; threads; and its parameter.
"""

from __future__ import annotations

import pickle
import re

import kdloss
import numpy as np
import pytest
from helpers import check_against_reference
from kdloss import DistillationLoss
from reference import reference

DIVERGENCES = ["reverse_kl"]
DTYPES = [np.float32, np.float64]
BLOCK_MAX = kdloss.build_info()["block_max_classes"]
LANES = kdloss.build_info()["lanes"]


def logits(rng, shape, dtype, scale=3.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


def row_lengths(dtype) -> list[int]:
    """Both sides of the block/long-row boundary, a row shorter than a vector, and a long row."""
    limit = BLOCK_MAX[np.dtype(dtype).name]
    return [1, LANES - 1, limit, limit + 1, 1000, 20000]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["none", "index", "distribution"])
def test_agrees_with_the_reference_across_row_lengths(divergence, dtype, form):
    rng = np.random.default_rng(7)
    for classes in row_lengths(dtype):
        rows = 21
        s, t = logits(rng, (rows, classes), dtype), logits(rng, (rows, classes), dtype)
        if form == "index":
            labels = rng.integers(0, classes, rows)
            labels[::5] = -100
        elif form == "distribution":
            labels = rng.random((rows, classes)).astype(dtype)
        else:
            labels = None
        for temperature, alpha in [(1.0, 0.3), (2.0, 0.5), (2.5, 0.0), (4.0, 1.0)]:
            kd = DistillationLoss(temperature, alpha, divergence=divergence)
            # A single class's gradient is exactly 0, which float32 meets to a rounding of the terms that
            # cancel there (the error scales of the reference): tolerances relative to 0 cannot apply.
            check_against_reference(kd, s, t, labels, conditioned=classes == 1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_sequences(divergence, reduction):
    rng = np.random.default_rng(3)
    s, t = logits(rng, (2, 5, 300), np.float64), logits(rng, (2, 5, 300), np.float64)
    labels = rng.integers(0, 300, (2, 5))
    kd = DistillationLoss(2.0, 0.4, reduction=reduction, divergence=divergence)
    loss, gradient = kd.loss_and_gradient(s, t, labels)
    ref = reference(s.reshape(10, 300), t.reshape(10, 300), labels.reshape(10), temperature=2.0, alpha=0.4,
                    reduction=reduction, divergence=divergence)  # fmt: skip
    np.testing.assert_allclose(np.asarray(loss).reshape(-1), np.asarray(ref.loss).reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(gradient.reshape(10, 300), ref.grad, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("classes", [7, 500])
def test_gradient_matches_finite_differences(divergence, classes):
    """Central differences of the kernel's own loss, float64: the gradient is the loss's derivative."""
    rng = np.random.default_rng(11)
    s, t = logits(rng, (3, classes), np.float64, 1.5), logits(rng, (3, classes), np.float64, 1.5)
    labels = np.array([0, 2, 1])
    kd = DistillationLoss(1.7, 0.35, divergence=divergence)
    gradient = kd.compute_gradient(s, t, labels)
    step = 1e-6
    for row, column in [(0, 0), (1, 2), (2, classes - 1), (1, classes // 2)]:
        up, down = s.copy(), s.copy()
        up[row, column] += step
        down[row, column] -= step
        numeric = (kd.compute_loss(up, t, labels) - kd.compute_loss(down, t, labels)) / (2 * step)
        # The differences' own error: ~1e-16 of the loss (O(1)) over the step.
        assert gradient[row, column] == pytest.approx(numeric, rel=1e-6, abs=2e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [5, 300])
def test_reverse_kl_masks(dtype, classes):
    """A class the student rules out costs nothing, whatever the teacher says; one only the teacher rules out
    makes the row's loss +inf and its gradient NaN where the student has mass."""
    rng = np.random.default_rng(5)
    s, t = logits(rng, (3, classes), dtype), logits(rng, (3, classes), dtype)
    s[0, 1] = -np.inf  # the student rules it out, the teacher not
    s[1, 2] = t[1, 2] = -np.inf  # both rule it out
    t[2, 3] = -np.inf  # only the teacher rules it out
    kd = DistillationLoss(2.0, divergence="reverse_kl", reduction="none")
    losses, gradient = kd.loss_and_gradient(s, t)
    ref = reference(s, t, temperature=2.0, alpha=0.3, reduction="none", divergence="reverse_kl")
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(losses[:2], ref.loss[:2], rtol=tolerance)
    scale = np.abs(ref.grad[:2]).max()
    np.testing.assert_allclose(gradient[:2], ref.grad[:2], rtol=tolerance, atol=tolerance * scale)
    assert gradient[0, 1] == 0 and gradient[1, 2] == 0
    assert losses[2] == np.inf
    assert np.isnan(gradient[2]).all()  # the student has mass in every class of that row


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_thread_counts_give_bitwise_equal_results(divergence):
    rng = np.random.default_rng(2)
    s, t = logits(rng, (64, 3000), np.float32), logits(rng, (64, 3000), np.float32)
    labels = rng.integers(0, 3000, 64)
    results = [
        DistillationLoss(2.0, divergence=divergence, num_threads=n).loss_and_gradient(s, t, labels) for n in (1, 2, 3)
    ]
    for loss, gradient in results[1:]:
        assert loss == results[0][0]
        assert np.array_equal(gradient, results[0][1])


def test_forward_kl_is_the_default_and_the_divergences_differ():
    rng = np.random.default_rng(4)
    s, t = logits(rng, (4, 50), np.float64), logits(rng, (4, 50), np.float64)
    assert DistillationLoss().divergence == "forward_kl"
    assert DistillationLoss().compute_loss(s, t) == DistillationLoss(divergence="forward_kl").compute_loss(s, t)
    assert DistillationLoss().compute_loss(s, t) != DistillationLoss(divergence="reverse_kl").compute_loss(s, t)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_the_parameter_in_repr_equality_and_pickles(divergence):
    kd = DistillationLoss(2.0, 0.4, divergence=divergence)
    assert f"divergence={divergence!r}" in repr(kd)
    assert eval(repr(kd), {"DistillationLoss": DistillationLoss}) == kd
    assert kd != DistillationLoss(2.0, 0.4)
    assert pickle.loads(pickle.dumps(kd)) == kd
    kd.temperature = 3.0  # the setters keep it
    assert kd.divergence == divergence


def test_an_unknown_divergence_is_refused_by_name():
    names = "'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl'"
    with pytest.raises(ValueError, match=re.escape(f"divergence must be one of {names}, got 'jensen'")):
        DistillationLoss(divergence="jensen")
    with pytest.raises(TypeError, match=re.escape(f"divergence must be one of {names}, got 1")):
        DistillationLoss(divergence=1)
