"""The soft term's divergences other than forward KL, against the independent reference (reference.py).

Forward KL is what the rest of the suite tests. Each other divergence ("reverse_kl", "jsd", "skew_forward_kl",
"skew_reverse_kl"), its parameter at its boundaries (jsd's beta 0 and 1 are forward and reverse KL by definition,
a skew of 0 the plain KL), next to them and in between, gets the same checks in fewer cases: agreement in float32
and float64 across row lengths (blocks of short rows and long rows, read from the library's own limits), label
forms, reductions, layouts and the normalizer, with loss_parts; finite differences; masks and non-finite logits;
threads and micro-batches; the parameters in repr, == and pickles, and their checks; and the divergences'
properties: the special parameter values bit for bit the plain KLs, jsd's symmetry and bound, the mixtures' exact
values on disjoint supports, jsd as a mixture of the two skew KLs, and jsd next to its ends to full precision.
"""

from __future__ import annotations

import math
import pickle
import re
from typing import NamedTuple

import kdloss
import numpy as np
import pytest
from helpers import SEEDS, TEMPERATURES, assert_grad_close, assert_loss_close, cases, check_types, with_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from kdloss import DistillationLoss
from reference import plain_divergence, reference

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

DTYPES = [np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]
BLOCK_MAX = kdloss.build_info()["block_max_classes"]
LANES = kdloss.build_info()["lanes"]
NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


class Case(NamedTuple):
    """A divergence and its parameters."""

    divergence: str
    beta: float = 0.5
    skew: float = 0.1

    def kd(self, temperature=2.0, alpha=0.3, **kwargs) -> DistillationLoss:
        return DistillationLoss(
            temperature, alpha, divergence=self.divergence, beta=self.beta, skew=self.skew, **kwargs
        )

    def ref(self, student, teacher, labels=None, **kwargs):
        return reference(student, teacher, labels, divergence=self.divergence, beta=self.beta, skew=self.skew, **kwargs)

    @property
    def plain(self) -> str:
        """What the case is by definition: the plain KL at a special parameter value, or itself."""
        return plain_divergence(*self)

    def __str__(self) -> str:
        if self.divergence == "jsd":
            return f"jsd-beta{self.beta:g}"
        if self.divergence.startswith("skew_"):
            return f"{self.divergence}-skew{self.skew:g}"
        return self.divergence


# Every parameter's boundaries (0, and jsd's 1), a tiny skew, 0.5 and uneven values. jsd's beta next to its ends
# has a test of its own (test_jsd_next_to_its_ends_is_the_formula_to_full_precision).
CASES = (
    [Case("reverse_kl")]
    + [Case("jsd", beta=beta) for beta in (0.5, 0.2, 0.9, 0.0, 1.0)]
    + [Case("skew_forward_kl", skew=skew) for skew in (0.1, 0.5, 0.0, 1e-6, 0.9)]
    + [Case("skew_reverse_kl", skew=skew) for skew in (0.1, 0.5, 0.0, 1e-6, 0.9)]
)
MIXTURES = [case for case in CASES if case.plain == case.divergence and case.divergence != "reverse_kl"]
DEFAULTS = [Case("jsd"), Case("skew_forward_kl"), Case("skew_reverse_kl")]  # their default parameters
SPECIAL = [case for case in CASES if case.plain != case.divergence]  # jsd at 0 and 1, the skews at 0

# Row lengths by name, each dtype's own: a single class, around a vector (the library's lanes), both sides of the
# longest rows computed in blocks, and long rows.
SHORT_LENGTHS = ["1", "lanes-1", "lanes+1", "limit"]
LONG_LENGTHS = ["limit+1", "1000", "20000"]


def classes_of(length, dtype) -> int:
    if isinstance(length, int):
        return length
    limit = BLOCK_MAX[np.dtype(dtype).name]
    return {"1": 1, "lanes-1": LANES - 1, "lanes+1": LANES + 1, "limit": limit, "limit+1": limit + 1}.get(
        length, None
    ) or int(length)


