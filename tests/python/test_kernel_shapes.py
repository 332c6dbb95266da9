"""Row lengths and batch sizes around the kernels' internal boundaries, against the reference.

The kernels work on vectors of 16 lanes. Rows of up to 160 (float32) or 128 (float64) classes run 16 rows
at a time (one per lane), transposed in tiles; longer rows run along the row, and a last partial vector is
the window of the row's last 16 classes, which overlaps the vector before it and must not count those
classes twice. These tests put the row's maximum, -inf masks, NaN and the label inside that overlap, for
every tail length.

The boundary lengths and batch sizes are explicit Hypothesis examples, run every time; the drawn examples add
lengths and batch sizes in between and beyond.
"""

from __future__ import annotations

import kdloss
import numpy as np
import pytest
from helpers import SEEDS, assert_grad_close, assert_loss_close, check_against_reference, with_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kdloss import DistillationLoss
from reference import reference

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

DTYPES = [np.float32, np.float64]
# The longest rows that run in blocks, as the library says (block_max_classes in batch_problem.hpp): a changed
# limit moves the boundaries tested here with it.
BLOCK_MAX_CLASSES = {dtype: kdloss.build_info()["block_max_classes"][np.dtype(dtype).name] for dtype in DTYPES}
LANES = kdloss.build_info()["lanes"]


def short_rows(dtype):
    """One lane per row; tiles of 16 (and 4, 8) columns."""
    block_max = BLOCK_MAX_CLASSES[dtype]
    return list(range(1, 2 * LANES + 3)) + [
        3 * LANES - 1,
        3 * LANES,
        3 * LANES + 1,
        99,
        100,
        101,
        117,
        block_max - 1,
        block_max,
    ]


def long_rows(dtype):
    """Every tail length 0..LANES-1 of the last vector, from the shortest long row on."""
    first = BLOCK_MAX_CLASSES[dtype] + 1
    return list(range(first, first + LANES + 1)) + [1000, 1024, 4095]


FORMS = ["none", "index", "soft"]


def labels_for(rng, form, B, C, dtype):
    if form == "none":
        return None
    if form == "index":
        return rng.integers(0, C, size=B)
    y = rng.random((B, C)).astype(dtype)
    y[:, rng.random(C) < 0.3] = 0
    return y


@st.composite
def dtype_and_row_length(draw, kind):
    """(dtype, classes): a row length that runs in blocks ("short"), along the row ("long", with a last partial
    vector: "long_with_tail"), or either ("any")."""
    dtype = draw(st.sampled_from(DTYPES))
    block_max = BLOCK_MAX_CLASSES[dtype]
    if kind == "short":
        classes = draw(st.integers(1, block_max))
    elif kind == "any":
        classes = draw(st.one_of(st.integers(1, 2 * block_max + 2 * LANES), st.integers(1, 5000)))
    else:
        classes = draw(st.integers(block_max + 1, 5000))
        if kind == "long_with_tail" and classes % LANES == 0:
            classes += 1
    return dtype, classes


@settings(max_examples=20)
@given(dtype_and_classes=dtype_and_row_length("any"), seed=SEEDS)
@with_examples(
    [
        dict(dtype_and_classes=(dtype, classes), seed=classes)
        for dtype in DTYPES
        for classes in short_rows(dtype) + long_rows(dtype)
    ]
)
def test_every_row_length_around_the_kernel_boundaries_matches_the_reference(dtype_and_classes, seed):
    """Every row length around the kernels' boundaries (each short length up to two vectors and a bit, a block
    row's tiles, the longest block row, and each tail length of the first long rows), in a full block and a
    partial one, gives the reference's loss and gradient: without labels, with class indices and with target
    distributions, for reduction "none" and "mean"."""
    dtype, classes = dtype_and_classes
    rng = np.random.default_rng(seed)
    batch = LANES + 3  # a full block and a partial one
    s = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
    t = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
    # Errors are measured against the size of the terms (conditioned): with two classes or one, a float32
    # loss is a small difference of O(1) terms.
    for form in FORMS:
        for kd in (DistillationLoss(3.0, 0.3, reduction="none"), DistillationLoss(2.5, 0.4)):
            check_against_reference(kd, s, t, labels_for(rng, form, batch, classes, dtype), conditioned=True)


@settings(max_examples=10)
@given(dtype_and_classes=dtype_and_row_length("long_with_tail"), seed=SEEDS)
@with_examples(
    [
        dict(dtype_and_classes=(dtype, classes), seed=classes)
        for dtype in DTYPES
        for classes in long_rows(dtype)
        if classes % LANES
    ]
)
def test_maxima_masks_and_labels_in_the_overlap_of_the_last_vector_count_once(dtype_and_classes, seed):
    """A long row's last partial vector overlaps the one before it: a maximum (once, or twice), a teacher
    mask, a mask of both and the label placed in that overlap are each counted once, for every tail length."""
    dtype, classes = dtype_and_classes
    rng = np.random.default_rng(seed)
    batch = 4
    overlap = range(classes - LANES, classes - classes % LANES)  # what the last window shares with the one before
    s = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
    t = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
    first = overlap[0]
    s[0, first] = t[0, first + 1] = 40.0  # each row's maximum, once (a double count would show in Z)
    s[1, first], s[1, first + 2] = 40.0, 40.0  # a maximum twice, both in the overlap
    t[2, first] = -np.inf  # a teacher mask in the overlap
    t[3, overlap[-1]] = -np.inf
    s[3, overlap[-1]] = -np.inf  # masked in both: drops out
    y = np.array([first, first + 2, first + 1, 0])
    for kd in (DistillationLoss(3.0, 0.3, reduction="none"), DistillationLoss(1.7, 0.5, reduction="sum")):
        check_against_reference(kd, s, t, y)  # a class counted twice would be off by log 2, not by ulps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [20, 117, 245])
