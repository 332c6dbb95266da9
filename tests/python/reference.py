"""Independent float64 NumPy reference for the kdloss distillation loss.

Written from the formulas in the specification only; it never imports ``kdloss``. The soft term against a sparse
teacher (a few classes per row, issue 17) is at the end: ``sparse_soft_reference``.

Per row ``i`` (``p`` = softmax, ``T`` = temperature)::

    soft_i = T^2 * sum_c p(t_i/T)_c * (log p(t_i/T)_c - log p(s_i/T)_c)   (0 * log 0 := 0)
           (divergence "reverse_kl": the roles of student and teacher swapped)
    hard_i = -sum_c y_ic * log p(s_i)_c                                  (0 * log 0 := 0)
    row_i  = alpha * hard_i + (1 - alpha) * soft_i      (labels given)
    row_i  = soft_i                                     (no labels)

with the hard term absent when ``alpha == 0`` and the soft term absent when
``alpha == 1`` (so that ``0 * inf`` never produces NaN).  Rows labelled
``ignore_index`` contribute nothing (loss 0, zero gradient row) and are not
counted by the ``"mean"`` reduction.

Gradient of one row with respect to the student logits::

    (1 - alpha) * T * (q_T - p_T) + alpha * (p_1 * sum_c y_c - y)

where ``q_T = p(s/T)``, ``p_T = p(t/T)``, ``p_1 = p(s)`` (reverse KL: ``T * q_T * (log q_T - log p_T - KL)``,
from d KL(q || p) / d(s/T), 0 where q_T = 0, NaN where the row's KL is infinite); for ``"mean"`` it is
divided by the number of counted rows; for ``"none"`` it is the gradient of the
sum of the rows.

The mixture divergences (p = p_T teacher, q = q_T student, soft = T^2 * D)::

    "jsd"              D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                       (beta == 0: forward KL, beta == 1: reverse KL, by definition)
    "skew_forward_kl"  D = KL(p || m),  m = skew p + (1 - skew) q     (skew == 0: forward KL)
    "skew_reverse_kl"  D = KL(q || m),  m = skew q + (1 - skew) p     (skew == 0: reverse KL)

Their soft gradients, d soft / d s = T * d D / d(s/T), from dD/dq_c and the softmax's Jacobian
(dq_c/da_j = q_c (1[c=j] - q_j))::

    "jsd"              dD/dq_c = (1 - beta) log(q_c/m_c)      ->  T (1 - beta) q_j (log(q_j/m_j) - KL(q || m))
    "skew_forward_kl"  dD/dq_c = -p_c (1 - skew) / m_c        ->  T (q_j W - p_j w_j),
                                                                  w = (1 - skew) q / m, W = sum_c p_c w_c
    "skew_reverse_kl"  dD/dq_c = log(q_c/m_c) + 1 - skew q_c/m_c
                                                              ->  T q_j (v_j - E_q[v]),  v = log(q/m) - skew q/m

Each log ratio of a mixture is taken from the difference of the two log-probabilities,
d = log p - log q, as a log-sum-exp of the weights' logs (never from log m itself, nor from a sum of
probabilities)::

    log(m/q) = logaddexp(log w_q, log w_p + d)      log(m/p) = logaddexp(log w_p, log w_q - d)

with log(1 - x) as log1p(-x): exact when one side rules a class out (d = +-inf), and free of the
cancellation of log m - log q (of the size of log q's rounding) that would swamp the ~beta^2 size of
KL(q || m) at a small beta.  A class both sides rule out contributes nothing (its d is NaN and is
masked), and where one side has mass the mixture's log ratio is finite (log of a weight), so these
divergences are finite wherever either side has mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "DIVERGENCES",
    "log_softmax",
    "mixture_log_ratios",
    "RefResult",
    "reference",
    "reference_loss",
    "reference_grad",
    "brute_force_loss",
    "SPARSE_TAILS",
    "SparseSoft",
    "scatter_teacher",
    "sparse_soft_reference",
    "dense_equivalent",
]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis in float64, via max-subtraction.

    The normaliser's log is log1p of the other classes' exponentials (the largest one's is exactly 1), so that
    the log-probability of a row's dominant class, ~ -(its tail), keeps its relative precision where the row
    is saturated (a low temperature): the divergences of two saturated rows compare those tails.

    A row containing NaN or +inf, or made only of -inf, yields NaN everywhere;
    -inf entries of an otherwise finite row give -inf.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        z = x - m
        e = np.exp(z)
        if x.shape[-1]:
            np.put_along_axis(e, np.argmax(x, axis=-1)[..., None], 0.0, axis=-1)  # the largest: exp(0) = 1
        lse = np.log1p(np.sum(e, axis=-1, keepdims=True))
        bad = ~np.isfinite(m) | np.isnan(np.sum(x, axis=-1, keepdims=True))  # NaN, +inf, or all -inf
        return np.where(bad, np.nan, z - lse)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def plain_divergence(divergence: str, beta: float = 0.5, skew: float = 0.1) -> str:
    """The divergence a parameter value makes it by definition: jsd at beta 0 / 1 is forward / reverse KL,
    a skew KL at skew 0 its plain KL; any other (divergence, parameter) is itself."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and skew == 0.0:
        return divergence[len("skew_") :]
    return divergence


