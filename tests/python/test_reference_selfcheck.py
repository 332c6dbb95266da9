"""Checks of the test suite's own float64 reference (no kdloss involved).

If the reference were wrong, every agreement test would be meaningless, so it
is anchored here against the specification's check values, a brute-force
per-element implementation, central finite differences and closed forms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import brute_force_loss, log_softmax, reference

CHECK_S = np.array([1.0, 2.0, 0.5])
CHECK_T = np.array([1.5, 1.8, 0.6])
CHECK_Y = np.array([0.0, 1.0, 0.0])


def test_reference_check_values():
    r = reference(CHECK_S, CHECK_T, CHECK_Y, temperature=3.0, alpha=0.5)
    assert r.loss == pytest.approx(0.25465032, rel=1e-7)
    np.testing.assert_allclose(r.grad, [0.05121834, -0.12252327, 0.07130493], rtol=0, atol=1e-8)
    r = reference(CHECK_S, CHECK_T, None, temperature=3.0, alpha=0.5)
    assert r.loss == pytest.approx(0.04493185, rel=1e-7)


# (divergence, beta, skew): every divergence, the mixtures at a middling and an uneven parameter.
DIVERGENCE_CASES = [
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 0.2, 0.1),
    ("skew_forward_kl", 0.5, 0.1),
    ("skew_forward_kl", 0.5, 0.7),
    ("skew_reverse_kl", 0.5, 0.1),
    ("skew_reverse_kl", 0.5, 0.7),
]
MIXTURES = [case for case in DIVERGENCE_CASES if case[0] not in ("forward_kl", "reverse_kl")]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["none", "index", "soft"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("divergence,beta,skew", DIVERGENCE_CASES)
def test_reference_matches_brute_force(reduction, form, alpha, divergence, beta, skew):
    rng = np.random.default_rng(1234)
    B, C = 5, 7
    s = rng.normal(size=(B, C)) * 3
    t = rng.normal(size=(B, C)) * 3
    if form == "none":
        y = None
    elif form == "index":
        y = rng.integers(0, C, size=B)
        y[1] = -100
    else:
        y = rng.random((B, C))
    kw = dict(temperature=2.5, alpha=alpha, reduction=reduction, divergence=divergence, beta=beta, skew=skew)
    r = reference(s, t, y, **kw)
    bl, bg = brute_force_loss(s, t, y, **kw)
    np.testing.assert_allclose(r.loss, bl, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(r.grad, bg, rtol=1e-12, atol=1e-15)


def test_reference_gradient_finite_differences():
    rng = np.random.default_rng(99)
    B, C = 3, 6
    s = rng.normal(size=(B, C))
    t = rng.normal(size=(B, C))
    y = rng.random((B, C))
    for reduction in ("mean", "sum", "none"):
        kw = dict(temperature=1.7, alpha=0.4, reduction=reduction)
        g = reference(s, t, y, **kw).grad
        h = 1e-6
        fd = np.zeros_like(s)
        for idx in np.ndindex(s.shape):
            sp, sm = s.copy(), s.copy()
            sp[idx] += h
            sm[idx] -= h
            fp = np.sum(reference(sp, t, y, **kw).loss)
            fm = np.sum(reference(sm, t, y, **kw).loss)
            fd[idx] = (fp - fm) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=0, atol=1e-7)


def test_reference_log_softmax_edge_rows():
    x = np.array(
        [
            [0.0, -np.inf, 1.0],
            [-np.inf, -np.inf, -np.inf],
            [np.nan, 0.0, 1.0],
            [np.inf, 0.0, 1.0],
            [1e4, -1e4, 0.0],
        ]
    )
    ls = log_softmax(x)
    assert ls[0, 1] == -np.inf
    np.testing.assert_allclose(np.exp(ls[0, [0, 2]]).sum(), 1.0, rtol=1e-15)
    assert np.isnan(ls[1]).all() and np.isnan(ls[2]).all() and np.isnan(ls[3]).all()
    assert ls[4, 0] == 0.0 and ls[4, 1] == -2e4


def test_reference_masks():
    s = np.array([[0.3, -np.inf, 1.0, 0.2]])
    t = np.array([[0.1, -np.inf, 0.5, -np.inf]])
    r = reference(s, t, np.array([0]), temperature=2.0, alpha=0.3, reduction="sum")
    assert np.isfinite(r.loss) and np.all(np.isfinite(r.grad))
    # closed form with masked classes simply removed
    keep_s = np.array([0.3, 1.0, 0.2])
    lq = log_softmax(keep_s / 2.0)
    lp = log_softmax(np.array([0.1, 0.5]) / 2.0)
    soft = 4.0 * np.sum(np.exp(lp) * (lp - lq[:2]))
    hard = -log_softmax(keep_s)[0]
    assert r.loss == pytest.approx(0.3 * hard + 0.7 * soft, rel=1e-14)
    # student mask where the teacher has mass: +inf soft loss, finite gradient
    s2 = np.array([[0.3, 0.1, -np.inf]])
    t2 = np.array([[0.1, 0.2, 0.3]])
    r2 = reference(s2, t2, None, temperature=2.0, alpha=0.3, reduction="none")
    assert r2.loss[0] == np.inf and np.all(np.isfinite(r2.grad))
    # alpha == 1 removes the soft term entirely, so the loss is finite
    r3 = reference(s2, t2, np.array([0]), temperature=2.0, alpha=1.0, reduction="none")
    assert np.isfinite(r3.loss[0])
    assert r3.loss[0] == pytest.approx(-log_softmax(s2[0, :2])[0], rel=1e-15)


def test_reference_ignore_and_empty():
    s = np.ones((0, 4))
    r = reference(s, s, None, temperature=1.0, alpha=0.5, reduction="mean")
    assert r.loss == 0.0 and r.grad.shape == (0, 4)
    s = np.arange(8.0).reshape(2, 4)
    r = reference(s, s[::-1], np.array([-100, -100]), temperature=1.0, alpha=0.5)
    assert r.loss == 0.0 and not r.grad.any()
    assert math.isfinite(r.loss)


# ---------------------------------------------------------------------------------------------------------------
# The mixture divergences (jsd, skew_forward_kl, skew_reverse_kl): the reference's loss against 50-digit mpmath,
# its gradient against float64 autograd and mpmath derivatives, and their properties in the reference itself.
# ---------------------------------------------------------------------------------------------------------------


def _mp_soft(student_row, teacher_row, temperature, divergence, beta, skew, index=None, value=None):
    """T^2 D of one row in 50-digit arithmetic, from the definitions (optionally with student_row[index] = value,
    an mpf, for derivatives). Each KL(u || w_u u + w_v v) is summed as -u log1p(w_v (v/u - 1)), so that a weight
    of 1e-300 is not lost in 1 - w; a class u rules out adds nothing, one only v rules out -u log w_u."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp
    T = mp.mpf(temperature)
    s = [mp.mpf(float(v)) for v in student_row]
    if index is not None:
        s[index] = value

    def softmax(row):
        finite = [x / T for x in row if x != -mp.inf]
        top = max(finite)
        e = [mp.exp(x / T - top) if x != -mp.inf else mp.mpf(0) for x in row]
        z = mp.fsum(e)
        return [v / z for v in e]

    q = softmax(s)
    p = softmax([mp.mpf(float(v)) for v in teacher_row])

    def kl_mix(u, v, w_v, u_first):
        """KL(u || (1 - w_v) u + w_v v), the weight 1 - w_v never rounded: log(m/u) = log1p(w_v (v/u - 1)),
        log(1 - w_v) = log1p(-w_v)."""
        w_v = mp.mpf(w_v)
        return mp.fsum(
            -u[c] * (mp.log1p(-w_v) if v[c] == 0 else mp.log1p(w_v * (v[c] / u[c] - 1))) for c in range(len(u)) if u[c]
        )

    def kl_mix_small_u(u, v, w_u):
        """KL(u || w_u u + (1 - w_u) v) for a weight w_u (possibly tiny): log(m/u) = log(w_u + (1 - w_u) v/u)."""
        w_u = mp.mpf(w_u)
        return mp.fsum(
            -u[c] * (mp.log(w_u) if v[c] == 0 else mp.log(w_u + (v[c] / u[c]) - w_u * (v[c] / u[c])))
            for c in range(len(u))
            if u[c]
        )

    def kl(u, v):
        return mp.fsum(u[c] * mp.log(u[c] / v[c]) for c in range(len(u)) if u[c])

    if divergence == "forward_kl":
        d = kl(p, q)
    elif divergence == "reverse_kl":
        d = kl(q, p)
    elif divergence == "jsd":  # beta KL(p || beta p + (1 - beta) q) + (1 - beta) KL(q || (1 - beta) q + beta p)
        d = beta * kl_mix_small_u(p, q, beta) + (1 - mp.mpf(beta)) * kl_mix(q, p, beta, True)
    elif divergence == "skew_forward_kl":
        d = kl_mix_small_u(p, q, skew)
    else:
        d = kl_mix_small_u(q, p, skew)
    return T * T * d


