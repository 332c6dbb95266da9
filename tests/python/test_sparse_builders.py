"""kdloss.top_k and kdloss.sample_teacher: against a float64 NumPy reference (a stable argsort and log-sum-exp) and
torch.topk, their shapes, dtypes, in-place reads, errors and thread counts; the sampler's structure, its
reproducibility, and draws that follow the softmax (chi-square bounds for fixed seeds, which a correct sampler
exceeds with probability below 1e-6). test_isa_paths.py reruns this file under every instruction set.
"""

from __future__ import annotations

import doctest
import math

import kdloss
import numpy as np
import pytest
from kdloss import _sparse_builders

DTYPES = [np.float32, np.float64]
# Log-probabilities agree with the float64 reference to a few roundings of the compute dtype.
RTOL = {np.float32: 4e-7, np.float64: 1e-14}


def reference_top_k(logits, k, temperature):
    """(indices, logprobs) of the k best of each row, in float64: stable argsort of -t, log-sum-exp."""
    t = np.asarray(logits, np.float64)
    t = t.reshape(-1, t.shape[-1])
    order = np.argsort(-t, axis=-1, kind="stable")[:, :k]
    top = t.max(axis=-1, keepdims=True)
    centred = (t - top) / temperature
    log_softmax = centred - np.log(np.exp(centred).sum(axis=-1, keepdims=True))
    return order, np.take_along_axis(log_softmax, order, axis=-1)


def assert_matches_reference(cache, logits, k, temperature):
    indices, logprobs = reference_top_k(logits, k, temperature)
    lead = np.shape(logits)[:-1]
    assert cache.indices.shape == (*lead, k) and cache.indices.dtype == np.int32
    got_indices = cache.indices.reshape(-1, k)
    got = cache.logprobs.reshape(-1, k).astype(np.float64)
    np.testing.assert_array_equal(got_indices, indices)
    finite = np.isfinite(logprobs)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    np.testing.assert_array_equal(got[~finite], logprobs[~finite])
    rtol = RTOL[cache.logprobs.dtype.type]
    np.testing.assert_allclose(got[finite], logprobs[finite], rtol=rtol, atol=rtol)


def counts_of(cache, num_samples):
    """Each row's counts by class, after checking the row's structure: distinct classes by decreasing count (ties
    to the lower index), weights count / num_samples that add up to num_samples draws, then empty slots that
    repeat the index listed last."""
    indices = cache.indices.reshape(-1, cache.indices.shape[-1])
    logprobs = cache.logprobs.reshape(indices.shape).astype(np.float64)
    counts = np.zeros((indices.shape[0], cache.vocab_size), np.int64)
    for i in range(indices.shape[0]):
        listed = int(np.isfinite(logprobs[i]).sum())
        assert listed >= 1 and np.isfinite(logprobs[i, :listed]).all()
        np.testing.assert_array_equal(logprobs[i, listed:], -np.inf)
        np.testing.assert_array_equal(indices[i, listed:], indices[i, listed - 1])
        row = np.rint(np.exp(logprobs[i, :listed]) * num_samples).astype(np.int64)
        assert row.sum() == num_samples and (row >= 1).all()
        np.testing.assert_array_equal(
            logprobs[i, :listed], np.log(row / num_samples).astype(cache.logprobs.dtype).astype(np.float64)
        )
        classes = indices[i, :listed]
        assert len(set(classes.tolist())) == listed and ((classes >= 0) & (classes < cache.vocab_size)).all()
        order = sorted(range(listed), key=lambda j: (-row[j], classes[j]))
        assert order == list(range(listed))
        counts[i, classes] = row
    return counts


def softmax64(logits, temperature):
    t = np.asarray(logits, np.float64)
    e = np.exp((t - t.max(axis=-1, keepdims=True)) / temperature)
    return e / e.sum(axis=-1, keepdims=True)


