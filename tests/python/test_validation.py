"""Every validation error: parameters, setters, shapes, dtypes, labels and `out`.

Errors name the offending argument; `out` is never written by a failing call. A bad call is made through each
method it applies to (compute_loss, compute_gradient, loss_and_gradient and calling the object: see
expect_error_from_every_method), and every one must refuse it alike.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import SEEDS, cases, with_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kdloss import DistillationLoss

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

SENTINEL = 12345.0
METHODS = ["compute_loss", "compute_gradient", "loss_and_gradient", "__call__"]
OUT_METHODS = ["compute_gradient", "loss_and_gradient"]


def call(kd, method, *args, **kwargs):
    fn = kd if method == "__call__" else getattr(kd, method)
    return fn(*args, **kwargs)


def data(rng, B=4, C=5, dtype=np.float64):
    s = rng.standard_normal((B, C)).astype(dtype)
    t = rng.standard_normal((B, C)).astype(dtype)
    return s, t


def sentinel_like(shape, dtype=np.float64):
    return np.full(shape, SENTINEL, dtype=dtype)


def expect_error(exc, match, kd, method, s, t, y=None, *, out_shape=None, out_dtype=None):
    """Assert the call raises; for methods taking ``out`` also pass a valid
    sentinel-filled ``out`` (when the student's shape allows) and check it is untouched."""
    s_before = np.array(s, copy=True) if isinstance(s, np.ndarray) else None
    t_before = np.array(t, copy=True) if isinstance(t, np.ndarray) else None
    with pytest.raises(exc, match=match):
        call(kd, method, s, t, y)
    if method in OUT_METHODS and out_shape is not None:
        out = sentinel_like(out_shape, out_dtype or np.float64)
        with pytest.raises(exc, match=match):
            call(kd, method, s, t, y, out=out)
        np.testing.assert_array_equal(out, SENTINEL, err_msg="out was written by a failing call")
    if s_before is not None and s_before.dtype.kind in "fiu":
        np.testing.assert_array_equal(s, s_before)
    if t_before is not None and t_before.dtype.kind in "fiu":
        np.testing.assert_array_equal(t, t_before)


def expect_error_from_every_method(exc, match, kd, s, t, y=None, *, out_shape=None, out_dtype=None):
    """expect_error for each of METHODS: the same bad call is refused whichever method makes it."""
    for method in METHODS:
        expect_error(exc, match, kd, method, s, t, y, out_shape=out_shape, out_dtype=out_dtype)


# ---------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------

# Out of [1e-30, 1e6], where the loss meets its accuracy (test_temperature_range.py checks inside it).
BAD_TEMPERATURES = [
    0.0,
    -0.0,
    -1.5,
    math.nan,
    math.inf,
    -math.inf,
    -1e-300,
    1e-310,
    9.99e-31,
    1000000.0000000001,
    1e7,
    1e155,
]
BAD_ALPHAS = [-0.1, 1.1, -1e-12, 1.0 + 1e-12, math.nan, math.inf, -math.inf, 2]
BAD_REDUCTIONS = ["avg", "MEAN", "Sum", "", "mean ", "batchmean"]


def test_defaults():
    kd = DistillationLoss()
    assert kd.temperature == 3.0
    assert kd.alpha == 0.3
    assert kd.reduction == "mean"
    assert kd.ignore_index == -100


@pytest.mark.parametrize("value", BAD_TEMPERATURES)
def test_bad_temperature(value):
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=value)


@pytest.mark.parametrize("value", BAD_ALPHAS)
def test_bad_alpha(value):
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=value)


@pytest.mark.parametrize("value", BAD_REDUCTIONS)
def test_bad_reduction(value):
    with pytest.raises(ValueError, match="reduction") as info:
        DistillationLoss(reduction=value)
    if value:
        assert value in str(info.value), "the message names the rejected value"


