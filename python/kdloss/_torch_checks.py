"""What kdloss.torch checks before any kernel runs, on every device (``meta`` and fake tensors included).

The checks that do not depend on values are made here, in the order and with the messages of the NumPy class
(``kdloss.DistillationLoss``), whose native validation makes them again on the CPU. A call on ``meta`` tensors or
under ``torch.compile``'s fake tensors therefore fails exactly as the same call on the CPU would. Values (label
ranges, a normaliser held in a tensor) can only be checked where the data is, by the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

from ._arrays import floating_class_indices_message
from ._loss import DistillationLoss as NumpyDistillationLoss
from ._params import Parameters


def validated_params(
    temperature: Any,
    alpha: Any,
    reduction: Any,
    ignore_index: Any,
    num_threads: Any,
    divergence: Any = "forward_kl",
    beta: Any = 0.5,
    skew: Any = 0.1,
    tail: Any = "bucket",
) -> Parameters:
    """The parameters as the NumPy class takes them: its type checks and messages, then its range checks."""
    params = Parameters.checked(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail)
    # The range checks ("temperature must be in [1e-30, 100]", ...) live in the native class. torch.compile
    # cannot trace its constructor; there the operators' fake implementations run this function for real.
    if not torch.compiler.is_compiling():
        engine(params)
    return params


@functools.lru_cache(maxsize=64)
def engine(params: Parameters) -> NumpyDistillationLoss:
    """The NumPy-facing loss object for these (type-checked) parameters; it checks their ranges.

    Cached because a training loop calls the operators with the same parameters every step. The objects are
    never mutated here (their setters are not used), so they are safe to share between threads.
    """
    return NumpyDistillationLoss(**params._asdict())


def check_shapes(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    params: Parameters,
    has_normalizer: bool,
) -> None:
    """The NumPy class's shape rules, in its order: binding (teacher, axes, labels), then core (normaliser, C)."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {_shape(student.shape)}, got {_shape(teacher.shape)}"
        )
    if student.ndim == 0:
        raise ValueError("student_logits must have at least one axis (..., C), got shape ()")
    if labels is not None:
        if labels.is_floating_point():
            check_floating_labels(labels, student)
            if labels.shape != student.shape:
                raise ValueError(
                    "true_labels as target distributions must have the shape of student_logits "
                    f"{_shape(student.shape)}, got {_shape(labels.shape)}"
                )
        elif labels.shape != student.shape[:-1]:
            raise ValueError(
                f"true_labels as class indices must have shape {_shape(student.shape[:-1])}, got {_shape(labels.shape)}"
            )
    if has_normalizer and params.reduction == "none":
        raise ValueError("normalizer needs reduction 'mean' or 'sum', not 'none'")
    if student.shape[-1] == 0:
        # The core sees the leading axes collapsed into rows and names the shape it sees.
        rows = math.prod(student.shape[:-1])
        raise ValueError(f"student_logits must have at least one class, got shape ({rows}, 0)")


def check_floating_labels(labels: torch.Tensor, student: torch.Tensor) -> None:
    """Floating labels of the logits' leading shape are class indices of the wrong dtype, said as NumPy says it."""
    message = floating_class_indices_message(labels.shape, student.shape, str(labels.dtype).removeprefix("torch."))
    if message is not None:
        raise TypeError(message)


def _shape(shape: torch.Size) -> str:
    return str(tuple(shape))
