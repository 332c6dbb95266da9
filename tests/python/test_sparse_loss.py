"""The loss against a sparse teacher (kdloss.SparseTeacher) against the independent float64 reference.

The reference (reference.sparse_soft_reference) scatters the cache into a dense teacher and applies the issue's
formulas; the hard term comes from the dense reference with alpha = 1, which reads no teacher. Every row length the
kernels treat apart (shorter than a vector, short, long), every dtype of the cache, both tails, labels of both
kinds, ignored rows, reductions, threads, and the checks of bad caches, which must leave `out` untouched.
"""

from __future__ import annotations

import re

import kdloss
import numpy as np
import pytest
from helpers import assert_grad_close, assert_loss_close
from reference import dense_equivalent, reference, sparse_soft_reference

TAILS = ("bucket", "renormalize")


def top_k_cache(teacher: np.ndarray, k: int, temperature: float, index_dtype=np.int32, logprob_dtype=np.float32):
    """The k most probable classes of each row with their exact log-softmax, computed here in float64."""
    scaled = np.asarray(teacher, dtype=np.float64) / temperature
    top = scaled.max(axis=-1, keepdims=True)
    log_softmax = scaled - top - np.log(np.exp(scaled - top).sum(axis=-1, keepdims=True))
    indices = np.argsort(-scaled, axis=-1, kind="stable")[..., :k]
    logprobs = np.take_along_axis(log_softmax, indices, axis=-1)
    return kdloss.SparseTeacher(indices.astype(index_dtype), logprobs.astype(logprob_dtype))


def expected(student, cache, labels, *, temperature, alpha, tail, reduction="mean", ignore_index=-100):
    """Loss and gradient of the whole loss, from the sparse soft reference and the dense hard reference."""
    s = np.asarray(student, dtype=np.float64)
    soft = sparse_soft_reference(s, cache.indices, cache.logprobs.astype(np.float64), temperature, tail)
    lead = s.shape[:-1]
    counted = np.ones(lead, dtype=bool)
    if labels is not None and np.issubdtype(np.asarray(labels).dtype, np.integer):
        counted = np.asarray(labels) != ignore_index
    rows, grad = soft.soft, soft.grad
    if labels is not None:
        hard = reference(
            s.reshape(-1, s.shape[-1]),
            s.reshape(-1, s.shape[-1]),
            np.asarray(labels).reshape(-1) if np.asarray(labels).ndim == len(lead) else labels.reshape(-1, s.shape[-1]),
            temperature=temperature,
            alpha=1.0,
            reduction="none",
            ignore_index=ignore_index,
        )
        rows = (1 - alpha) * rows + alpha * hard.rows.reshape(lead)
        grad = (1 - alpha) * grad + alpha * hard.grad.reshape(s.shape)
    rows = np.where(counted, rows, 0.0)
    grad = np.where(counted[..., None], grad, 0.0)
    if reduction == "none":
        return rows, grad
    divisor = max(int(counted.sum()), 1) if reduction == "mean" else 1
    return rows.sum() / divisor, grad / divisor