@pytest.mark.parametrize(
    "kwargs,name,shown",
    [
        ({"temperature": -1.5}, "temperature", ["-1.5"]),
        ({"temperature": math.nan}, "temperature", ["nan"]),
        ({"temperature": math.inf}, "temperature", ["inf"]),
        ({"alpha": 1.5}, "alpha", ["1.5"]),
        ({"alpha": -0.25}, "alpha", ["-0.25"]),
        ({"alpha": math.nan}, "alpha", ["nan"]),
        ({"reduction": "avg"}, "reduction", ["avg"]),
    ],
)
def test_parameter_error_names_argument_and_value(kwargs, name, shown):
    with pytest.raises(ValueError, match=name) as info:
        DistillationLoss(**kwargs)
    msg = str(info.value).lower()
    assert any(v in msg for v in shown), f"value not shown in: {info.value}"


@pytest.mark.parametrize("value", ["3.0", None, [1.0], 1 + 2j])
def test_temperature_wrong_type(value):
    with pytest.raises(TypeError, match="temperature"):
        DistillationLoss(temperature=value)


@pytest.mark.parametrize("value", ["0.5", None, [0.5], 0.5j])
def test_alpha_wrong_type(value):
    with pytest.raises(TypeError, match="alpha"):
        DistillationLoss(alpha=value)


@pytest.mark.parametrize("value", [None, 1, b"mean", ["mean"]])
def test_reduction_wrong_type(value):
    with pytest.raises(TypeError, match="reduction"):
        DistillationLoss(reduction=value)


@pytest.mark.parametrize(
    "temperature,alpha",
    [(1e-30, 0.0), (100, 1.0), (2, 0), (2, 1), (np.float32(2.5), np.float64(0.5)), (np.float64(0.1), np.float32(0.25))],
)
def test_valid_parameters_accepted(temperature, alpha):
    kd = DistillationLoss(temperature, alpha)
    assert kd.temperature == float(temperature)
    assert kd.alpha == float(alpha)


def test_reduction_is_keyword_only():
    with pytest.raises(TypeError):
        DistillationLoss(2.0, 0.5, "sum")  # type: ignore[misc]


@pytest.mark.parametrize("value", BAD_TEMPERATURES + ["x", None])
def test_temperature_setter_validates_and_keeps_old_value(value):
    kd = DistillationLoss(temperature=2.5, alpha=0.4)
    with pytest.raises((ValueError, TypeError), match="temperature"):
        kd.temperature = value
    assert kd.temperature == 2.5
    assert kd.alpha == 0.4


@pytest.mark.parametrize("value", BAD_ALPHAS + ["x", None])
def test_alpha_setter_validates_and_keeps_old_value(value):
    kd = DistillationLoss(temperature=2.5, alpha=0.4)
    with pytest.raises((ValueError, TypeError), match="alpha"):
        kd.alpha = value
    assert kd.alpha == 0.4
    assert kd.temperature == 2.5


def test_setter_error_types():
    kd = DistillationLoss()
    with pytest.raises(ValueError):
        kd.temperature = -1.0
    with pytest.raises(TypeError):
        kd.temperature = "2"
    with pytest.raises(ValueError):
        kd.alpha = 1.5
    with pytest.raises(TypeError):
        kd.alpha = None


def test_reduction_and_ignore_index_are_read_only():
    kd = DistillationLoss(reduction="sum", ignore_index=-1)
    with pytest.raises(AttributeError):
        kd.reduction = "mean"
    with pytest.raises(AttributeError):
        kd.ignore_index = 3
    assert kd.reduction == "sum" and kd.ignore_index == -1


# ---------------------------------------------------------------------------
# logits: shapes and dtypes
# ---------------------------------------------------------------------------


def test_scalar_logits_are_refused(rng):
    # Logits need a class axis; any number of leading (row) axes is fine (see test_sequences.py).
    kd = DistillationLoss()
    expect_error_from_every_method(ValueError, "student_logits", kd, rng.standard_normal(()), rng.standard_normal(()))


