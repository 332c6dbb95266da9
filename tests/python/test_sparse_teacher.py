"""kdloss.SparseTeacher and kdloss.SparseTeacherWriter, and the float64 reference of the sparse soft term.

The container: construction and what it refuses (with the exact messages), reading NumPy arrays and torch tensors
in place, the content checks of ``validate`` naming the first bad row, indexing as views, the tail computed to
full precision, the files on disk (NumPy alone reads them; written whole or not at all; loaded memory-mapped),
the writer that builds a cache batch by batch, and concatenation.

The reference (``sparse_soft_reference`` in reference.py) is itself checked: a cache listing every class is the
dense reference; its hand-derived gradient is torch autograd's of the scattered formula and mpmath's derivative
of the KL between the coarse-grained distributions, which mpmath also checks the loss against.
"""

from __future__ import annotations

import doctest
import gc
import json
import math
import os
import re
import sys

import kdloss
import numpy as np
import pytest
from kdloss import DistillationLoss, SparseTeacher, SparseTeacherWriter
from kdloss import _sparse_teacher as sparse_module
from reference import SPARSE_TAILS, dense_equivalent, reference, scatter_teacher, sparse_soft_reference

INDEX_DTYPES = [np.int32, np.int64]
LOGPROB_DTYPES = [np.float16, np.float32, np.float64]


def make_cache_arrays(rng, lead, k, classes, index_dtype=np.int64, logprob_dtype=np.float64, empty=0.2):
    """A valid cache of a random teacher: k distinct classes per row, their log-probabilities under a softmax over
    ``classes`` (so each row sums below 1 and has a tail), about ``empty`` of the slots empty (-inf) with any
    index in them."""
    rows = math.prod(lead)
    logits = rng.normal(size=(rows, classes)) * 2
    log_p = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    indices = np.argsort(rng.random((rows, classes)), axis=1)[:, :k]
    logprobs = np.take_along_axis(log_p, indices, axis=1)
    hollow = rng.random((rows, k)) < empty
    logprobs[hollow] = -np.inf
    indices[hollow] = rng.integers(-5, 2 * classes, size=int(hollow.sum()))  # padding: anything goes
    return (
        indices.reshape(*lead, k).astype(index_dtype),
        logprobs.reshape(*lead, k).astype(logprob_dtype),
    )


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------------


def test_a_cache_exposes_its_arrays_and_metadata(rng):
    indices, logprobs = make_cache_arrays(rng, (3, 5), 4, 10, np.int32, np.float16)
    cache = SparseTeacher(indices, logprobs, temperature=2, vocab_size=np.int64(10), method="top_k")
    assert cache.indices is indices and cache.logprobs is logprobs
    assert cache.shape == (3, 5) and cache.k == 4 and len(cache) == 3
    assert cache.temperature == 2.0 and type(cache.temperature) is float
    assert cache.vocab_size == 10 and type(cache.vocab_size) is int
    assert cache.method == "top_k"
    assert cache.dtype == np.float16
    assert cache.nbytes == 3 * 5 * 4 * (4 + 2)
    assert repr(cache) == (
        "SparseTeacher(shape=(3, 5), k=4, indices=int32, logprobs=float16, temperature=2.0, vocab_size=10, "
        "method='top_k')"
    )
    bare = SparseTeacher(indices, logprobs)
    assert (bare.temperature, bare.vocab_size, bare.method) == (None, None, None)


def test_a_cache_of_one_row_has_the_leading_shape_of_one_row_of_logits():
    cache = SparseTeacher(np.array([4, 1]), np.log([0.5, 0.25]))
    assert cache.shape == () and cache.k == 2
    with pytest.raises(TypeError, match=re.escape("len() of a SparseTeacher of one row (leading shape ())")):
        len(cache)
    with pytest.raises(TypeError, match="len"):
        list(cache)
    assert cache.tail_mass().shape == ()
    assert cache[...].shape == () and cache[None].shape == (1,)
    with pytest.raises(IndexError, match="too many indices"):
        cache[0]


def test_numpy_arrays_of_any_layout_are_kept_as_given(rng):
    indices, logprobs = make_cache_arrays(rng, (6,), 8, 20)
    strided = SparseTeacher(indices[::2, ::3], logprobs[::2, ::3])
    assert strided.indices.base is indices and strided.logprobs.base is logprobs
    fortran = SparseTeacher(np.asfortranarray(indices), np.asfortranarray(logprobs))
    assert fortran.indices.flags.f_contiguous and not fortran.indices.flags.c_contiguous


def test_python_sequences_become_arrays():
    cache = SparseTeacher([[0, 2], [1, 3]], [[-1.0, -2.0], [-0.5, -np.inf]])
    assert cache.indices.dtype.kind == "i" and cache.logprobs.dtype == np.float64
    np.testing.assert_array_equal(cache.indices, [[0, 2], [1, 3]])


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("logprob_dtype", LOGPROB_DTYPES)
def test_torch_tensors_are_read_without_a_copy(index_dtype, logprob_dtype):
    torch = pytest.importorskip("torch")
    indices = torch.arange(12).reshape(3, 4).to(getattr(torch, np.dtype(index_dtype).name))
    logprobs = torch.full((3, 4), -2.0, dtype=getattr(torch, np.dtype(logprob_dtype).name))
    cache = SparseTeacher(indices, logprobs)
    assert cache.indices.dtype == index_dtype and cache.logprobs.dtype == logprob_dtype
    assert np.shares_memory(cache.indices, indices.numpy()) and np.shares_memory(cache.logprobs, logprobs.numpy())
    logprobs[1, 2] = -np.inf  # the cache sees the tensor's memory
    assert cache.logprobs[1, 2] == -np.inf


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint32", "uint64", "bool", "float32", ">i4"])
def test_indices_of_another_dtype_are_refused_not_cast(dtype):
    indices = np.zeros((2, 3), dtype=dtype)
    with pytest.raises(TypeError, match=re.escape(f"indices must be int32 or int64, got dtype {np.dtype(dtype)}")):
        SparseTeacher(indices, np.zeros((2, 3)))


@pytest.mark.parametrize("dtype", ["int32", "complex64", "bool", "longdouble", ">f4"])
def test_logprobs_of_another_dtype_are_refused(dtype):
    if np.dtype(dtype) == np.float64:  # longdouble is double on some platforms
        pytest.skip("longdouble is float64 here")
    message = f"logprobs must be float16, float32 or float64, got dtype {np.dtype(dtype)}"
    with pytest.raises(TypeError, match=re.escape(message)):
        SparseTeacher(np.zeros((2, 3), np.int64), np.zeros((2, 3), dtype=dtype))


