"""Logits of any rank (leading axes are rows), accumulation-safe reduction, and DLPack inputs."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from helpers import assert_grad_close, assert_loss_close
from kdloss import DistillationLoss
from reference import reference

REDUCTIONS = ["mean", "sum", "none"]


def sequence_batch(rng, shape, dtype=np.float64, ignored=0.25):
    student = (rng.standard_normal(shape) * 3).astype(dtype)
    teacher = (rng.standard_normal(shape) * 3).astype(dtype)
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    labels[rng.random(shape[:-1]) < ignored] = -100
    return student, teacher, labels


def flat_reference(student, teacher, labels, **params):
    """The reference on the rows the leading axes hold, reshaped back."""
    classes = student.shape[-1]
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1) if labels.dtype.kind in "iu" else labels.reshape(-1, classes)
    ref = reference(student.reshape(-1, classes), teacher.reshape(-1, classes), flat_labels, **params)
    loss = ref.rows.reshape(student.shape[:-1]) if params.get("reduction") == "none" else ref.loss
    return loss, ref.grad.reshape(student.shape)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 4, 40), (1, 6, 100)])
def test_sequence_logits_match_the_reference_on_their_rows(rng, reduction, dtype, shape):
    student, teacher, labels = sequence_batch(rng, shape, dtype)
    kd = DistillationLoss(2.0, 0.4, reduction=reduction)
    loss, grad = kd.loss_and_gradient(student, teacher, labels)
    ref_loss, ref_grad = flat_reference(student, teacher, labels, temperature=2.0, alpha=0.4, reduction=reduction)
    assert grad.shape == shape and grad.dtype == dtype
    if reduction == "none":
        assert loss.shape == shape[:-1] and loss.dtype == dtype
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("labels", ["none", "soft"])
def test_sequence_logits_with_other_label_forms(rng, labels):
    student, teacher, _ = sequence_batch(rng, (2, 3, 9))
    targets = None if labels == "none" else rng.random(student.shape)
    kd = DistillationLoss(3.0, 0.3, reduction="none")
    loss, grad = kd.loss_and_gradient(student, teacher, targets)
    ref_loss, ref_grad = flat_reference(student, teacher, targets, temperature=3.0, alpha=0.3, reduction="none")
    assert_loss_close(loss, ref_loss, np.float64)
    assert_grad_close(grad, ref_grad, np.float64)


def test_label_shape_must_be_the_leading_shape(rng):
    student, teacher, labels = sequence_batch(rng, (2, 3, 5))
    with pytest.raises(ValueError, match=r"true_labels.*\(2, 3\)"):
        DistillationLoss().compute_loss(student, teacher, labels.reshape(-1))


@pytest.mark.parametrize("layout", ["transposed", "sliced_classes", "sliced_sequence", "broadcast"])
def test_strided_leading_axes(rng, layout):
    base_student, base_teacher, base_labels = sequence_batch(rng, (4, 6, 12))
    if layout == "transposed":  # leading axes that do not collapse: converted once
        student, teacher, labels = (x.swapaxes(0, 1) for x in (base_student, base_teacher, base_labels))
    elif layout == "sliced_classes":  # rows apart by more than their length: read in place
        student, teacher, labels = base_student[..., :7], base_teacher[..., :7], base_labels % 7
    elif layout == "sliced_sequence":  # every other position: the leading axes no longer collapse
        student, teacher, labels = base_student[:, ::2], base_teacher[:, ::2], base_labels[:, ::2]
    else:  # one row repeated along a stride-0 axis
        student = np.broadcast_to(base_student[0, 0], (3, 4, 12))
        teacher = np.broadcast_to(base_teacher[0, 1], (3, 4, 12))
        labels = np.broadcast_to(np.int64(5), (3, 4))
    kd = DistillationLoss(2.5, 0.5, reduction="none")
    loss, grad = kd.loss_and_gradient(student, teacher, labels)
    ref_loss, ref_grad = flat_reference(
        np.ascontiguousarray(student),
        np.ascontiguousarray(teacher),
        np.ascontiguousarray(labels),
        temperature=2.5,
        alpha=0.5,
        reduction="none",
    )
    assert_loss_close(loss, ref_loss, np.float64)
    assert_grad_close(grad, ref_grad, np.float64)


# ---------------------------------------------------------------------------
# Accumulation-safe reduction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sum_and_count(rng, reduction):
    student, teacher, labels = sequence_batch(rng, (4, 5, 11), ignored=0.3)
    loss_sum, count = DistillationLoss(2.0, 0.3, reduction=reduction).sum_and_count(student, teacher, labels)
    ref_sum, _ = flat_reference(student, teacher, labels, temperature=2.0, alpha=0.3, reduction="sum")
    assert isinstance(loss_sum, float) and isinstance(count, int)
    assert count == int(np.count_nonzero(labels != -100))
    assert_loss_close(loss_sum, ref_sum, np.float64)
    assert DistillationLoss().sum_and_count(student, teacher)[1] == 20  # no labels: every row counts


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalizer_divides_the_sum(rng, reduction, dtype):
    student, teacher, labels = sequence_batch(rng, (3, 4, 10), dtype)
    kd = DistillationLoss(3.0, 0.3, reduction=reduction)
    loss, grad = kd.loss_and_gradient(student, teacher, labels, normalizer=7.5)
    ref_sum, ref_grad = flat_reference(student, teacher, labels, temperature=3.0, alpha=0.3, reduction="sum")
    assert_loss_close(loss, ref_sum / 7.5, dtype)
    assert_grad_close(grad, ref_grad / 7.5, dtype)
    assert kd.compute_loss(student, teacher, labels, normalizer=7.5) == loss
    np.testing.assert_array_equal(kd.compute_gradient(student, teacher, labels, normalizer=7.5), grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_micro_batches_give_exactly_the_full_batch_gradient(rng, dtype):
    # Gradient accumulation: every micro-batch normalised by the count over the whole batch.
    student, teacher, labels = sequence_batch(rng, (8, 5, 50), dtype, ignored=0.3)
    kd = DistillationLoss(2.0, 0.3)
    full_loss, full_grad = kd.loss_and_gradient(student, teacher, labels)
    pieces = [slice(0, 3), slice(3, 4), slice(4, 8)]
    total = sum(kd.sum_and_count(student[p], teacher[p], labels[p])[1] for p in pieces)
    losses, grads = zip(*(kd.loss_and_gradient(student[p], teacher[p], labels[p], normalizer=total) for p in pieces))
    np.testing.assert_array_equal(np.concatenate(grads), full_grad)  # each row is computed the same way
    assert sum(losses) == pytest.approx(full_loss, rel=1e-12)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_normalizer_must_be_positive_and_finite(rng, value):
    student, teacher, labels = sequence_batch(rng, (2, 4))
    with pytest.raises(ValueError, match="normalizer"):
        DistillationLoss().compute_loss(student, teacher, labels, normalizer=value)


def test_normalizer_needs_a_reduced_loss(rng):
    student, teacher, labels = sequence_batch(rng, (2, 4))
    out = np.full_like(student, 7.0)
    with pytest.raises(ValueError, match="normalizer.*none"):
        DistillationLoss(reduction="none").compute_gradient(student, teacher, labels, out=out, normalizer=2.0)
    assert np.all(out == 7.0)
    with pytest.raises(TypeError, match="normalizer"):
        DistillationLoss().compute_loss(student, teacher, labels, normalizer="2")


# ---------------------------------------------------------------------------
# DLPack
# ---------------------------------------------------------------------------


class DLPackOnly:
    """A foreign CPU array that NumPy only knows through the DLPack protocol."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dlpack_inputs_are_read_without_a_copy(rng, dtype):
    student = rng.standard_normal((256, 50_000)).astype(dtype)  # 50-100 MB each
    teacher = rng.standard_normal((256, 50_000)).astype(dtype)
    labels = rng.integers(0, 50_000, size=256)
    kd = DistillationLoss(num_threads=1)
    expected = kd.compute_loss(student, teacher, labels)
    tracemalloc.start()
    try:
        got = kd.compute_loss(DLPackOnly(student), DLPackOnly(teacher), DLPackOnly(labels))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == expected
    assert peak < student.nbytes / 100
