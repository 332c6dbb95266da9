"""What kdloss.torch checks before any kernel runs, on every device (``meta`` and fake tensors included).

The checks that do not depend on values are made here, in the order and with the messages of the NumPy class
(``kdloss.DistillationLoss``), whose native validation makes them again on the CPU. A call on ``meta`` tensors or
under ``torch.compile``'s fake tensors therefore fails exactly as the same call on the CPU would. Values (label
ranges, a normaliser held in a tensor) can only be checked where the data is, by the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Union

import numpy as np
import torch

from ._arrays import floating_class_indices_message
from ._loss import DistillationLoss as NumpyDistillationLoss
from ._params import MAX_SPARSE_TEMPERATURE, Parameters, format_number
from ._sparse_teacher import check_structure


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
    # The range checks ("temperature must be in [1e-30, 1e6]", ...) live in the native class. torch.compile
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
    _check_label_shapes(student, labels)
    if has_normalizer and params.reduction == "none":
        raise ValueError("normalizer needs reduction 'mean' or 'sum', not 'none'")
    _check_classes(student)


def check_sparse_structure(indices: torch.Tensor, logprobs: torch.Tensor) -> None:
    """What ``kdloss.SparseTeacher`` requires of its two arrays (dtypes, shapes), with its messages: the sparse
    operators take the arrays themselves."""
    check_structure(_numpy_dtype(indices.dtype), indices.shape, _numpy_dtype(logprobs.dtype), logprobs.shape)


def check_sparse_shapes(
    student: torch.Tensor,
    teacher_shape: tuple[int, ...],
    labels: Optional[torch.Tensor],
    params: Parameters,
    has_normalizer: bool,
) -> None:
    """check_shapes() for a sparse teacher whose arrays have the shape ``teacher_shape`` (..., K), their structure
    checked: the NumPy class's rules in its order, binding (axes, leading shape, labels), then core (normaliser,
    divergence, C). The cache's contents (indices in range, no duplicates, no NaN, sums at most 1) are values: the
    kernel checks them."""
    if student.ndim == 0:
        raise ValueError("student_logits must have at least one axis (..., C), got shape ()")
    teacher_shape = tuple(teacher_shape)
    if len(teacher_shape) != student.ndim or teacher_shape[:-1] != tuple(student.shape[:-1]):
        raise ValueError(
            f"a sparse teacher must have the leading shape of student_logits {_shape(student.shape[:-1])}, "
            f"got indices {_shape(teacher_shape)} and logprobs {_shape(teacher_shape)}"
        )
    _check_label_shapes(student, labels)
    if has_normalizer and params.reduction == "none":
        raise ValueError("normalizer needs reduction 'mean' or 'sum', not 'none'")
    if params.divergence != "forward_kl":
        raise ValueError(
            f"divergence '{params.divergence}' needs the teacher's whole distribution: a sparse teacher takes "
            "divergence 'forward_kl' only"
        )
    if params.temperature > MAX_SPARSE_TEMPERATURE:
        raise ValueError(
            f"temperature must be at most {format_number(MAX_SPARSE_TEMPERATURE)} with a sparse teacher (where kdloss "
            f"is accurate), got {format_number(params.temperature)}"
        )
    _check_classes(student)


def _check_label_shapes(student: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
    if labels is None:
        return
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


def _check_classes(student: torch.Tensor) -> None:
    if student.shape[-1] == 0:
        # The core sees the leading axes collapsed into rows and names the shape it sees.
        rows = math.prod(student.shape[:-1])
        raise ValueError(f"student_logits must have at least one class, got shape ({rows}, 0)")


# The dtypes a sparse teacher's arrays may have, as torch spells them; any other is named as torch names it.
_NUMPY_DTYPES = {
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}
TORCH_DTYPES = {numpy: torch_dtype for torch_dtype, numpy in _NUMPY_DTYPES.items()}


def _numpy_dtype(dtype: torch.dtype) -> Union[np.dtype, str]:
    return _NUMPY_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def check_floating_labels(labels: torch.Tensor, student: torch.Tensor) -> None:
    """Floating labels of the logits' leading shape are class indices of the wrong dtype, said as NumPy says it."""
    message = floating_class_indices_message(labels.shape, student.shape, str(labels.dtype).removeprefix("torch."))
    if message is not None:
        raise TypeError(message)


def _shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))