@pytest.mark.parametrize(
    "index_shape, logprob_shape, message",
    [
        ((), (3,), "indices must have at least one axis (the K slots of a row), got shape ()"),
        ((3,), (), "logprobs must have at least one axis (the K slots of a row), got shape ()"),
        ((2, 3), (2, 4), "indices and logprobs must have the same shape, got (2, 3) and (2, 4)"),
        ((2, 3), (3, 2), "indices and logprobs must have the same shape, got (2, 3) and (3, 2)"),
        ((2, 3), (2, 1, 3), "indices and logprobs must have the same shape, got (2, 3) and (2, 1, 3)"),
        ((4, 0), (4, 0), "indices and logprobs must have K >= 1 slots on their last axis, got shape (4, 0)"),
    ],
)
def test_shapes_are_checked(index_shape, logprob_shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SparseTeacher(np.zeros(index_shape, np.int32), np.zeros(logprob_shape, np.float32))


def test_no_rows_is_a_cache():
    cache = SparseTeacher(np.zeros((0, 5), np.int32), np.zeros((0, 5), np.float32))
    assert cache.shape == (0,) and len(cache) == 0 and cache.tail_mass().shape == (0,)
    cache.validate()


@pytest.mark.parametrize("temperature", [0.0, -1.0, 1e-31, 1.5e6, math.inf, math.nan])
def test_a_temperature_out_of_range_gets_distillation_loss_message(temperature):
    with pytest.raises(ValueError) as expected:
        DistillationLoss(temperature)
    assert str(expected.value).startswith("temperature must be in [1e-30, 1e6] (where kdloss is accurate), got ")
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        SparseTeacher(np.zeros(2, np.int32), np.zeros(2), temperature=temperature)


@pytest.mark.parametrize("temperature", [1e-30, 100, 1e6, np.float32(0.5), 3])
def test_a_temperature_in_range_is_kept_as_a_float(temperature):
    cache = SparseTeacher(np.zeros(2, np.int32), np.zeros(2), temperature=temperature)
    assert cache.temperature == float(temperature) and type(cache.temperature) is float


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"temperature": "2"}, TypeError, "temperature must be a real number or None, got '2'"),
        ({"temperature": True}, TypeError, "temperature must be a real number or None, got True"),
        ({"vocab_size": 2.0}, TypeError, "vocab_size must be an integer or None, got 2.0"),
        ({"vocab_size": True}, TypeError, "vocab_size must be an integer or None, got True"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be >= 1, got 0"),
        ({"vocab_size": -3}, ValueError, "vocab_size must be >= 1, got -3"),
        ({"vocab_size": 3}, ValueError, "vocab_size must be at least K = 4 (a row lists distinct classes), got 3"),
        ({"method": 3}, TypeError, "method must be a string or None, got 3"),
    ],
)
def test_metadata_is_checked(arguments, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SparseTeacher(np.zeros((2, 4), np.int32), np.zeros((2, 4)), **arguments)


def test_a_vocabulary_of_exactly_k_classes_is_fine():
    assert SparseTeacher(np.zeros((2, 4), np.int32), np.zeros((2, 4)), vocab_size=4).vocab_size == 4


def test_the_public_names_are_exported():
    assert kdloss.SparseTeacher is sparse_module.SparseTeacher
    assert kdloss.SparseTeacherWriter is sparse_module.SparseTeacherWriter
    assert {"SparseTeacher", "SparseTeacherWriter"} <= set(kdloss.__all__)


def test_the_docstring_examples_run():
    result = doctest.testmod(sparse_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0


# ---------------------------------------------------------------------------------------------------------------
# validate(): the contents, the first bad row named
# ---------------------------------------------------------------------------------------------------------------


def valid_arrays():
    """Leading shape (4, 5), K = 3, vocabulary 12: each row lists 3 distinct classes below 9 with probabilities
    0.5, 0.25 and 0.125."""
    indices = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 7) % 9  # classes below 9: 9 to 11 are free for tests
    indices[..., 1] = (indices[..., 0] + 1) % 9
    indices[..., 2] = (indices[..., 0] + 2) % 9
    logprobs = np.broadcast_to(np.log([0.5, 0.25, 0.125]), (4, 5, 3)).copy()
    return indices, logprobs


def test_a_valid_cache_passes_with_padding_anything_in_empty_slots():
    indices, logprobs = valid_arrays()
    logprobs[0, 1, 1:] = -np.inf  # the padding repeats the listed class, and goes out of range either way
    indices[0, 1, 1:] = indices[0, 1, 0]
    logprobs[2, 3, :] = -np.inf  # nothing listed: the whole row is tail
    indices[2, 3, :] = [-7, 12, 10**9]
    for index_dtype in INDEX_DTYPES:
        for logprob_dtype in LOGPROB_DTYPES:
            cache = SparseTeacher(indices.astype(index_dtype), logprobs.astype(logprob_dtype), vocab_size=12)
            cache.validate()
            cache.validate(vocab_size=12)
            cache.validate(vocab_size=10**6)


def test_the_sum_may_exceed_one_by_the_rounding_tolerance_only():
    for total, ok in [(1.0, True), (1 + 5e-7, True), (1 + 2e-6, False)]:
        logprobs = np.log([[total / 2, total / 4, total / 4]])
        cache = SparseTeacher(np.array([[0, 1, 2]]), logprobs)
        if ok:
            cache.validate()
        else:
            with pytest.raises(ValueError, match=r"^logprobs of row \(0,\) sum to probability 1\.00000[12]\d* > 1 "):
                cache.validate()


def _break(kind, indices, logprobs, row):
    """Make ``row`` of the valid arrays bad in one way; the message expected, as a regular expression (a sum's
    last digits depend on the rounding of the logarithms)."""
    name = re.escape(str(row))
    if kind == "nan":
        logprobs[row][1] = np.nan
        return f"logprobs of row {name} hold NaN"
    if kind == "+inf":
        logprobs[row][2] = np.inf
        return rf"logprobs of row {name} hold \+inf"
    if kind == "too large":
        indices[row][1] = 12
        return rf"indices of row {name} hold 12, outside \[0, 12\)"
    if kind == "negative":
        indices[row][0] = -1
        return rf"indices of row {name} hold -1, outside \[0, 12\)"
    if kind == "duplicate":
        indices[row][2] = indices[row][0]
        return f"indices of row {name} list class {indices[row][0]} more than once"
    if kind == "sum":
        logprobs[row][:] = np.log([0.5, 0.5, 0.25])
        return rf"logprobs of row {name} sum to probability 1\.2(5|49999)\d* > 1 \(\+1e-6 for rounding\)"
    if kind == "positive":
        logprobs[row][:] = [0.5, -np.inf, -np.inf]
        return rf"logprobs of row {name} sum to probability 1\.648721270700\d* > 1 \(\+1e-6 for rounding\)"
    raise AssertionError(kind)


KINDS = ["nan", "+inf", "too large", "negative", "duplicate", "sum", "positive"]


@pytest.mark.parametrize("logprob_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", [(0, 0), (3, 4), (2, 1)])
def test_validate_names_the_bad_row_and_what_is_wrong(kind, row, logprob_dtype):
    indices, logprobs = valid_arrays()
    pattern = _break(kind, indices, logprobs, row)
    cache = SparseTeacher(indices, logprobs.astype(logprob_dtype), vocab_size=12)
    with pytest.raises(ValueError, match="^" + pattern + "$"):
        cache.validate()


def test_validate_takes_the_number_of_classes_from_its_argument_first():
    indices, logprobs = valid_arrays()
    indices[1, 2, 0] = 11
    indices[1, 2, 1:] = [5, 6]
    SparseTeacher(indices, logprobs).validate()  # no vocabulary: 11 may be a class
    with pytest.raises(ValueError, match=re.escape("indices of row (1, 2) hold 11, outside [0, 11)")):
        SparseTeacher(indices, logprobs, vocab_size=11).validate()
    with pytest.raises(ValueError, match=re.escape("indices of row (1, 2) hold 11, outside [0, 10)")):
        SparseTeacher(indices, logprobs, vocab_size=12).validate(vocab_size=10)
    SparseTeacher(indices, logprobs, vocab_size=11).validate(vocab_size=12)
    with pytest.raises(ValueError, match=re.escape("vocab_size must be at least K = 3")):
        SparseTeacher(indices, logprobs).validate(vocab_size=2)


def test_without_a_vocabulary_only_negative_indices_are_refused():
    indices, logprobs = valid_arrays()
    indices[3, 0, 2] = -4
    with pytest.raises(ValueError, match=re.escape("indices of row (3, 0) hold -4, a negative class index")):
        SparseTeacher(indices, logprobs).validate()


def test_within_a_row_the_checks_come_in_their_order():
    """NaN, +inf, the index range, duplicates, the sum: the first that applies is reported."""
    indices, logprobs = valid_arrays()
    _break("sum", indices, logprobs, (1, 1))
    _break("duplicate", indices, logprobs, (1, 1))
    cache = SparseTeacher(indices, logprobs, vocab_size=12)
    with pytest.raises(ValueError, match=re.escape("indices of row (1, 1) list class")):
        cache.validate()
    _break("too large", indices, logprobs, (1, 1))
    with pytest.raises(ValueError, match=re.escape("indices of row (1, 1) hold 12, outside")):
        cache.validate()
    _break("+inf", indices, logprobs, (1, 1))
    with pytest.raises(ValueError, match=re.escape("logprobs of row (1, 1) hold +inf")):
        cache.validate()
    _break("nan", indices, logprobs, (1, 1))
    with pytest.raises(ValueError, match=re.escape("logprobs of row (1, 1) hold NaN")):
        cache.validate()


def test_the_first_bad_row_in_c_order_is_reported():
    indices, logprobs = valid_arrays()
    _break("nan", indices, logprobs, (2, 4))
    _break("sum", indices, logprobs, (2, 3))
    _break("duplicate", indices, logprobs, (3, 0))
    with pytest.raises(ValueError, match=re.escape("logprobs of row (2, 3) sum to probability")):
        SparseTeacher(indices, logprobs).validate()


def test_the_smallest_class_listed_twice_is_named():
    cache = SparseTeacher(np.array([[9, 4, 9, 4]]), np.log(np.full((1, 4), 0.2)))
    with pytest.raises(ValueError, match=re.escape("indices of row (0,) list class 4 more than once")):
        cache.validate()


def test_a_nan_slot_is_reported_as_nan_whatever_its_index():
    cache = SparseTeacher(np.array([[3, 3]]), np.array([[np.nan, -1.0]]), vocab_size=3)
    with pytest.raises(ValueError, match=re.escape("logprobs of row (0,) hold NaN")):
        cache.validate()


def test_a_single_row_cache_names_its_row_as_the_empty_tuple():
    cache = SparseTeacher(np.array([1, 1]), np.log([0.5, 0.25]))
    with pytest.raises(ValueError, match=re.escape("indices of row () list class 1 more than once")):
        cache.validate()


@pytest.mark.parametrize("chunk", [1, 45, 10**6])  # 1, 3 and 4 of the first axis's rows a piece
def test_rows_are_named_rightly_across_pieces_and_in_views(monkeypatch, chunk):
    """validate goes through the rows a piece at a time (for memory maps); the row named is the cache's own,
    also in a non-contiguous view."""
    monkeypatch.setattr(sparse_module, "_CHUNK_SLOTS", chunk)
    indices, logprobs = valid_arrays()
    _break("duplicate", indices, logprobs, (3, 4))
    with pytest.raises(ValueError, match=re.escape("indices of row (3, 4) list class")):
        SparseTeacher(indices, logprobs).validate()
    view = SparseTeacher(indices, logprobs)[::-1, 1::3]  # original rows (3, 1), (3, 4), (2, 1), ...
    with pytest.raises(ValueError, match=re.escape("indices of row (0, 1) list class")):
        view.validate()
    SparseTeacher(indices, logprobs)[:3].validate()


# ---------------------------------------------------------------------------------------------------------------
# Indexing
# ---------------------------------------------------------------------------------------------------------------

# A key over the leading axes of a (4, 5, K) cache, and the same selection written for the whole array.
VIEW_KEYS = [
    (slice(1, 3), (slice(1, 3),)),
    (2, (2,)),
    (-1, (-1,)),
    (np.int64(1), (1,)),
    ((Ellipsis, 2), (slice(None), 2)),
    ((slice(None), 1), (slice(None), 1)),
    ((1, 3), (1, 3)),
    ((slice(None, None, -1), slice(0, 5, 2)), (slice(None, None, -1), slice(0, 5, 2))),
    ((None, 1), (None, 1)),
    (Ellipsis, ()),
    ((0, Ellipsis), (0,)),
]


@pytest.mark.parametrize("key, whole", VIEW_KEYS)
def test_basic_indexing_gives_a_view_with_the_metadata(rng, key, whole):
    indices, logprobs = make_cache_arrays(rng, (4, 5), 3, 30)
    cache = SparseTeacher(indices, logprobs, temperature=1.5, vocab_size=30, method="sample")
    view = cache[key]
    expected_indices = indices[(*whole, Ellipsis, slice(None))]
    np.testing.assert_array_equal(view.indices, expected_indices)
    np.testing.assert_array_equal(view.logprobs, logprobs[(*whole, Ellipsis, slice(None))])
    assert view.shape == expected_indices.shape[:-1] and view.k == 3
    assert np.shares_memory(view.indices, indices) and np.shares_memory(view.logprobs, logprobs)
    assert (view.temperature, view.vocab_size, view.method) == (1.5, 30, "sample")


@pytest.mark.parametrize(
    "key",
    [np.array([3, 0, 3]), [1, 2], np.array([True, False, True, True]), np.ones((4, 5), bool), (slice(None), [0, 4])],
)
def test_array_indexing_gives_a_copy(rng, key):
    indices, logprobs = make_cache_arrays(rng, (4, 5), 3, 30)
    cache = SparseTeacher(indices, logprobs, temperature=1.5)
    picked = cache[key]
    whole = key if isinstance(key, tuple) else (key,)
    np.testing.assert_array_equal(picked.indices, indices[(*whole, Ellipsis, slice(None))])
    np.testing.assert_array_equal(picked.logprobs, logprobs[(*whole, Ellipsis, slice(None))])
    assert not np.shares_memory(picked.indices, indices) and picked.temperature == 1.5


@pytest.mark.parametrize("key", [(0, 0, 0), (Ellipsis, 0, 0, 0), (0, slice(None), 1), np.ones((4, 5, 3), bool)])
def test_the_k_slots_cannot_be_indexed(key):
    cache = SparseTeacher(np.zeros((4, 5, 3), np.int32), np.zeros((4, 5, 3)))
    with pytest.raises(IndexError, match=re.escape("too many indices for a SparseTeacher of leading shape (4, 5)")):
        cache[key]


def test_iterating_gives_the_rows_of_the_first_axis(rng):
    indices, logprobs = make_cache_arrays(rng, (3, 2), 4, 10)
    rows = list(SparseTeacher(indices, logprobs))
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert row.shape == (2,)
        np.testing.assert_array_equal(row.indices, indices[i])


# ---------------------------------------------------------------------------------------------------------------
# tail_mass()
# ---------------------------------------------------------------------------------------------------------------


def _mp_tail(logprobs_row):
    """1 - sum exp(logprobs) of the values as stored (clipped at 0), in 60 digits: -expm1 of the largest less the
    others' probabilities, so that a tail far below 1e-60 is exact too."""
    mp = pytest.importorskip("mpmath").mp
    with mp.workdps(60):
        listed = sorted((mp.mpf(float(v)) for v in logprobs_row if v != -np.inf), reverse=True)
        if not listed:
            return 1.0
        tail = -mp.expm1(listed[0]) - mp.fsum(mp.exp(v) for v in listed[1:])
        return float(max(tail, mp.mpf(0)))


def test_the_tail_keeps_its_precision_behind_a_dominant_class():
    rows = [
        [-1e-12, -np.inf, -np.inf],  # tail 1e-12: 1 - exp(-1e-12) rounds to 1.00009e-12
        [-1e-12, math.log(1e-13), -np.inf],  # 9e-13 behind a class and a tiny one
        [-3e-9, math.log(1e-12), math.log(1e-15)],
        [math.log(0.5), math.log(0.25), math.log(0.125)],
        [-np.inf, -np.inf, -np.inf],  # nothing listed: all tail
        [-1e-300, -np.inf, -np.inf],
    ]
    logprobs = np.array(rows)
    tails = SparseTeacher(np.array([[0, 1, 2]] * len(rows)), logprobs).tail_mass()
    assert tails.dtype == np.float64 and tails.shape == (len(rows),)
    for i, row in enumerate(rows):
        exact = _mp_tail(row)
        assert abs(tails[i] - exact) <= 1e-15 * exact, (i, tails[i], exact)
    naive = 1 - np.exp(-1e-12)
    assert abs(naive - _mp_tail(rows[0])) > 1e-6 * 1e-12  # what the test would catch


@pytest.mark.parametrize("logprob_dtype", LOGPROB_DTYPES)
def test_the_tail_of_each_dtype_is_that_of_the_values_stored(rng, logprob_dtype):
    indices, logprobs = make_cache_arrays(rng, (3, 4), 5, 12, logprob_dtype=logprob_dtype)
    tails = SparseTeacher(indices, logprobs).tail_mass()
    assert tails.shape == (3, 4)
    flat = logprobs.reshape(-1, 5)
    for i in range(flat.shape[0]):
        exact = _mp_tail(flat[i])
        assert abs(tails.reshape(-1)[i] - exact) <= 1e-15 * max(exact, 1e-300), (i, exact)


def test_the_tail_is_zero_above_one_and_nan_for_nan():
    logprobs = np.array([[0.0, math.log(1e-7)], [np.nan, -1.0], [-np.inf, 0.0]])
    tails = SparseTeacher(np.array([[0, 1]] * 3), logprobs).tail_mass()
    assert tails[0] == 0.0 and np.isnan(tails[1]) and tails[2] == 0.0


@pytest.mark.parametrize("chunk", [1, 50, 10**6])  # 1, 2 and 6 of the first axis's rows a piece
def test_the_tail_is_the_same_in_pieces_and_views(monkeypatch, rng, chunk):
    indices, logprobs = make_cache_arrays(rng, (6, 7), 3, 9)
    whole = SparseTeacher(indices, logprobs).tail_mass()
    monkeypatch.setattr(sparse_module, "_CHUNK_SLOTS", chunk)
    np.testing.assert_array_equal(SparseTeacher(indices, logprobs).tail_mass(), whole)
    np.testing.assert_array_equal(SparseTeacher(indices, logprobs)[::-2, 1:].tail_mass(), whole[::-2, 1:])


# ---------------------------------------------------------------------------------------------------------------
# save() and load()
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("logprob_dtype", LOGPROB_DTYPES)
def test_a_saved_cache_is_plain_npy_files_and_json(tmp_path, rng, index_dtype, logprob_dtype):
    indices, logprobs = make_cache_arrays(rng, (3, 4), 5, 40, index_dtype, logprob_dtype)
    path = tmp_path / "cache"
    SparseTeacher(indices, logprobs, temperature=2.5, vocab_size=40, method="top_k").save(path)
    assert listing(tmp_path) == ["cache"]
    assert listing(path) == ["indices.npy", "logprobs.npy", "metadata.json"]
    with open(path / "metadata.json") as file:
        assert json.load(file) == {
            "format": "kdloss.sparse_teacher",
            "version": 1,
            "shape": [3, 4],
            "k": 5,
            "indices_dtype": np.dtype(index_dtype).name,
            "logprobs_dtype": np.dtype(logprob_dtype).name,
            "temperature": 2.5,
            "vocab_size": 40,
            "method": "top_k",
            "kdloss_version": kdloss.__version__,
        }
    for name, array in (("indices.npy", indices), ("logprobs.npy", logprobs)):
        read = np.load(path / name)
        assert read.dtype == array.dtype and read.flags.c_contiguous
        np.testing.assert_array_equal(read, array)


@pytest.mark.parametrize("lead", [(), (0,), (7,), (2, 3, 2)])
def test_save_and_load_round_trip_memory_mapped(tmp_path, rng, lead):
    indices, logprobs = make_cache_arrays(rng, lead, 4, 16, np.int32, np.float16)
    SparseTeacher(indices, logprobs, vocab_size=16).save(tmp_path / "cache")
    cache = SparseTeacher.load(tmp_path / "cache")
    assert isinstance(cache.indices, np.memmap) and isinstance(cache.logprobs, np.memmap)
    assert not cache.logprobs.flags.writeable
    assert cache.shape == lead and cache.k == 4 and cache.vocab_size == 16
    assert (cache.temperature, cache.method) == (None, None)
    assert cache.indices.dtype == np.int32 and cache.logprobs.dtype == np.float16
    np.testing.assert_array_equal(cache.indices, indices)
    np.testing.assert_array_equal(cache.logprobs, logprobs)


def test_the_memory_map_modes(tmp_path, rng):
    indices, logprobs = make_cache_arrays(rng, (5,), 3, 9, empty=0.0)
    path = tmp_path / "cache"
    SparseTeacher(indices, logprobs).save(path)
    in_memory = SparseTeacher.load(path, mmap_mode=None)
    assert type(in_memory.logprobs) is np.ndarray and in_memory.logprobs.flags.writeable
    copy_on_write = SparseTeacher.load(path, mmap_mode="c")
    copy_on_write.logprobs[0, 0] = -9.0
    assert SparseTeacher.load(path).logprobs[0, 0] == logprobs[0, 0]
    writable = SparseTeacher.load(path, mmap_mode="r+")
    writable.logprobs[0, 0] = -7.0
    writable.logprobs.flush()
    del writable
    assert SparseTeacher.load(path, mmap_mode=None).logprobs[0, 0] == -7.0
    for mode in ("w+", "w", "readonly"):
        with pytest.raises(ValueError, match=re.escape(f"mmap_mode must be one of None, 'r', 'r+', 'c', got {mode!r}")):
            SparseTeacher.load(path, mmap_mode=mode)
    assert SparseTeacher.load(path).shape == (5,)  # nothing truncated


@pytest.mark.parametrize("chunk", [1, 10**6])
def test_any_layout_is_saved_in_c_order(tmp_path, rng, monkeypatch, chunk):
    monkeypatch.setattr(sparse_module, "_CHUNK_SLOTS", chunk)
    indices, logprobs = make_cache_arrays(rng, (6, 4), 5, 30, np.int64, np.float32)
    layouts = {
        "fortran": SparseTeacher(np.asfortranarray(indices), np.asfortranarray(logprobs)),
        "strided": SparseTeacher(indices, logprobs)[::-2, 1:],
        "slots": SparseTeacher(indices[..., ::2], logprobs[..., ::2]),
    }
    for name, cache in layouts.items():
        cache.save(tmp_path / name)
        loaded = SparseTeacher.load(tmp_path / name)
        assert loaded.indices.flags.c_contiguous and loaded.logprobs.flags.c_contiguous
        np.testing.assert_array_equal(loaded.indices, cache.indices)
        np.testing.assert_array_equal(loaded.logprobs, cache.logprobs)


def test_an_existing_path_is_replaced_only_when_a_cache_and_asked(tmp_path):
    first = SparseTeacher(np.array([[1, 2]]), np.log([[0.5, 0.5]]), temperature=1.0)
    second = SparseTeacher(np.array([[3, 4], [5, 6]]), np.log([[0.5, 0.25], [0.5, 0.25]]), temperature=2.0)
    path = tmp_path / "cache"
    first.save(path)
    with pytest.raises(FileExistsError, match=re.escape(f"{path} already exists (pass overwrite=True")):
        second.save(path)
    assert SparseTeacher.load(path).temperature == 1.0
    second.save(path, overwrite=True)
    loaded = SparseTeacher.load(path)
    assert loaded.temperature == 2.0 and loaded.shape == (2,)
    assert listing(tmp_path) == ["cache"]  # the old cache and the temporary directory are gone

    (tmp_path / "file").write_text("precious")
    (tmp_path / "directory").mkdir()
    (tmp_path / "directory" / "notes.txt").write_text("precious")
    (tmp_path / "empty").mkdir()
    for name in ("file", "directory", "empty"):
        message = f"{tmp_path / name} exists and is not a kdloss sparse-teacher cache; refusing to replace it"
        with pytest.raises(FileExistsError, match=re.escape(message)):
            second.save(tmp_path / name, overwrite=True)
    assert (tmp_path / "file").read_text() == "precious"
    assert (tmp_path / "directory" / "notes.txt").read_text() == "precious"
    assert listing(tmp_path) == ["cache", "directory", "empty", "file"]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot move a directory whose files are mapped")
def test_a_memory_mapped_cache_may_be_saved_over_itself(tmp_path, rng):
    indices, logprobs = make_cache_arrays(rng, (50,), 4, 20)
    path = tmp_path / "cache"
    SparseTeacher(indices, logprobs).save(path)
    loaded = SparseTeacher.load(path)
    loaded[::2].save(path, overwrite=True)
    np.testing.assert_array_equal(SparseTeacher.load(path).logprobs, logprobs[::2])


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch, existing):
    old = SparseTeacher(np.array([[7, 8]]), np.log([[0.5, 0.5]]), method="old")
    path = tmp_path / "cache"
    if existing:
        old.save(path)
    written = []
    original = sparse_module._write_npy

    def write_then_fail(file, array):
        if written:
            raise OSError("disk full")
        original(file, array)
        written.append(file)

    monkeypatch.setattr(sparse_module, "_write_npy", write_then_fail)
    new = SparseTeacher(np.array([[1, 2], [3, 4]]), np.log([[0.5, 0.5], [0.5, 0.5]]), method="new")
    with pytest.raises(OSError, match="disk full"):
        new.save(path, overwrite=True)
    assert written and not written[0].exists()  # the first file was written, then removed
    if existing:
        assert listing(tmp_path) == ["cache"] and SparseTeacher.load(path).method == "old"
    else:
        assert listing(tmp_path) == []


