"""Comparison helpers shared by the test modules (no kdloss import here either)."""

from __future__ import annotations

import numpy as np
from hypothesis import example
from hypothesis import strategies as st
from reference import reference

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

# Spec tolerances.
F64_LOSS_RTOL = 1e-12
F64_LOSS_ATOL = 1e-15
F64_GRAD_RTOL = 1e-12  # times max|grad|
F64_GRAD_ATOL = 1e-15
F32_LOSS_RTOL = 1e-5
F32_LOSS_ATOL = 1e-30
F32_GRAD_RTOL = 1e-5  # times max|grad|
F32_GRAD_ATOL = 1e-30


def is_f32(dtype) -> bool:
    return np.dtype(dtype) == np.float32


def _nonfinite_pattern_equal(got, ref, what):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaN pattern differs")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref), err_msg=f"{what}: +inf pattern differs")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref), err_msg=f"{what}: -inf pattern differs")
    return got, ref, np.isfinite(ref)


def assert_loss_close(got, ref, dtype, *, mag=None, what="loss"):
    """Loss within the spec's relative tolerance of the reference.

    ``mag`` (optional) is the reference's error-scale magnitude; when given, an
    extra absolute allowance of a few ulps times ``mag`` is granted (used for
    ill-conditioned inputs such as large constant offsets, where no finite
    precision implementation can reach the plain relative bound).
    """
    got, ref, fin = _nonfinite_pattern_equal(got, ref, what)
    if is_f32(dtype):
        rtol, atol, eps = F32_LOSS_RTOL, F32_LOSS_ATOL, EPS32
    else:
        rtol, atol, eps = F64_LOSS_RTOL, F64_LOSS_ATOL, EPS64
    tol = rtol * np.abs(ref[fin]) + atol
    if mag is not None:
        tol = tol + 32 * eps * np.asarray(mag, dtype=np.float64)[fin]
    err = np.abs(got[fin] - ref[fin])
    bad = err > tol
    assert not np.any(bad), (
        f"{what}: max error {err.max():.3e} exceeds tolerance; got {got[fin][bad][:5]}, expected {ref[fin][bad][:5]}"
    )


def assert_grad_close(got, ref, dtype, *, mag=None, what="gradient"):
    """max|got - ref| <= rtol * max|ref| + atol (spec), elementwise on finite entries."""
    got, ref, fin = _nonfinite_pattern_equal(got, ref, what)
    if ref.size == 0 or not fin.any():
        return
    if is_f32(dtype):
        rtol, atol, eps = F32_GRAD_RTOL, F32_GRAD_ATOL, EPS32
    else:
        rtol, atol, eps = F64_GRAD_RTOL, F64_GRAD_ATOL, EPS64
    scale = np.max(np.abs(ref[fin]))
    tol = rtol * scale + atol
    if mag is not None:
        tol = tol + 32 * eps * np.asarray(mag, dtype=np.float64)[fin]
    err = np.abs(got[fin] - ref[fin])
    assert np.all(err <= tol), (
        f"{what}: max-abs error {err.max():.3e} exceeds {np.max(tol):.3e} (max|grad| = {scale:.3e})"
    )


def check_against_reference(kd, student, teacher, labels=None, *, conditioned=False, out=None):
    """Run compute_loss / compute_gradient / loss_and_gradient and compare with the reference."""
    params = dict(
        temperature=kd.temperature,
        alpha=kd.alpha,
        reduction=kd.reduction,
        ignore_index=kd.ignore_index,
        divergence=kd.divergence,
    )
    if kd.divergence == "jsd":
        params["beta"] = kd.beta
    elif kd.divergence.startswith("skew_"):
        params["skew"] = kd.skew
    dtype = np.result_type(student, teacher, np.float32)
    ref = reference(student, teacher, labels, **params)
    loss = kd.compute_loss(student, teacher, labels)
    grad = kd.compute_gradient(student, teacher, labels)
    check_types(loss, grad, student, dtype, kd.reduction)
    lmag = ref.loss_mag if conditioned else None
    gmag = ref.grad_mag if conditioned else None
    assert_loss_close(loss, ref.loss, dtype, mag=lmag)
    assert_grad_close(grad, ref.grad, dtype, mag=gmag)
    return ref, loss, grad


def check_types(loss, grad, student, dtype, reduction):
    student = np.asarray(student)
    if reduction == "none":
        assert isinstance(loss, np.ndarray), f"'none' loss must be an ndarray, got {type(loss)}"
        assert loss.dtype == dtype, f"loss dtype {loss.dtype} != compute dtype {dtype}"
        assert loss.shape == student.shape[:-1], f"loss shape {loss.shape} != {student.shape[:-1]}"
    else:
        assert type(loss) is float, f"{reduction!r} loss must be a Python float, got {type(loss)}"
    assert isinstance(grad, np.ndarray)
    assert grad.dtype == dtype, f"gradient dtype {grad.dtype} != compute dtype {dtype}"
    assert grad.shape == student.shape, f"gradient shape {grad.shape} != {student.shape}"


# Seeds of the NumPy generators that make a Hypothesis example's arrays: Hypothesis draws the parameters that
# matter (shapes, dtypes, label forms, ...), and the values in the arrays are just noise.
SEEDS = st.integers(0, 2**32 - 1)


def with_examples(cases):
    """Gives a ``@given`` test one explicit ``@example`` per case (a dict of its arguments), run first and
    every time: the boundaries a test must always check, where drawn examples are left to chance."""

    def decorate(test):
        for case in reversed(cases):  # decorators apply bottom-up: the cases then run in the order given
            test = example(**case)(test)
        return test

    return decorate


def cases(fixed=({},), **cycled):
    """Explicit examples for ``with_examples``: each dict of ``fixed`` (e.g. every boundary, or every pair of
    values two axes can take), with the values of each ``cycled`` axis taken in turn, so that each value of
    every axis is in at least one example (there are more examples than ``fixed`` when an axis is longer)."""
    fixed = list(fixed)
    n = max([len(fixed)] + [len(values) for values in cycled.values()])
    return [
        {**fixed[i % len(fixed)], **{name: values[i % len(values)] for name, values in cycled.items()}}
        for i in range(n)
    ]


# Temperatures: the integers 1 to 4, for which the kernels raise the soft exponentials to a power instead of
# computing the hard ones (soft_power in lane_math.hpp), or any in [0.1, 20].
TEMPERATURES = st.one_of(st.sampled_from([1.0, 2.0, 3.0, 4.0]), st.floats(0.1, 20.0))