@pytest.mark.parametrize("teacher_shape", [(), (2, 3, 4), (4,)])
def test_teacher_shape_must_match(rng, teacher_shape):
    kd = DistillationLoss()
    s2, _ = data(rng)
    bad_t = rng.standard_normal(teacher_shape)
    expect_error_from_every_method(ValueError, "teacher_logits", kd, s2, bad_t, out_shape=s2.shape)


@pytest.mark.parametrize(
    "s,t",
    [
        (1, 2),
        (1.0, 2.0),
        (np.float16(1.0), np.float16(2.0)),
        (np.int32(1), np.int32(2)),
        (np.array(1.5, dtype=np.float32), np.array(2.5, dtype=np.float32)),
        (np.array(1, dtype=np.int8), np.array(2, dtype=np.int8)),
        (np.float64(1.0), np.float64(2.0)),
    ],
    ids=["py_int", "py_float", "f16_scalar", "i32_scalar", "f32_0d", "i8_0d", "f64_scalar"],
)
def test_scalar_logits_of_any_dtype(s, t):
    # 0-d logits are an error whatever their dtype, including those that need a
    # dtype conversion first (the conversion must not turn () into (1,)).
    kd = DistillationLoss()
    for method in METHODS:
        with pytest.raises(ValueError, match="student_logits"):
            call(kd, method, s, t)


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((4, 5), (4, 6)), ((4, 5), (3, 5)), ((4, 5), (5,)), ((5,), (4, 5)), ((5,), (6,)), ((4, 5), (5, 4))],
)
def test_mismatched_shapes(rng, s_shape, t_shape):
    kd = DistillationLoss()
    s = rng.standard_normal(s_shape)
    t = rng.standard_normal(t_shape)
    expect_error_from_every_method(ValueError, "student_logits|teacher_logits", kd, s, t, out_shape=s_shape)


@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (0,)])
def test_zero_classes(shape):
    kd = DistillationLoss()
    s = np.zeros(shape)
    t = np.zeros(shape)
    expect_error_from_every_method(ValueError, "student_logits|teacher_logits", kd, s, t, out_shape=shape)


BAD_DTYPE_ARRAYS = {
    "bool": lambda s: s > 0,
    "complex64": lambda s: s.astype(np.complex64),
    "complex128": lambda s: s.astype(np.complex128),
    "object": lambda s: s.astype(object),
    "str": lambda s: s.astype(str),
    "bytes": lambda s: s.astype("S8"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DTYPE_ARRAYS))
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_bad_logit_dtypes(rng, kind, which):
    """Logits of a dtype that is no real number (bool, complex, object, str, bytes) are refused by every
    method with a TypeError naming the argument."""
    kd = DistillationLoss()
    s, t = data(rng)
    if which == "student":
        s = BAD_DTYPE_ARRAYS[kind](s)
        name = "student_logits"
    else:
        t = BAD_DTYPE_ARRAYS[kind](t)
        name = "teacher_logits"
    expect_error_from_every_method(TypeError, name, kd, s, t, out_shape=(4, 5))


def test_longdouble_is_rejected(rng):
    if np.dtype(np.longdouble) == np.float64:
        pytest.skip("longdouble is float64 on this platform")
    kd = DistillationLoss()
    s, t = data(rng)
    expect_error_from_every_method(TypeError, "student_logits|teacher_logits", kd, s.astype(np.longdouble), t)


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------


INT64 = np.iinfo(np.int64)