def test_loading_what_is_not_a_cache_names_the_path(tmp_path):
    def refused(path, message):
        with pytest.raises(ValueError, match=re.escape(message)):
            SparseTeacher.load(path)

    refused(tmp_path / "missing", f"{tmp_path / 'missing'} is not a kdloss sparse-teacher cache: no such directory")
    (tmp_path / "bare").mkdir()
    refused(tmp_path / "bare", f"{tmp_path / 'bare'} is not a kdloss sparse-teacher cache: ")

    good = SparseTeacher(np.array([[1, 2]], np.int32), np.log([[0.5, 0.25]]).astype(np.float32), vocab_size=3)

    def edited(name, change):
        path = tmp_path / name
        good.save(path)
        change(path)
        return path

    def rewrite_metadata(**fields):
        def change(path):
            meta = json.loads((path / "metadata.json").read_text())
            meta.update(fields)
            (path / "metadata.json").write_text(json.dumps(meta))

        return change

    path = edited("not_json", lambda path: (path / "metadata.json").write_text("{"))
    refused(path, f"{path / 'metadata.json'} is not valid JSON")
    path = edited("other_format", rewrite_metadata(format="something.else"))
    refused(path, f"{path} is not a kdloss sparse-teacher cache: {path / 'metadata.json'} does not say format")
    path = edited("newer", rewrite_metadata(version=2))
    refused(path, f"{path} is a cache of version 2; this kdloss reads version 1")
    path = edited("no_logprobs", lambda path: (path / "logprobs.npy").unlink())
    refused(path, f"{path} is not a complete kdloss sparse-teacher cache: {path / 'logprobs.npy'} does not exist")
    path = edited("shape", rewrite_metadata(shape=[2]))
    refused(path, f"{path / 'indices.npy'} holds an array of shape (1, 2) and dtype int32, but ")
    path = edited("dtype", rewrite_metadata(logprobs_dtype="float16"))
    refused(path, f"{path / 'logprobs.npy'} holds an array of shape (1, 2) and dtype float32, but ")
    path = edited("bad_k", rewrite_metadata(k=0))
    refused(path, f"{path / 'metadata.json'} holds a bad shape [1] or k 0")
    path = edited("bad_temperature", rewrite_metadata(temperature=0))
    refused(path, f"{path / 'metadata.json'} holds a bad value: temperature must be in [1e-30, 1e6]")
    path = edited("not_npy", lambda path: (path / "indices.npy").write_bytes(b"garbage"))
    refused(path, f"{path / 'indices.npy'} is not a readable .npy file")