def _mask_rows(rng, C=7):
    """Three rows of logits: both sides rule a class out; the student rules out one the teacher keeps; the
    teacher rules out one the student keeps (a mixture stays finite in all three)."""
    s = rng.normal(size=(3, C)) * 3
    t = rng.normal(size=(3, C)) * 3
    s[0, 4] = t[0, 4] = -np.inf
    s[1, 2] = -np.inf
    t[2, 3] = -np.inf
    return s, t


# The mixtures at their extremes too: a tiny weight (where a log ratio log(m/q) is ~ beta, and the ~beta^2
# KL(q || m) cancels to the last bits of an ordinary log m - log q), beta next to 1, and a skew of 0.99.
EXTREME_MIXTURES = MIXTURES + [
    ("jsd", 1e-6, 0.1),
    ("jsd", 1e-300, 0.1),
    ("jsd", 1 - 1e-6, 0.1),
    ("jsd", 1 - 2**-52, 0.1),
    ("skew_forward_kl", 0.5, 1e-300),
    ("skew_forward_kl", 0.5, 0.99),
    ("skew_reverse_kl", 0.5, 1e-300),
    ("skew_reverse_kl", 0.5, 0.99),
]


@pytest.mark.parametrize("divergence,beta,skew", EXTREME_MIXTURES)
def test_reference_mixture_loss_matches_mpmath(divergence, beta, skew):
    """The soft loss per row, finite rows and every kind of mask, to ~1e-15 of 50-digit values (a skew of 0.99
    loses ~1/(1 - skew) ulps: KL(q || m) with m ~ q cancels at first order, in the definition itself)."""
    pytest.importorskip("mpmath").mp.dps = 50
    rng = np.random.default_rng(42)
    finite_s, finite_t = rng.normal(size=(3, 7)) * 3, rng.normal(size=(3, 7)) * 3
    mask_s, mask_t = _mask_rows(rng)
    s, t = np.vstack([finite_s, mask_s]), np.vstack([finite_t, mask_t])
    ref = reference(s, t, temperature=2.0, alpha=0.3, reduction="none", divergence=divergence, beta=beta, skew=skew)
    assert np.all(np.isfinite(ref.loss)) and np.all(np.isfinite(ref.grad))
    rtol = 1e-13 if skew == 0.99 else 2e-15
    for i in range(len(s)):
        exact = _mp_soft(s[i], t[i], 2.0, divergence, beta, skew)
        assert ref.loss[i] > 0
        assert abs(ref.loss[i] - float(exact)) <= rtol * abs(float(exact)), (i, ref.loss[i], float(exact))