@settings(max_examples=30)
@given(
    bad=st.one_of(st.integers(5, INT64.max), st.integers(INT64.min, -1).filter(lambda v: v != -100)),
    alpha=st.one_of(st.sampled_from([0.0, 0.3, 1.0]), st.floats(0.0, 1.0)),
    row=st.integers(0, 3),
)
@with_examples(
    cases(
        [
            dict(bad=bad, alpha=alpha)
            for bad in (5, 6, 1000, -1, -99, -101, INT64.min, INT64.max)
            for alpha in (0.0, 0.3, 1.0)
        ],
        row=[3],
    )
)
def test_label_out_of_range(bad, alpha, row):
    """A class index outside [0, C) that is not ignore_index (C itself, -1, either side of -100, the int64
    extremes, ...) is refused by every method with a ValueError naming true_labels, whatever alpha (at 0 the
    labels are unused, and still checked), and an out= is left untouched."""
    kd = DistillationLoss(alpha=alpha)  # ignore_index = -100
    s, t = data(np.random.default_rng(0))  # (4, 5)
    y = np.array([0, 1, 2, 3], dtype=np.int64)
    y[row] = bad
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, y, out_shape=s.shape)


def test_label_error_names_the_value(rng):
    kd = DistillationLoss()
    s, t = data(rng, B=6, C=5)
    y = np.array([0, 1, 2, 12345, 3, 4])
    for method in METHODS:
        with pytest.raises(ValueError, match="true_labels") as info:
            call(kd, method, s, t, y)
        msg = str(info.value)
        assert "12345" in msg or "3" in msg, msg


def test_label_equal_to_custom_ignore_index_only(rng):
    # -100 is only special when it is the ignore_index
    kd = DistillationLoss(ignore_index=-1)
    s, t = data(rng)
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, np.array([0, -100, 1, 2]), out_shape=s.shape)
    for method in METHODS:
        call(kd, method, s, t, np.array([0, -1, 1, 2]))  # fine


@pytest.mark.parametrize("bad", [6, -1, -7])
def test_1d_scalar_label_out_of_range(rng, bad):
    kd = DistillationLoss()
    s = rng.standard_normal(6)
    t = rng.standard_normal(6)
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, bad, out_shape=(6,))
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, np.int32(bad), out_shape=(6,))


INDEX_SHAPES_2D = [(5,), (3,), (4, 1), (1, 4), (), (4, 2)]


@pytest.mark.parametrize("shape", INDEX_SHAPES_2D)
def test_index_label_wrong_shape(rng, shape):
    kd = DistillationLoss()
    s, t = data(rng)  # (4, 5)
    y = np.zeros(shape, dtype=np.int64)
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, y, out_shape=s.shape)


def test_python_int_label_for_2d_logits(rng):
    kd = DistillationLoss()
    s, t = data(rng)
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, 1, out_shape=s.shape)


@pytest.mark.parametrize("shape", [(1,), (6,), (1, 1)])
def test_1d_index_label_wrong_shape(rng, shape):
    kd = DistillationLoss()
    s = rng.standard_normal(6)
    t = rng.standard_normal(6)
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, np.zeros(shape, dtype=np.int64), out_shape=(6,))


@pytest.mark.parametrize("shape", [(4, 6), (4, 4), (5, 5), (1, 5), (5,), (4, 5, 1), ()])
def test_distribution_label_wrong_shape(rng, shape):
    kd = DistillationLoss()
    s, t = data(rng)  # (4, 5)
    y = np.full(shape, 0.2)
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, y, out_shape=s.shape)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_floating_class_indices_say_they_must_be_integers(rng, dtype):
    """Labels of the logits' leading shape are class indices: a float dtype is what is wrong with them."""
    kd = DistillationLoss()
    s, t = data(rng)  # (4, 5)
    name = np.dtype(dtype).name
    message = rf"true_labels of shape \(4,\) are class indices, which must be integers, got dtype {name}"
    expect_error_from_every_method(TypeError, message, kd, s, t, np.array([0, 1, 2, 3], dtype=dtype), out_shape=s.shape)
    one_row = rf"true_labels of shape \(\) are class indices, which must be integers, got dtype {name}"
    expect_error_from_every_method(TypeError, one_row, kd, s[0], t[0], np.array(2, dtype=dtype), out_shape=(5,))