# ---------------------------------------------------------------------------------------------------------------
# SparseTeacherWriter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype, logprob_dtype", [(np.int32, np.float16), (np.int64, np.float64)])
def test_a_cache_written_in_batches_is_the_cache_saved_at_once(tmp_path, rng, index_dtype, logprob_dtype):
    indices, logprobs = make_cache_arrays(rng, (10, 3), 4, 50, index_dtype, logprob_dtype)
    whole = SparseTeacher(indices, logprobs, temperature=3.0, vocab_size=50, method="top_k")
    whole.save(tmp_path / "at_once")
    arguments = dict(vocab_size=50, temperature=3.0, method="top_k")
    dtypes = dict(indices_dtype=index_dtype, logprobs_dtype=logprob_dtype)
    with SparseTeacherWriter(tmp_path / "batches", (10, 3), 4, **arguments, **dtypes) as writer:
        assert "batches" not in listing(tmp_path)  # not there until closed
        for start, stop in [(0, 4), (4, 4), (4, 7), (7, 10)]:
            writer.append(whole[start:stop])
            assert writer.rows_written == stop
    assert writer.closed and listing(tmp_path) == ["at_once", "batches"]
    for name in ("indices.npy", "logprobs.npy", "metadata.json"):
        assert (tmp_path / "batches" / name).read_bytes() == (tmp_path / "at_once" / name).read_bytes(), name


