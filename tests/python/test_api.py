"""Public API behaviour: properties, repr, pickling, call forms, out=, dtypes, layouts."""

from __future__ import annotations

import copy
import itertools
import pickle

import numpy as np
import pytest
from helpers import (
    SEEDS,
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


def data(rng, B=6, C=9, dtype=np.float64):
    s = (rng.standard_normal((B, C)) * 2).astype(dtype)
    t = (rng.standard_normal((B, C)) * 2).astype(dtype)
    y = rng.integers(0, C, size=B)
    y[1] = -100
    return s, t, y


def test_import_surface():
    import kdloss

    assert kdloss.DistillationLoss is DistillationLoss


def test_properties():
    kd = DistillationLoss(temperature=2.5, alpha=0.25, reduction="sum", ignore_index=-7)
    assert kd.temperature == 2.5 and type(kd.temperature) is float
    assert kd.alpha == 0.25 and type(kd.alpha) is float
    assert kd.reduction == "sum"
    assert kd.ignore_index == -7
    kd2 = DistillationLoss(4, 1)
    assert type(kd2.temperature) is float and type(kd2.alpha) is float


def test_positional_and_keyword_construction():
    a = DistillationLoss(2.0, 0.4, reduction="none", ignore_index=3)
    b = DistillationLoss(temperature=2.0, alpha=0.4, reduction="none", ignore_index=3)
    assert (a.temperature, a.alpha, a.reduction, a.ignore_index) == (
        b.temperature,
        b.alpha,
        b.reduction,
        b.ignore_index,
    )


def test_setters_change_the_computation(rng):
    s, t, y = data(rng)
    kd = DistillationLoss(3.0, 0.3)
    kd.temperature = 1.25
    kd.alpha = 0.8
    assert kd.temperature == 1.25 and kd.alpha == 0.8
    ref = reference(s, t, y, temperature=1.25, alpha=0.8, reduction="mean")
    assert_loss_close(kd.compute_loss(s, t, y), ref.loss, np.float64)
    assert_grad_close(kd.compute_gradient(s, t, y), ref.grad, np.float64)
    kd.temperature = 7
    assert kd.temperature == 7.0 and type(kd.temperature) is float
    kd.alpha = 0
    assert kd.alpha == 0.0


def test_repr_shows_all_parameters():
    kd = DistillationLoss(temperature=2.5, alpha=0.25, reduction="sum", ignore_index=-7)
    r = repr(kd)
    assert "DistillationLoss" in r
    for piece in ("temperature", "2.5", "alpha", "0.25", "reduction", "sum", "ignore_index", "-7"):
        assert piece in r, f"{piece!r} missing from {r!r}"
    kd.temperature = 6.75
    assert "6.75" in repr(kd)


@pytest.mark.parametrize("num_threads", [None, 1, 3])
def test_repr_round_trips_through_eval(num_threads):
    kd = DistillationLoss(temperature=2.5, alpha=0.25, reduction="none", ignore_index=-7, num_threads=num_threads)
    back = eval(repr(kd), {"DistillationLoss": DistillationLoss})
    assert back == kd and repr(back) == repr(kd)


def test_num_threads_none_stays_none():
    """None means every core of the machine the object is on: shown, compared and pickled as None."""
    kd = DistillationLoss()
    assert kd.num_threads is None and "num_threads=None" in repr(kd)
    assert kd != DistillationLoss(num_threads=2) and kd == DistillationLoss(num_threads=None)
    assert pickle.loads(pickle.dumps(kd)).num_threads is None
    kd.temperature = 4.0  # a setter keeps it too
    assert kd.num_threads is None


@pytest.mark.parametrize("num_threads", [4097, 10**9, 2**64])
def test_num_threads_beyond_the_limit_is_a_clear_error(num_threads):
    with pytest.raises(ValueError, match=f"^num_threads must be at most 4096, got {num_threads}$"):
        DistillationLoss(num_threads=num_threads)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip(rng, protocol):
    kd = DistillationLoss(temperature=1.75, alpha=0.6, reduction="none", ignore_index=-5)
    kd.temperature = 2.25  # the setter's value is what pickles
    back = pickle.loads(pickle.dumps(kd, protocol=protocol))
    assert type(back) is DistillationLoss
    assert (back.temperature, back.alpha, back.reduction, back.ignore_index) == (2.25, 0.6, "none", -5)
    s, t, y = data(rng)
    y[1] = -5
    np.testing.assert_array_equal(back.compute_loss(s, t, y), kd.compute_loss(s, t, y))
    np.testing.assert_array_equal(back.compute_gradient(s, t, y), kd.compute_gradient(s, t, y))
    # the copy is independent
    back.alpha = 0.1
    assert kd.alpha == 0.6


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy])
def test_copy(rng, copier):
    kd = DistillationLoss(temperature=1.5, alpha=0.45, reduction="sum", ignore_index=2)
    c = copier(kd)
    assert (c.temperature, c.alpha, c.reduction, c.ignore_index) == (1.5, 0.45, "sum", 2)
    s, t, y = data(rng)
    y[(y == 2) | (y == -100)] = 0
    y[3] = 2
    assert c.compute_loss(s, t, y) == kd.compute_loss(s, t, y)
    np.testing.assert_array_equal(c.compute_gradient(s, t, y), kd.compute_gradient(s, t, y))
    c.temperature = 9.0
    assert kd.temperature == 1.5


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", ["none", "index", "soft"])
def test_call_equals_compute_loss(rng, reduction, labels):
    s, t, y = data(rng)
    y = {"none": None, "index": y, "soft": rng.random(s.shape)}[labels]
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    a = kd(s, t, y)
    b = kd.compute_loss(s, t, y)
    assert type(a) is type(b)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(kd(s, t, true_labels=y), b)
    np.testing.assert_array_equal(kd(student_logits=s, teacher_logits=t, true_labels=y), b)
    if y is None:
        np.testing.assert_array_equal(kd(s, t), b)


