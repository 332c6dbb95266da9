"""Independent float64 NumPy reference for the kdloss distillation loss.

Written from the formulas in the specification only; it never imports ``kdloss``.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "log_softmax",
    "RefResult",
    "reference",
    "reference_loss",
    "reference_grad",
    "brute_force_loss",
]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis in float64, via max-subtraction.

    A row containing NaN or +inf, or made only of -inf, yields NaN everywhere;
    -inf entries of an otherwise finite row give -inf.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        z = x - m
        lse = np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
        return z - lse


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
) -> RefResult:
    """Full float64 reference: loss, gradient, per-row losses and error scales."""
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
        if divergence == "forward_kl":
            # teacher probability exactly 0 contributes 0 (also for -inf student there)
            soft_terms = np.where(pt == 0, 0.0, pt * (lpt - lqt))
            soft = T * T * np.sum(soft_terms, axis=-1)
            soft_grad = T * (qt - pt)
        elif divergence == "reverse_kl":
            # student probability exactly 0 contributes 0 (also for -inf teacher there)
            kl = np.sum(np.where(qt == 0, 0.0, qt * (lqt - lpt)), axis=-1)
            soft = T * T * kl
            # An infinite KL has no derivative: NaN where the student has mass.
            centred = np.where(np.isinf(kl)[:, None], np.nan, (lqt - lpt) - kl[:, None])
            soft_grad = np.where(qt == 0, 0.0, T * qt * centred)
        else:
            raise ValueError("reference: bad divergence")

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
        if divergence == "reverse_kl":
            soft_mag = (
                T * T * (np.sum(np.where(qt == 0, 0.0, qt * (fin(lpt) + fin(lqt))), axis=-1))
                + 2.0 * T * (smax[:, 0] + tmax[:, 0])
                + T * T * logC
            )
            soft_gmag = T * fin(qt) * ((fin(s) + fin(t) + 2 * (smax + tmax)) / T + logC + fin(soft)[:, None] / T**2)

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


def brute_force_loss(
    student, teacher, labels=None, *, temperature, alpha, reduction="mean", ignore_index=-100, divergence="forward_kl"
):
    """Loss and gradient with explicit Python loops (finite logits only)."""
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
        else:  # reverse KL, its gradient from the chain rule through softmax: sum_c dKL/dq_c dq_c/ds_j
            q = [math.exp(v) for v in lq]
            soft = T * T * math.fsum(q[c] * (lq[c] - lp[c]) for c in range(C))
            d_kl_d_q = [lq[c] - lp[c] + 1.0 for c in range(C)]
            gsoft = [
                T * math.fsum(d_kl_d_q[c] * q[c] * ((1.0 if c == j else 0.0) - q[j]) for c in range(C))
                for j in range(C)
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