def _log1p_weighted_exp(d, weights):
    """``log(1 + (w_p / w_q) e^d)`` for ``weights = (w_p, w_q)`` (positive, summing to 1, the smaller given exactly:
    see ``_weights``), to a few ulps of its own size: log1p of ``r = (w_p / w_q) e^d`` where ``r <= 1``, else
    ``log(w_p / w_q) + d + log1p(1/r)``, ``log(w_p / w_q)`` from the weights' exact logs; ``r`` is not exposed to
    the rounding of a large ``log w_p`` (a tiny weight), as ``exp(log w_p - log w_q + d)`` would be."""
    (w_p, log_wp), (w_q, log_wq) = weights
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        r = (w_p / w_q) * np.exp(d)
        r_inv = (w_q / w_p) * np.exp(-d)
        return np.where(r <= 1.0, np.log1p(r), (log_wp - log_wq) + d + np.log1p(r_inv))


def _weights(w: float):
    """((w, log w), (1 - w, log(1 - w))) with log(1 - w) = log1p(-w) exact and 1 - w rounded (used only in
    ratios, whose relative error it is)."""
    return (w, math.log(w)), (1.0 - w, math.log1p(-w))


def mixture_log_ratios(lp, lq, w_p: float):
    """``log(m/q)`` and ``log(m/p)`` for the mixture ``m = w_p p + (1 - w_p) q`` (0 < w_p < 1) of the
    distributions with log-probabilities ``lp`` and ``lq``, from ``d = lp - lq`` and the weights (see the module's
    docstring).  NaN where both sides rule the class out (to be masked by the caller).

    ``log(m/q) = log(w_q + w_p e^d)`` is ``log w_q + log1p(r)`` with ``r = (w_p / w_q) e^d`` where ``r <= 1``, and
    ``log w_p + d + log1p(1/r)`` where ``r > 1`` (and symmetrically ``log(m/p)``): each log1p's argument at most
    1, ``r`` not exposed to the rounding of a large ``log w_p`` (a tiny weight), as ``exp(log w_p - log w_q + d)``
    would be, and the weights' logs added once, so both ratios are good to a few ulps of their own size (``~ w_p``
    for a tiny ``w_p``).
    """
    (w_p, log_wp), (w_q, log_wq) = _weights(w_p)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        d = lp - lq
        r = (w_p / w_q) * np.exp(d)  # w_p p / (w_q q)
        r_inv = (w_q / w_p) * np.exp(-d)
        log_m_q = np.where(r <= 1.0, log_wq + np.log1p(r), log_wp + d + np.log1p(r_inv))
        log_m_p = np.where(r_inv <= 1.0, log_wp + np.log1p(r_inv), log_wq - d + np.log1p(r))
        # Where m ~ q (or m ~ p) the ratio's log is small and the forms above, sums of a weight's log and a
        # log1p, would leave it only an ulp of that log: there m/q = 1 + w_p expm1(d), m/p = 1 + w_q expm1(-d).
        near_q, near_p = w_p * np.expm1(d), w_q * np.expm1(-d)
        log_m_q = np.where(np.abs(near_q) <= 0.5, np.log1p(near_q), log_m_q)
        log_m_p = np.where(np.abs(near_p) <= 0.5, np.log1p(near_p), log_m_p)
    return log_m_q, log_m_p