@pytest.mark.parametrize("shape", [(5,), (7,), (1, 6)])
def test_1d_distribution_label_wrong_shape(rng, shape):
    kd = DistillationLoss()
    s = rng.standard_normal(6)
    t = rng.standard_normal(6)
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, np.full(shape, 0.1), out_shape=(6,))


@pytest.mark.parametrize(
    "label",
    [np.float16(1.0), np.float32(1.0), np.array(1.0, dtype=np.float16), 1.0],
    ids=["f16", "f32", "f16_0d", "py"],
)
def test_0d_distribution_label_for_single_class_1d_logits(label):
    # For 1-D logits (C,) a target distribution has shape (C,): a 0-d float is
    # wrong even when C == 1 (and a dtype conversion must not make it (1,)); it has the shape of a class index.
    kd = DistillationLoss()
    s = np.array([0.5])
    t = np.array([0.25])
    expect_error_from_every_method(TypeError, "class indices, which must be integers", kd, s, t, label, out_shape=(1,))


@settings(max_examples=30)
@given(
    bad=st.one_of(st.sampled_from([-np.inf, np.inf, np.nan]), st.floats(-1e30, -1e-30)),
    dtype=st.sampled_from([np.float32, np.float64]),
    alpha=st.one_of(st.sampled_from([0.0, 0.3]), st.floats(0.0, 1.0)),
    row=st.integers(0, 3),
    column=st.integers(0, 4),
    seed=SEEDS,
)
@with_examples(
    cases(
        [
            dict(bad=bad, dtype=dtype, alpha=alpha)
            for bad in (-1e-3, -np.inf, np.inf, np.nan, -0.5)
            for dtype in (np.float32, np.float64)
            for alpha in (0.0, 0.3)
        ],
        row=[3],
        column=[4],
        seed=[0],
    )
)
def test_distribution_label_bad_values(bad, dtype, alpha, row, column, seed):
    """A target distribution with one negative, infinite or NaN entry, anywhere, is refused by every method
    with a ValueError naming true_labels, whatever alpha (at 0 the labels are unused, and still checked), and
    an out= is left untouched."""
    kd = DistillationLoss(alpha=alpha)
    s, t = data(np.random.default_rng(seed), dtype=dtype)
    y = np.full((4, 5), 0.2, dtype=dtype)
    y[row, column] = bad
    assert not (y[row, column] >= 0 and np.isfinite(y[row, column]))  # still bad in dtype
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, y, out_shape=s.shape, out_dtype=dtype)


def test_distribution_label_negative_zero_is_fine(rng):
    """-0.0 is a non-negative target (it compares equal to 0): accepted, and the same as +0.0."""
    kd = DistillationLoss()
    s, t = data(rng)
    y = np.full((4, 5), 0.2)
    positive = y.copy()
    y[1, 1], positive[1, 1] = -0.0, 0.0
    for method in METHODS:
        got, want = call(kd, method, s, t, y), call(kd, method, s, t, positive)
        for got_part, want_part in zip(
            got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)
        ):
            np.testing.assert_array_equal(got_part, want_part)


def test_1d_distribution_label_bad_value(rng):
    kd = DistillationLoss()
    s = rng.standard_normal(6)
    t = rng.standard_normal(6)
    y = np.full(6, 0.1)
    y[5] = np.nan
    expect_error_from_every_method(ValueError, "true_labels", kd, s, t, y, out_shape=(6,))


@pytest.mark.parametrize("layout", ["index", "dist", "1d"])
def test_bool_labels(rng, layout):
    kd = DistillationLoss()
    if layout == "1d":
        s = rng.standard_normal(5)
        t = rng.standard_normal(5)
        y = np.bool_(True)
    else:
        s, t = data(rng)
        y = np.array([True, False, True, False]) if layout == "index" else rng.random((4, 5)) > 0.5
    expect_error_from_every_method(TypeError, "true_labels", kd, s, t, y, out_shape=s.shape)