def logits(rng, shape, dtype, scale=3.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


@pytest.mark.parametrize("classes", [5, 16, 100, 1000, 5000])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_the_reference(classes: int, tail: str, dtype) -> None:
    rng = np.random.default_rng(classes)
    student, teacher = logits(rng, (6, classes), dtype), logits(rng, (6, classes), np.float64)
    cache = top_k_cache(teacher, min(7, classes), 2.0, logprob_dtype=dtype)
    labels = rng.integers(0, classes, 6)
    for given in (None, labels):
        kd = kdloss.DistillationLoss(2.0, 0.4, tail=tail, num_threads=1)
        loss, grad = kd.loss_and_gradient(student, cache, given)
        want_loss, want_grad = expected(student, cache, given, temperature=2.0, alpha=0.4, tail=tail)
        assert_loss_close(loss, want_loss, dtype)
        assert_grad_close(grad, want_grad, dtype)
        assert kd.compute_loss(student, cache, given) == loss


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("logprob_dtype", [np.float16, np.float32, np.float64])
def test_every_cache_dtype_is_read_as_it_is(index_dtype, logprob_dtype) -> None:
    rng = np.random.default_rng(1)
    student, teacher = logits(rng, (2, 3, 300), np.float32), logits(rng, (2, 3, 300), np.float64)
    cache = top_k_cache(teacher, 20, 3.0, index_dtype, logprob_dtype)
    kd = kdloss.DistillationLoss(3.0, num_threads=1)
    loss, grad = kd.loss_and_gradient(student, cache)
    # The reference reads the cache's values as they are, float16 rounding included.
    want_loss, want_grad = expected(student, cache, None, temperature=3.0, alpha=0.3, tail="bucket")
    assert_loss_close(loss, want_loss, np.float32)
    assert_grad_close(grad, want_grad, np.float32)


def test_a_cache_of_every_class_is_the_dense_teacher() -> None:
    rng = np.random.default_rng(2)
    student, teacher = logits(rng, (4, 50), np.float64), logits(rng, (4, 50), np.float64)
    labels = rng.integers(0, 50, 4)
    indices, logprobs = dense_equivalent(teacher, 1.5)
    cache = kdloss.SparseTeacher(indices, logprobs)
    for tail in TAILS:
        kd = kdloss.DistillationLoss(1.5, 0.3, tail=tail, num_threads=1)
        dense_loss, dense_grad = kd.loss_and_gradient(student, teacher, labels)
        sparse_loss, sparse_grad = kd.loss_and_gradient(student, cache, labels)
        np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-12)
        np.testing.assert_allclose(sparse_grad, dense_grad, rtol=0, atol=1e-12 * np.abs(dense_grad).max())


@pytest.mark.parametrize("tail", TAILS)
def test_gradient_matches_finite_differences(tail: str) -> None:
    rng = np.random.default_rng(3)
    student, teacher = logits(rng, (3, 40), np.float64), logits(rng, (3, 40), np.float64)
    cache = top_k_cache(teacher, 6, 2.0, logprob_dtype=np.float64)
    labels = rng.integers(0, 40, 3)
    kd = kdloss.DistillationLoss(2.0, 0.3, tail=tail, num_threads=1)
    grad = kd.compute_gradient(student, cache, labels)
    step = 1e-6
    numeric = np.zeros_like(student)
    for index in np.ndindex(student.shape):
        up, down = student.copy(), student.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (kd.compute_loss(up, cache, labels) - kd.compute_loss(down, cache, labels)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-7 * np.abs(grad).max())


def test_the_tail_stays_exact_where_the_listed_classes_hold_nearly_all_of_the_student() -> None:
    # The student puts all but ~1e-12 of its mass on the listed classes, the teacher leaves them a tail of 0.1:
    # Q_u computed as 1 - sum q_k would be lost to rounding, and with it the tail's term.
    classes = 2000
    student = np.full((1, classes), -30.0)
    student[0, :4] = [5.0, 4.0, 3.0, 2.0]
    logprobs = np.log(np.array([[0.5, 0.2, 0.1, 0.1]]))
    cache = kdloss.SparseTeacher(np.arange(4)[None], logprobs)
    for dtype in (np.float64, np.float32):
        kd = kdloss.DistillationLoss(1.0, num_threads=1)
        loss, grad = kd.loss_and_gradient(student.astype(dtype), cache)
        want_loss, want_grad = expected(student, cache, None, temperature=1.0, alpha=0.3, tail="bucket")
        assert_loss_close(loss, want_loss, dtype)
        assert_grad_close(grad, want_grad, dtype)
    assert want_loss > 2.0  # the tail term carries it: 0.1 log(0.1 / Q_u), Q_u ~ 1e-12