def test_the_writer_converts_batches_to_its_dtypes(tmp_path, rng):
    indices, logprobs = make_cache_arrays(rng, (6,), 3, 20, np.int64, np.float32)
    with SparseTeacherWriter(tmp_path / "cache", 6, 3, logprobs_dtype="float16") as writer:
        writer.append(SparseTeacher(indices, logprobs))
    loaded = SparseTeacher.load(tmp_path / "cache")
    assert loaded.indices.dtype == np.int32 and loaded.logprobs.dtype == np.float16
    np.testing.assert_array_equal(loaded.indices, indices)
    np.testing.assert_array_equal(loaded.logprobs, logprobs.astype(np.float16))


def test_a_batch_the_writer_refuses_writes_nothing(tmp_path):
    writer = SparseTeacherWriter(tmp_path / "cache", 4, 2, temperature=2.0, vocab_size=2**40)
    good = SparseTeacher(np.array([[1, 2]]), np.log([[0.5, 0.25]]))
    writer.append(good)

    def refused(error, message, batch):
        with pytest.raises(error, match=re.escape(message)):
            writer.append(batch)
        assert writer.rows_written == 1

    huge = SparseTeacher(np.array([[1, 2**31]]), np.log([[0.5, 0.25]]))
    refused(ValueError, f"the batch holds index {2**31}, which int32 cannot hold", huge)
    negative = SparseTeacher(np.array([[-(2**31) - 1, 2]]), np.log([[0.5, 0.25]]))
    refused(ValueError, f"the batch holds index {-(2**31) - 1}, which int32 cannot hold", negative)
    refused(ValueError, "the batch has K = 3, the writer K = 2", SparseTeacher(np.zeros((1, 3), int), np.zeros((1, 3))))
    refused(
        ValueError,
        "the batch has leading shape (1, 1), which must be (4,) but for the first axis (that of the writer)",
        SparseTeacher(np.zeros((1, 1, 2), int), np.zeros((1, 1, 2))),
    )
    refused(
        ValueError,
        "the batch has leading shape (), which must be (4,) but for the first axis",
        SparseTeacher(np.zeros(2, int), np.zeros(2)),
    )
    refused(
        ValueError,
        "the batch has temperature 3.0, the writer 2.0",
        SparseTeacher(np.array([[1, 2]]), np.zeros((1, 2)), temperature=3.0),
    )
    refused(
        ValueError,
        "the batch has method 'sample', the writer None",
        SparseTeacher(np.array([[1, 2]]), np.zeros((1, 2)), method="sample"),
    )
    refused(
        ValueError,
        "the batch's 4 rows would make 5, more than the writer's 4",
        SparseTeacher(np.zeros((4, 2), int), np.zeros((4, 2))),
    )
    refused(TypeError, "cache must be a SparseTeacher, got ndarray", np.zeros((1, 2)))
    writer.append(SparseTeacher(np.array([[3, 4]] * 3), np.log([[0.5, 0.25]] * 3), temperature=2.0))
    writer.close()
    loaded = SparseTeacher.load(tmp_path / "cache")
    np.testing.assert_array_equal(loaded.indices, [[1, 2], [3, 4], [3, 4], [3, 4]])
    with pytest.raises(ValueError, match=re.escape(f"the writer of {tmp_path / 'cache'} is closed")):
        writer.append(good)
    writer.close()  # a second close does nothing


