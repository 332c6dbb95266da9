"""Rows that cancellation would spoil (issue 20): a student within 1e-3 or 1e-4 of the teacher per logit, large
temperatures (up to 1e6) and nearly one-hot students, for every divergence, float32 and float64, against an
independent 50-digit mpmath truth.

Each row's loss within 1e-5 (float32) or 1e-12 (float64) of its true value, relative, and its gradient within the
same fraction of the row's largest true entry. Before rows were recognised and computed again (exact_row.hpp), float32
missed by up to 1e3 relative at T = 100 and by 2x at T = 1 for a student within 1e-4. Against a sparse teacher (a
top-k cache), float32 and float64 rows alike (sparse_kl.hpp).
"""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
from kdloss import DistillationLoss, SparseTeacher

TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"]
ALPHA = 0.3


def _softmax(values: list, scale) -> list:
    scaled = [x / scale for x in values]
    log_z = mp.log(mp.fsum(mp.exp(x) for x in scaled))
    return [mp.exp(x - log_z) for x in scaled]


def mixture(divergence, p, q, T):
    """D and its gradient T q (G - E_q[G]), G = dD/dq with q taken as free, from the definitions (beta = 0.5,
    skew = 0.1)."""
    if divergence == "jsd":
        a, wp, wq = mp.mpf("0.5"), mp.mpf("0.5"), mp.mpf("0.5")
    elif divergence == "skew_forward_kl":
        a, wp, wq = mp.mpf("0.1"), 1, 0
    else:
        a, wp, wq = mp.mpf("0.9"), 0, 1
    b = 1 - a
    m = [a * pc + b * qc for pc, qc in zip(p, q)]

    def x_log(x, y):  # x log(x / y), 0 at x = 0
        return x * mp.log(x / y) if x != 0 else 0

    d = mp.fsum(wp * x_log(pc, mc) + wq * x_log(qc, mc) for pc, qc, mc in zip(p, q, m))
    # (where q = 0, G is multiplied by q = 0 below: any finite value does)
    g = [(wq * (mp.log(qc / mc) + 1) if qc != 0 else 0) - b * (wp * pc + wq * qc) / mc for pc, qc, mc in zip(p, q, m)]
    mean = mp.fsum(qc * gc for qc, gc in zip(q, g))
    return d, [T * qc * (gc - mean) for qc, gc in zip(q, g)]


def true_rows(student, teacher, temperature, divergence, targets):
    """Per row: (1 - alpha) T^2 D + alpha CE (or T^2 D without targets), and its gradient, each row unscaled.
    `targets`: None, class indices, or distributions."""
    T = mp.mpf(temperature)
    losses, gradient = [], np.zeros(student.shape)
    for row, (s_row, t_row) in enumerate(zip(student, teacher)):
        s, t = [mp.mpf(float(x)) for x in s_row], [mp.mpf(float(x)) for x in t_row]
        q, p = _softmax(s, T), _softmax(t, T)
        if divergence == "forward_kl":
            d = mp.fsum(pc * mp.log(pc / qc) for pc, qc in zip(p, q) if pc != 0)
            soft_gradient = [T * (qc - pc) for qc, pc in zip(q, p)]
        elif divergence == "reverse_kl":
            d = mp.fsum(qc * mp.log(qc / pc) for pc, qc in zip(p, q) if qc != 0)
            soft_gradient = [T * qc * (mp.log(qc / pc) - d) if qc != 0 else 0 for pc, qc in zip(p, q)]
        else:
            d, soft_gradient = mixture(divergence, p, q, T)
        soft = T**2 * d
        if targets is None:
            losses.append(soft)
            gradient[row] = [float(g) for g in soft_gradient]
            continue
        h = _softmax(s, mp.mpf(1))
        y = (
            [mp.mpf(float(v)) for v in targets[row]]
            if targets.ndim == 2
            else [int(c == targets[row]) for c in range(len(s))]
        )
        ce = -mp.fsum(yc * mp.log(hc) for yc, hc in zip(y, h) if yc != 0)
        losses.append((1 - ALPHA) * soft + ALPHA * ce)
        mass = mp.fsum(y)
        gradient[row] = [float((1 - ALPHA) * sg + ALPHA * (hc * mass - yc)) for sg, hc, yc in zip(soft_gradient, h, y)]
    return np.array([float(x) for x in losses]), gradient


