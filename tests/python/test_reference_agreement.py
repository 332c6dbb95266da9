"""Library vs. the independent float64 reference, over reductions, dtypes, label
forms, shapes and extreme inputs, at the specification's tolerances."""

from __future__ import annotations

import itertools

import kdloss
import numpy as np
import pytest
from helpers import (
    SEEDS,
    TEMPERATURES,
    assert_grad_close,
    assert_loss_close,
    cases,
    check_against_reference,
    check_types,
    with_examples,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from kdloss import DistillationLoss
from reference import reference

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [np.float32, np.float64]
LABEL_FORMS = ["none", "index", "index_ignore", "onehot", "soft"]
# The longest float64 rows that run in blocks, as the library says (see test_kernel_shapes.py).
BLOCK_MAX_F64 = kdloss.build_info()["block_max_classes"]["float64"]


def make_labels(rng, form, B, C, dtype, ignore_index=-100):
    if form == "none":
        return None
    if form in ("index", "index_ignore"):
        y = rng.integers(0, C, size=B)
        if form == "index_ignore" and B:
            y[rng.random(B) < 0.4] = ignore_index
            y[0] = ignore_index
        return y
    if form == "onehot":
        y = np.zeros((B, C), dtype=dtype)
        y[np.arange(B), rng.integers(0, C, size=B)] = 1
        return y
    # soft targets: non-negative, not necessarily normalised
    y = rng.random((B, C)).astype(dtype)
    y[:, rng.random(C) < 0.3] = 0
    return y


def logits(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@settings(max_examples=40)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    form=st.sampled_from(LABEL_FORMS),
    temperature=TEMPERATURES,
    alpha=st.floats(0.0, 1.0),
    batch=st.integers(1, 40),
    # Tolerances relative to max|gradient| (not to the size of the terms, as test_properties.py's): with very few
    # classes a float32 gradient can be a small difference of larger terms, and a single class's exactly 0.
    classes=st.integers(8, 64),
    seed=SEEDS,
)
@with_examples(
    cases(
        [dict(form=form, dtype=dtype) for form, dtype in itertools.product(LABEL_FORMS, DTYPES)],
        reduction=REDUCTIONS,
        temperature=[3.0, 1.0, 0.25, 7.5],
        alpha=[0.3, 0.5, 0.9, 0.05],
        batch=[17],
        classes=[33],
        seed=[0],
    )
)
def test_batches_match_the_reference_in_every_label_form(
    reduction, dtype, form, temperature, alpha, batch, classes, seed
):
    """A batch's loss and gradient are the reference's, for every reduction, dtype and label form (none, class
    indices, some of them ignored, one-hot and soft targets), temperature and alpha."""
    rng = np.random.default_rng(seed)
    s = logits(rng, (batch, classes), dtype)
    t = logits(rng, (batch, classes), dtype)
    y = make_labels(rng, form, batch, classes, dtype)
    kd = DistillationLoss(temperature, alpha, reduction=reduction)
    check_against_reference(kd, s, t, y)


@pytest.mark.parametrize("alpha", [0.0, 1.0], ids=["soft_term_only", "hard_term_only"])
@settings(max_examples=15)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    form=st.sampled_from(["index", "onehot", "soft"]),
    temperature=TEMPERATURES,
    seed=SEEDS,
)
@with_examples(
    cases(
        [dict(form=form, dtype=dtype) for form, dtype in itertools.product(["index", "onehot", "soft"], DTYPES)],
        reduction=REDUCTIONS,
        temperature=[2.0],
        seed=[0],
    )
)
def test_alpha_0_and_1_leave_only_the_soft_or_the_hard_term(alpha, reduction, dtype, form, temperature, seed):
    """alpha = 0 drops the hard term and alpha = 1 the soft one: the reference's loss and gradient, and at
    alpha = 0 those of the labels-free (pure soft) loss."""
    B, C = 9, 12
    rng = np.random.default_rng(seed)
    s = logits(rng, (B, C), dtype)
    t = logits(rng, (B, C), dtype)
    y = make_labels(rng, form, B, C, dtype)
    kd = DistillationLoss(temperature, alpha, reduction=reduction)
    ref, loss, grad = check_against_reference(kd, s, t, y)
    if alpha == 0.0:
        pure = reference(s, t, None, temperature=temperature, alpha=0.0, reduction=reduction)
        assert_loss_close(loss, pure.loss, dtype)
        assert_grad_close(grad, pure.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_alpha_does_not_matter_without_labels(rng, dtype, reduction):
    s = logits(rng, (6, 10), dtype)
    t = logits(rng, (6, 10), dtype)
    losses = [DistillationLoss(2.0, a, reduction=reduction).compute_loss(s, t) for a in (0.0, 0.3, 1.0)]
    grads = [DistillationLoss(2.0, a, reduction=reduction).compute_gradient(s, t) for a in (0.0, 0.3, 1.0)]
    for other in losses[1:]:
        np.testing.assert_array_equal(other, losses[0])
    for other in grads[1:]:
        np.testing.assert_array_equal(other, grads[0])
    ref = reference(s, t, None, temperature=2.0, alpha=0.7, reduction=reduction)
    assert_loss_close(losses[0], ref.loss, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_onehot_equals_index_labels(rng, dtype):
    B, C = 11, 8
    s = logits(rng, (B, C), dtype)
    t = logits(rng, (B, C), dtype)
    idx = rng.integers(0, C, size=B)
    onehot = np.eye(C, dtype=dtype)[idx]
    for reduction in REDUCTIONS:
        kd = DistillationLoss(2.0, 0.4, reduction=reduction)
        tol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(kd.compute_loss(s, t, idx), kd.compute_loss(s, t, onehot), rtol=tol)
        g1, g2 = kd.compute_gradient(s, t, idx), kd.compute_gradient(s, t, onehot)
        np.testing.assert_allclose(g1, g2, rtol=0, atol=tol * np.abs(g1).max())


@pytest.mark.parametrize("form", ["none", "index", "ignored", "soft", "onehot"])
@settings(max_examples=10)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    seed=SEEDS,
)
@with_examples(cases(reduction=REDUCTIONS, dtype=DTYPES, seed=[0]))
def test_one_row_of_logits_is_one_row_of_a_batch(form, reduction, dtype, seed):
    """1-D logits (C,), with a scalar class index (ignored or not) or a target row, give the reference's loss
    (0-d for "none") and gradient (C,), bitwise those of the same row as a batch of one; an ignored row gives
    0 and a zero gradient."""
    C = 21
    rng = np.random.default_rng(seed)
    s = logits(rng, (C,), dtype)
    t = logits(rng, (C,), dtype)
    if form == "none":
        y = None
    elif form == "index":
        y = np.int64(rng.integers(0, C))
    elif form == "ignored":
        y = -100
    elif form == "onehot":
        y = np.eye(C, dtype=dtype)[5]
    else:
        y = rng.random(C).astype(dtype)
    kd = DistillationLoss(2.5, 0.35, reduction=reduction)
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert grad.shape == (C,)
    if reduction == "none":
        assert loss.shape == ()
    # a 1-D input is exactly one row of a 2-D input
    y2 = None if y is None else (np.array([y]) if np.ndim(y) == 0 else y[None, :])
    loss2 = kd.compute_loss(s[None, :], t[None, :], y2)
    grad2 = kd.compute_gradient(s[None, :], t[None, :], y2)
    np.testing.assert_array_equal(np.reshape(loss2, ()), np.reshape(loss, ()))
    np.testing.assert_array_equal(grad2[0], grad)
    if form == "ignored":
        assert float(np.reshape(loss, ())) == 0.0
        assert not grad.any()


@pytest.mark.parametrize("label", [3, np.int8(3), np.uint16(3), np.array(3, dtype=np.int32)])
def test_1d_scalar_label_kinds(rng, label):
    C = 6
    s, t = logits(rng, (C,), np.float64), logits(rng, (C,), np.float64)
    kd = DistillationLoss(2.0, 0.5)
    ref = reference(s, t, 3, temperature=2.0, alpha=0.5)
    assert_loss_close(kd.compute_loss(s, t, label), ref.loss, np.float64)
    assert_grad_close(kd.compute_gradient(s, t, label), ref.grad, np.float64)


@pytest.mark.parametrize("label_dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64])
def test_integer_label_dtypes(rng, label_dtype):
    B, C = 7, 9
    s, t = logits(rng, (B, C), np.float64), logits(rng, (B, C), np.float64)
    y = rng.integers(0, C, size=B).astype(label_dtype)
    kd = DistillationLoss(1.5, 0.6, reduction="sum")
    check_against_reference(kd, s, t, y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["none", "index", "soft"])
def test_empty_batch(reduction, dtype, form):
    C = 5
    s = np.zeros((0, C), dtype=dtype)
    t = np.zeros((0, C), dtype=dtype)
    y = {"none": None, "index": np.zeros(0, dtype=np.int64), "soft": np.zeros((0, C), dtype=dtype)}[form]
    kd = DistillationLoss(3.0, 0.3, reduction=reduction)
    loss = kd.compute_loss(s, t, y)
    grad = kd.compute_gradient(s, t, y)
    check_types(loss, grad, s, np.dtype(dtype), reduction)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss == 0.0
    assert grad.shape == (0, C)
    l2, g2 = kd.loss_and_gradient(s, t, y)
    assert g2.shape == (0, C)
    np.testing.assert_array_equal(l2, loss)


@settings(max_examples=20)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    ignore_index=st.integers(-150, 8),
    classes=st.integers(2, 40),
    seed=SEEDS,
)
@with_examples(
    cases(
        [dict(ignore_index=i, reduction=r) for i, r in itertools.product([-100, -1, 0, 4], REDUCTIONS)],
        dtype=DTYPES,
        classes=[6],
        seed=[0],
    )
)
def test_rows_labelled_ignore_index_are_left_out(reduction, dtype, ignore_index, classes, seed):
    """Rows whose class index is ignore_index (the default -100, -1, or a class index such as 0 or 4) have a
    zero loss and gradient (written over whatever an out= held), and the rest are the reference's and those of
    the batch without the ignored rows ("mean" divides by the rows kept)."""
    B, C = 12, classes
    rng = np.random.default_rng(seed)
    s = logits(rng, (B, C), dtype)
    t = logits(rng, (B, C), dtype)
    y = rng.integers(0, C, size=B)
    y[y == ignore_index] = (ignore_index + 1) % C if 0 <= ignore_index < C else y[y == ignore_index]
    ignored = np.zeros(B, dtype=bool)
    ignored[[0, 3, 4, 10]] = True
    y[ignored] = ignore_index
    kd = DistillationLoss(2.0, 0.3, reduction=reduction, ignore_index=ignore_index)
    assert kd.ignore_index == ignore_index
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert not grad[ignored].any(), "ignored rows must have a zero gradient"
    assert grad[~ignored].any()
    out = np.full(s.shape, np.nan, dtype=dtype)  # a fresh gradient may hold zeros by chance; this one does not
    np.testing.assert_array_equal(kd.compute_gradient(s, t, y, out=out), grad)
    if reduction == "none":
        assert not np.asarray(loss)[ignored].any()
    # the same loss as simply dropping the ignored rows (so "mean" divides by the kept count)
    kept = DistillationLoss(2.0, 0.3, reduction=reduction, ignore_index=ignore_index)
    loss_kept = kept.compute_loss(s[~ignored], t[~ignored], y[~ignored])
    grad_kept = kept.compute_gradient(s[~ignored], t[~ignored], y[~ignored])
    if reduction == "none":
        assert_loss_close(np.asarray(loss)[~ignored], loss_kept, dtype)
    else:
        assert_loss_close(loss, loss_kept, dtype)
    assert_grad_close(grad[~ignored], grad_kept, dtype)


def test_ignore_index_rows_do_not_propagate_nonfinite(rng):
    # "Rows labelled ignore_index are left out entirely": garbage there is irrelevant.
    s = logits(rng, (4, 5), np.float64)
    t = logits(rng, (4, 5), np.float64)
    s[1, 2] = np.nan
    t[1, 0] = np.inf
    y = np.array([0, -100, 3, 1])
    for reduction in REDUCTIONS:
        kd = DistillationLoss(2.0, 0.3, reduction=reduction)
        ref, loss, grad = check_against_reference(kd, s, t, y)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        assert not grad[1].any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (7,)])