def test_a_writer_closed_early_leaves_nothing(tmp_path):
    writer = SparseTeacherWriter(tmp_path / "cache", 3, 2)
    writer.append(SparseTeacher(np.array([[1, 2]]), np.log([[0.5, 0.25]])))
    with pytest.raises(ValueError, match=re.escape(f"the writer of {tmp_path / 'cache'} was closed after 1 of its 3")):
        writer.close()
    assert writer.closed and listing(tmp_path) == []


def test_an_aborted_writer_leaves_nothing_and_takes_nothing_more(tmp_path):
    writer = SparseTeacherWriter(tmp_path / "cache", 1, 2)
    assert not writer.closed
    writer.append(SparseTeacher(np.array([[1, 2]]), np.log([[0.5, 0.25]])))
    writer.abort()
    assert writer.closed and listing(tmp_path) == []
    with pytest.raises(ValueError, match="is closed"):
        writer.append(SparseTeacher(np.array([[1, 2]]), np.log([[0.5, 0.25]])))
    writer.close()  # nothing to complete
    assert listing(tmp_path) == []


def test_an_error_in_the_with_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with SparseTeacherWriter(tmp_path / "cache", 2, 2) as writer:
            writer.append(SparseTeacher(np.array([[1, 2]]), np.log([[0.5, 0.25]])))
            raise RuntimeError("teacher crashed")
    assert writer.closed and listing(tmp_path) == []


def test_a_writer_dropped_unclosed_leaves_nothing(tmp_path):
    writer = SparseTeacherWriter(tmp_path / "cache", 2, 2)
    assert len(listing(tmp_path)) == 1  # its temporary directory
    del writer
    gc.collect()
    assert listing(tmp_path) == []


def test_a_writer_replaces_a_cache_only_when_asked_and_only_when_done(tmp_path):
    path = tmp_path / "cache"
    SparseTeacher(np.array([[7, 8]]), np.log([[0.5, 0.5]]), method="old").save(path)
    with pytest.raises(FileExistsError, match="already exists"):
        SparseTeacherWriter(path, 1, 2)
    (tmp_path / "file").write_text("precious")
    with pytest.raises(FileExistsError, match="is not a kdloss sparse-teacher cache"):
        SparseTeacherWriter(tmp_path / "file", 1, 2, overwrite=True)
    with SparseTeacherWriter(path, 1, 2, method="new", overwrite=True) as writer:
        writer.append(SparseTeacher(np.array([[1, 2]]), np.log([[0.5, 0.5]])))
        assert SparseTeacher.load(path).method == "old"
    assert SparseTeacher.load(path).method == "new"
    assert listing(tmp_path) == ["cache", "file"]


def test_a_writer_of_sequences_and_of_no_rows(tmp_path, rng):
    indices, logprobs = make_cache_arrays(rng, (4, 6), 3, 11, np.int32, np.float32)
    with SparseTeacherWriter(tmp_path / "sequences", (4, 6), 3, logprobs_dtype=np.float32) as writer:
        writer.append(SparseTeacher(indices[:1], logprobs[:1]))
        writer.append(SparseTeacher(indices[1:], logprobs[1:]))
    loaded = SparseTeacher.load(tmp_path / "sequences")
    assert loaded.shape == (4, 6)
    np.testing.assert_array_equal(loaded.logprobs, logprobs)
    SparseTeacherWriter(tmp_path / "empty", 0, 3).close()
    assert SparseTeacher.load(tmp_path / "empty").shape == (0,)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"shape": ()}, ValueError, "shape must be a number of rows or a tuple of at least one size >= 0, got ()"),
        ({"shape": (3, -1)}, ValueError, "shape must be a number of rows or a tuple of at least one size >= 0"),
        ({"k": 0}, ValueError, "k must be an integer >= 1, got 0"),
        ({"indices_dtype": "int16"}, TypeError, "indices_dtype must be int32 or int64, got dtype int16"),
        ({"logprobs_dtype": "int32"}, TypeError, "logprobs_dtype must be float16, float32 or float64, got dtype int32"),
        ({"temperature": 0.0}, ValueError, "temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 0"),
        ({"vocab_size": 1}, ValueError, "vocab_size must be at least K = 2"),
        ({"method": 1}, TypeError, "method must be a string or None, got 1"),
    ],
)
def test_the_writer_checks_its_arguments_before_creating_anything(tmp_path, arguments, error, message):
    arguments = {"shape": 3, "k": 2, **arguments}
    with pytest.raises(error, match=re.escape(message)):
        SparseTeacherWriter(tmp_path / "cache", **arguments)
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# concatenate()
# ---------------------------------------------------------------------------------------------------------------


def test_concatenate_joins_rows_in_order(rng):
    parts = [make_cache_arrays(rng, (n, 2), 3, 12, np.int32, np.float16) for n in (2, 0, 5)]
    caches = [SparseTeacher(i, lp, temperature=2.0, vocab_size=12, method="sample") for i, lp in parts]
    joined = SparseTeacher.concatenate(caches)
    assert joined.shape == (7, 2) and joined.indices.dtype == np.int32 and joined.logprobs.dtype == np.float16
    assert (joined.temperature, joined.vocab_size, joined.method) == (2.0, 12, "sample")
    np.testing.assert_array_equal(joined.indices, np.concatenate([i for i, _ in parts]))
    np.testing.assert_array_equal(joined.logprobs, np.concatenate([lp for _, lp in parts]))
    assert not np.shares_memory(joined.indices, parts[0][0])