def rows(rng, count, classes, closeness, dtype):
    """Students ~N(0, 3^2) and teachers within `closeness` of them per logit (None: independent teachers)."""
    student = rng.normal(0, 3, (count, classes))
    teacher = student + rng.normal(0, closeness, (count, classes)) if closeness else rng.normal(0, 3, (count, classes))
    return student.astype(dtype), teacher.astype(dtype)


def assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, what):
    tolerance = TOLERANCE[dtype]
    relative = np.abs(loss - true_loss) / np.abs(true_loss)
    assert relative.max() <= tolerance, f"{what}: loss off by {relative.max():.2e} relative"
    scale = np.abs(true_gradient).max(axis=1, keepdims=True)
    off = (np.abs(gradient - true_gradient) / scale).max()
    assert off <= tolerance, f"{what}: gradient off by {off:.2e} of its largest entry"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("classes", [10, 1000])
@pytest.mark.parametrize(
    "temperature, closeness",
    [(0.05, 1e-4), (1.0, 1e-3), (1.0, 1e-4), (3.0, 1e-4), (30.0, 1e-3), (100.0, 1e-4), (100.0, None), (1e3, None)]
    + [(1e4, 1e-3), (1e5, None), (1e6, None), (1e6, 1e-4)],
)
def test_near_matches_and_large_temperatures(dtype, divergence, classes, temperature, closeness):
    mp.mp.dps = 50
    rng = np.random.default_rng(20)
    student, teacher = rows(rng, 2, classes, closeness, dtype)
    true_loss, true_gradient = true_rows(student, teacher, temperature, divergence, None)
    kd = DistillationLoss(temperature, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}, T={temperature}")
    assert np.array_equal(kd.compute_loss(student, teacher), loss)  # the loss alone is the same, bit for bit


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_long_rows_across_the_kernels_chunks(divergence):
    """Rows of 9001 classes, a student within 1e-4 of its teacher per logit and one apart from it, at T = 1: a long
    row's sums are kept in float over chunks of 1024 elements (float32) or 4096 (float64) and added up in double,
    which the rows of 1000 classes above stay within; 9001 leaves a partial last block too. float32 and float64 from
    the same values, against one truth (a vocabulary of 32 000 classes took four times as long, for the same code)."""
    mp.mp.dps = 30  # faster than 50, and 1e-30 an operation is still 1e-17 of a D that cancels to 1e-9 of its terms
    rng = np.random.default_rng(21)
    classes = 9001
    student = rng.normal(0, 3, (2, classes))
    teacher = np.vstack([student[0] + rng.normal(0, 1e-4, classes), rng.normal(0, 3, classes)])
    student, teacher = (x.astype(np.float32).astype(np.float64) for x in (student, teacher))  # float32's values
    true_loss, true_gradient = true_rows(student, teacher, 1.0, divergence, None)
    kd = DistillationLoss(1.0, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    for dtype in (np.float32, np.float64):
        loss, gradient = kd.loss_and_gradient(student.astype(dtype), teacher.astype(dtype))
        assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}, {dtype.__name__}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("classes", [5, 40, 300])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 20.0])
def test_rows_between_near_matches_and_independent(dtype, divergence, classes, temperature):
    """Teachers 0.03 to 1 per logit from the student (students ~N(0, 3^2)), where D runs from ~1e-4 to ~1: the
    kernels' rows, or recomputed ones where their rounding would miss (float32 rows with D near 1e-3 and few classes
    missed the loss's tolerance by up to 4x before exact_row.hpp's floor)."""
    mp.mp.dps = 40
    rng = np.random.default_rng(25)
    student = rng.normal(0, 3, (8, classes))
    teacher = student + rng.normal(0, 1, student.shape) * np.repeat([0.03, 0.1, 0.3, 1.0], 2)[:, None]
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    true_loss, true_gradient = true_rows(student, teacher, temperature, divergence, None)
    kd = DistillationLoss(temperature, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}, T={temperature}")


def _masked_cases():
    """(dtype, divergence, side, ruled out by), without the KLs' infinite cases (test_divergences.py has those)."""
    cases = []
    for dtype, name in [(np.float32, "float32"), (np.float64, "float64")]:
        for divergence in DIVERGENCES:
            for side in ["teacher", "student"]:
                for by in ["-inf", "-25"]:
                    if by == "-inf" and (divergence, side) in [("reverse_kl", "teacher"), ("forward_kl", "student")]:
                        continue
                    cases.append(pytest.param(dtype, divergence, side, by, id=f"{side}{by}-{divergence}-{name}"))
    return cases