def test_all_rows_ignored(rng, reduction, dtype, shape):
    s = logits(rng, shape, dtype)
    t = logits(rng, shape, dtype)
    y = np.full(shape[:-1], -100, dtype=np.int64) if len(shape) == 2 else -100
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    loss = kd.compute_loss(s, t, y)
    grad = kd.compute_gradient(s, t, y)
    check_types(loss, grad, s, np.dtype(dtype), reduction)
    if reduction == "none":
        np.testing.assert_array_equal(loss, np.zeros(shape[:-1], dtype=dtype))
    else:
        assert loss == 0.0 and not np.isnan(loss)
    np.testing.assert_array_equal(grad, np.zeros(shape, dtype=dtype))


@settings(max_examples=15)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from(DTYPES),
    temperature=st.one_of(st.sampled_from([1.0, 3.0, 20.0]), TEMPERATURES),
    form=st.sampled_from(["none", "index", "soft"]),
    seed=SEEDS,
)
@with_examples(
    cases(
        [dict(form=form, dtype=dtype) for form, dtype in itertools.product(["none", "index", "soft"], DTYPES)],
        reduction=REDUCTIONS,
        temperature=[1.0, 3.0, 20.0],
        seed=[0],
    )
)
def test_logits_up_to_1e4_give_finite_results_that_match_the_reference(reduction, dtype, temperature, form, seed):
    """Logits spread over [-1e4, 1e4] (exponentials far beyond any float's range unless shifted by the row's
    maximum) give a finite loss and gradient, the reference's."""
    B, C = 6, 300
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1e4, 1e4, (B, C)).astype(dtype)
    t = rng.uniform(-1e4, 1e4, (B, C)).astype(dtype)
    y = make_labels(rng, form, B, C, dtype)
    kd = DistillationLoss(temperature, 0.4, reduction=reduction)
    ref, loss, grad = check_against_reference(kd, s, t, y)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "dtype,offset",
    [(np.float32, 1e4), (np.float32, -1e4), (np.float64, 1e4), (np.float64, -1e4), (np.float64, 3e5)],
)
def test_large_constant_offset(rng, dtype, offset):
    # log-softmax is shift invariant: a naive exp() would overflow/underflow here.
    B, C = 5, 40
    s = (offset + rng.standard_normal((B, C)) * 2).astype(dtype)
    t = (offset + rng.standard_normal((B, C)) * 2).astype(dtype)
    y = rng.integers(0, C, size=B)
    for reduction in REDUCTIONS:
        kd = DistillationLoss(2.0, 0.3, reduction=reduction)
        ref, loss, grad = check_against_reference(kd, s, t, y, conditioned=True)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("form", ["none", "index", "soft"])