@pytest.mark.parametrize("shape", [(4,), (4, 5)])
def test_complex_labels(rng, shape):
    kd = DistillationLoss()
    s, t = data(rng)
    expect_error_from_every_method(
        TypeError, "true_labels", kd, s, t, np.zeros(shape, dtype=np.complex128), out_shape=s.shape
    )


# ---------------------------------------------------------------------------
# out=
# ---------------------------------------------------------------------------


def out_error(kd, method, s, t, y, out, match="out"):
    before = np.array(out, copy=True)
    with pytest.raises((ValueError, TypeError), match=match):
        call(kd, method, s, t, y, out=out)
    np.testing.assert_array_equal(out, before, err_msg="out was modified by a failing call")


@pytest.mark.parametrize("method", OUT_METHODS)
@pytest.mark.parametrize("shape", [(4, 6), (4, 4), (5, 5), (20,), (5, 4), (1, 4, 5), (4, 5, 1)])
def test_out_wrong_shape(rng, method, shape):
    kd = DistillationLoss()
    s, t = data(rng)
    out_error(kd, method, s, t, np.array([0, 1, 2, 3]), sentinel_like(shape))


@pytest.mark.parametrize("method", OUT_METHODS)
@pytest.mark.parametrize(
    "in_dtype,out_dtype",
    [
        (np.float64, np.float32),
        (np.float32, np.float64),
        (np.float64, np.float16),
        (np.float32, np.float16),
        (np.float64, np.int64),
        (np.float64, np.complex128),
        (np.float64, np.longdouble),
    ],
)
def test_out_wrong_dtype(rng, method, in_dtype, out_dtype):
    if np.dtype(out_dtype) == np.dtype(in_dtype):
        pytest.skip("same dtype on this platform")
    kd = DistillationLoss()
    s, t = data(rng, dtype=in_dtype)
    out_error(kd, method, s, t, None, sentinel_like(s.shape, out_dtype))


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_compute_dtype_follows_result_type(rng, method):
    # float32 student + float64 teacher compute in float64: a float32 out is wrong
    kd = DistillationLoss()
    s, _ = data(rng, dtype=np.float32)
    _, t = data(rng, dtype=np.float64)
    out_error(kd, method, s, t, None, sentinel_like(s.shape, np.float32))
    out = sentinel_like(s.shape, np.float64)
    res = call(kd, method, s, t, None, out=out)
    g = res[1] if method == "loss_and_gradient" else res
    assert g is out


@pytest.mark.parametrize("method", OUT_METHODS)
@pytest.mark.parametrize("layout", ["fortran", "strided_cols", "strided_rows", "transposed_1d_like"])
def test_out_not_c_contiguous(rng, method, layout):
    kd = DistillationLoss()
    s, t = data(rng)  # (4, 5)
    if layout == "fortran":
        out = np.asfortranarray(sentinel_like((4, 5)))
    elif layout == "strided_cols":
        out = sentinel_like((4, 10))[:, ::2]
    elif layout == "strided_rows":
        out = sentinel_like((8, 5))[::2]
    else:
        out = sentinel_like((5, 4)).T
    assert out.shape == (4, 5) and not out.flags.c_contiguous
    out_error(kd, method, s, t, None, out)


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_row_padded_view_is_not_contiguous(rng, method):
    kd = DistillationLoss()
    s, t = data(rng)
    out = sentinel_like((4, 8))[:, :5]
    assert not out.flags.c_contiguous
    out_error(kd, method, s, t, None, out)


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_1d_strided(rng, method):
    kd = DistillationLoss()
    s = rng.standard_normal(5)
    t = rng.standard_normal(5)
    out_error(kd, method, s, t, 1, sentinel_like(10)[::2])


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_read_only(rng, method):
    kd = DistillationLoss()
    s, t = data(rng)
    out = sentinel_like(s.shape)
    out.flags.writeable = False
    out_error(kd, method, s, t, None, out)