def logits(rng, shape, dtype, scale=3.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


def make_labels(rng, form, lead, classes, dtype):
    if form == "none":
        return None
    if form == "index":
        if not lead:
            return np.int64(rng.integers(0, classes))
        labels = rng.integers(0, classes, lead)
        labels.reshape(-1)[::5] = -100  # ignored rows, the first among them
        return labels
    return rng.random((*lead, classes)).astype(dtype)  # target distributions, not normalised


def expected(case, student, teacher, labels, *, temperature, alpha, reduction, normalizer=None):
    """The reference for logits of any rank: the rows the leading axes hold (a normalizer: their sum)."""
    classes = student.shape[-1]
    if student.ndim > 2:
        student, teacher = student.reshape(-1, classes), teacher.reshape(-1, classes)
        if labels is not None:
            labels = labels.reshape(-1) if labels.dtype.kind in "iu" else labels.reshape(-1, classes)
    reduction = "sum" if normalizer else reduction
    return case.ref(student, teacher, labels, temperature=temperature, alpha=alpha, reduction=reduction)


def check_call(case, kd, student, teacher, labels, normalizer, dtype):
    """Every method of ``kd`` on one input against the reference: loss, gradient, loss_parts, sum_and_count."""
    reduction, classes = kd.reduction, student.shape[-1]
    params = dict(temperature=kd.temperature, reduction=reduction, normalizer=normalizer)
    ref = expected(case, student, teacher, labels, alpha=kd.alpha, **params)
    divisor = normalizer or 1.0
    ref_loss = ref.loss / divisor if reduction != "none" else np.reshape(ref.loss, student.shape[:-1])
    ref_grad = ref.grad.reshape(student.shape) / divisor
    # A single class's loss and gradient are exactly 0, which float32 meets to a rounding of terms that cancel
    # there (the reference's error scales): tolerances relative to 0 cannot apply.
    conditioned = classes == 1
    lmag = ref.loss_mag if conditioned else None
    gmag = ref.grad_mag.reshape(student.shape) if conditioned else None
    if conditioned and reduction == "none":
        lmag = np.reshape(lmag, student.shape[:-1])

    loss, grad = kd.loss_and_gradient(student, teacher, labels, normalizer=normalizer)
    check_types(loss, grad, student, dtype, reduction)
    assert_loss_close(loss, ref_loss, dtype, mag=lmag)
    assert_grad_close(grad, ref_grad, dtype, mag=gmag)
    np.testing.assert_array_equal(kd.compute_loss(student, teacher, labels, normalizer=normalizer), loss)
    np.testing.assert_array_equal(kd.compute_gradient(student, teacher, labels, normalizer=normalizer), grad)

    soft, hard = kd.loss_parts(student, teacher, labels, normalizer=normalizer)
    for part, alpha, what in [(soft, 0.0, "soft"), (hard, 1.0, "hard")]:
        if what == "hard" and labels is None:
            assert np.all(np.asarray(hard) == 0.0)
            continue
        part_ref = expected(case, student, teacher, labels, alpha=alpha, **params)
        want = part_ref.loss / divisor if reduction != "none" else np.reshape(part_ref.loss, student.shape[:-1])
        mag = None
        if conditioned:
            mag = part_ref.loss_mag if reduction != "none" else np.reshape(part_ref.loss_mag, student.shape[:-1])
        assert_loss_close(part, want, dtype, mag=mag, what=what)

    if normalizer is None and reduction != "none":
        total, count = kd.sum_and_count(student, teacher, labels)
        assert count == int(np.count_nonzero(ref.counted))
        assert_loss_close(total, float(np.sum(ref.rows)), dtype, mag=np.sum(ref.loss_mag) if conditioned else None)


@settings(max_examples=15)
@given(
    case=st.sampled_from(CASES),
    dtype=st.sampled_from(DTYPES),
    form=st.sampled_from(["none", "index", "distribution"]),
    # (Drawn lengths from 8: with fewer classes a row's loss can be tiny by chance, a difference of larger terms
    # that float32 log-probabilities alone put beyond 1e-5 of it, whatever the divergence.)
    length=st.one_of(st.sampled_from(SHORT_LENGTHS + LONG_LENGTHS), st.integers(8, 400)),
    layout=st.sampled_from(["rows", "sequences", "one row"]),
    reduction=st.sampled_from(REDUCTIONS),
    normalize=st.booleans(),
    temperature=TEMPERATURES,
    alpha=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    seed=SEEDS,
)
@with_examples(
    cases(
        # every case with a row short enough for the blocks and a long one, between them every named length
        [
            dict(case=case, length=lengths[i % len(lengths)])
            for i, case in enumerate(CASES)
            for lengths in (SHORT_LENGTHS, LONG_LENGTHS)
        ],
        dtype=DTYPES,
        form=["index", "none", "distribution"],
        layout=["rows", "sequences", "rows", "one row", "rows"],
        reduction=REDUCTIONS,
        normalize=[False, False, True],
        temperature=[2.0, 1.0, 3.7, 0.5],
        alpha=[0.3, 0.0, 0.6, 1.0],
        seed=[0],
    )
)
def test_agrees_with_the_reference(case, dtype, form, length, layout, reduction, normalize, temperature, alpha, seed):
    """Loss, gradient, loss_parts and sum_and_count are the reference's for every divergence and parameter, dtype,
    label form (class indices with ignored rows, distributions, none), row length (blocks of short rows and long
    rows), layout (rows, sequences (B, S, C), one row (C,)), reduction, normalizer, temperature and alpha."""
    rng = np.random.default_rng(seed)
    classes = classes_of(length, dtype)
    short = classes <= BLOCK_MAX[np.dtype(dtype).name]
    lead = {"rows": (21,) if short else (5,), "sequences": (3, 7) if short else (2, 3), "one row": ()}[layout]
    student, teacher = logits(rng, (*lead, classes), dtype), logits(rng, (*lead, classes), dtype)
    labels = make_labels(rng, form, lead, classes, dtype)
    normalizer = 7.5 if normalize and reduction != "none" else None
    kd = case.kd(temperature, alpha, reduction=reduction)
    check_call(case, kd, student, teacher, labels, normalizer, dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradient_matches_finite_differences(case):
    """Central differences of the kernel's own loss, float64, short and long rows: the gradient is the loss's
    derivative."""
    rng = np.random.default_rng(11)
    for classes in (7, 300):
        s, t = logits(rng, (3, classes), np.float64, 1.5), logits(rng, (3, classes), np.float64, 1.5)
        labels = np.array([0, 2, 1])
        kd = case.kd(1.7, 0.35)
        gradient = kd.compute_gradient(s, t, labels)
        step = 1e-6
        for row, column in [(0, 0), (1, 2), (2, classes - 1), (1, classes // 2)]:
            up, down = s.copy(), s.copy()
            up[row, column] += step
            down[row, column] -= step
            numeric = (kd.compute_loss(up, t, labels) - kd.compute_loss(down, t, labels)) / (2 * step)
            # The differences' own error: ~1e-16 of the loss (O(1)) over the step.
            assert gradient[row, column] == pytest.approx(numeric, rel=1e-6, abs=2e-9)


def masked_batch(rng, classes, dtype):
    """Rows with -inf masks: (0) both sides rule classes out; (1) the student rules out a class the teacher keeps;
    (2) the teacher one the student keeps; (3) the teacher all but two classes; (4) the student all but two;
    (5) disjoint supports, the teacher's classes 0 and 1, the student's the others."""
    s, t = logits(rng, (6, classes), dtype), logits(rng, (6, classes), dtype)
    s[0, [1, 4]] = t[0, [1, 4]] = -np.inf
    s[1, 2] = -np.inf
    t[2, 3] = -np.inf
    t[3, 2:] = -np.inf
    s[4, 3:] = -np.inf
    s[4, 0] = -np.inf
    t[5, 2:] = -np.inf
    s[5, :2] = -np.inf
    return s, t


def disjoint_value(case) -> float:
    """D on disjoint supports: jsd's KL(p || beta p) and KL(q || (1 - beta) q) give the binary entropy of beta;
    a skew KL's KL(u || skew u) is -log(skew)."""
    if case.divergence == "jsd":
        return -case.beta * math.log(case.beta) - (1 - case.beta) * math.log1p(-case.beta)
    return -math.log(case.skew)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_masks(case, dtype):
    """-inf masks, short and long rows: the reference's losses and gradients, infinities and NaNs included. A
    class both sides rule out contributes nothing; a mixture (jsd with 0 < beta < 1, a skew > 0) is finite
    wherever either side has mass and its gradient 0 where the student has none, and on disjoint supports it is
    exactly T^2 h(beta) (jsd) or -T^2 log(skew); the plain KLs at the special values keep their infinities
    (forward: the student rules out the teacher's mass; reverse: the teacher the student's, with a NaN gradient
    where the student has mass)."""
    rng = np.random.default_rng(5)
    for classes in (6, 300):
        s, t = masked_batch(rng, classes, dtype)
        kd = case.kd(2.0, reduction="none")
        losses, gradient = kd.loss_and_gradient(s, t)
        ref = case.ref(s, t, temperature=2.0, alpha=0.3, reduction="none")
        assert_loss_close(losses, ref.loss, dtype)
        assert_grad_close(gradient, ref.grad, dtype)
        assert gradient[0, 1] == 0 and gradient[0, 4] == 0
        if case.plain == "forward_kl":
            assert list(np.isposinf(losses)) == [False, True, False, False, True, True]
            assert np.all(np.isfinite(gradient))
        elif case.plain == "reverse_kl":
            assert list(np.isposinf(losses)) == [False, False, True, True, False, True]
            assert np.isnan(gradient[2]).all()
        else:
            assert np.all(np.isfinite(losses)) and np.all(np.isfinite(gradient))
            assert np.all(gradient[np.isneginf(s)] == 0)
            tolerance = 1e-5 if dtype == np.float32 else 1e-12
            assert losses[5] == pytest.approx(4.0 * disjoint_value(case), rel=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DEFAULTS, ids=str)
def test_nan_and_posinf_logits_propagate_as_nan(case, dtype):
    """A NaN student logit or a +inf teacher logit, or a row all -inf, makes its row's loss and gradient row NaN
    (a reduced loss too); the other rows are the reference's, and garbage in an ignored row changes nothing."""
    rng = np.random.default_rng(6)
    s, t = logits(rng, (5, 7), dtype), logits(rng, (5, 7), dtype)
    s[1, 3] = np.nan
    t[2, 0] = np.inf
    s[3, :] = -np.inf
    t[4, 2] = np.nan
    labels = np.array([1, 2, 3, 4, -100])
    for reduction in REDUCTIONS:
        kd = case.kd(2.0, 0.3, reduction=reduction)
        loss, gradient = kd.loss_and_gradient(s, t, labels)
        ref = case.ref(s, t, labels, temperature=2.0, alpha=0.3, reduction=reduction)
        assert_loss_close(loss, ref.loss, dtype)
        assert_grad_close(gradient, ref.grad, dtype)
        assert np.isnan(gradient[1:4]).all()
        assert np.isfinite(gradient[0]).all() and not gradient[4].any()
        if reduction == "none":
            assert np.isnan(loss[1:4]).all() and np.isfinite(loss[[0, 4]]).all()
        else:
            assert np.isnan(loss)


@pytest.mark.parametrize("case", DEFAULTS, ids=str)
def test_logits_up_to_1e4_and_rows_of_200000_classes(case):
    """float32 within 1e-5 of the loss and of the gradient's largest entry on rows of 200 000 classes and on logits
    spread over [-1e4, 1e4] (almost disjoint distributions), float64 within 1e-12 on the latter."""
    rng = np.random.default_rng(7)
    wide_s, wide_t = logits(rng, (2, 200_000), np.float32), logits(rng, (2, 200_000), np.float32)
    labels = rng.integers(0, 200_000, 2)
    check_call(case, case.kd(1.0, 0.3, reduction="none"), wide_s, wide_t, labels, None, np.float32)
    for dtype in DTYPES:
        s, t = rng.uniform(-1e4, 1e4, (6, 300)).astype(dtype), rng.uniform(-1e4, 1e4, (6, 300)).astype(dtype)
        for temperature in (1.0, 20.0):
            kd = case.kd(temperature, 0.4, reduction="none")
            check_call(case, kd, s, t, rng.integers(0, 300, 6), None, dtype)
            assert np.all(np.isfinite(kd.compute_loss(s, t)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", DEFAULTS + [Case("jsd", 0.2), Case("jsd", 0.9), Case("skew_forward_kl", skew=0.9)], ids=str
)
def test_probabilities_near_the_smallest_normal_number(case, dtype):
    """A class whose probability, on one side or both, is near the smallest normal number (logits ~700 apart in
    float64, ~87 in float32, well within 1e4): the mixture (a weight times it) is subnormal there, its reciprocal
    out of range. Finite losses and gradients, the reference's to a few ulps of 1 (the rows' losses are tiny:
    their relative precision is the business of test_saturated_rows_at_a_low_temperature)."""
    centre = math.log(np.finfo(dtype).tiny)
    rows = []
    for z in np.arange(centre + 10, centre - 20, -0.5):
        rows += [
            ([0.0, z], [0.0, -3000.0]),
            ([0.0, -3000.0], [0.0, z]),
            ([0.0, z], [0.0, z - 2]),
            ([0.0, z], [0.0, z + 2]),
        ]
    s, t = (np.array([row[i] for row in rows], dtype) for i in (0, 1))
    losses, gradient = case.kd(1.0, reduction="none").loss_and_gradient(s, t)
    ref = case.ref(s, t, temperature=1.0, alpha=0.3, reduction="none")
    bad = ~np.isfinite(losses) | ~np.all(np.isfinite(gradient), axis=-1)
    assert not bad.any(), f"non-finite at student {s[bad][:3].tolist()}, teacher {t[bad][:3].tolist()}"
    atol = 8 * np.finfo(dtype).eps
    assert np.abs(losses - ref.loss).max() <= atol and np.abs(gradient - ref.grad).max() <= atol


@pytest.mark.parametrize("case", DEFAULTS + [Case("reverse_kl")], ids=str)
def test_thread_counts_give_bitwise_equal_results(case):
    rng = np.random.default_rng(2)
    for shape in [(64, 3000), (64, 40)]:
        s, t = logits(rng, shape, np.float32), logits(rng, shape, np.float32)
        labels = rng.integers(0, shape[1], 64)
        results = [case.kd(num_threads=n).loss_and_gradient(s, t, labels) for n in (1, 2, 3)]
        parts = [case.kd(num_threads=n).loss_parts(s, t, labels) for n in (1, 2, 3)]
        for (loss, gradient), part in zip(results[1:], parts[1:]):
            assert loss == results[0][0] and part == parts[0]
            assert np.array_equal(gradient, results[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DEFAULTS, ids=str)
def test_micro_batches_give_exactly_the_full_batch_gradient(case, dtype):
    """Gradient accumulation: every micro-batch normalised by the count over the whole batch."""
    rng = np.random.default_rng(3)
    s, t = logits(rng, (8, 5, 50), dtype), logits(rng, (8, 5, 50), dtype)
    labels = rng.integers(0, 50, (8, 5))
    labels[rng.random((8, 5)) < 0.3] = -100
    kd = case.kd()
    full_loss, full_grad = kd.loss_and_gradient(s, t, labels)
    pieces = [slice(0, 3), slice(3, 4), slice(4, 8)]
    total = sum(kd.sum_and_count(s[p], t[p], labels[p])[1] for p in pieces)
    losses, grads = zip(*(kd.loss_and_gradient(s[p], t[p], labels[p], normalizer=total) for p in pieces))
    np.testing.assert_array_equal(np.concatenate(grads), full_grad)
    assert sum(losses) == pytest.approx(full_loss, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------


def property_batch(rng, classes, dtype):
    """Random rows and rows with masks that make forward or reverse KL infinite, and class-index labels."""
    s, t = logits(rng, (12, classes), dtype), logits(rng, (12, classes), dtype)
    masked_s, masked_t = masked_batch(rng, classes, dtype)
    s[:6], t[:6] = masked_s, masked_t
    labels = rng.integers(0, classes, 12)
    labels[[0, 7]] = -100
    labels[1] = 0  # not the class the student rules out in row 1 (an infinite hard term)
    return s, t, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SPECIAL, ids=str)
def test_the_special_parameter_values_are_the_plain_kls_bit_for_bit(case, dtype):
    """jsd at beta 0 and 1, and a skew KL at skew 0, are forward / reverse KL: the same losses, gradients and
    parts to the bit (infinities and NaNs included), short and long rows, every reduction."""
    rng = np.random.default_rng(12)
    for classes in (BLOCK_MAX[np.dtype(dtype).name], 1000):
        s, t, labels = property_batch(rng, classes, dtype)
        for reduction in REDUCTIONS:
            got = case.kd(reduction=reduction)
            want = DistillationLoss(2.0, 0.3, reduction=reduction, divergence=case.plain)
            for method in ("loss_and_gradient", "loss_parts"):
                for a, b in zip(getattr(got, method)(s, t, labels), getattr(want, method)(s, t, labels)):
                    assert np.array_equal(a, b, equal_nan=True), (method, reduction, classes)


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_the_divergence_does_not_use_changes_nothing(name):
    """beta is jsd's alone and skew the skew KLs': the other divergences give the same bits whatever they are."""
    rng = np.random.default_rng(13)
    s, t, labels = property_batch(rng, 40, np.float64)
    unused = ["beta"] * (name != "jsd") + ["skew"] * (not name.startswith("skew_"))
    for parameter in unused:
        results = [
            DistillationLoss(divergence=name, **{parameter: value}).loss_and_gradient(s, t, labels)
            for value in (0.0, 0.25, 0.9)
        ]
        for loss, gradient in results[1:]:
            assert np.array_equal(loss, results[0][0], equal_nan=True)
            assert np.array_equal(gradient, results[0][1], equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_is_symmetric_at_one_half_and_bounded_by_the_binary_entropy(dtype):
    """jsd at beta 0.5 is the same with student and teacher swapped, and every jsd is in [0, T^2 h(beta)]
    (h(0.5) = log 2), close to the bound on almost disjoint distributions (logits up to 1e4)."""
    rng = np.random.default_rng(14)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for scale, classes in [(4.0, 13), (4.0, 1000), (1e4, 300)]:
        s, t = (rng.uniform(-scale, scale, (9, classes)).astype(dtype) for _ in range(2))
        for temperature in (1.0, 2.5):
            half = Case("jsd", 0.5).kd(temperature, reduction="none")
            forth, back = half.compute_loss(s, t), half.compute_loss(t, s)
            np.testing.assert_allclose(forth, back, rtol=tolerance)
            for beta in (0.5, 0.2, 0.9):
                losses = Case("jsd", beta).kd(temperature, reduction="none").compute_loss(s, t)
                bound = temperature**2 * disjoint_value(Case("jsd", beta))
                assert np.all(losses >= 0) and np.all(losses <= bound * (1 + tolerance))
                if scale == 1e4:
                    assert np.all(losses >= 0.99 * bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.3, 0.5, 0.8])
def test_jsd_is_a_mixture_of_the_two_skew_kls(beta, dtype):
    """jsd(beta) = beta skew_forward_kl(skew=beta) + (1 - beta) skew_reverse_kl(skew=1 - beta), the losses (rows)
    and gradients of three kernels, short and long rows."""
    rng = np.random.default_rng(15)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for classes in (50, 1000):
        s, t = logits(rng, (8, classes), dtype), logits(rng, (8, classes), dtype)
        jsd = Case("jsd", beta).kd(reduction="none").loss_and_gradient(s, t)
        forward = Case("skew_forward_kl", skew=beta).kd(reduction="none").loss_and_gradient(s, t)
        reverse = Case("skew_reverse_kl", skew=1 - beta).kd(reduction="none").loss_and_gradient(s, t)
        mixed = [beta * f.astype(np.float64) + (1 - beta) * r.astype(np.float64) for f, r in zip(forward, reverse)]
        np.testing.assert_allclose(jsd[0], mixed[0], rtol=tolerance)
        assert np.abs(jsd[1] - mixed[1]).max() <= tolerance * np.abs(mixed[1]).max()


@pytest.mark.parametrize("case", [Case("forward_kl"), Case("reverse_kl")] + DEFAULTS + [Case("jsd", 0.2)], ids=str)
def test_float32_flat_distributions_at_a_high_temperature(case, request):
    """At a high temperature p and q are flat and D is small beside its terms (log ratios ~ 1/T, their first
    order cancelling): float32 rows still within 1e-5 of their loss, as the plain KLs' are (whose log-probability
    differences keep their relative precision; float32 log-probabilities themselves cost ~1e-7 here)."""
    rng = np.random.default_rng(21)
    for classes in (50, 1000):
        s, t = logits(rng, (64, classes), np.float32), logits(rng, (64, classes), np.float32)
        for temperature in (6.0, 20.0):
            losses, gradient = case.kd(temperature, reduction="none").loss_and_gradient(s, t)
            ref = case.ref(s, t, temperature=temperature, alpha=0.3, reduction="none")
            assert_loss_close(losses, ref.loss, np.float32, what=f"{classes} classes, T={temperature}: loss")
            assert_grad_close(gradient, ref.grad, np.float32, what=f"{classes} classes, T={temperature}: gradient")


SATURATED_ROW = (
    [0.37719065, -0.39631459, 1.92126799, 0.31470037, -1.6070081, 1.08478522, 3.91200018, 2.84124279],
    [-2.11120582, -3.79626441, -1.86982334, 0.12397794, -6.97509241, -0.65637499, -3.73773289, -2.19680214],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [Case("reverse_kl")] + DEFAULTS, ids=str)
def test_saturated_rows_at_a_low_temperature(case, dtype):
    """At a low temperature rows saturate (p and q almost one-hot, on the same class or not): D and the gradient
    are tiny beside their terms, and still within the tolerances of the row's loss and of the gradient's largest
    entry (the reference keeps them to ~1e-14: test_reference_selfcheck.py)."""
    rng = np.random.default_rng(22)
    batches = [(logits(rng, shape, dtype), logits(rng, shape, dtype), (0.1, 0.25)) for shape in [(16, 8), (4, 1000)]]
    # One row the "explore" profile found: the student's top two classes take the gradient, nearly opposite.
    batches.append((np.array([SATURATED_ROW[0]], dtype), np.array([SATURATED_ROW[1]], dtype), (0.125,)))
    for s, t, temperatures in batches:
        shape = s.shape
        for temperature in temperatures:
            losses, gradient = case.kd(temperature, reduction="none").loss_and_gradient(s, t)
            ref = case.ref(s, t, temperature=temperature, alpha=0.3, reduction="none")
            assert_loss_close(losses, ref.loss, dtype, what=f"{shape}, T={temperature}: loss")
            assert_grad_close(gradient, ref.grad, dtype, what=f"{shape}, T={temperature}: gradient")


NEAR_THE_ENDS = [
    Case("jsd", 1e-6),
    Case("jsd", 1 - 1e-6),
    Case("jsd", 1e-30),
    Case("skew_forward_kl", skew=0.99),
    Case("skew_reverse_kl", skew=0.99),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NEAR_THE_ENDS, ids=str)
def test_next_to_their_ends_the_mixtures_keep_full_precision(case, dtype):
    """Next to its ends jsd is the formula, not the end (~ beta KL(p || q), not KL(p || q)), and a skew KL next to
    1 is ~ (1 - skew)^2: both to the loss's and the gradient's full relative precision (no absolute allowance).
    There a log ratio log(m/q) is ~ beta (or 1 - skew) and the first-order terms of the KL cancel: a log taken of
    a rounded quotient m/q ~ 1, or a log m - log q, would lose it to an absolute error of an ulp of 1. (A skew
    of 0.99 costs any evaluation of the definition ~1/(1 - skew) ulps, the reference's included (1e-14 here),
    which the tolerances hold 1e3 (float64) and 1.6 (float32) times. beta 1e-300: float64 only, whose losses are
    ~1e-300; float32's must be 0 or tiny.)"""
    rng = np.random.default_rng(16)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for shape in [(8, 50), (3, 1000)]:
        s, t = logits(rng, shape, dtype), logits(rng, shape, dtype)
        losses, gradient = case.kd(2.0, reduction="none").loss_and_gradient(s, t)
        assert np.all(np.isfinite(losses)) and np.all(losses >= 0)
        if case.divergence == "jsd":
            end = Case("jsd", 0.0 if case.beta < 0.5 else 1.0)
            assert np.all(losses <= 1e-5 * end.kd(2.0, reduction="none").compute_loss(s, t))
        if case.beta == 1e-300 and dtype == np.float32:
            assert np.all(losses <= 1e-37) and np.all(np.isfinite(gradient))
            continue
        ref = case.ref(s, t, temperature=2.0, alpha=0.3, reduction="none")
        error = np.abs(losses - ref.loss) / ref.loss
        assert error.max() <= tolerance, f"loss relative error {error.max():.2e}"
        error = np.abs(gradient - ref.grad).max() / np.abs(ref.grad).max()
        assert error <= tolerance, f"gradient error {error:.2e} of its largest entry"


# ---------------------------------------------------------------------------------------------------------------
# The parameters
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_and_read_only_parameters():
    kd = DistillationLoss()
    assert (kd.divergence, kd.beta, kd.skew) == ("forward_kl", 0.5, 0.1)
    for name in ("beta", "skew"):
        with pytest.raises(AttributeError):
            setattr(kd, name, 0.2)
    kd = DistillationLoss(divergence="jsd", beta=np.float32(0.25), skew=np.int64(0))
    assert type(kd.beta) is float and type(kd.skew) is float and (kd.beta, kd.skew) == (0.25, 0.0)
    assert DistillationLoss(beta=1).beta == 1.0 and DistillationLoss(beta=0).beta == 0.0


@pytest.mark.parametrize("case", [Case("jsd", 0.25, 0.3), Case("skew_reverse_kl", 0.75, 0.0)], ids=str)
def test_the_parameters_in_repr_equality_and_pickles(case):
    kd = case.kd(2.0, 0.4)
    text = repr(kd)
    assert f"divergence={case.divergence!r}, beta={case.beta!r}, skew={case.skew!r}" in text
    assert eval(text, {"DistillationLoss": DistillationLoss}) == kd
    assert kd != case._replace(beta=case.beta + 0.125).kd(2.0, 0.4)
    assert kd != case._replace(skew=case.skew + 0.125).kd(2.0, 0.4)
    assert kd != DistillationLoss(2.0, 0.4)
    copy = pickle.loads(pickle.dumps(kd))
    assert copy == kd and (copy.divergence, copy.beta, copy.skew) == case
    rng = np.random.default_rng(17)
    s, t = logits(rng, (3, 20), np.float64), logits(rng, (3, 20), np.float64)
    assert copy.compute_loss(s, t) == kd.compute_loss(s, t)
    kd.temperature = 3.0  # the setters keep them
    kd.alpha = 0.5
    assert (kd.divergence, kd.beta, kd.skew) == case


BAD_VALUES = [
    (dict(beta=-0.1), ValueError, "beta must be in [0, 1], got -0.1"),
    (dict(beta=1.5), ValueError, "beta must be in [0, 1], got 1.5"),
    (dict(beta=1.0000000000000002), ValueError, "beta must be in [0, 1], got 1.0000000000000002"),
    (dict(beta=-1e-300), ValueError, "beta must be in [0, 1], got -1e-300"),
    (dict(beta=2), ValueError, "beta must be in [0, 1], got 2"),
    (dict(beta=math.nan), ValueError, "beta must be in [0, 1], got nan"),
    (dict(beta=math.inf), ValueError, "beta must be in [0, 1], got inf"),
    (dict(beta=-math.inf), ValueError, "beta must be in [0, 1], got -inf"),
    (dict(skew=1.0), ValueError, "skew must be in [0, 1), got 1"),
    (dict(skew=1), ValueError, "skew must be in [0, 1), got 1"),
    (dict(skew=1.5), ValueError, "skew must be in [0, 1), got 1.5"),
    (dict(skew=-0.25), ValueError, "skew must be in [0, 1), got -0.25"),
    (dict(skew=math.nan), ValueError, "skew must be in [0, 1), got nan"),
    (dict(skew=math.inf), ValueError, "skew must be in [0, 1), got inf"),
    (dict(beta="0.5"), TypeError, "beta must be a real number, got '0.5'"),
    (dict(beta=None), TypeError, "beta must be a real number, got None"),
    (dict(beta=True), TypeError, "beta must be a real number, got True"),
    (dict(skew=[0.1]), TypeError, "skew must be a real number, got [0.1]"),
    (dict(skew=0.1j), TypeError, "skew must be a real number, got 0.1j"),
]


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "forward_kl"])
@pytest.mark.parametrize("bad,error,message", BAD_VALUES, ids=[str(bad[0]) for bad in BAD_VALUES])
def test_parameters_out_of_range_or_of_the_wrong_type_are_refused(bad, error, message, divergence):
    """The native class's messages, whichever divergence (one that ignores the parameter too); the same from
    kdloss.torch (test_torch_validation.py)."""
    with pytest.raises(error) as info:
        DistillationLoss(divergence=divergence, **bad)
    assert str(info.value) == message
    assert type(info.value) is error


def test_the_extreme_parameter_values_are_accepted_and_computed():
    """The smallest positive weight (1e-30) and the largest below 1 are parameters like any other: the
    reference's losses and gradients, in float32 too. Below 1e-30 a positive weight is refused, by name."""
    for beta in (0.0, 1.0, 1e-30, 1 - 2**-53):
        assert DistillationLoss(divergence="jsd", beta=beta).beta == beta
    for skew in (0.0, 1e-30, 1 - 2**-53):
        assert DistillationLoss(divergence="skew_forward_kl", skew=skew).skew == skew
    for tiny in (5e-324, 1e-31):
        with pytest.raises(
            ValueError, match=re.escape(f"beta must be 0 or at least 1e-30 (where kdloss is accurate), got {tiny!r}")
        ):
            DistillationLoss(divergence="jsd", beta=tiny)
        with pytest.raises(
            ValueError, match=re.escape(f"skew must be 0 or at least 1e-30 (where kdloss is accurate), got {tiny!r}")
        ):
            DistillationLoss(divergence="skew_reverse_kl", skew=tiny)
    rng = np.random.default_rng(18)
    extremes = [Case("jsd", 1e-30), Case("jsd", 1 - 2**-53)] + [
        Case(name, skew=skew) for name in ("skew_forward_kl", "skew_reverse_kl") for skew in (1e-30, 1e-20)
    ]
    for dtype in DTYPES:
        s, t = logits(rng, (4, 30), dtype), logits(rng, (4, 30), dtype)
        for case in extremes:
            losses, gradient = case.kd(reduction="none").loss_and_gradient(s, t)
            ref = case.ref(s, t, temperature=2.0, alpha=0.3, reduction="none")
            assert_loss_close(losses, ref.loss, dtype, what=f"{case} {np.dtype(dtype).name} loss")
            assert_grad_close(gradient, ref.grad, dtype, what=f"{case} {np.dtype(dtype).name} gradient")


def test_forward_kl_is_the_default_and_the_divergences_differ():
    rng = np.random.default_rng(4)
    s, t = logits(rng, (4, 50), np.float64), logits(rng, (4, 50), np.float64)
    assert DistillationLoss().compute_loss(s, t) == DistillationLoss(divergence="forward_kl").compute_loss(s, t)
    losses = {name: DistillationLoss(divergence=name).compute_loss(s, t) for name in NAMES}
    assert len(set(losses.values())) == len(NAMES)


def test_an_unknown_divergence_is_refused_by_name():
    names = "'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl'"
    with pytest.raises(ValueError, match=re.escape(f"divergence must be one of {names}, got 'jensen'")):
        DistillationLoss(divergence="jensen")
    with pytest.raises(TypeError, match=re.escape(f"divergence must be one of {names}, got 1")):
        DistillationLoss(divergence=1)