@pytest.mark.parametrize("kind", ["normal", "huge"])
def test_float32_very_wide_rows(form, kind):
    # float32 must stay within 1e-5 for C up to 200000 (row sums accumulated accurately)
    rng = np.random.default_rng(20240 + len(form) + len(kind))
    B, C = 3, 200_000
    if kind == "normal":
        s = (rng.standard_normal((B, C)) * 3).astype(np.float32)
        t = (rng.standard_normal((B, C)) * 3).astype(np.float32)
    else:
        s = rng.uniform(-1e4, 1e4, (B, C)).astype(np.float32)
        t = rng.uniform(-1e4, 1e4, (B, C)).astype(np.float32)
    y = make_labels(rng, form, B, C, np.float32)
    for reduction in REDUCTIONS:
        for temperature in (1.0, 4.0):
            kd = DistillationLoss(temperature, 0.3, reduction=reduction)
            check_against_reference(kd, s, t, y)


def test_float32_wide_rows_accumulation():
    # 200000 similar terms per row with an O(1) loss: naive float32 accumulation of
    # the row sums drifts by ~sqrt(C)*eps ~ 3e-5 relative, beyond the 1e-5 allowed.
    rng = np.random.default_rng(7)
    B, C = 2, 200_000
    s = rng.standard_normal((B, C)).astype(np.float32)
    t = rng.standard_normal((B, C)).astype(np.float32)
    y = rng.integers(0, C, size=B)
    for labels in (y, None):
        for reduction in ("sum", "none"):
            kd = DistillationLoss(1.0, 0.5, reduction=reduction)
            check_against_reference(kd, s, t, labels)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_wide_rows(reduction):
    rng = np.random.default_rng(11)
    B, C = 2, 100_000
    s = rng.standard_normal((B, C)) * 3
    t = rng.standard_normal((B, C)) * 3
    y = rng.integers(0, C, size=B)
    check_against_reference(DistillationLoss(2.0, 0.3, reduction=reduction), s, t, y)