@pytest.mark.parametrize("method", OUT_METHODS)
@pytest.mark.parametrize("value", [[[0.0] * 5] * 4, "out", 3.0])
def test_out_not_an_array(rng, method, value):
    kd = DistillationLoss()
    s, t = data(rng)
    with pytest.raises((TypeError, ValueError), match="out"):
        call(kd, method, s, t, None, out=value)


@pytest.mark.parametrize("method", OUT_METHODS)
@pytest.mark.parametrize("which", ["student", "teacher", "student_view", "teacher_view", "labels"])
def test_out_overlapping_an_input(rng, method, which):
    kd = DistillationLoss()
    s, t = data(rng)
    y = np.full((4, 5), 0.2)
    if which == "student":
        out = s
    elif which == "teacher":
        out = t
    elif which == "student_view":
        out = s[:]
    elif which == "teacher_view":
        out = t.reshape(4, 5)[...]
    else:
        out = y
    assert np.shares_memory(out, s) or np.shares_memory(out, t) or np.shares_memory(out, y)
    s0, t0, y0 = s.copy(), t.copy(), y.copy()
    with pytest.raises((ValueError, TypeError), match="out"):
        call(kd, method, s, t, y, out=out)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(t, t0)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_partially_overlapping_an_input(rng, method):
    kd = DistillationLoss()
    buf = rng.standard_normal(30)
    s = buf[:20].reshape(4, 5)
    out = buf[10:30].reshape(4, 5)  # shares buf[10:20] with s
    t = rng.standard_normal((4, 5))
    before = buf.copy()
    with pytest.raises((ValueError, TypeError), match="out"):
        call(kd, method, s, t, None, out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_overlapping_input_with_mixed_dtypes(rng, method):
    # int16 student is converted to float32 before computing; out aliasing the
    # float32 teacher must still be refused.
    kd = DistillationLoss()
    s = rng.integers(-5, 5, (4, 5)).astype(np.int16)
    t = rng.standard_normal((4, 5)).astype(np.float32)
    t0 = t.copy()
    with pytest.raises((ValueError, TypeError), match="out"):
        call(kd, method, s, t, None, out=t)
    np.testing.assert_array_equal(t, t0)


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_aliasing_an_input_that_gets_converted(rng, method):
    # The Fortran-ordered student is converted to a C-contiguous copy before the
    # kernel runs, but out still aliases the caller's student: refuse it.
    kd = DistillationLoss()
    buf = rng.standard_normal(20)
    s = buf.reshape(5, 4).T  # (4, 5), F-contiguous view of buf
    out = buf.reshape(4, 5)  # (4, 5), C-contiguous view of the same memory
    t = rng.standard_normal((4, 5))
    before = buf.copy()
    with pytest.raises((ValueError, TypeError), match="out"):
        call(kd, method, s, t, None, out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("method", OUT_METHODS)
@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (), (6,), (4,)])
def test_out_1d_wrong_shape(rng, method, shape):
    kd = DistillationLoss()
    s = rng.standard_normal(5)
    t = rng.standard_normal(5)
    out_error(kd, method, s, t, 1, sentinel_like(shape))


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_untouched_on_every_input_error(rng, method):
    """One valid out, many failing calls: it must still hold the sentinel afterwards."""
    kd = DistillationLoss()
    s, t = data(rng)
    out = sentinel_like((4, 5))
    bad_calls = [
        (s, t[:, :4], None),
        (s > 0, t, None),
        (s, t.astype(np.complex128), None),
        (s, t, np.array([0, 1, 2, 5])),
        (s, t, np.array([0, 1, 2, -3])),
        (s, t, np.array([0, 1, 2])),
        (s, t, np.array([True, False, True, True])),
        (s, t, np.where(np.arange(20).reshape(4, 5) == 19, -1.0, 0.2)),
        (s, t, np.where(np.arange(20).reshape(4, 5) == 19, np.nan, 0.2)),
        (s, t, np.where(np.arange(20).reshape(4, 5) == 19, np.inf, 0.2)),
        (s, t, np.full((4, 4), 0.2)),
    ]
    for args in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            call(kd, method, *args, out=out)
        np.testing.assert_array_equal(out, SENTINEL)
    # and a good call afterwards does write it
    res = call(kd, method, s, t, np.array([0, 1, 2, 3]), out=out)
    assert not np.any(out == SENTINEL)
    g = res[1] if method == "loss_and_gradient" else res
    assert g is out