@pytest.mark.parametrize("dtype, divergence, side, by", _masked_cases())
@pytest.mark.parametrize("closeness", [1e-4, 1e-2])
def test_rows_with_one_class_ruled_out(dtype, divergence, side, by, closeness):
    """A student within `closeness` of the teacher but for one class that one side rules out (-inf, or 25 below its
    logit) where the other puts 3e-4 to 0.6 of its mass. D is about that mass, far above the near-match threshold,
    and where the student rules the class out every gradient entry is a small difference of two numbers near a
    constant (the rest of the row agrees up to the factor that mass makes): the kernels' gradient, good only relative
    to those numbers, missed by up to 1e3 times the tolerance (float32) and 170 times (float64) before the gradient
    pass's size was judged (GradientSize, exact_row.hpp). Before the floor there, float32 forward KL's loss missed by
    1.7x its tolerance and its gradient by 3.7x; the mixtures' exact pass, float32's gradient by 1.3x."""
    mp.mp.dps = 40
    rng = np.random.default_rng(26)
    masses = [3e-4, 1e-3, 1e-2, 0.1, 0.3, 0.6]
    student, teacher = rows(rng, len(masses), 40, closeness, dtype)
    for row, mass in enumerate(masses):
        q = np.exp(student[row].astype(np.float64) - student[row].max())
        q /= q.sum()
        c = int(np.argmin(np.abs(np.log(q) - np.log(mass))))
        ruled_out = teacher if side == "teacher" else student
        ruled_out[row, c] = -np.inf if by == "-inf" else ruled_out[row, c] - 25
    true_loss, true_gradient = true_rows(student, teacher, 1.0, divergence, None)
    kd = DistillationLoss(1.0, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"{side} rules out by {by}")
    assert np.array_equal(kd.compute_loss(student, teacher), loss)  # the loss alone is the same, bit for bit


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_computed_again_for_their_gradient_among_many(divergence):
    """float32 short rows, a few of which (scattered over blocks) are computed again in double for their gradient
    alone, gathered across blocks (WidenedRows, exact_row.hpp): each row against the truth, its loss the kernels' (the
    loss alone is the same, bit for bit), and the same rows one call each give the same results."""
    mp.mp.dps = 30
    rng = np.random.default_rng(27)
    student, teacher = rows(rng, 70, 10, 1e-2, np.float32)
    for row in range(3, 70, 9):
        student[row, np.argmax(teacher[row])] -= 25  # the student all but rules out the teacher's top class
    true_loss, true_gradient = true_rows(student, teacher, 1.0, divergence, None)
    kd = DistillationLoss(1.0, reduction="none", divergence=divergence, beta=0.5, skew=0.1, num_threads=1)
    loss, gradient = kd.loss_and_gradient(student, teacher)
    assert_rows_close(loss, gradient, true_loss, true_gradient, np.float32, "70 rows")
    assert np.array_equal(kd.compute_loss(student, teacher), loss)
    for row in range(3, 70, 9):
        one_loss, one_gradient = kd.loss_and_gradient(student[row : row + 1], teacher[row : row + 1])
        assert np.array_equal(one_loss, loss[row : row + 1]) and np.array_equal(one_gradient[0], gradient[row])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("temperature, closeness", [(1e3, None), (1e4, 1e-3)])
def test_masked_forward_kl_rows(dtype, temperature, closeness):
    """Forward KL's recomputed rows (every row above T = 100) with -inf masks: the teacher's alone (p = 0 where the
    student keeps mass: that class's term in the log domain is q, not 0 (-inf) - (0 - q), which is NaN) and both
    sides' (no terms)."""
    mp.mp.dps = 50
    rng = np.random.default_rng(24)
    student, teacher = rows(rng, 3, 40, closeness, dtype)
    teacher[:, 5] = -np.inf
    student[1:, 9] = teacher[1:, 9] = -np.inf
    true_loss, true_gradient = true_rows(student, teacher, temperature, "forward_kl", None)
    loss, gradient = DistillationLoss(temperature, reduction="none").loss_and_gradient(student, teacher)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"T={temperature}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("labels", ["indices", "distributions"])