# Around multiples of the kernels' lanes and the longest rows that run in blocks, as the library reports them.
_INFO = kdloss.build_info()
_AROUND = [_INFO["lanes"] * k for k in (1, 2, 4)] + list(_INFO["block_max_classes"].values())
ROW_WIDTHS = sorted({1, 2, 3, 4, 5, 7, 8, 9, 99, 100, 101, 1000} | {n + d for n in _AROUND for d in (-1, 0, 1)})


@settings(max_examples=10)
@given(dtype=st.sampled_from(DTYPES), classes=st.integers(1, 1100), seed=SEEDS)
@with_examples([dict(dtype=dtype, classes=classes, seed=0) for classes in ROW_WIDTHS for dtype in DTYPES])
def test_row_widths_around_multiples_of_the_vector_width_match_the_reference(dtype, classes, seed):
    """Widths around multiples of the SIMD lanes exercise the vectorised loops' tails: per-row losses and the
    gradient with class indices, and the mean without labels, are the reference's."""
    B = 4
    rng = np.random.default_rng(seed)
    s = logits(rng, (B, classes), dtype)
    t = logits(rng, (B, classes), dtype)
    y = rng.integers(0, classes, size=B)
    check_against_reference(DistillationLoss(1.7, 0.45, reduction="none"), s, t, y)
    check_against_reference(DistillationLoss(1.7, 0.45, reduction="mean"), s, t, None)