def test_rows_listing_nothing_every_class_or_masked_classes() -> None:
    student = np.array([[1.0, 2.0, 0.5, -1.0], [1.0, -np.inf, 0.5, -1.0], [0.0, 1.0, -np.inf, -np.inf]])
    indices = np.array([[0, 1], [1, 0], [0, 1]])
    logprobs = np.array([[-np.inf, -np.inf], [np.log(0.5), np.log(0.3)], [np.log(0.4), np.log(0.3)]])
    cache = kdloss.SparseTeacher(indices, logprobs)
    for tail in TAILS:
        rows = kdloss.DistillationLoss(1.0, reduction="none", tail=tail, num_threads=1).compute_loss(student, cache)
        grad = kdloss.DistillationLoss(1.0, reduction="sum", tail=tail, num_threads=1).compute_gradient(student, cache)
        want_rows, want_grad = expected(student, cache, None, temperature=1.0, alpha=0.3, tail=tail, reduction="none")
        assert rows[0] == 0.0 and np.all(grad[0] == 0.0)  # nothing listed: no soft term
        assert rows[1] == np.inf  # a listed class the student rules out
        np.testing.assert_allclose(grad[1], want_grad[1], rtol=1e-12)  # finite there: -T p_j
        if tail == "bucket":
            # A tail of 0.3 and no unlisted class the student allows: infinite, NaN where the student has no mass.
            assert rows[2] == np.inf
            assert np.isnan(grad[2, 2:]).all() and np.isfinite(grad[2, :2]).all()
        np.testing.assert_allclose(rows[2], want_rows[2], rtol=1e-12)


def test_labels_of_both_kinds_ignored_rows_and_reductions() -> None:
    rng = np.random.default_rng(4)
    student, teacher = logits(rng, (8, 200), np.float64), logits(rng, (8, 200), np.float64)
    cache = top_k_cache(teacher, 10, 2.0, logprob_dtype=np.float64)
    indices = rng.integers(0, 200, 8)
    indices[[1, 5]] = -100
    targets = rng.dirichlet(np.ones(200), 8)
    for labels in (indices, targets):
        for reduction in ("mean", "sum", "none"):
            kd = kdloss.DistillationLoss(2.0, 0.6, reduction=reduction, num_threads=1)
            loss, grad = kd.loss_and_gradient(student, cache, labels)
            want_loss, want_grad = expected(
                student, cache, labels, temperature=2.0, alpha=0.6, tail="bucket", reduction=reduction
            )
            np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
            np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-13)
    soft, hard = kdloss.DistillationLoss(2.0, 0.6, num_threads=1).loss_parts(student, cache, indices)
    counted = indices != -100
    want_soft = sparse_soft_reference(student, cache.indices, cache.logprobs, 2.0, "bucket").soft[counted].mean()
    np.testing.assert_allclose(soft, want_soft, rtol=1e-12)
    assert hard > 0


def test_threads_give_bitwise_the_same_results() -> None:
    rng = np.random.default_rng(5)
    student, teacher = logits(rng, (64, 3000), np.float32), logits(rng, (64, 3000), np.float32)
    cache = top_k_cache(teacher, 32, 3.0)
    labels = rng.integers(0, 3000, 64)
    results = [
        kdloss.DistillationLoss(num_threads=threads).loss_and_gradient(student, cache, labels) for threads in (1, 2, 3)
    ]
    for loss, grad in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grad, results[0][1])


def test_torch_tensors_are_read_without_a_copy() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    student, teacher = logits(rng, (4, 100), np.float32), logits(rng, (4, 100), np.float32)
    reference_cache = top_k_cache(teacher, 8, 3.0)
    cache = kdloss.SparseTeacher(torch.from_numpy(reference_cache.indices), torch.from_numpy(reference_cache.logprobs))
    kd = kdloss.DistillationLoss(num_threads=1)
    assert kd.compute_loss(student, cache) == kd.compute_loss(student, reference_cache)