@pytest.mark.parametrize("classes", [12, 300])
def test_with_a_hard_term_and_ordinary_rows_beside(dtype, divergence, labels, classes):
    """Near matches among ordinary rows (a block of short rows, or long rows, some recomputed and some not), with
    class-index or distribution labels: every row's loss and gradient, and the loss parts."""
    mp.mp.dps = 50
    rng = np.random.default_rng(21)
    near_s, near_t = rows(rng, 3, classes, 1e-4, dtype)
    far_s, far_t = rows(rng, 3, classes, None, dtype)
    student, teacher = (
        np.concatenate([near_s, far_s])[[0, 3, 1, 4, 2, 5]],
        np.concatenate([near_t, far_t])[[0, 3, 1, 4, 2, 5]],
    )
    if labels == "indices":
        targets = rng.integers(0, classes, len(student))
    else:
        targets = rng.dirichlet(np.ones(classes), len(student)).astype(dtype)
    true_loss, true_gradient = true_rows(student, teacher, 2.0, divergence, targets)
    kd = DistillationLoss(2.0, ALPHA, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher, targets)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}, {labels}")
    soft, hard = kd.loss_parts(student, teacher, targets)
    np.testing.assert_allclose((1 - ALPHA) * soft + ALPHA * hard, loss, rtol=TOLERANCE[dtype])


def confident_rows(rng, classes, rests, dtype):
    """Students N(0, 1) but for a top class, whose softmax at T = 1 leaves the other classes rests[i] times its own
    mass in row i (Z_h - 1 = rest), and that class's index."""
    student = rng.normal(0, 1, (len(rests), classes))
    top = rng.integers(0, classes, len(rests))
    for row, (c, rest) in enumerate(zip(top, rests)):
        others = np.delete(student[row], c)
        student[row, c] = np.log(np.exp(others).sum()) - np.log(rest)
    return student.astype(dtype), top


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("classes", [10, 300])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_confident_students_whose_label_is_their_top_class(dtype, divergence, classes, temperature):
    """The student right and sure of it, late in training: the hard term's gradient at the label, h_y - 1, is minus
    the small mass of the other classes. Taken as h_y less 1 in T's precision, it cancelled, and the row's gradient
    (whose largest entry it is, or near it) missed float32's tolerance by up to 9x (rows of 10 classes at T = 1 and
    logits N(0, 3^2), one in a thousand), and float64's alike where the rest is below ~1e-4."""
    mp.mp.dps = 50
    rng = np.random.default_rng(24)
    rests = [0.3, 1e-2, 1e-3, 1e-4, 1e-6, 1e-9]
    student, labels = confident_rows(rng, classes, rests, dtype)
    teacher = rng.normal(0, 3, (len(rests), classes)).astype(dtype)
    teacher[::2] = (student[::2] + rng.normal(0, 1e-2, (len(rests[::2]), classes))).astype(dtype)
    true_loss, true_gradient = true_rows(student, teacher, temperature, divergence, labels)
    kd = DistillationLoss(temperature, ALPHA, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher, labels)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}, rests {rests}")


def balanced_rows(rng, classes, divergence, temperature, closeness):
    """Students where the soft and hard terms' gradients all but cancel, as training leaves them: float64 gradient
    descent on alpha CE + (1 - alpha) T^2 D from N(0, 1) logits, against teachers N(0, 3^2) and random labels, until
    each row's gradient is `closeness` of its starting size. Returns students, teachers and labels in float64."""
    student = rng.normal(0, 1, (len(closeness), classes))
    teacher = rng.normal(0, 3, (len(closeness), classes))
    labels = rng.integers(0, classes, len(closeness))
    kd = DistillationLoss(temperature, ALPHA, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    for row, wanted in enumerate(closeness):
        s, t, y = student[row : row + 1], teacher[row : row + 1], labels[row : row + 1]
        start = np.abs(kd.loss_and_gradient(s, t, y)[1]).max()
        for _ in range(20000):
            gradient = kd.loss_and_gradient(s, t, y)[1]
            if np.abs(gradient).max() <= wanted * start:
                break
            s = s - 2.0 * gradient
        student[row] = s[0]
    return student, teacher, labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("classes", [10, 300])
def test_rows_where_the_soft_and_hard_terms_all_but_balance(dtype, divergence, classes):
    """Each entry a sum of a soft and a hard part that cancel: the gradient pass judges a row by its whole largest
    entry against both parts' terms. float32 rows were off by up to 2x their tolerance (4096x10 at T = 1, a few a
    call). float64 keeps its tolerance while the entries are 1e-3 of their parts; closer, it cannot (each part is
    rounded to 2^-53 of itself), and is not tested."""
    mp.mp.dps = 50
    rng = np.random.default_rng(25)
    closeness = [1e-2, 1e-3, 1e-4, 1e-5] if dtype == np.float32 else [1e-2, 1e-3]
    student, teacher, labels = balanced_rows(rng, classes, divergence, 1.0, closeness)
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    true_loss, true_gradient = true_rows(student, teacher, 1.0, divergence, labels)
    kd = DistillationLoss(1.0, ALPHA, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher, labels)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}, closeness {closeness}")


