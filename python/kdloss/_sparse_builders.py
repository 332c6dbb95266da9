"""The sparse-teacher builders ``kdloss.top_k`` and ``kdloss.sample_teacher``: teacher logits in, a
``SparseTeacher`` out, computed natively (csrc/include/kdloss/teacher_cache.hpp).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _arrays, _core
from ._params import check_num_threads, check_real
from ._sparse_teacher import SparseTeacher

__all__ = ["sample_teacher", "top_k"]

_FLOAT32, _FLOAT64, _FLOAT16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)

# What the caches record as their ``method``: give a SparseTeacherWriter the same, to append them.
TOP_K_METHOD = "top_k"
SAMPLE_METHOD = "sample"


def _teacher_logits(teacher_logits: Any) -> np.ndarray:
    """The logits in float32 or float64, as they are where the kernels read them in place (rows of contiguous
    elements), else converted once."""
    array = _arrays._as_array(teacher_logits)
    if array.dtype.kind != "f" or array.dtype not in (_FLOAT16, _FLOAT32, _FLOAT64):
        raise TypeError(f"teacher_logits must be float16, float32 or float64, got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError("teacher_logits must have at least one axis (..., C), got shape ()")
    if array.shape[-1] == 0:
        raise ValueError(f"teacher_logits must have at least one class, got shape {array.shape}")
    # There are no float16 kernels: float16 logits are converted to float32 once, here (a cache is written in
    # the dtype it is computed in).
    return _arrays._in_dtype(array, _FLOAT32 if array.dtype == _FLOAT16 else array.dtype)


def _check_count(name: str, value: Any, rule: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {rule}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be {rule}, got {value}")
    return int(value)


def top_k(
    teacher_logits: npt.ArrayLike, k: int, *, temperature: float, num_threads: int | None = None
) -> SparseTeacher:
    r"""The k most probable classes of each row of teacher logits, with their exact log-probabilities.

    For each row :math:`t` of ``C`` logits: the ``k`` largest logits (of equal ones, the lower index first), sorted
    by decreasing logit, and their log-softmax at ``temperature``,

    .. math::

        \log p_i = \frac{t_i - \max t}{T} - \log \sum_{c=1}^{C} e^{(t_c - \max t)/T},

    the sum over the whole row, so that the tail, the mass ``1 - sum(p)`` of the classes not listed, is known.

    Parameters
    ----------
    teacher_logits : array_like, shape (..., C)
        float32 or float64 (read in place, without a copy, when its rows are contiguous: NumPy arrays and any CPU
        array with ``__dlpack__``, PyTorch tensors included), or float16 (converted to float32 once).
    k : int
        Classes listed per row, in [1, C].
    temperature : float
        The softmax temperature, in [1e-30, 1e6], as :class:`kdloss.DistillationLoss` takes it: the cache is for a
        loss at this temperature (which takes a sparse teacher up to 100).
    num_threads : int or None, default None
        Rows are split over up to this many threads (None: all cores; 1: the calling thread). Results are
        bitwise identical whatever the count.

    Returns
    -------
    SparseTeacher
        ``indices`` int32 and ``logprobs`` of the compute dtype, both ``(..., k)``; ``temperature``,
        ``vocab_size = C`` and ``method = "top_k"`` recorded.

    Raises
    ------
    TypeError
        If ``teacher_logits`` is not floating-point (bool and integer logits are refused), or an argument is of the
        wrong type.
    ValueError
        If ``k`` is not in [1, C], ``temperature`` not in [1e-30, 1e6], ``teacher_logits`` has no class (or more
        than 2**31 - 1), or a row holds NaN or +inf, or only -inf (it has no softmax): the message names the first
        such row by its index in the leading shape, e.g. ``(3, 17)``.

    Notes
    -----
    ``-inf`` logits are masked classes: they are listed only in rows with fewer than ``k`` finite logits, with
    log-probability ``-inf`` (an empty slot). Indices are int32: a vocabulary has fewer than 2**31 classes, and
    int64 would double the cache's indices. The logits are read twice, each pass a Pack of 16 at a time: once for
    group maxima, whose k-th largest is a threshold that every one of the k largest logits reaches, and once for
    the exponential sum, taking out on the way the few logits at or above the threshold. No temporary of the
    logits' size is made.

    Examples
    --------
    >>> import numpy as np
    >>> import kdloss
    >>> logits = np.array([[2.0, 0.0, 2.0, 1.0]])
    >>> cache = kdloss.top_k(logits, 2, temperature=1.0)
    >>> cache.indices
    array([[0, 2]], dtype=int32)
    >>> np.exp(cache.logprobs).round(4)      # the tail, 1 - 0.799, is the mass of classes 1 and 3
    array([[0.3995, 0.3995]])
    """
    logits = _teacher_logits(teacher_logits)
    classes = logits.shape[-1]
    k = _check_count("k", k, f"an integer in [1, C] (C = {classes})", 1, classes)
    temperature = check_real("temperature", temperature)
    threads = check_num_threads(num_threads)
    indices, logprobs = _core.top_k(logits, k, temperature, 0 if threads is None else threads)
    return SparseTeacher(indices, logprobs, temperature=temperature, vocab_size=classes, method=TOP_K_METHOD)


def sample_teacher(
    teacher_logits: npt.ArrayLike,
    num_samples: int,
    *,
    temperature: float,
    seed: int,
    num_threads: int | None = None,
) -> SparseTeacher:
    r"""Classes drawn from each row's softmax, with their frequencies: a sampled (unbiased) sparse teacher.

    For each row :math:`t` of ``C`` logits: ``num_samples`` draws with replacement from
    :math:`\mathrm{softmax}(t / T)`; each class drawn is listed once, by decreasing count (of equal counts, the
    lower index first), with log-probability ``log(count / num_samples)``. A row's weights sum to exactly 1 (as
    counts), and the expected weight of each class is its probability: the Random-Sampling KD estimate
    (Anshumann et al., ACL 2025).

    Parameters
    ----------
    teacher_logits : array_like, shape (..., C)
        As in :func:`top_k`.
    num_samples : int
        Draws per row, >= 1.
    temperature : float
        The softmax temperature, in [1e-30, 1e6].
    seed : int
        In [0, 2**64). A row's draws depend on the seed and the row's index (its place in C order over the leading
        axes) alone, whatever ``num_threads`` is: the same call gives the same cache. A cache built in pieces should
        give each piece its own seed (e.g. ``base_seed + piece``), or their rows would repeat the first piece's
        draws.
    num_threads : int or None, default None
        As in :func:`top_k`.

    Returns
    -------
    SparseTeacher
        ``indices`` int32 and ``logprobs`` of the compute dtype, both ``(..., K)`` with ``K = min(num_samples, C)``;
        slots past a row's distinct classes are empty (log-probability ``-inf``, the index listed last repeated).
        ``temperature``, ``vocab_size = C`` and
        ``method = "sample"`` recorded (not the seed: the pieces of a cache built batch by batch, each with its own
        seed, must agree on their metadata to be written or concatenated together).

    Raises
    ------
    TypeError, ValueError
        As in :func:`top_k`, for ``num_samples`` below 1 and ``seed`` outside [0, 2**64).

    Notes
    -----
    A class of probability 0 (a ``-inf`` logit, or one whose exponential is below the compute dtype's normal range)
    is never drawn. The draws come from SplitMix64, a counter-based generator keyed by the seed and the row, and
    are placed by inverse transform against the exponentials' running sums in double precision (blocks of 64
    classes at a time): each class is drawn with its probability to the accuracy of its exponential (about 1e-7
    relative in float32).

    Examples
    --------
    >>> import numpy as np
    >>> import kdloss
    >>> logits = np.array([[0.0, -np.inf, 0.0]])   # class 1 is masked: it is never drawn
    >>> cache = kdloss.sample_teacher(logits, 8, temperature=1.0, seed=0)
    >>> cache.indices                               # K = min(8, 3) slots; the last is empty
    array([[2, 0, 0]], dtype=int32)
    >>> np.exp(cache.logprobs) * 8                  # the counts
    array([[5., 3., 0.]])
    """
    logits = _teacher_logits(teacher_logits)
    num_samples = _check_count("num_samples", num_samples, "an integer >= 1", 1, 2**63 - 1)
    temperature = check_real("temperature", temperature)
    seed = _check_count("seed", seed, "an integer in [0, 2**64)", 0, 2**64 - 1)
    threads = check_num_threads(num_threads)
    indices, logprobs = _core.sample_teacher(logits, num_samples, temperature, seed, 0 if threads is None else threads)
    return SparseTeacher(indices, logprobs, temperature=temperature, vocab_size=logits.shape[-1], method=SAMPLE_METHOD)