BAD_CACHES = [
    (lambda i, p: p.__setitem__((1, 2), np.nan), "logprobs of row (1,) hold NaN"),
    (lambda i, p: p.__setitem__((2, 0), np.inf), "logprobs of row (2,) hold +inf"),
    (lambda i, p: i.__setitem__((1, 3), 50), "indices of row (1,) hold 50, outside [0, 50)"),
    (lambda i, p: i.__setitem__((0, 1), -1), "indices of row (0,) hold -1, outside [0, 50)"),
    (lambda i, p: i.__setitem__((2, 4), i[2, 1]), "indices of row (2,) list class {dup} more than once"),
    (lambda i, p: p.__setitem__((1, slice(None)), np.log(0.25)), "logprobs of row (1,) sum to probability 1.25 > 1"),
]


@pytest.mark.parametrize(("spoil", "message"), BAD_CACHES)
def test_a_bad_cache_is_refused_naming_its_row_and_nothing_is_written(spoil, message) -> None:
    rng = np.random.default_rng(7)
    student, teacher = logits(rng, (3, 50), np.float64), logits(rng, (3, 50), np.float64)
    good = top_k_cache(teacher, 5, 1.0, np.int64, np.float64)
    indices, logprobs = good.indices.copy(), good.logprobs.copy()
    spoil(indices, logprobs)
    message = message.format(dup=indices[2, 1])
    out = np.full_like(student, 7.0)
    kd = kdloss.DistillationLoss(1.0, num_threads=1)
    with pytest.raises(ValueError, match=re.escape(message)):
        kd.compute_gradient(student, kdloss.SparseTeacher(indices, logprobs), out=out)
    assert np.all(out == 7.0)


def test_rows_are_named_by_their_place_in_the_leading_shape() -> None:
    rng = np.random.default_rng(8)
    student, teacher = logits(rng, (2, 3, 20), np.float32), logits(rng, (2, 3, 20), np.float32)
    good = top_k_cache(teacher, 4, 1.0)
    logprobs = good.logprobs.copy()
    logprobs[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"logprobs of row \(1, 2\) hold NaN"):
        kdloss.DistillationLoss(1.0).compute_loss(student, kdloss.SparseTeacher(good.indices, logprobs))


def test_one_row_is_named_as_a_cache_of_one_row_is() -> None:
    student = np.array([1.0, 2.0, 3.0])
    cache = kdloss.SparseTeacher(np.array([0, 0]), np.log(np.array([0.5, 0.25])))
    with pytest.raises(ValueError, match=re.escape("indices of row () list class 0 more than once")):
        kdloss.DistillationLoss(1.0).compute_loss(student, cache)
    with pytest.raises(ValueError, match=re.escape("indices of row () list class 0 more than once")):
        cache.validate()


def test_empty_slots_may_hold_any_index() -> None:
    rng = np.random.default_rng(9)
    student, teacher = logits(rng, (2, 30), np.float64), logits(rng, (2, 30), np.float64)
    good = top_k_cache(teacher, 4, 1.0, np.int64, np.float64)
    indices = np.concatenate([good.indices, [[999, 999], [good.indices[1, 0], -5]]], axis=1)
    logprobs = np.concatenate([good.logprobs, np.full((2, 2), -np.inf)], axis=1)
    kd = kdloss.DistillationLoss(1.0, num_threads=1)
    assert kd.compute_loss(student, kdloss.SparseTeacher(indices, logprobs)) == kd.compute_loss(student, good)


def test_other_divergences_and_shapes_are_refused() -> None:
    rng = np.random.default_rng(10)
    student, teacher = logits(rng, (3, 20), np.float32), logits(rng, (3, 20), np.float32)
    cache = top_k_cache(teacher, 4, 1.0)
    with pytest.raises(ValueError, match="divergence 'jsd' needs the teacher's whole distribution"):
        kdloss.DistillationLoss(divergence="jsd").compute_loss(student, cache)
    with pytest.raises(ValueError, match="leading shape of student_logits"):
        kdloss.DistillationLoss().compute_loss(student[:2], cache)
    with pytest.raises(ValueError, match="tail must be one of 'bucket', 'renormalize', got 'top'"):
        kdloss.DistillationLoss(tail="top")
    with pytest.raises(TypeError, match="tail must be one of"):
        kdloss.DistillationLoss(tail=1)