@pytest.mark.parametrize("classes", [10, 1000])
def test_recomputed_rows_do_not_depend_on_threads_or_batching(classes):
    rng = np.random.default_rng(23)
    student, teacher = rows(rng, 40, classes, 1e-4, np.float32)
    labels = rng.integers(0, classes, 40)
    one = DistillationLoss(1.0, ALPHA, reduction="none", num_threads=1).loss_and_gradient(student, teacher, labels)
    two = DistillationLoss(1.0, ALPHA, reduction="none", num_threads=2).loss_and_gradient(student, teacher, labels)
    halves = [
        DistillationLoss(1.0, ALPHA, reduction="none", num_threads=1).loss_and_gradient(
            student[k], teacher[k], labels[k]
        )
        for k in (slice(0, 17), slice(17, 40))
    ]
    for got in (two, tuple(np.concatenate(parts) for parts in zip(*halves))):
        assert np.array_equal(got[0], one[0]) and np.array_equal(got[1], one[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("classes", [8, 300])
def test_saturated_rows(dtype, divergence, classes):
    """Students nearly one-hot (their top class ahead by 8 to 32 over T, so 1 - q_top from ~1e-1 to ~1e-12), teachers
    saturating on the same class or on another: each row's loss within the tolerance of itself, and its gradient,
    at the top class a difference of numbers near it, within the tolerance of the row's largest entry (reverse KL's
    was not, in float32, until its saturated rows were computed again centred on that class: exact_row.hpp; where
    both sides saturate on one class, float32's forward KL was good only to ~1e-7 / (1 - q_top) of it until the
    gradient pass's size was judged, and this test held the gradient to the whole gradient's largest entry)."""
    mp.mp.dps = 50
    rng = np.random.default_rng(23)
    gaps = np.array([8.0, 16.0, 24.0, 32.0])
    student = rng.normal(0, 1, (2 * len(gaps), classes))
    teacher = student + rng.normal(0, 0.5, student.shape)
    student[:, 0] += np.tile(gaps, 2)
    teacher[: len(gaps), 0] += gaps  # the same top class
    teacher[len(gaps) :, 1] += gaps  # another
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    true_loss, true_gradient = true_rows(student, teacher, 1.0, divergence, None)
    kd = DistillationLoss(1.0, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}")
    assert np.array_equal(kd.compute_loss(student, teacher), loss)  # the loss alone is the same, bit for bit


def one_hot_students(rng, count, classes, rests, temperature):
    """Students N(0, 1) but for a top class at a random index, whose tempered softmax leaves the other classes rests[i]
    of its own mass (Z_s - 1 = rest at T), in rows i, i + len(rests), ... of `count` rows that are otherwise
    ordinary (N(0, 3^2)), so that a block of rows holds some of each."""
    student = rng.normal(0, 3, (count, classes))
    for row in range(0, count, 2):
        rest = rests[(row // 2) % len(rests)]
        top = rng.integers(0, classes)
        others = np.delete(rng.normal(0, 1, classes), top)
        student[row] = np.insert(others, top, 0.0)
        student[row, top] = temperature * (np.log(np.exp(others / temperature).sum()) - np.log(rest))
    return student


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("classes", [10, 300])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("labels", [None, "indices", "distributions"])
def test_nearly_one_hot_students_among_ordinary_rows(dtype, divergence, classes, temperature, labels):
    """Every other row's student nearly one-hot (Z_s - 1 from 1/20 down to 1e-9), its teacher independent, close to it
    or sure of another class. Reverse KL's gradient at the top class, q_k (r_k - E_q[r]), is a difference of two
    numbers near r_k there: it is taken as minus the sum of the row's other entries (top_entry.hpp), which float32
    rows of 10 classes at T = 1 had instead gone to the double kernels for, a tenth of such a call's rows."""
    mp.mp.dps = 50
    rng = np.random.default_rng(26)
    rests = [1 / 20, 1e-2, 1e-3, 1e-5, 1e-7, 1e-9]
    student = one_hot_students(rng, 2 * len(rests), classes, rests, temperature)
    teacher = rng.normal(0, 3, student.shape)
    teacher[2::6] = student[2::6] + rng.normal(0, 1e-2, student[2::6].shape)
    teacher[4::6, 0] += 30.0
    student, teacher = student.astype(dtype), teacher.astype(dtype)
    if labels == "indices":
        targets = rng.integers(0, classes, len(student))
        targets[::4] = student[::4].argmax(axis=1)  # the student right, and sure of it
    elif labels == "distributions":
        targets = rng.dirichlet(np.ones(classes), len(student)).astype(dtype)
    else:
        targets = None
    true_loss, true_gradient = true_rows(student, teacher, temperature, divergence, targets)
    kd = DistillationLoss(temperature, ALPHA, reduction="none", divergence=divergence, beta=0.5, skew=0.1)
    loss, gradient = kd.loss_and_gradient(student, teacher, targets)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"C={classes}, T={temperature}, {labels}")
    assert np.array_equal(kd.compute_loss(student, teacher, targets), loss)  # the loss alone, bit for bit


@mp.workdps(50)
def true_sparse_rows(student, indices, logprobs, temperature, tail):
    """Per row: T^2 D against a sparse teacher, bucket or renormalised (docs/math.md, "Sparse teachers"), and its
    gradient, from the cache's values as they are, to 50 digits."""
    T = mp.mpf(temperature)
    losses, gradient = [], np.zeros(student.shape)
    for row, s_row in enumerate(student):
        q = _softmax([mp.mpf(float(x)) for x in s_row], T)
        listed = [int(c) for c in indices[row]]
        pi = [mp.exp(mp.mpf(float(v))) for v in logprobs[row]]
        if tail == "renormalize":
            pi_sum = mp.fsum(pi)
            pi, rho = [v / pi_sum for v in pi], mp.mpf(0)
        else:
            rho = max(mp.mpf(0), 1 - mp.fsum(pi))
        unlisted = mp.fsum(qc for c, qc in enumerate(q) if c not in set(listed))
        d = mp.fsum(v * mp.log(v / q[c]) for v, c in zip(pi, listed) if v != 0)
        d += rho * mp.log(rho / unlisted) if rho != 0 else 0
        total = mp.fsum(pi) + rho
        g = [T * qc * (total - rho / unlisted) for qc in q]
        for v, c in zip(pi, listed):
            g[c] = T * (total * q[c] - v)
        losses.append(T**2 * d)
        gradient[row] = [float(x) for x in g]
    return np.array([float(x) for x in losses]), gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("classes, k", [(40, 8), (1000, 64)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("closeness", [1e-4, 1e-2, 0.3, None])
def test_sparse_teacher_rows(dtype, tail, classes, k, temperature, closeness):
    # A top-k cache of a teacher near the student. float32: the loss once moved by the rounding of the student's
    # float normaliser, ~1e-7 absolutely, 40x its true value for a teacher 1e-4 per logit from the student and 5e-5
    # of it at 0.1. float64: the difference of the bins' log-probabilities left such a loss 3e-6 of itself, and
    # normalisers in double the gradient 1e-11 of its largest entry. Such rows are taken relative (sparse_kl.hpp).
    rng = np.random.default_rng(classes + k)
    student, teacher = rows(rng, 3, classes, closeness, np.float64)
    check_sparse_rows(student, teacher, k, temperature, tail, dtype, f"{tail}, {closeness}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize(
    "temperature, closeness",
    [(0.05, 1e-4), (0.05, 1e-2), (0.3, 1e-4), (0.3, None), (30.0, 1e-4), (100.0, 1e-4), (100.0, None)],
)
def test_sparse_teacher_rows_across_temperatures(dtype, tail, temperature, closeness):
    # At T = 0.05 both sides saturate: the teacher's listed mass misses 1 by ~1e-16, or by less than double's
    # rounding of 1 (its tail, and P - 1, come from the probabilities summed in double-double), the loss is ~1e-20,
    # and float32's unlisted classes' gradient is a tail of ~1e-16 spread over student probabilities below float's
    # smallest normal number, which its exponentials flush to 0 (added in double: restore_flushed_unlisted).
    rng = np.random.default_rng(300)
    student, teacher = rows(rng, 2, 300, closeness, np.float64)
    check_sparse_rows(student, teacher, 16, temperature, tail, dtype, f"T={temperature}, {tail}, {closeness}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_teacher_rows_whose_listed_classes_hold_nearly_everything(dtype, tail):
    # The listed classes hold all but ~1e-10 of both sides' mass: Z_u is summed over the unlisted classes apart.
    rng = np.random.default_rng(5)
    student = rng.normal(0, 1, (3, 1000))
    student[:, :8] += 30
    check_sparse_rows(student, student + rng.normal(0, 1e-4, student.shape), 8, 1.0, tail, dtype, tail)


def check_sparse_rows(student, teacher, k, temperature, tail, dtype, what):
    """Rows of `dtype` against a top-k cache of the teacher (log-probabilities of `dtype`): each row's loss and
    gradient against true_sparse_rows."""
    scaled = teacher / temperature
    top = scaled.max(-1, keepdims=True)
    log_softmax = scaled - top - np.log(np.exp(scaled - top).sum(-1, keepdims=True))
    indices = np.argsort(-scaled, axis=-1)[:, :k].astype(np.int32)
    logprobs = np.take_along_axis(log_softmax, indices, -1).astype(dtype)
    cache = SparseTeacher(indices, logprobs)
    student = student.astype(dtype)
    kd = DistillationLoss(temperature, tail=tail, reduction="none", num_threads=1)
    loss = kd.compute_loss(student, cache)
    gradient = DistillationLoss(temperature, tail=tail, reduction="sum", num_threads=1).compute_gradient(student, cache)
    true_loss, true_gradient = true_sparse_rows(student, indices, logprobs, temperature, tail)
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("teacher_kind", ["close", "independent"])
def test_sparse_teacher_rows_of_confident_students_with_labels(dtype, teacher_kind):
    """test_confident_students_whose_label_is_their_top_class against a top-k cache: the label among the listed
    classes (a teacher close to the student, whose top classes are the student's) or, mostly, not."""
    mp.mp.dps = 50
    rng = np.random.default_rng(26)
    rests = [0.3, 1e-2, 1e-4, 1e-6, 1e-9]
    student, labels = confident_rows(rng, 40, rests, np.float64)
    teacher = (
        student + rng.normal(0, 1e-2, student.shape) if teacher_kind == "close" else rng.normal(0, 3, student.shape)
    )
    indices = np.argsort(-teacher, axis=-1)[:, :8].astype(np.int32)
    log_softmax = teacher - teacher.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    logprobs = np.take_along_axis(log_softmax, indices, -1).astype(dtype)
    student = student.astype(dtype)
    soft_loss, soft_gradient = true_sparse_rows(student, indices, logprobs, 1.0, "bucket")
    hard_loss, hard_gradient = [], np.zeros(student.shape)
    for row, s_row in enumerate(student):
        h = _softmax([mp.mpf(float(x)) for x in s_row], mp.mpf(1))
        hard_loss.append(float(-mp.log(h[labels[row]])))
        hard_gradient[row] = [float(hc - (c == labels[row])) for c, hc in enumerate(h)]
    true_loss = (1 - ALPHA) * soft_loss + ALPHA * np.array(hard_loss)
    true_gradient = (1 - ALPHA) * soft_gradient + ALPHA * hard_gradient
    kd = DistillationLoss(1.0, ALPHA, reduction="none", num_threads=1)
    loss = kd.compute_loss(student, SparseTeacher(indices, logprobs), labels)
    gradient = DistillationLoss(1.0, ALPHA, reduction="sum", num_threads=1).compute_gradient(
        student, SparseTeacher(indices, logprobs), labels
    )
    assert_rows_close(loss, gradient, true_loss, true_gradient, dtype, f"{teacher_kind}, rests {rests}")