def _x_plus_log1m(x, log1m):
    """``x + log(1 - x)`` for 0 <= x <= 1 (``log1m`` = log(1 - x), given accurately by the caller), to a few ulps
    of its own size ~ -x^2/2: its series below 1/4."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        small = np.where(x < 0.25, x, 0.0)
        total, power = np.zeros_like(small), small.copy()
        for n in range(2, 32):  # 0.25^31 / 31 < 1e-20
            power = power * small
            total -= power / n
        return np.where(x < 0.25, total, x + log1m)


def _check_parameters(divergence, beta, skew):
    if divergence not in DIVERGENCES:
        raise ValueError("reference: bad divergence")
    if not 0.0 <= beta <= 1.0:
        raise ValueError("reference: beta must be in [0, 1]")
    if not 0.0 <= skew < 1.0:
        raise ValueError("reference: skew must be in [0, 1)")


def _centred_gradient(qt, phi, T):
    """``T q_j (phi_j - E_q[phi])``, the soft gradient from ``phi_c = dD/dq_c`` (up to a constant) and the
    softmax's Jacobian, with ``phi`` shifted to vanish at the student's most probable class k: there q_k ~ 1 and
    ``phi_k - E_q[phi] = sum_{c != k} q_c (phi_k - phi_c)`` is small in a saturated row (a low temperature), which
    ``phi_k - E_q[phi]`` taken as it is would give only to an ulp of ``phi_k``. 0 where the student has no mass."""
    k = np.argmax(np.where(np.isnan(qt), np.inf, qt), axis=-1)[:, None]
    shifted = np.where(qt == 0, 0.0, phi - np.take_along_axis(phi, k, axis=-1))
    mean = np.sum(qt * shifted, axis=-1, keepdims=True)
    return np.where(qt == 0, 0.0, T * qt * (shifted - mean))


def _soft_term(divergence, beta, skew, lpt, lqt, pt, qt, T):
    """Per-row T^2 D and its gradient T dD/da (a = s/T) for the divergence as ``plain_divergence`` names it."""
    if divergence == "forward_kl":
        # teacher probability exactly 0 contributes 0 (also for -inf student there)
        soft_terms = np.where(pt == 0, 0.0, pt * (lpt - lqt))
        return T * T * np.sum(soft_terms, axis=-1), T * (qt - pt)
    if divergence == "reverse_kl":
        # student probability exactly 0 contributes 0 (also for -inf teacher there)
        kl = np.sum(np.where(qt == 0, 0.0, qt * (lqt - lpt)), axis=-1)
        # dKL/dq_c = log(q_c/p_c) + 1. An infinite KL has no derivative: NaN where the student has mass.
        grad = _centred_gradient(qt, lqt - lpt, T)
        return T * T * kl, np.where(np.isinf(kl)[:, None] & (qt != 0), np.nan, grad)
    if divergence == "jsd":
        # m = beta p + (1 - beta) q; a = log(m/q), b = log(m/p); dD/dq_c = (1 - beta) log(q_c/m_c), here without
        # the constant -(1 - beta) log(1 - beta): -(1 - beta) log(1 + beta/(1 - beta) p/q), which is small (to its
        # own relative precision) where the student dominates, as at the class the gradient's shift is taken.
        a, b = mixture_log_ratios(lpt, lqt, beta)
        kl_pm = np.sum(np.where(pt == 0, 0.0, -pt * b), axis=-1)
        kl_qm = np.sum(np.where(qt == 0, 0.0, -qt * a), axis=-1)
        soft = T * T * (beta * kl_pm + (1.0 - beta) * kl_qm)
        with np.errstate(invalid="ignore"):
            phi = -(1.0 - beta) * _log1p_weighted_exp(lpt - lqt, _weights(beta))
        return soft, _centred_gradient(qt, phi, T)
    if divergence == "skew_forward_kl":
        # m = skew p + (1 - skew) q; dD/dq_c = -(1 - skew) p_c / m_c = -(1 - skew) exp(-log(m/p)), 0 where p = 0
        a, b = mixture_log_ratios(lpt, lqt, skew)
        soft = T * T * np.sum(np.where(pt == 0, 0.0, -pt * b), axis=-1)
        return soft, _centred_gradient(qt, np.where(pt == 0, 0.0, -(1.0 - skew) * np.exp(-b)), T)
    if divergence == "skew_reverse_kl":
        # m = skew q + (1 - skew) p; a = log(m/q) = log(skew) + log1p(r), r = (1 - skew)/skew p/q. dD/dq_c =
        # log(q_c/m_c) + 1 - skew q_c/m_c is, but for a constant, x + log(1 - x) with x = r/(1 + r): ~ -x^2/2
        # where the student dominates (as at the class the gradient's shift is taken), whose two terms ~ x would
        # cancel to an ulp of x.
        _, a = mixture_log_ratios(lqt, lpt, skew)
        kl = np.sum(np.where(qt == 0, 0.0, -qt * a), axis=-1)
        with np.errstate(invalid="ignore", over="ignore", under="ignore"):
            d = lpt - lqt
            r, r_inv = ((1.0 - skew) / skew) * np.exp(d), (skew / (1.0 - skew)) * np.exp(-d)
            x = np.where(r <= 1.0, r / (1.0 + r), 1.0 / (1.0 + r_inv))
            log1m = -_log1p_weighted_exp(d, _weights(skew)[::-1])  # log(1 - x) = -log1p(r)
        phi = _x_plus_log1m(x, log1m)
        return T * T * kl, _centred_gradient(qt, phi, T)
    raise ValueError("reference: bad divergence")


@dataclass
class RefResult:
    loss: object  # Python float ("mean"/"sum") or float64 ndarray ("none")
    grad: np.ndarray  # float64, student's shape
    rows: np.ndarray  # float64 per-row losses, leading shape (0 for ignored rows)
    counted: np.ndarray  # bool mask of counted rows, leading shape
    loss_mag: object  # error-scale magnitude of the loss (same kind as ``loss``)
    grad_mag: np.ndarray  # error-scale magnitude of each gradient element


def _classify_labels(labels, one_d: bool, C: int):
    """Return (kind, array) with kind in {None, "index", "dist"} in 2-D row form."""
    if labels is None:
        return None, None
    arr = np.asarray(labels)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
        return "index", (arr.reshape(1) if one_d else arr)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        return "dist", (arr.reshape(1, C) if one_d else arr)
    raise TypeError(f"reference: unsupported label dtype {arr.dtype}")


def reference(
    student,
    teacher,
    labels=None,
    *,
    temperature: float,
    alpha: float,
    reduction: str = "mean",
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> RefResult:
    """Full float64 reference: loss, gradient, per-row losses and error scales."""
    beta, skew = float(beta), float(skew)
    _check_parameters(divergence, beta, skew)
    plain = plain_divergence(divergence, beta, skew)
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    if s.shape != t.shape or s.ndim not in (1, 2) or s.shape[-1] < 1:
        raise ValueError("reference: bad shapes")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError("reference: bad reduction")
    one_d = s.ndim == 1
    if one_d:
        s = s.reshape(1, -1)
        t = t.reshape(1, -1)
    B, C = s.shape
    T = float(temperature)
    a = float(alpha)
    kind, y = _classify_labels(labels, one_d, C)

    counted = np.ones(B, dtype=bool)
    if kind == "index":
        if y.shape != (B,):
            raise ValueError("reference: bad index label shape")
        counted = y != ignore_index
        if np.any((y[counted] < 0) | (y[counted] >= C)):
            raise ValueError("reference: label out of range")
    elif kind == "dist":
        if y.shape != (B, C):
            raise ValueError("reference: bad distribution label shape")
        if not np.all(np.isfinite(y)) or np.any(y < 0):
            raise ValueError("reference: bad distribution values")

    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        # ---------------- soft term ----------------
        lpt = log_softmax(t / T)
        lqt = log_softmax(s / T)
        pt = np.exp(lpt)
        qt = np.exp(lqt)
        soft, soft_grad = _soft_term(plain, beta, skew, lpt, lqt, pt, qt, T)

        fin = lambda v: np.where(np.isfinite(v), np.abs(v), 0.0)  # noqa: E731
        smax = np.max(fin(s), axis=-1, keepdims=True)
        tmax = np.max(fin(t), axis=-1, keepdims=True)
        logC = math.log(C) + 1.0
        soft_mag = (
            T
            * T
            * (
                np.sum(np.where(pt == 0, 0.0, pt * (fin(lpt) + fin(lqt))), axis=-1)
                + 2.0 * (smax[:, 0] + tmax[:, 0]) / T
                + logC
            )
        )
        soft_gmag = T * (fin(qt) + fin(pt)) * ((fin(s) + fin(t) + smax + tmax) / T + logC)
        if plain == "reverse_kl":
            soft_mag = (
                T * T * (np.sum(np.where(qt == 0, 0.0, qt * (fin(lpt) + fin(lqt))), axis=-1))
                + 2.0 * T * (smax[:, 0] + tmax[:, 0])
                + T * T * logC
            )
            soft_gmag = T * fin(qt) * ((fin(s) + fin(t) + 2 * (smax + tmax)) / T + logC + fin(soft)[:, None] / T**2)
        elif plain != "forward_kl":
            # A mixture: terms of both sides, each log ratio as large as either side's log-probability.
            both = fin(pt) + fin(qt)
            soft_mag = (
                T * T * np.sum(both * (fin(lpt) + fin(lqt)), axis=-1)
                + 2.0 * T * (smax[:, 0] + tmax[:, 0])
                + T * T * logC
            )
            soft_gmag = T * both * ((fin(s) + fin(t) + 2 * (smax + tmax)) / T + logC + fin(soft)[:, None] / T**2)

        # ---------------- hard term ----------------
        if kind is not None:
            lp1 = log_softmax(s)
            p1 = np.exp(lp1)
            if kind == "index":
                yy = np.zeros((B, C))
                rows_idx = np.nonzero(counted)[0]
                yy[rows_idx, y[rows_idx]] = 1.0
            else:
                yy = y
            hard_terms = np.where(yy == 0, 0.0, -yy * lp1)
            hard = np.sum(hard_terms, axis=-1)
            ysum = np.sum(yy, axis=-1, keepdims=True)
            hard_grad = p1 * ysum - yy
            hard_mag = np.sum(np.where(yy == 0, 0.0, yy * (fin(lp1) + 2 * smax + fin(s) + logC)), axis=-1)
            hard_gmag = (fin(p1) * ysum + yy) * (2 * smax + fin(s) + logC)

        # ---------------- combine ----------------
        if kind is None or a == 0.0:
            rows, grad = soft, soft_grad
            rmag, gmag = soft_mag, soft_gmag
        elif a == 1.0:
            rows, grad = hard, hard_grad
            rmag, gmag = hard_mag, hard_gmag
        else:
            rows = a * hard + (1.0 - a) * soft
            grad = (1.0 - a) * soft_grad + a * hard_grad
            rmag = a * hard_mag + (1.0 - a) * soft_mag
            gmag = (1.0 - a) * soft_gmag + a * hard_gmag

        rows = np.where(counted, rows, 0.0)
        grad = np.where(counted[:, None], grad, 0.0)
        rmag = np.where(counted, rmag, 0.0)
        gmag = np.where(counted[:, None], gmag, 0.0)

        n = int(np.count_nonzero(counted))
        if reduction == "none":
            loss = rows.copy()
            loss_mag = rmag.copy()
            if one_d:
                loss = loss.reshape(())
                loss_mag = loss_mag.reshape(())
        elif reduction == "sum":
            loss = float(np.sum(rows))
            loss_mag = float(np.sum(rmag))
        else:  # mean
            if n == 0:
                loss = 0.0
                loss_mag = 0.0
                grad = np.zeros_like(grad)
                gmag = np.zeros_like(gmag)
            else:
                loss = float(np.sum(rows)) / n
                loss_mag = float(np.sum(rmag)) / n
                grad = grad / n
                gmag = gmag / n

    if one_d:
        grad = grad.reshape(C)
        gmag = gmag.reshape(C)
        rows = rows.reshape(())
        counted = counted.reshape(())
    return RefResult(loss, grad, rows, counted, loss_mag, gmag)


def reference_loss(student, teacher, labels=None, **params):
    return reference(student, teacher, labels, **params).loss


def reference_grad(student, teacher, labels=None, **params):
    return reference(student, teacher, labels, **params).grad


# ---------------------------------------------------------------------------
# Brute-force, element-by-element implementation (pure Python ``math``).  Only
# used to cross-check the vectorised reference above on finite inputs.
# ---------------------------------------------------------------------------


def _bf_log_softmax(row):
    m = max(row)
    lse = math.log(math.fsum(math.exp(v - m) for v in row))
    return [v - m - lse for v in row]


def _bf_kl(u, v):
    """KL(u || v) of probability lists, 0 log 0 = 0."""
    return math.fsum(u[c] * math.log(u[c] / v[c]) for c in range(len(u)) if u[c] != 0.0)


def _bf_divergence(divergence, beta, skew, p, q):
    """D(p, q) and its partial derivatives dD/dq_c, straight from the definitions with m a plain sum of
    probabilities (un-simplified: the terms of the product rule written out, none cancelled by hand)."""
    C = len(p)
    if divergence == "forward_kl":
        return _bf_kl(p, q), [-p[c] / q[c] for c in range(C)]
    if divergence == "reverse_kl":
        return _bf_kl(q, p), [math.log(q[c] / p[c]) + 1.0 for c in range(C)]
    if divergence == "jsd":
        m = [beta * p[c] + (1.0 - beta) * q[c] for c in range(C)]
        d = beta * _bf_kl(p, m) + (1.0 - beta) * _bf_kl(q, m)
        # d/dq_c [beta p_c log(p_c/m_c)] = -beta p_c (1 - beta) / m_c
        # d/dq_c [(1 - beta) q_c log(q_c/m_c)] = (1 - beta) (log(q_c/m_c) + 1 - q_c (1 - beta) / m_c)
        dq = [
            -beta * p[c] * (1.0 - beta) / m[c]
            + (1.0 - beta) * (math.log(q[c] / m[c]) + 1.0 - q[c] * (1.0 - beta) / m[c])
            for c in range(C)
        ]
        return d, dq
    if divergence == "skew_forward_kl":
        m = [skew * p[c] + (1.0 - skew) * q[c] for c in range(C)]
        return _bf_kl(p, m), [-p[c] * (1.0 - skew) / m[c] for c in range(C)]
    if divergence == "skew_reverse_kl":
        m = [skew * q[c] + (1.0 - skew) * p[c] for c in range(C)]
        return _bf_kl(q, m), [math.log(q[c] / m[c]) + 1.0 - q[c] * skew / m[c] for c in range(C)]
    raise ValueError("brute force: bad divergence")


def brute_force_loss(
    student,
    teacher,
    labels=None,
    *,
    temperature,
    alpha,
    reduction="mean",
    ignore_index=-100,
    divergence="forward_kl",
    beta=0.5,
    skew=0.1,
):
    """Loss and gradient with explicit Python loops (finite logits only).

    The soft term's gradient is the chain rule through the softmax, sum_c dD/dq_c dq_c/ds_j with
    dq_c/ds_j = q_c (1[c=j] - q_j) / T, from the un-simplified partials of ``_bf_divergence``; the special
    parameter values (jsd's beta 0 and 1, a skew of 0) are the plain KLs by definition."""
    divergence = plain_divergence(divergence, float(beta), float(skew))
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    one_d = s.ndim == 1
    if one_d:
        s = s[None, :]
        t = t[None, :]
    B, C = s.shape
    T = float(temperature)
    a = float(alpha)
    lab = None if labels is None else np.asarray(labels)
    if lab is not None and one_d:
        lab = lab.reshape(1) if lab.dtype.kind in "iu" else lab.reshape(1, C)
    rows, grads, n = [], [], 0
    for i in range(B):
        if lab is not None and lab.dtype.kind in "iu" and int(lab[i]) == ignore_index:
            rows.append(0.0)
            grads.append([0.0] * C)
            continue
        n += 1
        lq = _bf_log_softmax([float(v) / T for v in s[i]])
        lp = _bf_log_softmax([float(v) / T for v in t[i]])
        if divergence == "forward_kl":
            soft = T * T * math.fsum(math.exp(lp[c]) * (lp[c] - lq[c]) for c in range(C))
            gsoft = [T * (math.exp(lq[c]) - math.exp(lp[c])) for c in range(C)]
        else:
            q = [math.exp(v) for v in lq]
            d, d_d_q = _bf_divergence(divergence, float(beta), float(skew), [math.exp(v) for v in lp], q)
            soft = T * T * d
            gsoft = [
                T * math.fsum(d_d_q[c] * q[c] * ((1.0 if c == j else 0.0) - q[j]) for c in range(C)) for j in range(C)
            ]
        if lab is None:
            rows.append(soft)
            grads.append(gsoft)
            continue
        if lab.dtype.kind in "iu":
            y = [1.0 if c == int(lab[i]) else 0.0 for c in range(C)]
        else:
            y = [float(v) for v in lab[i]]
        l1 = _bf_log_softmax([float(v) for v in s[i]])
        hard = -math.fsum(y[c] * l1[c] for c in range(C))
        ys = math.fsum(y)
        ghard = [math.exp(l1[c]) * ys - y[c] for c in range(C)]
        rows.append(a * hard + (1 - a) * soft)
        grads.append([(1 - a) * gsoft[c] + a * ghard[c] for c in range(C)])
    rows = np.array(rows, dtype=np.float64)
    grads = np.array(grads, dtype=np.float64).reshape(B, C)
    if reduction == "none":
        loss = rows.reshape(()) if one_d else rows
    elif reduction == "sum":
        loss = math.fsum(rows)
    else:
        loss = 0.0 if n == 0 else math.fsum(rows) / n
        if n:
            grads = grads / n
    if one_d:
        grads = grads.reshape(C)
    return loss, grads


# ---------------------------------------------------------------------------
# Sparse teachers (issue 17): the soft term against a teacher that lists a few classes per row.
# ---------------------------------------------------------------------------
#
# A row lists classes k in K with probabilities p_k = exp(logprobs_k) (a -inf slot is empty: not listed), and
# leaves the tail r = max(0, 1 - sum_k p_k) to the classes it does not list; r = 0 when it lists every class.
# With q = softmax(s/T) over all C classes and Q_u = sum_{c not in K} q_c (summed over the unlisted classes, as a
# log-sum-exp of their log-probabilities: never 1 - sum_k q_k, which cancels where the listed classes hold
# almost all of q):
#
#   "bucket"       soft = T^2 [sum_k p_k (log p_k - log q_k) + r (log r - log Q_u)]         (0 log 0 := 0)
#                  the KL between p and q coarse-grained to K + 1 bins (the listed classes and the rest).
#   "renormalize"  soft = T^2 sum_k pn_k (log pn_k - log q_k),  pn = p / sum_k p_k
#
# A row that lists nothing contributes 0 (loss and gradient) in both: there is nothing to match.
#
# Gradients, by hand (a = s/T, d log q_c / d a_j = [c = j] - q_j, d log Q_u / d a_j = q_j [j unlisted] / Q_u - q_j):
#
#   "bucket"       d soft/d s_j = T (P q_j - p_j)             j listed,     P = sum_k p_k + r
#                               = T q_j (P - r / Q_u)        j unlisted
#   "renormalize"  d soft/d s_j = T (q_j - pn_j)              j listed
#                               = T q_j                      j unlisted
#
# Where r > 0 but Q_u = 0 (the student rules out every unlisted class) the loss is +inf and the unlisted classes'
# gradient NaN (an infinite loss has no derivative), as for reverse KL; a listed class the student rules out makes
# the loss +inf and keeps the finite gradient -T p_j, as dense forward KL does.

SPARSE_TAILS = ("bucket", "renormalize")


class SparseSoft(NamedTuple):
    soft: np.ndarray  # float64 per-row soft losses T^2 D, of the leading shape
    grad: np.ndarray  # float64 d soft / d s of each row (the gradient of their sum), the student's shape


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis of a 2-D float64 array, as the largest plus log1p of the others' ratios to
    it (so that a sum near 1 keeps its distance from 1); -inf for a row of -inf."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        if x.shape[-1] == 0:
            return np.full(x.shape[:-1], -np.inf)
        top = np.argmax(x, axis=-1)[:, None]
        largest = np.take_along_axis(x, top, axis=-1)
        ratios = np.exp(x - largest)
        np.put_along_axis(ratios, top, 0.0, axis=-1)
        return np.where(largest[:, 0] == -np.inf, -np.inf, largest[:, 0] + np.log1p(np.sum(ratios, axis=-1)))


def scatter_teacher(indices, logprobs, classes: int):
    """The sparse teacher spread over all ``classes`` classes of each row, in float64 rows ``(rows, classes)``:
    ``(listed, log_p)``, the mask of the classes a row lists and their log-probabilities (-inf elsewhere).
    Refuses what is not a valid cache (an index out of range or listed twice in a row, NaN or +inf)."""
    indices = np.asarray(indices).astype(np.int64).reshape(-1, np.shape(indices)[-1])
    logprobs = np.asarray(logprobs).astype(np.float64).reshape(indices.shape)
    if np.isnan(logprobs).any() or np.isposinf(logprobs).any():
        raise ValueError("reference: NaN or +inf log-probabilities")
    filled = logprobs != -np.inf
    if np.any(filled & ((indices < 0) | (indices >= classes))):
        raise ValueError("reference: index out of range")
    rows = indices.shape[0]
    listed = np.zeros((rows, classes), dtype=bool)
    log_p = np.full((rows, classes), -np.inf)
    row_of = np.broadcast_to(np.arange(rows)[:, None], indices.shape)
    np.add.at(listed.view(np.uint8), (row_of[filled], indices[filled]), 1)  # a class listed twice counts 2
    if np.any(listed.view(np.uint8) > 1):
        raise ValueError("reference: a class listed twice in a row")
    log_p[row_of[filled], indices[filled]] = logprobs[filled]
    return listed, log_p


def sparse_soft_reference(student_logits, indices, logprobs, temperature: float, tail: str) -> SparseSoft:
    """The soft term against a sparse teacher and its gradient, per row, in float64 (see the formulas above).

    ``student_logits`` ``(..., C)``; ``indices`` and ``logprobs`` ``(..., K)`` of the same leading shape.
    """
    if tail not in SPARSE_TAILS:
        raise ValueError("reference: bad tail")
    s = np.asarray(student_logits, dtype=np.float64)
    if s.ndim < 1 or np.shape(indices) != np.shape(logprobs) or np.shape(indices)[:-1] != s.shape[:-1]:
        raise ValueError("reference: bad shapes")
    lead, C = s.shape[:-1], s.shape[-1]
    T = float(temperature)
    listed, log_p = scatter_teacher(indices, logprobs, C)
    s = s.reshape(-1, C)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        log_q = log_softmax(s / T)
        q = np.exp(log_q)
        p = np.exp(log_p)
        log_sum_p = _logsumexp_rows(log_p)  # log sum_k p_k, -inf when nothing is listed
        if tail == "bucket":
            every_class = listed.all(axis=-1)
            r = np.where(every_class, 0.0, np.maximum(-np.expm1(log_sum_p), 0.0))
            log_unlisted = _logsumexp_rows(np.where(listed, -np.inf, log_q))  # log Q_u
            listed_terms = np.sum(np.where(p == 0, 0.0, p * (log_p - log_q)), axis=-1)
            tail_term = np.where(r == 0, 0.0, r * (np.log(r) - log_unlisted))
            soft = T * T * (listed_terms + tail_term)
            P = (np.exp(log_sum_p) + r)[:, None]
            share = np.exp(log_q - log_unlisted[:, None])  # q_j / Q_u
            unlisted_grad = np.where(r[:, None] == 0, T * P * q, T * (P * q - r[:, None] * share))
            grad = np.where(listed, T * (P * q - p), unlisted_grad)
        else:
            log_pn = log_p - log_sum_p[:, None]
            pn = np.exp(log_pn)
            soft = T * T * np.sum(np.where(pn == 0, 0.0, pn * (log_pn - log_q)), axis=-1)
            grad = np.where(listed, T * (q - pn), T * q)
        # A row that lists nothing has nothing to match: 0 exactly (bucket: all of it is the tail, r = Q_u = 1; its
        # formula would leave the rounding of log Q_u ~ 1e-16).
        nothing = log_sum_p == -np.inf
        soft = np.where(nothing, 0.0, soft)
        grad = np.where(nothing[:, None], 0.0, grad)
    return SparseSoft(soft.reshape(lead), grad.reshape(*lead, C))


def dense_equivalent(teacher_logits, temperature: float):
    """A sparse teacher that lists every class of each row (K = C, the top-k of k = C): ``(indices, logprobs)``,
    int64 and float64, sorted by decreasing probability with ties in increasing class order, the log-probabilities
    the float64 log-softmax of ``teacher_logits / temperature``. With it the sparse soft term is the dense one."""
    t = np.asarray(teacher_logits, dtype=np.float64)
    lead, C = t.shape[:-1], t.shape[-1]
    t = t.reshape(-1, C)
    order = np.argsort(-t, axis=-1, kind="stable")
    logprobs = np.take_along_axis(log_softmax(t / float(temperature)), order, axis=-1)
    return order.reshape(*lead, C), logprobs.reshape(*lead, C)
