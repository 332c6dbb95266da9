"""A drop-in for TRL's GKD loss, ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (TRL 1.16), on kdloss.

TRL computes the generalized Jensen-Shannon divergence of every token with unfused autograd operations: log-softmax
of both sides, a stacked (2, ..., V) tensor for the mixture's log-sum-exp, two element-wise ``kl_div`` and their
weighted sum, each a temporary of the logits' size, and as many again in backward. Here the same number comes from
one native call of :func:`kdloss.torch.distillation_loss` with ``divergence="jsd"``, which returns the loss and its
exact gradient and keeps no temporary of the logits' size but the gradient itself.

How TRL's arguments map onto that call (TRL has no T^2 factor; kdloss's soft term is T^2 D, so every divisor below
is multiplied by T^2, folded into the kernel's ``normalizer``, which divides loss and gradient in the same pass):

- ``labels``: TRL only masks with them (``labels != -100``; the values are never read otherwise). The kernel gets
  class indices 0 for kept rows and -100 for masked ones, so labels outside the vocabulary mask as TRL masks;
  ``alpha=0``, so no hard term.
- ``num_items_in_batch`` (when given, it overrides ``reduction``, as in TRL): sum / num_items_in_batch.
- ``"batchmean"``: sum / number of kept rows (at least 1) with labels; without labels sum / ``max(shape[0], 1)``,
  TRL's ``jsd.size(0)``: for (B, S, V) logits that is B, not B*S.
- ``"sum"``: the sum. ``"mean"``: TRL's ``jsd.mean()`` over every *element* of the (masked) (rows, V) tensor, so
  sum / (kept rows * V); NaN when that is 0, with a zero gradient, as TRL's.
- ``"none"``: TRL returns the per-element terms, (B, S, V) (or ``(kept rows, V)`` with labels). The kernel only
  forms per-row sums, so this reduction is computed with torch operations, unfused (a NaN-safe version of TRL's
  own arithmetic); it is as slow as TRL's.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from ._params import MIN_NORMALIZER
from ._torch_autograd import _log_mixture
from ._torch_checks import validated_params

__all__ = ["generalized_jsd_loss"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
TRL_IGNORE_INDEX = -100  # TRL's mask value, fixed in its code (not an argument)


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Union[int, float, Tensor, None] = None,
    *,
    num_threads: Optional[int] = None,
) -> Tensor:
    r"""TRL's GKD loss (``GKDTrainer.generalized_jsd_loss``, TRL 1.16), computed by kdloss's fused CPU kernel.

    Per token, with :math:`p = \mathrm{softmax}(t/T)` (teacher) and :math:`q = \mathrm{softmax}(s/T)` (student),
    the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, eq. 1)

    .. math:: \beta\,\mathrm{KL}(p\,\|\,m) + (1-\beta)\,\mathrm{KL}(q\,\|\,m), \quad m = \beta p + (1-\beta) q,

    with :math:`\beta = 0` meaning :math:`\mathrm{KL}(p\,\|\,q)` and :math:`\beta = 1` meaning
    :math:`\mathrm{KL}(q\,\|\,p)`, as in TRL. There is no :math:`T^2` factor (TRL has none). The arguments, the
    masking and the reductions are TRL's, and so are the value and the gradient (on finite logits, to rounding).

    Parameters
    ----------
    student_logits : torch.Tensor, shape (..., V)
        Student logits on the CPU, e.g. (B, S, V) or (N, V); non-contiguous views (TRL's ``logits[:, :-1, :]``) are
        fine. float32/float64 are read in place; float16/bfloat16 are computed in float32.
    teacher_logits : torch.Tensor, same shape
        Teacher logits. Never receives a gradient (TRL computes them under ``torch.no_grad()``).
    labels : torch.Tensor, optional
        Of the logits' leading shape; positions where ``labels == -100`` are left out. Only the mask is used.
    beta : float, default 0.5
        The mixture's weight, in [0, 1].
    temperature : float, default 1.0
        Softmax temperature, in [1e-30, 1e6] (kdloss's range; TRL takes any positive number).
    reduction : {"batchmean", "sum", "mean", "none"}, default "batchmean"
        As TRL: "batchmean" divides the sum by the number of kept positions (labels given) or by
        ``shape[0]`` (no labels); "mean" by the number of kept *elements* (positions x V); "none" returns the
        per-element terms, (..., V), or (kept positions, V) with labels, computed with torch operations (not
        fused; as slow as TRL's).
    num_items_in_batch : int, float or torch.Tensor, optional
        When given, the loss is the sum divided by this (TRL's gradient-accumulation normalisation) and
        `reduction` is not used.
    num_threads : int, optional
        kdloss's threads for this call (keyword only; not in TRL's signature). Default: ``torch.get_num_threads()``,
        the threads TRL's torch operations would use.

    Returns
    -------
    torch.Tensor
        A 0-d tensor (per-element terms for "none"), in TRL's result dtype: that of the logits (the promotion of
        the two dtypes), and with a floating tensor ``num_items_in_batch`` the promotion with its dtype too. For
        bfloat16/float16 logits kdloss computes in float32 and rounds the result to that dtype at the end, where
        TRL computes in bfloat16 throughout (and rounds beta to bfloat16), so kdloss's value is the closer one.

    Raises
    ------
    ValueError
        For an unknown `reduction` (TRL treats any unknown one as "none"), `beta` outside [0, 1] (TRL returns NaN)
        or `temperature` outside kdloss's range, or labels of the wrong shape; with kdloss's messages.
    TypeError, RuntimeError
        As :func:`kdloss.torch.distillation_loss` (e.g. tensors not on the CPU).

    Notes
    -----
    On logits with ``-inf`` entries TRL returns NaN (``0 * -inf`` in ``kl_div``); kdloss returns the divergence,
    where a class ruled out by both sides contributes nothing and the mixture stays finite for 0 < beta < 1.

    Examples
    --------
    >>> import torch
    >>> import kdloss.torch
    >>> student = torch.tensor([[[1.0, 2.0, 0.5], [0.3, 0.1, 2.0]]], requires_grad=True)  # (B, S, V)
    >>> teacher = torch.tensor([[[1.5, 1.8, 0.6], [0.0, 1.0, 1.0]]])
    >>> labels = torch.tensor([[2, -100]])  # the second position is masked
    >>> loss = kdloss.torch.generalized_jsd_loss(student, teacher, labels, beta=0.5)
    >>> round(loss.item(), 6)
    0.011711
    >>> loss.backward()
    >>> student.grad[0, 1].tolist()  # masked: no gradient
    [0.0, 0.0, 0.0]

    The swap in TRL's GKD trainer is one assignment before training; ``staticmethod`` is needed because TRL
    defines the loss as one and calls it as ``self.generalized_jsd_loss(...)``. The logits must be on the CPU:

    >>> from trl.experimental.gkd import GKDTrainer  # doctest: +SKIP
    >>> GKDTrainer.generalized_jsd_loss = staticmethod(kdloss.torch.generalized_jsd_loss)  # doctest: +SKIP
    """
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'batchmean', 'sum', 'mean', 'none', got {reduction!r}")
    threads = torch.get_num_threads() if num_threads is None else num_threads
    # kdloss's checks and messages ("beta must be in [0, 1], got 2", "temperature must be in ...").
    params = validated_params(temperature, 0.0, "sum", TRL_IGNORE_INDEX, threads, "jsd", beta)
    if not (isinstance(student_logits, Tensor) and isinstance(teacher_logits, Tensor)):
        raise TypeError(
            "student_logits and teacher_logits must be torch.Tensors, got "
            f"{type(student_logits).__name__} and {type(teacher_logits).__name__}"
        )
    # TRL's result dtype: its arithmetic runs in the promotion of the two logits' dtypes.
    result_dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    kept = None
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels must have the logits' leading shape {tuple(student_logits.shape[:-1])}, "
                f"got {tuple(labels.shape)}"
            )
        kept = labels.detach() != TRL_IGNORE_INDEX

    if reduction == "none" and num_items_in_batch is None:
        return _elementwise_loss(student_logits, teacher_logits, kept, params).to(result_dtype)

    # The kernel sums T^2 D over the kept positions and divides loss and gradient by its `normalizer` in the same
    # pass: TRL's divisor times T^2, so that the T^2 cancels.
    square = params.temperature * params.temperature
    normalizer: Union[float, Tensor, None]
    divide_by = None  # a divisor the kernel cannot take, divided in torch afterwards as TRL divides
    empty_mean = None
    if num_items_in_batch is not None:
        normalizer = _folded(num_items_in_batch, square)
        if normalizer is None:
            normalizer, divide_by = square, num_items_in_batch
            result_dtype = _trl_division_dtype(result_dtype, num_items_in_batch)
        elif isinstance(num_items_in_batch, Tensor):
            result_dtype = _trl_division_dtype(result_dtype, num_items_in_batch)
    elif reduction == "batchmean":
        normalizer = (
            _count(kept).clamp(min=1) * square if kept is not None else max(student_logits.shape[0], 1) * square
        )
    elif reduction == "sum":
        normalizer = square
    else:  # "mean": TRL's jsd.mean() over every element of its (kept positions, V) tensor
        elements = (_count(kept) if kept is not None else math.prod(student_logits.shape[:-1])) * student_logits.shape[
            -1
        ]
        empty_mean = torch.as_tensor(elements) == 0
        normalizer = (elements.clamp(min=1) if isinstance(elements, Tensor) else max(elements, 1)) * square
    if isinstance(normalizer, float) and normalizer == 1:
        normalizer = None  # nothing to divide

    index_labels = None
    if kept is not None:
        # Class 0 for a kept position, -100 for a masked one: the kernel's mask, whatever the labels' values.
        index_labels = torch.where(kept, 0, TRL_IGNORE_INDEX)
    from .torch import _distillation_loss  # kdloss.torch imports this module

    loss = _distillation_loss(params, student_logits, teacher_logits, index_labels, normalizer)
    if divide_by is not None:
        loss = loss / (divide_by.to(loss.device) if isinstance(divide_by, Tensor) else divide_by)
    elif empty_mean is not None:
        # TRL's mean of no elements is NaN, with a zero gradient; the kernel divided by 1 instead of 0.
        loss = torch.where(empty_mean, torch.full((), math.nan, dtype=loss.dtype), loss)
    return loss.to(result_dtype)


def _count(kept: Tensor) -> Tensor:
    """The number of kept positions, as a float64 tensor (no .item(): traceable, and exact up to 2^53)."""
    return kept.sum(dtype=torch.float64)


def _folded(divisor: Union[int, float, Tensor], square: float) -> Optional[float]:
    """``num_items_in_batch * T^2`` as the kernel's normalizer, or None where the kernel cannot take it: not a
    positive finite number (TRL's division then gives its inf or NaN), a tensor of other than one element and no
    axes (TRL's division broadcasts), or a tensor whose value cannot be read here (under torch.compile)."""
    if isinstance(divisor, Tensor):
        if divisor.ndim != 0 or divisor.is_complex() or torch.compiler.is_compiling():
            return None
        divisor = divisor.item()
    if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real):
        return None
    value = float(divisor) * square
    return value if MIN_NORMALIZER <= value < math.inf else None


def _trl_division_dtype(dtype: torch.dtype, divisor: Union[int, float, Tensor]) -> torch.dtype:
    """The dtype of TRL's ``jsd_sum / num_items_in_batch``, jsd_sum being a 0-d tensor of `dtype`."""
    if not isinstance(divisor, Tensor):
        return dtype  # a Python number does not promote a tensor
    return torch.result_type(torch.empty((), dtype=dtype), divisor)


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """The element-wise terms of KL(a || b), e^log_a (log_a - log_b) (TRL's ``kl_div(log_b, log_a,
    log_target=True)``), with 0 where a has no mass (0 log 0 = 0) and derivatives free of that 0 * inf."""
    dead = log_a == -math.inf
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    log_a, log_b = torch.where(dead, zero, log_a), torch.where(dead, zero, log_b)
    return torch.where(dead, zero, torch.exp(log_a) * (log_a - log_b))


def _elementwise_loss(student: Tensor, teacher: Tensor, kept: Optional[Tensor], params) -> Tensor:
    """reduction="none": TRL's per-element terms from torch operations, in kdloss's compute dtype."""
    from .torch import _check_logits

    student = _check_logits("student_logits", student)
    teacher = _check_logits("teacher_logits", teacher)
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    temperature, beta = params.temperature, params.beta
    log_q = torch.log_softmax(student.to(dtype) / temperature, -1)
    log_p = torch.log_softmax(teacher.detach().to(dtype) / temperature, -1)
    if beta == 0:
        terms = _kl_terms(log_p, log_q)
    elif beta == 1:
        terms = _kl_terms(log_q, log_p)
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * _kl_terms(log_p, log_m) + (1 - beta) * _kl_terms(log_q, log_m)
    return terms if kept is None else terms[kept]