def test_concatenate_refuses_caches_that_differ():
    def cache(lead=(1,), k=2, index_dtype=np.int32, logprob_dtype=np.float32, **metadata):
        return SparseTeacher(np.zeros((*lead, k), index_dtype), np.zeros((*lead, k), logprob_dtype), **metadata)

    def refused(error, message, caches):
        with pytest.raises(error, match=re.escape(message)):
            SparseTeacher.concatenate(caches)

    refused(ValueError, "concatenate needs at least one SparseTeacher", [])
    refused(TypeError, "caches[1] must be a SparseTeacher, got tuple", [cache(), (1, 2)])
    refused(ValueError, "caches[0] has one row (leading shape ()), no first axis", [cache(lead=()), cache()])
    refused(ValueError, "caches[1] has K = 3, caches[0] K = 2", [cache(), cache(k=3)])
    refused(ValueError, "caches[2] has leading shape (1, 2), which must be (1,) but", [cache(), cache(), cache((1, 2))])
    refused(TypeError, "caches[1] has indices of dtype int64, caches[0] int32", [cache(), cache(index_dtype=np.int64)])
    refused(
        TypeError, "caches[1] has logprobs of dtype float16, caches[0] float32", [cache(), cache(logprob_dtype="e")]
    )
    refused(ValueError, "caches[1] has temperature 2.0, caches[0] None", [cache(), cache(temperature=2.0)])
    refused(ValueError, "caches[1] has vocab_size 5, caches[0] 4", [cache(vocab_size=4), cache(vocab_size=5)])
    refused(ValueError, "caches[1] has method None, caches[0] 'a'", [cache(method="a"), cache()])


# ---------------------------------------------------------------------------------------------------------------
# The reference of the sparse soft term, checked
# ---------------------------------------------------------------------------------------------------------------


def _teacher_cache(rng, rows, classes, k, temperature, *, empty=0.25, scale=3.0):
    """Student logits and a valid sparse teacher of k classes a row: the listed ones the teacher's own (so the
    row has a tail), some slots empty, some rows of sampled-teacher weights (count / num_samples, summing to 1)."""
    student = rng.normal(size=(rows, classes)) * scale
    teacher = rng.normal(size=(rows, classes)) * scale
    indices, logprobs = dense_equivalent(teacher, temperature)
    indices, logprobs = indices[:, :k].copy(), logprobs[:, :k].copy()
    logprobs[rng.random((rows, k)) < empty] = -np.inf
    for row in range(0, rows, 3):  # a sampled row: weights count / n over the classes drawn
        n = 16
        counts = np.bincount(rng.integers(0, k, n), minlength=k)
        logprobs[row] = np.where(counts > 0, np.log(np.maximum(counts, 1) / n), -np.inf)
    return student, indices, logprobs


def _torch_sparse_soft(student, indices, logprobs, temperature, tail):
    """The soft term written from the issue's formulas with torch primitives, on the teacher scattered over the
    classes, in float64; autograd differentiates it."""
    torch = pytest.importorskip("torch")
    listed, log_p = scatter_teacher(indices, logprobs, student.shape[-1])
    listed, log_p = torch.tensor(listed), torch.tensor(log_p)
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    p = torch.where(listed, log_p.exp(), 0.0)
    listed_p = p.sum(-1)
    if tail == "bucket":
        kl_terms = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        r = torch.where(listed.all(-1), 0.0, (1 - listed_p).clamp(min=0))
        # Where every class is listed the tail is 0 and Q_u unused: all of log q there keeps logsumexp's backward
        # free of NaN (exp(-inf - -inf)), which the zero gradient of the unused branch would multiply into NaN.
        hidden = listed & ~listed.all(-1, keepdim=True)
        unlisted = torch.logsumexp(torch.where(hidden, -math.inf, log_q), dim=-1)
        tail_terms = torch.where(r > 0, r * (torch.log(r) - unlisted), 0.0)
        soft = temperature**2 * (kl_terms + tail_terms)
    else:
        pn = p / listed_p[:, None]
        soft = temperature**2 * torch.where(pn > 0, pn * (torch.log(pn) - log_q), 0.0).sum(-1)
    soft.sum().backward()
    return soft.detach().numpy(), s.grad.numpy()


@pytest.mark.parametrize("tail", SPARSE_TAILS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 7.0])
@pytest.mark.parametrize("lead", [(), (6,), (2, 3)])
def test_a_cache_of_every_class_is_the_dense_reference(rng, tail, temperature, lead):
    """K = C (the top-k of k = C): both tails give the dense forward-KL soft term and gradient to 1e-12, whatever
    the order of the slots, also with classes both sides rule out (-inf logits, listed as empty slots)."""
    classes = 9
    student = rng.normal(size=(*lead, classes)) * 3
    teacher = rng.normal(size=(*lead, classes)) * 3
    if lead:
        teacher.reshape(-1, classes)[0, [2, 5]] = -np.inf
        student.reshape(-1, classes)[0, 5] = -np.inf
    rows = (-1, classes)  # the dense reference takes (B, C)
    dense = reference(
        student.reshape(rows), teacher.reshape(rows), temperature=temperature, alpha=0.0, reduction="none"
    )
    indices, logprobs = dense_equivalent(teacher, temperature)
    assert indices.shape == (*lead, classes) and indices.dtype == np.int64
    shuffled = rng.permuted(np.arange(classes))
    for order in (np.arange(classes), shuffled):
        sparse = sparse_soft_reference(student, indices[..., order], logprobs[..., order], temperature, tail)
        assert sparse.soft.shape == lead and sparse.grad.shape == student.shape
        np.testing.assert_allclose(sparse.soft, dense.rows.reshape(lead), rtol=1e-12, atol=1e-15)
        tolerance = 1e-12 * np.abs(dense.grad).max()
        np.testing.assert_allclose(sparse.grad, dense.grad.reshape(student.shape), rtol=0, atol=tolerance)


def test_dense_equivalent_is_the_top_k_order():
    indices, logprobs = dense_equivalent(np.array([[1.0, 3.0, 1.0, -np.inf, 3.0]]), 2.0)
    np.testing.assert_array_equal(indices, [[1, 4, 0, 2, 3]])  # ties: the lower index first
    log_z = math.log(2 * math.exp(1.5) + 2 * math.exp(0.5))
    np.testing.assert_allclose(logprobs, [[1.5 - log_z, 1.5 - log_z, 0.5 - log_z, 0.5 - log_z, -np.inf]], rtol=1e-15)


