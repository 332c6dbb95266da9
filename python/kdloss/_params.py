"""The loss's hyper-parameters, one frozen type for every Python front end.

``kdloss.DistillationLoss`` keeps one (its ``repr``, ``==`` and pickling read it), and ``kdloss.torch`` passes one to
its autograd function and spells it out for its operators' schemas. A new parameter is a field here and its
check in :meth:`Parameters.checked`; the native class checks ranges (``temperature must be in [1e-30, 1e6]``),
so that C++ hosts get the same messages.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, NamedTuple

import numpy as np

from . import _core

# The native class's limit (DistillationLoss<T>::max_threads), checked here before pybind11 sees the number: one
# too large for its size_t would get pybind11's "incompatible constructor arguments".
MAX_THREADS = 4096

# The divergences the native class knows, as its messages list them ('forward_kl', 'reverse_kl', ...).
DIVERGENCES = ", ".join(f"'{name}'" for name in _core.divergence_names)

# The native class's smallest normaliser (kdloss::min_normalizer), whose reciprocal is finite.
MIN_NORMALIZER = sys.float_info.min


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_reduction(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"reduction must be one of 'mean', 'sum', 'none', got {value!r}")
    return value


def check_divergence(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"divergence must be one of {DIVERGENCES}, got {value!r}")
    return value


def check_tail(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"tail must be one of 'bucket', 'renormalize', got {value!r}")
    return value


def check_ignore_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer, got {value!r}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


def check_num_threads(value: Any) -> int | None:
    """None (every hardware thread) stays None; the native side is told 0 for it (:meth:`Parameters.native`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_threads must be a positive integer or None, got {value!r}")
    if value < 1:
        raise ValueError(f"num_threads must be >= 1 (or None for all cores), got {value}")
    if value > MAX_THREADS:
        raise ValueError(f"num_threads must be at most {MAX_THREADS}, got {value}")
    return int(value)


def check_normalizer(value: Any) -> float | None:
    """None: the reduction's own divisor."""
    if value is None:
        return None
    number = check_real("normalizer", value)
    if not (MIN_NORMALIZER <= number < float("inf")):  # as the native class checks it, for meta tensors
        raise ValueError(
            f"normalizer must be finite and >= {format_number(MIN_NORMALIZER)} (the smallest normal double), "
            f"got {format_number(number)}"
        )
    return number


# The highest temperature with a sparse teacher: distillation_loss.hpp's max_sparse_temperature (its loss has no
# pass for the cancellation of larger temperatures yet; the dense loss takes up to 1e6).
MAX_SPARSE_TEMPERATURE = 100.0


def format_number(value: float) -> str:
    """The shortest text that reads back as `value`, as the native messages write it (messages.hpp, std::to_chars):
    0, -1, 0.3, 100.5, 1e-300, 1e+06, inf, nan. Of the fixed and the scientific form of the shortest digits, the
    shorter, and the fixed one where they tie."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    fixed = np.format_float_positional(value, unique=True, trim="-")
    scientific = np.format_float_scientific(value, unique=True, trim="-", exp_digits=2)
    return scientific if len(scientific) < len(fixed) else fixed


class Parameters(NamedTuple):
    """Type-checked hyper-parameters, in the order of the constructors' arguments."""

    temperature: float = 3.0
    alpha: float = 0.3
    reduction: str = "mean"
    ignore_index: int = -100
    num_threads: int | None = None
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    tail: str = "bucket"

    @classmethod
    def checked(
        cls,
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
        """The arguments' types checked (and numbers made float or int), in the order the messages come in."""
        return cls(
            check_real("temperature", temperature),
            check_real("alpha", alpha),
            check_reduction(reduction),
            check_ignore_index(ignore_index),
            check_num_threads(num_threads),
            check_divergence(divergence),
            check_real("beta", beta),
            check_real("skew", skew),
            check_tail(tail),
        )

    def native(self) -> tuple[float, float, str, int, int, str, float, float, str]:
        """The native class's constructor arguments (it checks the ranges)."""
        return (*self[:4], 0 if self.num_threads is None else self.num_threads, *self[5:])

    def arguments(self) -> str:
        """``temperature=3.0, alpha=0.3, ...``: the keyword arguments that rebuild these, for ``repr``."""
        return ", ".join(f"{name}={value!r}" for name, value in self._asdict().items())