@pytest.mark.parametrize("method", OUT_METHODS)
def test_out_unaligned_is_refused_cleanly(rng, method):
    """The kernels write whole vectors into out: an unaligned array is refused, and left as it was."""
    kd = DistillationLoss()
    s, t = data(rng)
    buf = np.zeros(s.nbytes + 1, dtype=np.uint8)
    out = np.frombuffer(buf.data, dtype=np.float64, offset=1, count=s.size).reshape(s.shape)
    out[...] = SENTINEL
    assert not out.flags.aligned
    with pytest.raises(ValueError, match="^out must be aligned$"):
        call(kd, method, s, t, None, out=out)
    np.testing.assert_array_equal(out, SENTINEL)


# The messages of the C++ core for the same 2-D calls, word for word (tests/cpp/test_validation.cpp): the binding
# checks what it can before the core does, and must say what the core would.
SAME_AS_CPP = [
    ((2, 3), (2, 2), None, {}, "teacher_logits must have the shape of student_logits (2, 3), got (2, 2)"),
    ((2, 3), (2, 3), np.array([0, 1, 2]), {}, r"true_labels as class indices must have shape (2,), got (3,)"),
    (
        (2, 3),
        (2, 3),
        np.full((2, 2), 0.5),
        {},
        "true_labels as target distributions must have the shape of student_logits (2, 3), got (2, 2)",
    ),
    ((2, 0), (2, 0), None, {}, "student_logits must have at least one class, got shape (2, 0)"),
    (
        (2, 3),
        (2, 3),
        None,
        {"normalizer": 0.0},
        "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got 0",
    ),
    (
        (2, 3),
        (2, 3),
        None,
        {"normalizer": -1e-300},
        "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got -1e-300",
    ),
    (
        (2, 3),
        (2, 3),
        None,
        {"normalizer": float("inf")},
        "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got inf",
    ),
    (
        (2, 3),
        (2, 3),
        None,
        {"normalizer": 1e-320},  # 1 / normalizer would overflow: an infinite loss, NaN gradient entries
        "normalizer must be finite and >= 2.2250738585072014e-308 (the smallest normal double), got 1e-320",
    ),
]


@pytest.mark.parametrize("student_shape, teacher_shape, labels, kwargs, message", SAME_AS_CPP)
def test_messages_are_the_cpp_cores(student_shape, teacher_shape, labels, kwargs, message):
    with pytest.raises(ValueError) as info:
        DistillationLoss().compute_loss(np.zeros(student_shape), np.zeros(teacher_shape), labels, **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("value", [1e7, 2e6, 1.5e7, 123456789.0, 1e155, 1000000.0000000001, 1e-300, -2.5, -0.0])
def test_python_messages_write_numbers_as_the_native_ones_do(value):
    """The torch checks (kdloss._torch_checks) write their numbers with _params.format_number, the native class with
    std::to_chars: the same text, fixed or scientific (1e+07, not 10000000)."""
    from kdloss._params import format_number

    with pytest.raises(ValueError) as native:
        DistillationLoss(value)
    assert str(native.value).endswith(f"got {format_number(value)}")