def chi_square(observed, p, draws):
    """Pearson's statistic over the classes expected at least 5 times (the rest pooled), and its degrees."""
    expected = p * draws
    big = expected >= 5
    statistic = float((((observed[big] - expected[big]) ** 2) / expected[big]).sum())
    bins = int(big.sum())
    if expected[~big].sum() >= 5:
        rest_expected, rest_observed = expected[~big].sum(), observed[~big].sum()
        statistic += (rest_observed - rest_expected) ** 2 / rest_expected
        bins += 1
    return statistic, bins - 1


def chi_square_bound(degrees):
    """Exceeded with probability below 1e-6 (Wilson-Hilferty at z = 4.9, with room for few degrees)."""
    h = 2 / (9 * degrees)
    return degrees * (1 - h + 4.9 * math.sqrt(h)) ** 3 + 10


def test_docstring_examples():
    result = doctest.testmod(_sparse_builders, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- top_k ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [1, 2, 15, 16, 17, 100, 1000, 33000])
def test_top_k_matches_the_reference(rng, dtype, classes):
    logits = (rng.standard_normal((5, classes)) * 3).astype(dtype)
    for k in sorted({1, 2, 64, classes // 2, classes} & set(range(1, classes + 1))):
        for temperature in (0.5, 2.0):
            assert_matches_reference(kdloss.top_k(logits, k, temperature=temperature), logits, k, temperature)


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_breaks_ties_by_the_lower_index(rng, dtype):
    logits = rng.integers(-3, 4, size=(6, 2000)).astype(dtype)
    logits[5] = 1.5  # one value throughout
    for k in (1, 7, 700, 2000):
        assert_matches_reference(kdloss.top_k(logits, k, temperature=1.0), logits, k, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_lists_masked_classes_last_as_empty_slots(rng, dtype):
    logits = rng.standard_normal((4, 300)).astype(dtype)
    logits[0, rng.random(300) < 0.9] = -np.inf
    logits[0, 0] = 0.5
    logits[1, :] = -np.inf
    logits[1, 123] = 2.0
    for k in (1, 50, 300):
        cache = kdloss.top_k(logits, k, temperature=3.0)
        assert_matches_reference(cache, logits, k, 3.0)
        assert cache.indices[1, 0] == 123 and cache.logprobs[1, 0] == 0
        assert (cache.logprobs[1, 1:] == -np.inf).all()


def test_top_k_with_k_equal_to_c_is_the_whole_log_softmax(rng):
    logits = rng.standard_normal((3, 500)) * 4
    cache = kdloss.top_k(logits, 500, temperature=2.0)
    np.testing.assert_allclose(np.exp(cache.logprobs).sum(axis=-1), 1.0, rtol=1e-14)
    # Scattered back, the whole log-softmax.
    full = np.full_like(logits, np.nan)
    np.put_along_axis(full, cache.indices.astype(np.int64), cache.logprobs, axis=-1)
    centred = (logits - logits.max(axis=-1, keepdims=True)) / 2.0
    expected = centred - np.log(np.exp(centred).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(full, expected, rtol=1e-14, atol=1e-14)


def test_top_k_agrees_with_torch_topk(rng):
    torch = pytest.importorskip("torch")
    logits = torch.from_numpy((rng.standard_normal((16, 5000)) * 2).astype(np.float32))
    temperature, k = 1.7, 64
    cache = kdloss.top_k(logits, k, temperature=temperature)
    scaled = logits.double() / temperature
    values, indices = torch.topk(scaled, k)  # continuous logits: no ties to break
    expected = values - torch.logsumexp(scaled, -1, keepdim=True)
    np.testing.assert_array_equal(cache.indices, indices.numpy())
    np.testing.assert_allclose(cache.logprobs, expected.numpy(), rtol=4e-7, atol=4e-7)


def test_top_k_records_what_it_built(rng):
    cache = kdloss.top_k(rng.standard_normal((2, 10)), 3, temperature=2)
    assert cache.temperature == 2.0 and type(cache.temperature) is float
    assert cache.vocab_size == 10
    assert cache.method == "top_k"


# -- shapes, dtypes, layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["top_k", "sample"])
def test_leading_axes_are_rows(rng, build):
    def run(x):
        if build == "top_k":
            return kdloss.top_k(x, 4, temperature=1.0)
        return kdloss.sample_teacher(x, 4, temperature=1.0, seed=3)

    logits = rng.standard_normal((2, 3, 50)).astype(np.float32)
    flat = run(logits.reshape(6, 50))
    for shape in [(2, 3, 50), (6, 50), (1, 6, 1, 50)]:
        cache = run(logits.reshape(shape))
        assert cache.indices.shape == cache.logprobs.shape == (*shape[:-1], 4)
        np.testing.assert_array_equal(cache.indices.reshape(6, 4), flat.indices)
        np.testing.assert_array_equal(cache.logprobs.reshape(6, 4), flat.logprobs)
    one = run(logits[0, 0])
    assert one.indices.shape == (4,)
    np.testing.assert_array_equal(one.indices, flat.indices[0])
    empty = run(np.zeros((0, 3, 50), np.float32))
    assert empty.indices.shape == (0, 3, 4) and empty.logprobs.dtype == np.float32


def test_inputs_are_read_in_place(rng):
    logits = rng.standard_normal((8, 1000))
    sliced = logits[:, :500]  # rows a stride apart
    for given in (logits, sliced, logits.reshape(2, 4, 1000), logits.astype(np.float32)):
        assert np.shares_memory(_sparse_builders._teacher_logits(given), given)
    assert_matches_reference(kdloss.top_k(sliced, 10, temperature=1.0), sliced, 10, 1.0)
    # A layout the kernels cannot read is converted, visibly, and gives the same result.
    transposed = np.ascontiguousarray(logits[:, :8].T).T
    assert_matches_reference(kdloss.top_k(transposed, 3, temperature=1.0), transposed, 3, 1.0)


def test_dlpack_inputs_are_read_without_a_copy(rng):
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(rng.standard_normal((4, 300)).astype(np.float32))
    assert np.shares_memory(_sparse_builders._teacher_logits(tensor), tensor.numpy())
    assert np.shares_memory(_sparse_builders._teacher_logits(tensor[:, 10:200]), tensor.numpy())
    cache = kdloss.top_k(tensor, 5, temperature=2.0)
    assert_matches_reference(cache, tensor.numpy(), 5, 2.0)
    sampled = kdloss.sample_teacher(tensor, 5, temperature=2.0, seed=1)
    np.testing.assert_array_equal(
        sampled.indices, kdloss.sample_teacher(tensor.numpy(), 5, temperature=2.0, seed=1).indices
    )


def test_dtypes(rng):
    logits = rng.standard_normal((3, 40))
    assert kdloss.top_k(logits, 2, temperature=1.0).logprobs.dtype == np.float64
    assert kdloss.top_k(logits.astype(np.float32), 2, temperature=1.0).logprobs.dtype == np.float32
    # float16 is computed in float32: the same as converting it first.
    half = logits.astype(np.float16)
    cache = kdloss.top_k(half, 5, temperature=1.0)
    assert cache.logprobs.dtype == np.float32
    np.testing.assert_array_equal(cache.logprobs, kdloss.top_k(half.astype(np.float32), 5, temperature=1.0).logprobs)
    sampled = kdloss.sample_teacher(half, 5, temperature=1.0, seed=0)
    assert sampled.logprobs.dtype == np.float32 and sampled.indices.dtype == np.int32
    for bad in (logits.astype(np.int64), logits > 0, logits.astype(np.complex128), logits.astype(object)):
        with pytest.raises(TypeError, match="teacher_logits must be float16, float32 or float64, got dtype"):
            kdloss.top_k(bad, 2, temperature=1.0)
        with pytest.raises(TypeError, match="teacher_logits must be float16, float32 or float64, got dtype"):
            kdloss.sample_teacher(bad, 2, temperature=1.0, seed=0)
    with pytest.raises(TypeError, match="got dtype int64"):
        kdloss.top_k([[1, 2, 3]], 2, temperature=1.0)
    assert kdloss.top_k([[1.0, 3.0, 2.0]], 2, temperature=1.0).indices.tolist() == [[1, 2]]


# -- errors ----------------------------------------------------------------------------------------------------


def test_top_k_argument_errors(rng):
    logits = rng.standard_normal((3, 10)).astype(np.float32)
    for k in (0, 11, -1):
        with pytest.raises(ValueError, match=rf"^k must be an integer in \[1, C\] \(C = 10\), got {k}$"):
            kdloss.top_k(logits, k, temperature=1.0)
    for k in (2.0, True, None, "3"):
        with pytest.raises(TypeError, match=r"^k must be an integer in \[1, C\] \(C = 10\), got "):
            kdloss.top_k(logits, k, temperature=1.0)
    assert kdloss.top_k(logits, np.int64(3), temperature=1.0).indices.shape == (3, 3)
    for temperature in (0.0, -1.0, 1.0000000001e6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^temperature must be in \[1e-30, 1e6\] \(where kdloss is accurate\)"):
            kdloss.top_k(logits, 2, temperature=temperature)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        kdloss.top_k(logits, 2, temperature="2")
    with pytest.raises(TypeError, match="temperature"):
        kdloss.top_k(logits, 2)  # required, keyword-only
    with pytest.raises(TypeError):
        kdloss.top_k(logits, 2, 1.0)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        kdloss.top_k(logits, 2, temperature=1.0, num_threads=0)
    with pytest.raises(ValueError, match=r"^teacher_logits must have at least one class, got shape \(3, 0\)$"):
        kdloss.top_k(np.zeros((3, 0)), 1, temperature=1.0)
    with pytest.raises(ValueError, match=r"^teacher_logits must have at least one axis \(\.\.\., C\), got shape \(\)$"):
        kdloss.top_k(np.float64(1.0), 1, temperature=1.0)


def test_sample_teacher_argument_errors(rng):
    logits = rng.standard_normal((3, 10))
    with pytest.raises(ValueError, match=r"^num_samples must be an integer >= 1, got 0$"):
        kdloss.sample_teacher(logits, 0, temperature=1.0, seed=0)
    with pytest.raises(TypeError, match=r"^num_samples must be an integer >= 1, got 2.5$"):
        kdloss.sample_teacher(logits, 2.5, temperature=1.0, seed=0)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=rf"^seed must be an integer in \[0, 2\*\*64\), got {seed}$"):
            kdloss.sample_teacher(logits, 4, temperature=1.0, seed=seed)
    for seed in (None, 1.0, "0", False):
        with pytest.raises(TypeError, match=r"^seed must be an integer in \[0, 2\*\*64\), got "):
            kdloss.sample_teacher(logits, 4, temperature=1.0, seed=seed)
    with pytest.raises(TypeError, match="seed"):
        kdloss.sample_teacher(logits, 4, temperature=1.0)  # required, keyword-only
    with pytest.raises(ValueError, match=r"^temperature must be in \[1e-30, 1e6\]"):
        kdloss.sample_teacher(logits, 4, temperature=0.0, seed=0)
    cache = kdloss.sample_teacher(logits, 4, temperature=1.0, seed=2**64 - 1)
    assert cache.method == "sample"


@pytest.mark.parametrize("build", ["top_k", "sample"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_a_softmax_are_named(rng, build, dtype):
    def run(x):
        if build == "top_k":
            return kdloss.top_k(x, 3, temperature=1.0, num_threads=2)
        return kdloss.sample_teacher(x, 3, temperature=1.0, seed=0, num_threads=2)

    logits = rng.standard_normal((2, 30, 100)).astype(dtype)
    logits[1, 4, 17] = np.nan
    logits[1, 9, 0] = np.inf
    not_finite = r"^teacher_logits must be finite or -inf, got "
    with pytest.raises(ValueError, match=not_finite + r"nan at class 17 of row \(1, 4\)$"):
        run(logits)
    logits[1, 4, 17] = 0
    with pytest.raises(ValueError, match=not_finite + r"inf at class 0 of row \(1, 9\)$"):
        run(logits)
    logits[1, 9, 0] = 0
    logits[0, 2] = -np.inf
    with pytest.raises(ValueError, match=r"got only -inf in row \(0, 2\)$"):
        run(logits)
    # The one row of 1-D logits is named (), as SparseTeacher names the one row of a (K,) cache.
    with pytest.raises(ValueError, match=not_finite + r"nan at class 1 of row \(\)$"):
        run(np.array([0.0, np.nan, 1.0, 2.0], dtype))


@pytest.mark.parametrize("build", ["top_k", "sample"])
def test_results_do_not_depend_on_the_thread_count(rng, build):
    logits = rng.standard_normal((300, 3000)).astype(np.float32)

    def run(threads):
        if build == "top_k":
            return kdloss.top_k(logits, 32, temperature=2.0, num_threads=threads)
        return kdloss.sample_teacher(logits, 32, temperature=2.0, seed=11, num_threads=threads)

    one = run(1)
    for threads in (2, 3, None):
        many = run(threads)
        np.testing.assert_array_equal(many.indices, one.indices)
        assert many.logprobs.tobytes() == one.logprobs.tobytes()


# -- sample_teacher --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [1, 3, 64, 1000])
@pytest.mark.parametrize("num_samples", [1, 5, 64, 2000])
def test_sample_teacher_lists_distinct_classes_by_count(rng, dtype, classes, num_samples):
    logits = (rng.standard_normal((4, classes)) * 3).astype(dtype)
    cache = kdloss.sample_teacher(logits, num_samples, temperature=1.5, seed=9)
    assert cache.indices.shape == (4, min(num_samples, classes)) and cache.indices.dtype == np.int32
    assert cache.logprobs.dtype == dtype and cache.vocab_size == classes and cache.temperature == 1.5
    counts = counts_of(cache, num_samples)
    # Weights count / num_samples add up to exactly 1.
    assert (counts.sum(axis=-1) == num_samples).all()


def test_sample_teacher_is_reproducible(rng):
    logits = rng.standard_normal((20, 500))
    first = kdloss.sample_teacher(logits, 64, temperature=1.0, seed=123)
    again = kdloss.sample_teacher(logits, 64, temperature=1.0, seed=123)
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    other = kdloss.sample_teacher(logits, 64, temperature=1.0, seed=124)
    assert not np.array_equal(first.indices, other.indices)
    # A row's draws depend on its index and the seed alone.
    head = kdloss.sample_teacher(logits[:5], 64, temperature=1.0, seed=123)
    np.testing.assert_array_equal(head.indices, first.indices[:5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [2, 10, 300, 20000])
def test_sample_teacher_frequencies_follow_the_softmax(rng, dtype, classes):
    rows, num_samples, temperature = 64, 4096, 1.3
    row = (rng.standard_normal(classes) * 2).astype(dtype)
    cache = kdloss.sample_teacher(np.tile(row, (rows, 1)), num_samples, temperature=temperature, seed=classes)
    pooled = counts_of(cache, num_samples).sum(axis=0)
    statistic, degrees = chi_square(pooled, softmax64(row, temperature), rows * num_samples)
    assert degrees >= 1
    assert statistic < chi_square_bound(degrees), (statistic, degrees)


def test_sample_teacher_never_draws_a_class_of_probability_zero(rng):
    logits = rng.standard_normal((50, 200)) * 3
    logits[rng.random(logits.shape) < 0.8] = -np.inf
    logits[:, 0] = 0.0
    cache = kdloss.sample_teacher(logits, 3000, temperature=1.0, seed=5)
    counts = counts_of(cache, 3000)
    assert (counts[np.isneginf(logits)] == 0).all()
    # A float32 exponential below the normal range counts as probability 0, too.
    tiny = np.full((1, 100), -200.0, np.float32)
    tiny[0, 42] = 0
    cache = kdloss.sample_teacher(tiny, 1000, temperature=1.0, seed=0)
    assert cache.indices[0, 0] == 42 and cache.logprobs[0, 0] == 0
    assert (cache.logprobs[0, 1:] == -np.inf).all()


def test_sample_teacher_k_is_min_of_samples_and_classes(rng):
    logits = rng.standard_normal((2, 7))
    assert kdloss.sample_teacher(logits, 3, temperature=1.0, seed=0).indices.shape == (2, 3)
    assert kdloss.sample_teacher(logits, 7, temperature=1.0, seed=0).indices.shape == (2, 7)
    assert kdloss.sample_teacher(logits, 100, temperature=1.0, seed=0).indices.shape == (2, 7)
    # Every class, drawn often enough, is listed: the slots hold them all.
    cache = kdloss.sample_teacher(np.zeros((1, 7)), 10000, temperature=1.0, seed=0)
    assert sorted(cache.indices[0].tolist()) == list(range(7))


# -- with SparseTeacher and the loss ---------------------------------------------------------------------------


def test_caches_are_valid_sparse_teachers_with_the_right_tail(rng):
    logits = rng.standard_normal((3, 5, 200)) * 2
    logits[0, 0, :150] = -np.inf
    for cache in (
        kdloss.top_k(logits, 64, temperature=2.0),
        kdloss.top_k(logits, 200, temperature=2.0),
        kdloss.top_k(logits.astype(np.float32), 200, temperature=2.0),
        kdloss.sample_teacher(logits, 64, temperature=2.0, seed=1),
        kdloss.sample_teacher(logits.astype(np.float32), 5000, temperature=2.0, seed=1),
    ):
        assert isinstance(cache, kdloss.SparseTeacher)
        cache.validate()
    # top_k's tail is the mass of the classes it leaves out, to float64's accuracy.
    cache = kdloss.top_k(logits, 10, temperature=2.0)
    p = np.sort(softmax64(logits, 2.0), axis=-1)[..., ::-1]
    np.testing.assert_allclose(cache.tail_mass(), p[..., 10:].sum(axis=-1), rtol=1e-12)
    # A sampled cache has none.
    np.testing.assert_allclose(kdloss.sample_teacher(logits, 64, temperature=2.0, seed=1).tail_mass(), 0, atol=1e-15)


def test_a_top_k_cache_of_every_class_gives_the_dense_loss(rng):
    student = rng.standard_normal((4, 3, 300)) * 2
    teacher = rng.standard_normal((4, 3, 300)) * 2
    teacher[1, 2, ::3] = -np.inf
    labels = rng.integers(0, 300, size=(4, 3))
    kd = kdloss.DistillationLoss(temperature=2.0, alpha=0.3)
    cache = kdloss.top_k(teacher, 300, temperature=2.0)
    dense_loss, dense_gradient = kd.loss_and_gradient(student, teacher, labels)
    loss, gradient = kd.loss_and_gradient(student, cache, labels)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-12)
    np.testing.assert_allclose(gradient, dense_gradient, rtol=1e-12, atol=1e-15)


def test_a_cache_built_in_batches_with_their_own_seeds_is_written_whole(rng, tmp_path):
    logits = rng.standard_normal((6, 4, 100)).astype(np.float32)
    path = tmp_path / "cache"
    writer = kdloss.SparseTeacherWriter(path, (6, 4), 32, vocab_size=100, temperature=2.0, method="sample")
    pieces = []
    for batch in range(3):
        piece = kdloss.sample_teacher(logits[2 * batch : 2 * batch + 2], 32, temperature=2.0, seed=batch)
        writer.append(piece)
        pieces.append(piece)
    writer.close()
    loaded = kdloss.SparseTeacher.load(path)
    whole = kdloss.SparseTeacher.concatenate(pieces)
    np.testing.assert_array_equal(loaded.indices, whole.indices)
    np.testing.assert_array_equal(loaded.logprobs, whole.logprobs)
    assert loaded.method == "sample" and loaded.vocab_size == 100 and loaded.temperature == 2.0
