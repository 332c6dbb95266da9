"""loss_parts: the soft and hard terms apart, each reduced as the loss is, against the reference's terms (its loss
with alpha 0, the soft term alone, and alpha 1, the hard term alone), for every divergence, label form and
reduction, short rows and long; and the loss recombined from them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_loss_close
from kdloss import DistillationLoss
from reference import reference

DIVERGENCES = ["forward_kl", "reverse_kl"]


def batch(rng, rows, classes, dtype, form):
    s = (rng.normal(size=(rows, classes)) * 3).astype(dtype)
    t = (rng.normal(size=(rows, classes)) * 3).astype(dtype)
    if form == "index":
        labels = rng.integers(0, classes, rows)
        labels[::4] = -100
    elif form == "distribution":
        labels = rng.random((rows, classes)).astype(dtype)
    else:
        labels = None
    return s, t, labels


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["none", "index", "distribution"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_parts_are_the_reference_terms(divergence, dtype, form, reduction):
    rng = np.random.default_rng(8)
    for classes in (7, 3000):
        s, t, labels = batch(rng, 13, classes, dtype, form)
        kd = DistillationLoss(2.0, 0.3, reduction=reduction, divergence=divergence)
        soft, hard = kd.loss_parts(s, t, labels)
        params = dict(temperature=2.0, reduction=reduction, divergence=divergence)
        assert_loss_close(soft, reference(s, t, labels, alpha=0.0, **params).loss, dtype, what="soft")
        if labels is None:
            assert np.all(np.asarray(hard) == 0.0)
        else:
            assert_loss_close(hard, reference(s, t, labels, alpha=1.0, **params).loss, dtype, what="hard")
        loss = kd.compute_loss(s, t, labels)
        recombined = soft if labels is None else 0.3 * np.asarray(hard) + 0.7 * np.asarray(soft)
        np.testing.assert_allclose(loss, recombined, rtol=1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_both_terms_whatever_alpha(alpha):
    """A term whose weight is 0 is left out of the loss, but loss_parts still gives it."""
    rng = np.random.default_rng(9)
    s, t, labels = batch(rng, 5, 40, np.float64, "index")
    soft, hard = DistillationLoss(2.0, alpha).loss_parts(s, t, labels)
    assert (soft, hard) == DistillationLoss(2.0, 0.5).loss_parts(s, t, labels)
    assert soft > 0 and hard > 0


def test_parts_take_the_normalizer_and_check_inputs_as_the_loss():
    rng = np.random.default_rng(10)
    s, t, labels = batch(rng, 6, 20, np.float64, "index")
    kd = DistillationLoss(reduction="sum")
    soft, hard = kd.loss_parts(s, t, labels, normalizer=4.0)
    total_soft, total_hard = kd.loss_parts(s, t, labels)
    assert soft == pytest.approx(total_soft / 4.0, rel=1e-15) and hard == pytest.approx(total_hard / 4.0, rel=1e-15)
    with pytest.raises(ValueError, match="teacher_logits must have the shape of student_logits"):
        kd.loss_parts(s, t[:, :5], labels)
    with pytest.raises(ValueError, match="true_labels"):
        kd.loss_parts(s, t, labels + 100)