@pytest.mark.parametrize("divergence,beta,skew", EXTREME_MIXTURES)
def test_reference_mixture_gradient_matches_mpmath_derivatives(divergence, beta, skew):
    """Entries of the gradient, masked classes' rows included, against the derivative of the 50-digit loss
    (mpmath.diff), relative to the row's largest entry: at the extreme weights where float64 autograd of the
    definitions would itself cancel."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    rng = np.random.default_rng(43)
    s, t = _mask_rows(rng, C=5)
    ref = reference(s, t, temperature=1.5, alpha=0.3, reduction="sum", divergence=divergence, beta=beta, skew=skew)
    for i in range(len(s)):
        scale = np.abs(ref.grad[i]).max()
        assert scale > 0
        for j in range(s.shape[1]):
            if s[i, j] == -np.inf:
                assert ref.grad[i, j] == 0.0  # no mass to move
                continue
            exact = mpmath.diff(lambda x, i=i, j=j: _mp_soft(s[i], t[i], 1.5, divergence, beta, skew, j, x), s[i, j])
            rtol = 4e-14 if skew == 0.99 else 4e-15
            assert abs(ref.grad[i, j] - float(exact)) <= rtol * scale, (i, j, ref.grad[i, j], float(exact))


def _torch_soft(s, t, temperature, divergence, beta, skew):
    """T^2 D per row written with torch primitives in float64 (the mixture's log as a logsumexp of a stacked
    pair, as TRL's generalized_jsd_loss writes it); autograd gives its gradient."""
    torch = pytest.importorskip("torch")
    lq = torch.log_softmax(s / temperature, dim=-1)
    lp = torch.log_softmax(t / temperature, dim=-1)

    def log_mix(la, lb, w):  # log(w a + (1 - w) b)
        return torch.logsumexp(torch.stack([la + math.log(w), lb + math.log1p(-w)]), dim=0)

    def kl(la, lb):  # KL(a || b)
        return (la.exp() * (la - lb)).sum(-1)

    if divergence == "jsd":
        lm = log_mix(lp, lq, beta)
        d = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    elif divergence == "skew_forward_kl":
        d = kl(lp, log_mix(lp, lq, skew))
    else:
        d = kl(lq, log_mix(lq, lp, skew))
    return temperature**2 * d


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence,beta,skew", MIXTURES)
def test_reference_mixture_gradient_matches_float64_autograd(divergence, beta, skew, reduction):
    """The whole loss (soft term with class-index labels' hard term, an ignored row, every reduction) and its
    gradient, against torch autograd of the definitions: the reference's gradient formulas, derived by hand,
    against the chain rule done by the machine."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(44)
    B, C, T, alpha = 6, 11, 1.7, 0.35
    s, t = rng.normal(size=(B, C)) * 3, rng.normal(size=(B, C)) * 3
    y = rng.integers(0, C, B)
    y[2] = -100
    params = dict(temperature=T, alpha=alpha, reduction=reduction, divergence=divergence, beta=beta, skew=skew)
    ref = reference(s, t, y, **params)
    st = torch.tensor(s, requires_grad=True)
    soft = _torch_soft(st, torch.tensor(t), T, divergence, beta, skew)
    hard = torch.nn.functional.cross_entropy(st, torch.tensor(y), ignore_index=-100, reduction="none")
    rows = torch.where(torch.tensor(y) != -100, alpha * hard + (1 - alpha) * soft, 0.0)
    loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / 5}[reduction]
    loss.sum().backward()
    np.testing.assert_allclose(ref.loss, loss.detach().numpy(), rtol=1e-13)
    grad = st.grad.numpy()
    assert np.abs(ref.grad - grad).max() <= 1e-13 * np.abs(grad).max()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reference_mixture_properties(temperature):
    """In the reference itself: jsd symmetric at beta 0.5 and within [0, T^2 log 2]; the special parameter
    values are the plain KLs exactly and the limits next to them continuous from the right side (jsd -> beta
    KL(p || q) as beta -> 0, (1 - beta) KL(q || p) as beta -> 1; skew 1e-12 is the plain KL to ~1e-12);
    jsd(beta) = beta skew_forward(beta) + (1 - beta) skew_reverse(1 - beta), loss and gradient; every divergence
    is 0 with a zero gradient where the student is the teacher, and its gradient's rows sum to 0."""
    rng = np.random.default_rng(45)
    s, t = rng.normal(size=(9, 13)) * 4, rng.normal(size=(9, 13)) * 4
    T = temperature

    def ref(student, teacher, divergence, **kw):
        return reference(student, teacher, temperature=T, alpha=0.3, reduction="none", divergence=divergence, **kw)

    forward, reverse = ref(s, t, "forward_kl"), ref(s, t, "reverse_kl")
    half, swapped = ref(s, t, "jsd", beta=0.5), ref(t, s, "jsd", beta=0.5)
    np.testing.assert_allclose(half.loss, swapped.loss, rtol=1e-14)
    assert np.all(half.loss > 0) and np.all(half.loss <= T * T * math.log(2))
    for beta in (0.1, 0.7):
        assert np.all(ref(s, t, "jsd", beta=beta).loss <= T * T * math.log(2))
    for got, want in [
        (ref(s, t, "jsd", beta=0.0), forward),
        (ref(s, t, "jsd", beta=1.0), reverse),
        (ref(s, t, "skew_forward_kl", skew=0.0), forward),
        (ref(s, t, "skew_reverse_kl", skew=0.0), reverse),
    ]:
        assert np.array_equal(got.loss, want.loss) and np.array_equal(got.grad, want.grad)
    # D = beta KL(p || q) + O(beta^2 chi^2(p, q)), chi^2 here up to ~1e6: a beta of 1e-15 is close enough.
    tiny = 1e-15
    np.testing.assert_allclose(ref(s, t, "jsd", beta=tiny).loss / tiny, forward.loss, rtol=1e-8)
    np.testing.assert_allclose(ref(s, t, "jsd", beta=1 - tiny).loss / (1 - (1 - tiny)), reverse.loss, rtol=1e-8)
    np.testing.assert_allclose(ref(s, t, "skew_forward_kl", skew=1e-20).loss, forward.loss, rtol=1e-12)
    np.testing.assert_allclose(ref(s, t, "skew_reverse_kl", skew=1e-20).loss, reverse.loss, rtol=1e-12)
    for beta in (0.3, 0.5, 0.8):  # (not near 0 or 1: a skew near 1 is ill-conditioned)
        jsd = ref(s, t, "jsd", beta=beta)
        sf, sr = ref(s, t, "skew_forward_kl", skew=beta), ref(s, t, "skew_reverse_kl", skew=1 - beta)
        np.testing.assert_allclose(jsd.loss, beta * sf.loss + (1 - beta) * sr.loss, rtol=1e-13)
        combined = beta * sf.grad + (1 - beta) * sr.grad
        assert np.abs(jsd.grad - combined).max() <= 1e-13 * np.abs(jsd.grad).max()
    for divergence, beta, skew in DIVERGENCE_CASES:
        r = ref(s, t, divergence, beta=beta, skew=skew)
        assert np.abs(r.grad.sum(axis=-1)).max() <= 1e-14 * np.abs(r.grad).max()
        same = ref(s, s.copy(), divergence, beta=beta, skew=skew)
        assert np.abs(same.loss).max() <= 1e-14 and np.abs(same.grad).max() <= 1e-15


@pytest.mark.parametrize("divergence,beta,skew", MIXTURES + [("jsd", 1e-6, 0.1), ("skew_reverse_kl", 0.5, 1e-6)])
def test_reference_mixture_masks(divergence, beta, skew):
    """A class both sides rule out is the same as no such class (loss and the other classes' gradient), with a
    zero gradient; one side's mask leaves a mixture finite; the plain KLs at beta 0 / 1 have their
    infinities (forward: a student mask under the teacher's mass; reverse: a teacher mask under the
    student's), jsd's reverse end with a NaN gradient, as reverse KL's."""
    rng = np.random.default_rng(46)
    s, t = _mask_rows(rng)
    kw = dict(temperature=2.0, alpha=0.3, reduction="none", divergence=divergence, beta=beta, skew=skew)
    r = reference(s, t, **kw)
    assert np.all(np.isfinite(r.loss)) and np.all(np.isfinite(r.grad))
    assert r.grad[0, 4] == 0.0 and r.grad[1, 2] == 0.0
    keep = [0, 1, 2, 3, 5, 6]
    dropped = reference(s[:1, keep], t[:1, keep], **kw)
    np.testing.assert_allclose(r.loss[0], dropped.loss[0], rtol=1e-15)
    np.testing.assert_allclose(r.grad[0, keep], dropped.grad[0], rtol=1e-14, atol=1e-17)
    if divergence == "jsd":
        ends = dict(kw, beta=0.0), dict(kw, beta=1.0)
        fwd, rev = reference(s, t, **ends[0]), reference(s, t, **ends[1])
        assert list(np.isinf(fwd.loss)) == [False, True, False] and np.all(np.isfinite(fwd.grad))
        assert list(np.isinf(rev.loss)) == [False, False, True]
        assert np.isnan(rev.grad[2]).all() and np.all(np.isfinite(rev.grad[:2]))


def test_reference_refuses_parameters_out_of_range():
    s = np.zeros((2, 3))
    for bad in (dict(beta=-0.1), dict(beta=1.5), dict(beta=np.nan), dict(skew=1.0), dict(skew=-1e-9)):
        with pytest.raises(ValueError):
            reference(s, s, temperature=1.0, alpha=0.0, divergence="jsd", **bad)
    with pytest.raises(ValueError):
        reference(s, s, temperature=1.0, alpha=0.0, divergence="js")


@pytest.mark.parametrize(
    "divergence,beta,skew", DIVERGENCE_CASES + [("jsd", 1e-6, 0.1), ("skew_reverse_kl", 0.5, 0.99)]
)
def test_reference_saturated_rows_match_mpmath(divergence, beta, skew):
    """At a low temperature rows saturate: q and p almost one-hot, on the same class or not, D and the gradient
    tiny beside their terms (the softmax's Jacobian q (1 - q)). The losses to ~1e-13 of themselves and the
    gradient to ~1e-14 of the batch's largest entry, against 50-digit values: the dominant class's log-probability
    from log1p of the tail, a mixture's log ratio near 0 from log1p(w expm1(d)), and the gradient's dD/dq shifted
    to vanish at the student's dominant class. (Row 0's D ~ 1e-14 is second order in logit differences ~0.5
    among logits/T ~ 100, whose ulps alone move it ~4e-14; a skew of 0.99 costs another 1/(1 - skew).)"""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    rng = np.random.default_rng(47)
    T = 0.1
    s, t = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6)) * 3
    t[0] = s[0] + rng.normal(size=6) * 0.05  # saturated on the same class, close
    t[1, np.argmax(s[1])] = t[1].max() + 2.0  # the same class, far apart elsewhere
    params = dict(temperature=T, alpha=0.3, reduction="sum", divergence=divergence, beta=beta, skew=skew)
    ref = reference(s, t, **dict(params, reduction="none"))
    grad = reference(s, t, **params).grad
    scale = np.abs(grad).max()
    for i in range(len(s)):
        exact = float(_mp_soft(s[i], t[i], T, divergence, beta, skew))
        assert abs(ref.loss[i] - exact) <= (1e-11 if skew == 0.99 else 1e-13) * exact, (i, ref.loss[i], exact)
        for j in range(s.shape[1]):
            derivative = mpmath.diff(lambda x, i=i, j=j: _mp_soft(s[i], t[i], T, divergence, beta, skew, j, x), s[i, j])
            assert abs(grad[i, j] - float(derivative)) <= 1e-14 * scale, (i, j, grad[i, j], float(derivative))