@settings(max_examples=20)
@given(
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from([np.float32, np.float64]),
    labels=st.sampled_from(["none", "index", "soft"]),
    one_d=st.booleans(),
    batch=st.integers(2, 40),
    classes=st.integers(1, 300),
    seed=SEEDS,
)
@with_examples(
    cases(
        [
            dict(labels=labels, one_d=one_d)
            for labels, one_d in itertools.product(["none", "index", "soft"], [False, True])
        ],
        reduction=REDUCTIONS,
        dtype=[np.float32, np.float64],
        batch=[6],
        classes=[9],
        seed=[0],
    )
)
def test_loss_and_gradient_equals_separate_calls(reduction, dtype, labels, one_d, batch, classes, seed):
    """loss_and_gradient returns a (loss, gradient) pair bitwise equal to compute_loss's and
    compute_gradient's, of the same types, called positionally or by keyword, for a batch or one row."""
    rng = np.random.default_rng(seed)
    s, t, y = data(rng, B=batch, C=classes, dtype=dtype)
    y = {"none": None, "index": y, "soft": rng.random(s.shape).astype(dtype)}[labels]
    if one_d:
        s, t = s[0].copy(), t[0].copy()
        y = None if y is None else (int(y[0]) if y.ndim == 1 else y[0].copy())
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    res = kd.loss_and_gradient(s, t, y)
    assert isinstance(res, tuple) and len(res) == 2
    loss, grad = res
    loss2 = kd.compute_loss(s, t, y)
    grad2 = kd.compute_gradient(s, t, y)
    assert type(loss) is type(loss2)
    check_types(loss, grad, s, np.dtype(dtype), reduction)
    np.testing.assert_array_equal(loss, loss2)
    if reduction == "none":
        assert loss.dtype == loss2.dtype and loss.shape == loss2.shape
    np.testing.assert_array_equal(grad, grad2)
    # keyword forms
    loss3, grad3 = kd.loss_and_gradient(student_logits=s, teacher_logits=t, true_labels=y)
    np.testing.assert_array_equal(loss3, loss2)
    np.testing.assert_array_equal(grad3, grad2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("one_d", [False, True])
def test_out_is_returned_and_filled(rng, dtype, one_d):
    s, t, y = data(rng, dtype=dtype)
    if one_d:
        s, t, y = s[2].copy(), t[2].copy(), int(y[2])
    kd = DistillationLoss(2.0, 0.3, reduction="sum")
    expected = kd.compute_gradient(s, t, y)
    out = np.full(s.shape, np.nan, dtype=dtype)
    g = kd.compute_gradient(s, t, y, out=out)
    assert g is out
    np.testing.assert_array_equal(out, expected)
    out2 = np.full(s.shape, np.nan, dtype=dtype)
    loss, g2 = kd.loss_and_gradient(s, t, y, out=out2)
    assert g2 is out2
    np.testing.assert_array_equal(out2, expected)
    assert loss == kd.compute_loss(s, t, y)
    # out=None behaves as no out
    np.testing.assert_array_equal(kd.compute_gradient(s, t, y, out=None), expected)


def test_out_ignored_rows_are_zeroed(rng):
    # A reused out buffer must have its ignored rows overwritten with zeros.
    s, t, y = data(rng)
    kd = DistillationLoss(2.0, 0.3)
    out = np.full(s.shape, 7.0)
    kd.compute_gradient(s, t, y, out=out)
    assert not out[1].any()
    y_all = np.full(s.shape[0], -100)
    out[:] = 7.0
    kd.compute_gradient(s, t, y_all, out=out)
    assert not out.any()


def test_out_is_keyword_only(rng):
    s, t, y = data(rng)
    kd = DistillationLoss()
    with pytest.raises(TypeError):
        kd.compute_gradient(s, t, y, np.empty_like(s))  # type: ignore[misc]


def test_inputs_are_not_modified(rng):
    s, t, y = data(rng)
    soft = rng.random(s.shape)
    copies = [a.copy() for a in (s, t, y, soft)]
    for reduction in REDUCTIONS:
        kd = DistillationLoss(2.0, 0.3, reduction=reduction)
        for labels in (None, y, soft):
            kd.compute_loss(s, t, labels)
            kd.compute_gradient(s, t, labels)
            kd.loss_and_gradient(s, t, labels)
            kd(s, t, labels)
    for a, b in zip((s, t, y, soft), copies):
        np.testing.assert_array_equal(a, b)


def test_results_do_not_alias_inputs(rng):
    s, t, y = data(rng)
    kd = DistillationLoss(2.0, 0.3, reduction="none")
    loss, grad = kd.loss_and_gradient(s, t, y)
    for r in (loss, grad):
        assert not np.shares_memory(r, s) and not np.shares_memory(r, t)
    assert grad.flags.c_contiguous and grad.flags.writeable
    grad2 = kd.compute_gradient(s, t, y)
    assert not np.shares_memory(grad, grad2)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------

DTYPE_PAIRS = [
    (np.float32, np.float32),
    (np.float64, np.float64),
    (np.float32, np.float64),
    (np.float64, np.float32),
    (np.float16, np.float16),
    (np.float16, np.float32),
    (np.float16, np.float64),
    (np.int8, np.int8),
    (np.int16, np.float32),
    (np.int32, np.int32),
    (np.int64, np.float32),
    (np.uint8, np.float16),
    (np.uint64, np.float32),
    (np.int32, np.float64),
]


@pytest.mark.parametrize("sd,td", DTYPE_PAIRS)
def test_dtype_conversions(rng, sd, td):
    """Logits of any real dtype pair compute in np.result_type(student, teacher, float32): the reference's
    results, in that dtype, bitwise those of converting by hand first, and an out= of that dtype is filled,
    for every reduction."""
    B, C = 5, 8
    s = (
        (rng.standard_normal((B, C)) * 4).astype(sd)
        if np.dtype(sd).kind == "f"
        else rng.integers(0, 10, (B, C)).astype(sd)
    )
    t = (
        (rng.standard_normal((B, C)) * 4).astype(td)
        if np.dtype(td).kind == "f"
        else rng.integers(0, 10, (B, C)).astype(td)
    )
    expected_dtype = np.result_type(s, t, np.float32)
    assert expected_dtype in (np.float32, np.float64)
    y = rng.integers(0, C, size=B)
    for reduction in REDUCTIONS:
        kd = DistillationLoss(2.0, 0.3, reduction=reduction)
        ref, loss, grad = check_against_reference(kd, s, t, y)
        assert grad.dtype == expected_dtype
        if reduction == "none":
            assert loss.dtype == expected_dtype
        # same values as converting by hand first
        s2 = s.astype(expected_dtype)
        t2 = t.astype(expected_dtype)
        np.testing.assert_array_equal(kd.compute_loss(s2, t2, y), loss)
        np.testing.assert_array_equal(kd.compute_gradient(s2, t2, y), grad)
        out = np.empty(s.shape, dtype=expected_dtype)
        assert kd.compute_gradient(s, t, y, out=out) is out
        np.testing.assert_array_equal(out, grad)


@pytest.mark.parametrize("label_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("logit_dtype", [np.float32, np.float64])
def test_soft_label_dtype_is_converted(rng, label_dtype, logit_dtype):
    B, C = 4, 6
    s = rng.standard_normal((B, C)).astype(logit_dtype)
    t = rng.standard_normal((B, C)).astype(logit_dtype)
    y = rng.random((B, C)).astype(label_dtype)
    kd = DistillationLoss(2.0, 0.6, reduction="none")
    loss, grad = kd.loss_and_gradient(s, t, y)
    assert grad.dtype == logit_dtype and loss.dtype == logit_dtype
    y2 = y.astype(logit_dtype)
    np.testing.assert_array_equal(kd.compute_loss(s, t, y2), loss)
    np.testing.assert_array_equal(kd.compute_gradient(s, t, y2), grad)
    ref = reference(s, t, y.astype(logit_dtype), temperature=2.0, alpha=0.6, reduction="none")
    assert_loss_close(loss, ref.loss, logit_dtype)


def test_python_scalar_results_for_float32(rng):
    s, t, y = data(rng, dtype=np.float32)
    for reduction in ("mean", "sum"):
        kd = DistillationLoss(2.0, 0.3, reduction=reduction)
        assert type(kd.compute_loss(s, t, y)) is float
        assert type(kd.loss_and_gradient(s, t, y)[0]) is float


# ---------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------


def _same(a, b, dtype):
    tol = 1e-6 if np.dtype(dtype) == np.float32 else 1e-14
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(np.abs(b).max(initial=0.0), 1e-300))


@pytest.mark.parametrize(
    "layout", ["fortran", "reversed_rows", "reversed_cols", "strided_rows", "strided_cols", "row_slice", "broadcast"]
)
@settings(max_examples=6)
@given(dtype=st.sampled_from([np.float32, np.float64]), reduction=st.sampled_from(REDUCTIONS), seed=SEEDS)
@with_examples(cases(dtype=[np.float32, np.float64], reduction=REDUCTIONS, seed=[0]))
def test_non_contiguous_inputs(layout, dtype, reduction, seed):
    """Non-contiguous logits (Fortran order, reversed or strided rows or columns, a row slice of a wider
    array, a broadcast row) and labels give what their contiguous copies give, the reference's results, and
    a C-contiguous gradient."""
    B, C = 6, 50
    rng = np.random.default_rng(seed)
    big_s = (rng.standard_normal((2 * B, 2 * C)) * 2).astype(dtype)
    big_t = (rng.standard_normal((2 * B, 2 * C)) * 2).astype(dtype)
    if layout == "fortran":
        s, t = np.asfortranarray(big_s[:B, :C]), np.asfortranarray(big_t[:B, :C])
    elif layout == "reversed_rows":
        s, t = big_s[:B, :C][::-1], big_t[:B, :C][::-1]
    elif layout == "reversed_cols":
        s, t = big_s[:B, :C][:, ::-1], big_t[:B, :C][:, ::-1]
    elif layout == "strided_rows":
        s, t = big_s[::2, :C], big_t[::2, :C]
    elif layout == "strided_cols":
        s, t = big_s[:B, ::2], big_t[:B, ::2]
    elif layout == "row_slice":  # x[:, :50]: each row contiguous, row stride larger than C
        s, t = big_s[:B, :C], big_t[:B, :C]
    else:  # a single row broadcast to B rows (stride 0)
        s, t = np.broadcast_to(big_s[0, :C], (B, C)), big_t[:B, :C]
    assert s.shape == (B, C) and not s.flags.c_contiguous
    y = rng.integers(0, C, size=B)
    soft = np.asfortranarray(rng.random((B, C)).astype(dtype))
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    sc, tc = np.ascontiguousarray(s), np.ascontiguousarray(t)
    for labels in (None, y, y[::-1].copy()[::-1], soft):
        loss = kd.compute_loss(s, t, labels)
        grad = kd.compute_gradient(s, t, labels)
        assert grad.flags.c_contiguous and grad.shape == (B, C)
        lc = np.ascontiguousarray(labels) if labels is not None else None
        _same(loss, kd.compute_loss(sc, tc, lc), dtype)
        _same(grad, kd.compute_gradient(sc, tc, lc), dtype)
    check_against_reference(kd, s, t, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_index_labels(rng, dtype):
    B, C = 6, 7
    s = rng.standard_normal((B, C)).astype(dtype)
    t = rng.standard_normal((B, C)).astype(dtype)
    ybig = rng.integers(0, C, size=2 * B)
    y = ybig[::2]
    assert not y.flags.c_contiguous
    kd = DistillationLoss(2.0, 0.5, reduction="none")
    _same(kd.compute_loss(s, t, y), kd.compute_loss(s, t, y.copy()), dtype)
    _same(kd.compute_gradient(s, t, y), kd.compute_gradient(s, t, y.copy()), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_1d(rng, dtype):
    C = 30
    big = rng.standard_normal((2, 2 * C)).astype(dtype)
    s, t = big[0, ::2], big[1, ::-2]
    kd = DistillationLoss(3.0, 0.3, reduction="none")
    _same(kd.compute_loss(s, t, 4), kd.compute_loss(s.copy(), t.copy(), 4), dtype)
    _same(kd.compute_gradient(s, t, 4), kd.compute_gradient(s.copy(), t.copy(), 4), dtype)


def test_readonly_inputs_are_accepted(rng):
    s, t, y = data(rng)
    for a in (s, t, y):
        a.flags.writeable = False
    kd = DistillationLoss()
    ref, loss, grad = check_against_reference(kd, s, t, y)


def test_results_are_independent_of_batch_companions(rng):
    # Row i's "none" loss and gradient do not depend on the other rows.
    s, t, y = data(rng, B=8, C=11)
    kd = DistillationLoss(2.0, 0.3, reduction="none")
    loss, grad = kd.loss_and_gradient(s, t, y)
    for i in range(8):
        li, gi = kd.loss_and_gradient(s[i : i + 1], t[i : i + 1], y[i : i + 1])
        _same(li[0], loss[i], np.float64)
        _same(gi[0], grad[i], np.float64)


def _unaligned_copy(a):
    """A C-contiguous copy of ``a`` whose data pointer is not aligned to its itemsize."""
    buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
    u = np.frombuffer(buf.data, dtype=a.dtype, offset=1, count=a.size).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned and u.flags.c_contiguous
    return u


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["student", "teacher", "soft_labels", "index_labels"])
def test_unaligned_inputs_are_handled(rng, dtype, which):
    # Misaligned buffers (e.g. from np.frombuffer at an odd offset) are a layout
    # like any other: converted once, same values as an aligned copy.
    s, t, y = data(rng, dtype=dtype)
    soft = rng.random(s.shape).astype(dtype)
    labels = soft if which == "soft_labels" else y
    args = {"student": s, "teacher": t, "labels": labels}
    key = {"student": "student", "teacher": "teacher"}.get(which, "labels")
    args_u = dict(args)
    args_u[key] = _unaligned_copy(args[key])
    kd = DistillationLoss(2.0, 0.3, reduction="none")
    loss_u, grad_u = kd.loss_and_gradient(args_u["student"], args_u["teacher"], args_u["labels"])
    loss, grad = kd.loss_and_gradient(args["student"], args["teacher"], args["labels"])
    _same(loss_u, loss, dtype)
    _same(grad_u, grad, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_swapped_inputs_are_converted(rng, dtype):
    s, t, y = data(rng, dtype=dtype)
    swapped = np.dtype(dtype).newbyteorder()
    kd = DistillationLoss(2.0, 0.3, reduction="none")
    loss, grad = kd.loss_and_gradient(s.astype(swapped), t.astype(swapped), y.astype(">i8"))
    assert grad.dtype == np.dtype(dtype) and grad.dtype.isnative
    _same(loss, kd.compute_loss(s, t, y), dtype)
    _same(grad, kd.compute_gradient(s, t, y), dtype)
    check_against_reference(kd, s.astype(swapped), t.astype(swapped), y)


def test_list_inputs(rng):
    s, t, y = data(rng)
    kd = DistillationLoss(2.0, 0.3, reduction="none")
    _same(kd.compute_loss(s.tolist(), t.tolist(), y.tolist()), kd.compute_loss(s, t, y), np.float64)
    _same(kd.compute_gradient(s.tolist(), t.tolist(), y.tolist()), kd.compute_gradient(s, t, y), np.float64)


def test_odd_strides_on_length_one_axes_are_read_in_place(rng):
    """NumPy calls such arrays C-contiguous (an axis of length 1 is never stepped along), and so do the kernels:
    one rule, kept in the binding, decides what is read in place."""
    import kdloss

    s_values = rng.standard_normal(8)
    t_values = rng.standard_normal(8)
    s = np.lib.stride_tricks.as_strided(s_values, (1, 5), (3, 8))
    t = np.lib.stride_tricks.as_strided(t_values, (1, 5), (3, 8))
    y = np.lib.stride_tricks.as_strided(np.array([2, 9], dtype=np.int64), (1,), (5,))
    assert s.flags.c_contiguous and kdloss._core.reads_in_place(s)
    kd = DistillationLoss(2.0, 0.4)
    loss, grad = kd.loss_and_gradient(s, t, y)
    want_loss, want_grad = kd.loss_and_gradient(s.copy(), t.copy(), y.copy())
    assert loss == want_loss
    np.testing.assert_array_equal(grad, want_grad)