def test_nan_in_the_overlap_or_the_tail_is_nan(rng, dtype, classes):
    s = (rng.standard_normal((3, classes)) * 3).astype(dtype)
    t = (rng.standard_normal((3, classes)) * 3).astype(dtype)
    s[0, classes - 10] = np.nan
    t[1, classes - 1] = np.nan
    loss, grad = DistillationLoss(3.0, 0.3, reduction="none").loss_and_gradient(s, t, np.zeros(3, dtype=np.int64))
    assert np.isnan(loss[0]) and np.isnan(loss[1]) and np.isfinite(loss[2])
    assert np.isnan(grad[0]).all() and np.isnan(grad[1]).all() and np.isfinite(grad[2]).all()


BLOCK_BATCHES = [1, LANES - 1, LANES, LANES + 1, 2 * LANES - 1, 2 * LANES, 2 * LANES + 1, 3 * LANES]


@settings(max_examples=15)
@given(dtype_and_classes=dtype_and_row_length("short"), batch=st.integers(1, 4 * LANES), seed=SEEDS)
@with_examples(
    [
        dict(dtype_and_classes=(dtype, classes), batch=batch, seed=batch)
        for dtype in DTYPES
        for batch in BLOCK_BATCHES
        for classes in sorted({10, 100, 128, BLOCK_MAX_CLASSES[dtype]})
    ]
)
def test_batches_of_short_rows_in_full_and_partial_blocks_match_the_reference(dtype_and_classes, batch, seed):
    """Short rows run `lanes` rows at a time: batches of one row, around one, two and three full blocks, and
    in between, give the reference's per-row losses and gradient (class-index labels)."""
    dtype, classes = dtype_and_classes
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
    t = (rng.standard_normal((batch, classes)) * 3).astype(dtype)
    y = rng.integers(0, classes, size=batch)
    kd = DistillationLoss(3.0, 0.3, reduction="none")
    ref = reference(s, t, y, temperature=3.0, alpha=0.3, reduction="none")
    loss, grad = kd.loss_and_gradient(s, t, y)
    assert_loss_close(loss, ref.loss, dtype)
    assert_grad_close(grad, ref.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [10, 100, 245, 1000])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_far_apart_around_ignored_rows(rng, dtype, classes, threads):
    """Each row is shifted by its own maxima, never a neighbour's: rows thousands apart, every third one
    ignored. (A long row's maxima are found ahead, by the gradient pass of the row before it: the maxima
    of an ignored row, or another row's, would make these exponentials overflow or underflow entirely.)"""
    rows = 40
    offsets = np.resize([0.0, 3000.0, -3000.0], rows)
    s = (rng.standard_normal((rows, classes)) * 3 + offsets[:, None]).astype(dtype)
    t = (rng.standard_normal((rows, classes)) * 3 + offsets[:, None]).astype(dtype)
    y = rng.integers(0, classes, size=rows)
    y[1::3] = -100
    for kd in (DistillationLoss(3.0, 0.3, reduction="none", num_threads=threads), DistillationLoss(2.0, 0.5)):
        check_against_reference(kd, s, t, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tail", [0, 7])
def test_rows_longer_than_long_row_bytes(rng, dtype, tail):
    """Rows of more than 256 KiB run their gradient pass backwards, last block first (lane_math.hpp's
    long_row_bytes), and find the next row's maxima on the way: every block once, the overlapping last one
    included, whichever end holds a row's maximum."""
    classes = (262144 // np.dtype(dtype).itemsize) + LANES * 5 + tail
    rows = 3
    s = (rng.standard_normal((rows, classes)) * 3).astype(dtype)
    t = (rng.standard_normal((rows, classes)) * 3).astype(dtype)
    s[0, classes - 3], t[0, 1] = 30.0, 30.0  # maxima at the two ends
    s[1, 0], t[1, classes - 1] = 30.0, 30.0
    s[2, classes // 2] = 30.0
    y = np.array([classes - 3, 0, classes - 1])
    for kd in (DistillationLoss(3.0, 0.3, reduction="none"), DistillationLoss(2.5, 0.4, reduction="sum")):
        check_against_reference(kd, s, t, y)


@pytest.mark.parametrize("threads", [1, 2])
def test_calls_larger_than_l3_fetch_gradient_rows_ahead(rng, threads):
    """Calls of more than 32 MiB over rows of 8000 bytes or more also fetch each gradient row ahead of its
    exponential pass (lane_math.hpp's fetch_gradient): the last rows of each task, which have no row ahead
    of them, and ignored rows among them."""
    rows, classes = 1500, 1000  # float64: 8000-byte rows, 3 x 12 MB
    s = rng.standard_normal((rows, classes)) * 3
    t = rng.standard_normal((rows, classes)) * 3
    y = rng.integers(0, classes, size=rows)
    y[rng.random(rows) < 0.05] = -100
    check_against_reference(DistillationLoss(3.0, 0.3, num_threads=threads), s, t, y)