@pytest.mark.parametrize("tail", SPARSE_TAILS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("classes, k", [(1, 1), (5, 2), (12, 5), (40, 8), (33, 33)])
def test_the_hand_derived_gradient_is_autograds(rng, tail, temperature, classes, k):
    student, indices, logprobs = _teacher_cache(rng, 12, classes, k, temperature)
    if tail == "renormalize":  # a row with nothing listed has no renormalised teacher (the reference gives 0)
        keep = np.isfinite(logprobs).any(axis=1)
        student, indices, logprobs = student[keep], indices[keep], logprobs[keep]
    ref = sparse_soft_reference(student, indices, logprobs, temperature, tail)
    soft, grad = _torch_sparse_soft(student, indices, logprobs, temperature, tail)
    np.testing.assert_allclose(ref.soft, soft, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ref.grad, grad, rtol=0, atol=1e-12 * max(np.abs(grad).max(), 1e-300))


def _mp_coarse_kl(student_row, indices_row, logprobs_row, temperature, tail, index=None, value=None):
    """T^2 times the KL between the teacher and the student coarse-grained to K + 1 bins (the listed classes and
    the rest), from the probabilities themselves (optionally with student_row[index] = value, an mpf,
    for derivatives); "renormalize": T^2 sum pn_k log(pn_k / q_k). 0 log 0 = 0; the tail 0 when every class is
    listed. At the caller's precision (mpmath.diff raises it for its differences)."""
    mp = pytest.importorskip("mpmath").mp
    T = mp.mpf(temperature)
    s = [mp.mpf(float(v)) for v in student_row]
    if index is not None:
        s[index] = value
    top = max(s)
    weights = [mp.exp((v - top) / T) for v in s]
    z = mp.fsum(weights)
    q = [w / z for w in weights]
    listed = {int(c): mp.exp(mp.mpf(float(lp))) for c, lp in zip(indices_row, logprobs_row) if lp != -np.inf}
    if tail == "renormalize":
        total = mp.fsum(listed.values())
        return T * T * mp.fsum(p / total * mp.log(p / total / q[c]) for c, p in listed.items() if p)
    bins = [(p, q[c]) for c, p in listed.items()]
    if len(listed) < len(s):
        rest = 1 - mp.fsum(listed.values())
        bins.append((max(rest, mp.mpf(0)), mp.fsum(q[c] for c in range(len(s)) if c not in listed)))
    return T * T * mp.fsum(p * mp.log(p / qb) for p, qb in bins if p)


def _hard_rows(temperature):
    """Rows where a careless formula loses digits: a tail of 1e-12 behind a class of log-probability ~ -1e-12; a
    student whose unlisted classes hold ~1e-20 of its mass (1 - sum q_k would be 0); a student ruling out a
    class it does not list; every class listed with probabilities summing to 1 - 1e-9 (no tail by definition)."""
    classes = 6
    student = np.array(
        [
            [2.0, 0.5, -1.0, 0.3, -0.7, 1.1],
            [30.0, 29.0, 28.5, -15.0, -16.0, -14.0],
            [1.0, -np.inf, 0.5, 2.0, -0.5, 0.0],
            [0.3, -0.2, 0.9, -1.4, 0.0, 0.6],
        ]
    )
    indices = np.array([[3, 1, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0], [3, 0, 5, 0, 0, 0], [5, 4, 3, 2, 1, 0]])
    logprobs = np.full((4, classes), -np.inf)
    logprobs[0, :2] = [-1.2e-12, math.log(2e-13)]
    logprobs[1, :3] = np.log([0.6, 0.3, 0.09])
    logprobs[2, :3] = np.log([0.5, 0.2, 0.25])
    p = np.array([0.3, 0.25, 0.2, 0.15, 0.07, 0.03 - 1e-9])
    logprobs[3] = np.log(p)
    return student, indices, logprobs


@pytest.mark.parametrize("tail", SPARSE_TAILS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_the_reference_is_the_coarse_grained_kl_to_full_precision(rng, tail, temperature):
    mp = pytest.importorskip("mpmath").mp
    hard = _hard_rows(temperature)
    drawn = _teacher_cache(rng, 9, 7, 4, temperature)
    for student, indices, logprobs in (hard, drawn):
        ref = sparse_soft_reference(student, indices, logprobs, temperature, tail)
        for i in range(student.shape[0]):
            with mp.workdps(60):
                exact = float(_mp_coarse_kl(student[i], indices[i], logprobs[i], temperature, tail))
            assert np.isfinite(ref.soft[i])
            assert abs(ref.soft[i] - exact) <= 1e-13 * abs(exact) + 1e-300, (i, ref.soft[i], exact)


@pytest.mark.parametrize("tail", SPARSE_TAILS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_reference_gradient_is_the_derivative_of_the_coarse_grained_kl(tail, temperature):
    mpmath = pytest.importorskip("mpmath")
    student, indices, logprobs = _hard_rows(temperature)
    ref = sparse_soft_reference(student, indices, logprobs, temperature, tail)
    for i in range(student.shape[0]):
        scale = np.abs(ref.grad[i]).max()
        for j in range(student.shape[1]):
            if student[i, j] == -np.inf:
                continue  # not a point the loss is differentiable at; checked below
            with mpmath.mp.workdps(60):
                exact = mpmath.diff(
                    lambda x, i=i, j=j: _mp_coarse_kl(student[i], indices[i], logprobs[i], temperature, tail, j, x),
                    mpmath.mpf(float(student[i, j])),
                )
            assert abs(ref.grad[i, j] - float(exact)) <= 1e-13 * scale, (i, j, ref.grad[i, j], float(exact))


def test_a_class_the_student_rules_out_has_the_gradient_of_dense_forward_kl():
    """Listed with teacher mass: loss +inf, gradient -T p_j (finite); unlisted: no mass, no gradient."""
    T = 2.0
    student = np.array([[0.5, -np.inf, 1.0, -np.inf]])
    indices, logprobs = np.array([[1, 2]]), np.log([[0.25, 0.5]])
    for tail in SPARSE_TAILS:
        ref = sparse_soft_reference(student, indices, logprobs, T, tail)
        assert ref.soft[0] == np.inf
        expected_p = 0.25 if tail == "bucket" else 0.25 / 0.75
        assert ref.grad[0, 1] == pytest.approx(-T * expected_p, rel=1e-15)
        assert ref.grad[0, 3] == 0.0


def test_a_tail_the_student_cannot_hold_is_an_infinite_loss_without_a_gradient():
    """bucket: r > 0 but every unlisted class ruled out (Q_u = 0): the loss is +inf, the unlisted gradient NaN."""
    student = np.array([[0.5, -np.inf, 1.0, -np.inf]])
    ref = sparse_soft_reference(student, np.array([[0, 2]]), np.log([[0.25, 0.5]]), 2.0, "bucket")
    assert ref.soft[0] == np.inf
    assert np.isnan(ref.grad[0, [1, 3]]).all() and np.isfinite(ref.grad[0, [0, 2]]).all()


def test_both_tails_agree_for_a_teacher_whose_listed_mass_is_one(rng):
    """A sampled teacher's weights sum to 1: there is no tail to bucket, and nothing to renormalise."""
    student = rng.normal(size=(20, 30)) * 2
    indices = np.argsort(rng.random((20, 30)), axis=1)[:, :6]
    counts = rng.multinomial(64, np.full(6, 1 / 6), size=20)
    logprobs = np.where(counts > 0, np.log(np.maximum(counts, 1) / 64), -np.inf)
    bucket = sparse_soft_reference(student, indices, logprobs, 1.5, "bucket")
    renormalize = sparse_soft_reference(student, indices, logprobs, 1.5, "renormalize")
    np.testing.assert_allclose(bucket.soft, renormalize.soft, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(bucket.grad, renormalize.grad, rtol=0, atol=1e-14)


def test_a_row_that_lists_nothing_contributes_nothing():
    student = np.array([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]])
    indices, logprobs = np.array([[0, 1], [2, 0]]), np.array([[-np.inf, -np.inf], [math.log(0.5), -np.inf]])
    for tail in SPARSE_TAILS:
        ref = sparse_soft_reference(student, indices, logprobs, 2.0, tail)
        assert ref.soft[0] == 0.0 and np.all(ref.grad[0] == 0.0)
        assert ref.soft[1] > 0


@pytest.mark.parametrize(
    "indices, logprobs",
    [
        ([[0, 0]], [[-1.0, -2.0]]),  # a class listed twice
        ([[0, 3]], [[-1.0, -2.0]]),  # out of range
        ([[0, -1]], [[-1.0, -2.0]]),
        ([[0, 1]], [[np.nan, -2.0]]),
        ([[0, 1]], [[np.inf, -2.0]]),
    ],
)
def test_the_reference_refuses_a_bad_cache(indices, logprobs):
    with pytest.raises(ValueError, match="^reference: "):
        sparse_soft_reference(np.zeros((1, 3)), np.array(indices), np.array(logprobs), 1.0, "bucket")
