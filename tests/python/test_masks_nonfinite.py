"""-inf masks give the mathematically right result; NaN / +inf propagate as NaN."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import SEEDS, assert_grad_close, assert_loss_close, cases, check_against_reference, with_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kdloss import DistillationLoss
from reference import reference

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [np.float32, np.float64]
NINF = -np.inf


def _base(rng, dtype, B=4, C=7):
    s = (rng.standard_normal((B, C)) * 2).astype(dtype)
    t = (rng.standard_normal((B, C)) * 2).astype(dtype)
    return s, t


@settings(max_examples=10)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    form=st.sampled_from(["none", "index", "soft"]),
    seed=SEEDS,
)
@with_examples(
    cases(
        [dict(form=form, dtype=dtype) for form, dtype in itertools.product(["none", "index", "soft"], DTYPES)],
        reduction=REDUCTIONS,
        seed=[0],
    )
)
def test_teacher_mask_is_finite_and_exact(reduction, dtype, form, seed):
    """-inf teacher logits (one, several, all but one class of a row) are masks: a finite loss and gradient,
    the reference's, with every label form."""
    s, t = _base(np.random.default_rng(seed), dtype)
    t[0, 2] = NINF
    t[1, [0, 3, 6]] = NINF
    t[3, :6] = NINF  # only one class left for the teacher
    y = {
        "none": None,
        "index": np.array([1, 2, 4, 6]),
        "soft": np.random.default_rng(seed + 1).random(s.shape).astype(dtype),
    }[form]
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_mask_equals_dropping_the_class(rng, dtype):
    # A class the teacher rules out contributes nothing to the soft loss: with the
    # student also ruling it out, the loss equals that of the reduced problem.
    s, t = _base(rng, dtype, B=3, C=6)
    t[:, 4] = NINF
    s[:, 4] = NINF
    keep = [0, 1, 2, 3, 5]
    y = np.array([0, 5, 2])
    y_reduced = np.array([0, 4, 2])
    for reduction in REDUCTIONS:
        kd = DistillationLoss(3.0, 0.4, reduction=reduction)
        loss = kd.compute_loss(s, t, y)
        grad = kd.compute_gradient(s, t, y)
        loss_r = kd.compute_loss(np.ascontiguousarray(s[:, keep]), np.ascontiguousarray(t[:, keep]), y_reduced)
        grad_r = kd.compute_gradient(np.ascontiguousarray(s[:, keep]), np.ascontiguousarray(t[:, keep]), y_reduced)
        assert_loss_close(loss, loss_r, dtype)
        assert_grad_close(grad[:, keep], grad_r, dtype)
        assert not grad[:, 4].any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_student_mask_where_teacher_has_mass(rng, reduction, dtype):
    s, t = _base(rng, dtype)
    s[1, 3] = NINF  # teacher has mass at (1, 3)
    y = np.array([0, 1, 2, 3])
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    ref, loss, grad = check_against_reference(kd, s, t, y)
    if reduction == "none":
        assert loss[1] == np.inf
        assert np.all(np.isfinite(np.delete(loss, 1)))
    else:
        assert loss == np.inf
    assert np.all(np.isfinite(grad)), "the gradient stays finite under a student mask"
    assert grad[1, 3] < 0, "pushes the masked logit up, towards the teacher's mass"


@pytest.mark.parametrize("dtype", DTYPES)
def test_student_mask_soft_term_absent_when_alpha_is_one(rng, dtype):
    s, t = _base(rng, dtype)
    s[1, 3] = NINF
    y = np.array([0, 1, 2, 3])
    kd = DistillationLoss(2.0, 1.0, reduction="none")
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert np.all(np.isfinite(loss)), "alpha == 1: no soft term, so no inf (and no 0*inf NaN)"
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_student_mask_on_label_hard_term_absent_when_alpha_is_zero(rng, dtype):
    s, t = _base(rng, dtype)
    s[2, 2] = NINF
    t[2, 2] = NINF
    y = np.array([0, 1, 2, 3])  # row 2's label is masked for the student
    kd = DistillationLoss(2.0, 0.0, reduction="none")
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert np.all(np.isfinite(loss)), "alpha == 0: no hard term, so no inf (and no 0*inf NaN)"
    kd = DistillationLoss(2.0, 0.5, reduction="none")
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert loss[2] == np.inf and np.isfinite(np.delete(loss, 2)).all()
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["index", "onehot", "soft_zero_there"])
def test_student_mask_with_zero_label_mass_is_finite(rng, dtype, form):
    # The hard term's 0 * log 0 is 0: a masked student class with no label mass
    # (and no teacher mass) must not turn the loss into NaN.
    s, t = _base(rng, dtype)
    s[:, 5] = NINF
    t[:, 5] = NINF
    idx = np.array([0, 1, 2, 3])
    if form == "index":
        y = idx
    elif form == "onehot":
        y = np.eye(7, dtype=dtype)[idx]
    else:
        y = rng.random(s.shape).astype(dtype)
        y[:, 5] = 0
    for reduction in REDUCTIONS:
        kd = DistillationLoss(2.0, 0.5, reduction=reduction)
        ref, loss, grad = check_against_reference(kd, s, t, y)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        assert not grad[:, 5].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_label_mass_on_student_masked_class_is_inf(rng, dtype):
    s, t = _base(rng, dtype)
    s[0, 5] = NINF
    t[0, 5] = NINF
    y = rng.random(s.shape).astype(dtype)  # y[0, 5] > 0
    y[0, 5] = 0.5
    kd = DistillationLoss(2.0, 0.5, reduction="none")
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert loss[0] == np.inf
    assert np.all(np.isfinite(grad))