def test_temperatures_above_100_are_refused_with_a_sparse_teacher() -> None:
    """The dense loss takes temperatures up to 1e6 (computing the rows that cancellation would spoil again); a sparse
    teacher's loss has no such pass, and stops at 100 with a clear error rather than a number off in its digits."""
    rng = np.random.default_rng(12)
    student, teacher = logits(rng, (3, 20), np.float32), logits(rng, (3, 20), np.float32)
    out = np.full(student.shape, 7.0, np.float32)
    for temperature, shown in ((100.5, "100.5"), (1e3, "1000"), (1e6, "1e+06")):
        kd = kdloss.DistillationLoss(temperature)
        cache = top_k_cache(teacher, 4, temperature)
        message = f"temperature must be at most 100 with a sparse teacher (where kdloss is accurate), got {shown}"
        with pytest.raises(ValueError, match=re.escape(message)):
            kd.compute_gradient(student, cache, out=out)
        with pytest.raises(ValueError, match=re.escape(message)):
            kd.compute_loss(student, cache)
        assert np.all(out == 7.0)
        assert np.isfinite(kd.compute_loss(student, teacher))  # the dense teacher's loss takes it
    assert np.isfinite(kdloss.DistillationLoss(100.0).compute_loss(student, top_k_cache(teacher, 4, 100.0)))


def test_a_cache_of_another_temperature_or_vocabulary_is_refused() -> None:
    rng = np.random.default_rng(11)
    student, teacher = logits(rng, (3, 20), np.float32), logits(rng, (3, 20), np.float32)
    built = top_k_cache(teacher, 4, 2.0)
    kd = kdloss.DistillationLoss(3.0)
    stamped = kdloss.SparseTeacher(built.indices, built.logprobs, temperature=2.0, vocab_size=20)
    with pytest.raises(ValueError, match="at temperature 2.0, the loss's temperature is 3.0"):
        kd.compute_loss(student, stamped)
    assert np.isfinite(kdloss.DistillationLoss(2.0).compute_loss(student, stamped))
    wider = kdloss.SparseTeacher(built.indices, built.logprobs, temperature=3.0, vocab_size=21)
    with pytest.raises(ValueError, match="of a vocabulary of 21 classes, student_logits of 20"):
        kd.compute_loss(student, wider)


def test_half_precision_caches_are_allowed_their_rounding() -> None:
    # log(0.5), log(0.3), log(0.2) rounded to float16 sum to probability 0.99987; other roundings exceed 1 by up to
    # 2^-11 sum p |log p|, which is allowed them, and no more.
    rng = np.random.default_rng(12)
    teacher = rng.normal(size=(200, 6))
    cache = top_k_cache(teacher, 6, 1.0, logprob_dtype=np.float16)  # every class: sums of 1, rounded
    totals = np.exp(cache.logprobs.astype(np.float64)).sum(axis=-1)
    assert totals.max() > 1 + 1e-6  # what a float32 cache would be refused for
    student = rng.normal(size=(200, 6))
    kd = kdloss.DistillationLoss(1.0, num_threads=1)
    loss, grad = kd.loss_and_gradient(student, cache)
    want_loss, want_grad = expected(student, cache, None, temperature=1.0, alpha=0.3, tail="bucket")
    assert_loss_close(loss, want_loss, np.float64)
    assert_grad_close(grad, want_grad, np.float64)
    cache.validate()
    bad = kdloss.SparseTeacher(np.array([[0, 1, 2]]), np.log(np.array([[0.5, 0.3, 0.21]])).astype(np.float16))
    with pytest.raises(ValueError) as from_loss:
        kd.compute_loss(np.zeros((1, 3)), bad)
    with pytest.raises(ValueError) as from_validate:
        bad.validate()
    assert str(from_loss.value) == str(from_validate.value)
    assert re.fullmatch(r"logprobs of row \(0,\) sum to probability 1\.0\d+ > 1 \(\+0\.000\d+ for rounding\)",
                        str(from_loss.value))  # fmt: skip
