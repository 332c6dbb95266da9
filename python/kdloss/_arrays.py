"""Turning user inputs into arrays the native core reads in place.

This is the one place where kdloss may copy an input: when its dtype is not the compute dtype or its rows
are not contiguous. float32/float64 inputs with contiguous rows pass through untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core

_COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = np.dtype(np.int64)
_INT64_MAX = np.iinfo(np.int64).max


def _as_array(value: Any) -> np.ndarray:
    """A NumPy view of `value`: arrays as they are, DLPack producers (PyTorch, JAX, CuPy host arrays) without a
    copy, anything else through np.asarray."""
    if type(value) is np.ndarray:
        return value
    if hasattr(value, "__dlpack__") and not isinstance(value, np.generic):
        return np.from_dlpack(value)
    return np.asarray(value)


def real_array(value: Any, name: str) -> np.ndarray:
    array = _as_array(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (a float or integer dtype), got dtype {array.dtype}")
    return array


def _in_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # The rule of what the kernels read in place lives once, in the binding (numpy_views.hpp).
    if array.dtype == dtype and _core.reads_in_place(array):
        return array
    return np.require(array, dtype=dtype, requirements=["C", "A"])


def logits_pair(student_logits: Any, teacher_logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both logits arrays in the compute dtype, ``np.result_type(student, teacher, np.float32)``."""
    # The common case, decided in a few attribute reads: small calls are dominated by this layer.
    if (
        type(student_logits) is np.ndarray
        and type(teacher_logits) is np.ndarray
        and student_logits.dtype is teacher_logits.dtype
        and student_logits.dtype in _COMPUTE_DTYPES
        and student_logits.flags.c_contiguous
        and teacher_logits.flags.c_contiguous
        and student_logits.flags.aligned
        and teacher_logits.flags.aligned
    ):
        return student_logits, teacher_logits
    student = real_array(student_logits, "student_logits")
    teacher = real_array(teacher_logits, "teacher_logits")
    dtype = np.result_type(student, teacher, np.float32)
    if dtype not in _COMPUTE_DTYPES:
        raise TypeError(
            f"student_logits and teacher_logits must compute in float32 or float64, but dtypes "
            f"{student.dtype} and {teacher.dtype} promote to {dtype}"
        )
    return _in_dtype(student, dtype), _in_dtype(teacher, dtype)


def student_alone(student: np.ndarray) -> np.ndarray:
    """The student's logits (a real array) in its compute dtype, ``np.result_type(student, np.float32)``: with a sparse
    teacher, whose log-probabilities are read as they are, the student alone decides it."""
    dtype = np.result_type(student, np.float32)
    if dtype not in _COMPUTE_DTYPES:
        raise TypeError(
            f"student_logits must compute in float32 or float64, but dtype {student.dtype} promotes to {dtype}"
        )
    return _in_dtype(student, dtype)


def sparse_teacher_arrays(indices: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sparse teacher's arrays as the native class reads them: in place, or copied once where their layout does
    not allow it (their dtypes are kept: the native class reads each one it accepts as it is)."""
    return tuple(array if _core.reads_in_place(array) else np.ascontiguousarray(array) for array in (indices, logprobs))


def floating_class_indices_message(labels_shape: tuple, logits_shape: tuple, labels_dtype: Any) -> str | None:
    """What to say of floating labels of the logits' leading shape: the shape of class indices, not of targets.

    Without it they would be refused as target distributions "of the wrong shape", which does not tell the
    caller that the dtype is what is wrong. Shared with kdloss.torch, so both say the same.
    """
    if tuple(labels_shape) != tuple(logits_shape[:-1]):
        return None
    return (
        f"true_labels of shape {tuple(labels_shape)} are class indices, which must be integers, got dtype "
        f"{labels_dtype} (target distributions have the logits' shape {tuple(logits_shape)})"
    )


def true_labels(labels: Any, dtype: np.dtype, logits_shape: tuple) -> np.ndarray | None:
    """Integer labels as int64 class indices; floating labels as target distributions in ``dtype``."""
    if labels is None:
        return None
    if type(labels) is np.ndarray and labels.dtype is _INT64 and labels.flags.c_contiguous and labels.flags.aligned:
        return labels
    array = _as_array(labels)
    kind = array.dtype.kind
    if kind in "iu":
        if kind == "u" and array.size and array.max() > _INT64_MAX:
            raise ValueError(f"true_labels holds a class index too large for int64: {array.max()}")
        return _in_dtype(array, _INT64)
    if kind == "f":
        message = floating_class_indices_message(array.shape, logits_shape, array.dtype)
        if message is not None:
            raise TypeError(message)
        return _in_dtype(array, dtype)
    raise TypeError(
        f"true_labels must be integer class indices or floating-point target distributions, got dtype {array.dtype}"
    )