@settings(max_examples=10)
@given(batch=st.integers(1, 60), classes=st.integers(1, 300), seed=SEEDS)
@with_examples(
    [
        dict(batch=batch, classes=classes, seed=0)
        for classes in (10, 100, BLOCK_MAX_F64, BLOCK_MAX_F64 + 1)
        for batch in (1, 15, 16, 17, 40)
    ]
)
def test_batch_sizes_around_a_block_with_ignored_rows_match_the_reference(batch, classes, seed):
    """Short rows are processed sixteen at a time, skipping ignored ones: batch sizes around that multiple,
    with ignored rows scattered among them, give the reference's results for partly filled blocks (and for
    the first long rows), with class indices, target distributions and no labels, in every reduction."""
    B, C = batch, classes
    rng = np.random.default_rng(seed)
    s = logits(rng, (B, C), np.float64)
    t = logits(rng, (B, C), np.float64)
    for labels in ("index", "soft", "none"):
        y = {"index": rng.integers(0, C, size=B), "soft": rng.random((B, C)), "none": None}[labels]
        if labels == "index":
            y[rng.random(B) < 0.3] = -100
        for reduction in REDUCTIONS:
            check_against_reference(DistillationLoss(3.0, 0.6, reduction=reduction), s, t, y)


def test_single_class(rng):
    # C = 1: softmax is 1, every loss and gradient is exactly 0.
    s = logits(rng, (4, 1), np.float64)
    t = logits(rng, (4, 1), np.float64)
    for reduction in REDUCTIONS:
        kd = DistillationLoss(3.0, 0.3, reduction=reduction)
        ref, loss, grad = check_against_reference(kd, s, t, np.zeros(4, dtype=np.int64))
        np.testing.assert_array_equal(grad, 0.0)
        np.testing.assert_array_equal(loss, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_student_and_teacher_gives_zero_soft_loss(rng, dtype):
    s = logits(rng, (5, 13), dtype)
    kd = DistillationLoss(2.0, 0.3, reduction="none")
    loss = kd.compute_loss(s, s.copy())
    grad = kd.compute_gradient(s, s.copy())
    atol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(loss, 0.0, atol=atol)
    np.testing.assert_allclose(grad, 0.0, atol=atol)


def test_mean_is_sum_over_count(rng):
    B, C = 10, 6
    s, t = logits(rng, (B, C), np.float64), logits(rng, (B, C), np.float64)
    y = rng.integers(0, C, size=B)
    y[[2, 5, 6]] = -100
    mean = DistillationLoss(2.0, 0.3, reduction="mean")
    total = DistillationLoss(2.0, 0.3, reduction="sum")
    none = DistillationLoss(2.0, 0.3, reduction="none")
    assert mean.compute_loss(s, t, y) == pytest.approx(total.compute_loss(s, t, y) / 7, rel=1e-14)
    assert total.compute_loss(s, t, y) == pytest.approx(float(np.sum(none.compute_loss(s, t, y))), rel=1e-14)
    np.testing.assert_allclose(
        mean.compute_gradient(s, t, y), total.compute_gradient(s, t, y) / 7, rtol=1e-14, atol=1e-17
    )
    np.testing.assert_allclose(none.compute_gradient(s, t, y), total.compute_gradient(s, t, y), rtol=1e-14, atol=1e-17)


@pytest.mark.parametrize("classes", [10, 1000])
def test_float32_keeps_a_confident_rows_cross_entropy(rng, classes):
    # Confident, correct rows have a cross-entropy of about e^-10: log(1 + tiny). Summing the row's
    # exponentials in float would round that tiny part to float's resolution at 1 (regression test).
    s = rng.standard_normal((64, classes))
    y = rng.integers(0, classes, size=64)
    s[np.arange(64), y] += 10.0
    t = s + 0.01 * rng.standard_normal(s.shape)
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    ref = reference(s32, t32, y, temperature=3.0, alpha=1.0)
    loss = DistillationLoss(3.0, 1.0)(s32, t32, y)
    assert loss == pytest.approx(ref.loss, rel=1e-6)


@pytest.mark.parametrize("classes", [10, 100, 1000, 20000])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_float32_soft_loss_of_a_close_teacher_is_good_to_float_resolution(rng, classes, temperature):
    # Teacher within 1e-2 of the student: the soft loss (~1e-5) is a small difference of O(1) terms. float32
    # exponentials bound its absolute error to a few float ulps (measured up to 4e-8 T^2). Summing Z_s and
    # Z_t apart in float, each to float's resolution, made it 4x worse (regression test).
    s = rng.standard_normal((64, classes)) * 3
    t = s + rng.uniform(-1e-2, 1e-2, s.shape)
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    ref = reference(s32, t32, None, temperature=temperature, alpha=0.3, reduction="none")
    loss = DistillationLoss(temperature, 0.3, reduction="none").compute_loss(s32, t32)
    assert np.max(np.abs(loss - ref.loss)) <= 8e-8 * temperature**2