@settings(max_examples=20)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    where=st.sampled_from(["student", "teacher"]),
    value=st.sampled_from([np.nan, np.inf]),
    form=st.sampled_from(["none", "index"]),
    row=st.integers(0, 3),
    column=st.integers(0, 6),
    seed=SEEDS,
)
@with_examples(
    cases(
        [
            dict(where=where, value=value, form=form)
            for where, value, form in itertools.product(["student", "teacher"], [np.nan, np.inf], ["none", "index"])
        ],
        reduction=REDUCTIONS,
        dtype=DTYPES,
        row=[2],
        column=[4],
        seed=[0],
    )
)
def test_nan_and_posinf_propagate_as_nan(reduction, dtype, where, value, form, row, column, seed):
    """A NaN or +inf student or teacher logit makes its row's loss and whole gradient row NaN (so a reduced
    loss too), and leaves the other rows finite, with or without labels."""
    s, t = _base(np.random.default_rng(seed), dtype)
    (s if where == "student" else t)[row, column] = value
    y = None if form == "none" else np.array([0, 1, 2, 3])
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    ref, loss, grad = check_against_reference(kd, s, t, y)
    if reduction == "none":
        assert np.isnan(loss[row])
        assert np.all(np.isfinite(np.delete(loss, row))), "other rows are unaffected"
    else:
        assert np.isnan(loss)
    assert np.isnan(grad[row]).all()
    assert np.all(np.isfinite(np.delete(grad, row, axis=0)))


@settings(max_examples=10)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    where=st.sampled_from(["student", "teacher", "both"]),
    row=st.integers(0, 3),
    seed=SEEDS,
)
@with_examples(
    cases(
        [dict(where=where, dtype=dtype) for where, dtype in itertools.product(["student", "teacher", "both"], DTYPES)],
        reduction=REDUCTIONS,
        row=[1],
        seed=[0],
    )
)
def test_all_neginf_row_is_nan(reduction, dtype, where, row, seed):
    """A row whose student or teacher logits (or both) are all -inf has no softmax: its loss and gradient
    row are NaN (so a reduced loss too), and the other rows stay finite."""
    s, t = _base(np.random.default_rng(seed), dtype)
    if where in ("student", "both"):
        s[row, :] = NINF
    if where in ("teacher", "both"):
        t[row, :] = NINF
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    ref, loss, grad = check_against_reference(kd, s, t, None)
    if reduction == "none":
        assert np.isnan(loss[row]) and np.isfinite(np.delete(loss, row)).all()
    else:
        assert np.isnan(loss)
    assert np.isnan(grad[row]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_nonfinite_irrelevant_when_alpha_is_one(rng, dtype):
    # alpha == 1 with labels: the soft term is absent entirely, teacher values unused.
    s, t = _base(rng, dtype)
    t[0, 0] = np.nan
    t[1, :] = NINF
    y = np.array([0, 1, 2, 3])
    kd = DistillationLoss(2.0, 1.0, reduction="none")
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_1d(rng, dtype):
    s = rng.standard_normal(6).astype(dtype)
    t = rng.standard_normal(6).astype(dtype)
    t[2] = NINF
    s[2] = NINF
    t[4] = NINF
    for reduction in REDUCTIONS:
        kd = DistillationLoss(1.5, 0.25, reduction=reduction)
        ref, loss, grad = check_against_reference(kd, s, t, 1)
        assert np.isfinite(loss) and np.isfinite(grad).all()
    s[0] = NINF  # teacher has mass at class 0
    ref, loss, grad = check_against_reference(DistillationLoss(1.5, 0.25, reduction="none"), s, t, 1)
    assert loss.shape == () and loss == np.inf
    assert np.isfinite(grad).all()
    ref = reference(s, t, 1, temperature=1.5, alpha=0.25, reduction="none")
    assert ref.loss == np.inf
