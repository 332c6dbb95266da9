"""A sparse teacher: the few classes of each row a teacher's distribution is kept as, and how they are stored.

``SparseTeacher`` holds two arrays of one shape ``(..., K)``: the class indices a row lists and the natural log of
the teacher's probability of each. It reads its arrays in place (NumPy arrays, memory maps, CPU tensors through
DLPack), checks their structure in O(1) when built, and their contents in O(rows * K) when asked
(:meth:`SparseTeacher.validate`). A cache is stored as a directory of two ``.npy`` files and a JSON file that NumPy
alone can read, written whole or not at all, in one go (:meth:`SparseTeacher.save`) or batch by batch
(:class:`SparseTeacherWriter`), and loaded memory-mapped (:meth:`SparseTeacher.load`).

The messages of the content checks are built by the functions ``*_message`` below, so that the loss's native
checks can say exactly the same.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import numpy.typing as npt

from . import _arrays, _core
from ._core import __version__
from ._params import Parameters, check_real, format_number

__all__ = ["SparseTeacher", "SparseTeacherWriter"]

PathLike = Union[str, "os.PathLike[str]"]

INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
LOGPROB_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

# A row's listed probabilities may sum to this much above 1: what float32 logarithms of probabilities that sum to 1
# (a top-k of k = C, a sampled row's count/num_samples weights) add up to after rounding, with room to spare.
PROBABILITY_TOLERANCE = 1e-6
# Half-precision log-probabilities are each rounded by up to 2^-11 of themselves, which moves a probability p by up
# to p |log p| 2^-11: a row of them may sum to PROBABILITY_TOLERANCE + HALF_ROUNDING * sum p |log p| above 1.
HALF_ROUNDING = 2.0**-11

FORMAT = "kdloss.sparse_teacher"
VERSION = 1
INDICES_FILE = "indices.npy"
LOGPROBS_FILE = "logprobs.npy"
METADATA_FILE = "metadata.json"

MMAP_MODES = (None, "r", "r+", "c")

# Content checks, the tail and non-contiguous saves go through the rows in pieces of about this many slots, so
# that a memory-mapped cache larger than RAM needs a few such pieces of memory, not the whole cache.
_CHUNK_SLOTS = 1 << 20


# ---------------------------------------------------------------------------------------------------------------
# The content checks' messages. The native checks of the loss build the same text; ``row`` is a row's index in the
# leading shape, as a tuple: ``(3, 17)``, ``(2,)``, or ``()`` for the one row of a cache of leading shape ().
# ---------------------------------------------------------------------------------------------------------------


def format_row(row: tuple[int, ...]) -> str:
    """``(3, 17)``, ``(2,)``, ``()``: a row's index in the leading shape, as Python writes a tuple."""
    return str(tuple(int(i) for i in row))


def nan_message(row: tuple[int, ...]) -> str:
    return f"logprobs of row {format_row(row)} hold NaN"


def positive_infinity_message(row: tuple[int, ...]) -> str:
    return f"logprobs of row {format_row(row)} hold +inf"


def index_range_message(row: tuple[int, ...], index: int, vocab_size: int | None) -> str:
    """An index outside [0, vocab_size); without a vocabulary size only negative indices are known to be wrong."""
    if vocab_size is None:
        return f"indices of row {format_row(row)} hold {int(index)}, a negative class index"
    return f"indices of row {format_row(row)} hold {int(index)}, outside [0, {int(vocab_size)})"


def duplicate_message(row: tuple[int, ...], index: int) -> str:
    return f"indices of row {format_row(row)} list class {int(index)} more than once"


def probability_sum_message(row: tuple[int, ...], total: float, tolerance: float = PROBABILITY_TOLERANCE) -> str:
    allowed = "1e-6" if tolerance == PROBABILITY_TOLERANCE else format_number(float(tolerance))
    total_text = format_number(float(total))
    return f"logprobs of row {format_row(row)} sum to probability {total_text} > 1 (+{allowed} for rounding)"


# ---------------------------------------------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------------------------------------------


def _check_temperature(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"temperature must be a real number or None, got {value!r}")
    temperature = check_real("temperature", value)
    # The range and its message are the native class's, as DistillationLoss states them: one place for both.
    _core.DistillationLoss(*Parameters(temperature=temperature, num_threads=1).native())
    return temperature


def _check_vocab_size(value: Any, k: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"vocab_size must be an integer or None, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"vocab_size must be >= 1, got {value}")
    if k is not None and k > value:
        raise ValueError(f"vocab_size must be at least K = {k} (a row lists distinct classes), got {value}")
    return value


def _check_method(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"method must be a string or None, got {value!r}")
    return value


def _check_index_dtype(dtype: np.dtype | str, name: str) -> np.dtype | str:
    if dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got dtype {dtype}")
    return dtype


def _check_logprob_dtype(dtype: np.dtype | str, name: str) -> np.dtype | str:
    if dtype not in LOGPROB_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {dtype}")
    return dtype


def check_structure(
    index_dtype: np.dtype | str, index_shape: Sequence[int], logprob_dtype: np.dtype | str, logprob_shape: Sequence[int]
) -> None:
    """What a sparse teacher's two arrays must be, whatever holds them (``SparseTeacher``, and ``kdloss.torch``'s
    operators on any device): their dtypes, at least one axis, one shape, K >= 1 slots."""
    _check_index_dtype(index_dtype, "indices")
    _check_logprob_dtype(logprob_dtype, "logprobs")
    index_shape, logprob_shape = tuple(index_shape), tuple(logprob_shape)
    for name, shape in (("indices", index_shape), ("logprobs", logprob_shape)):
        if not shape:
            raise ValueError(f"{name} must have at least one axis (the K slots of a row), got shape ()")
    if index_shape != logprob_shape:
        raise ValueError(f"indices and logprobs must have the same shape, got {index_shape} and {logprob_shape}")
    if index_shape[-1] < 1:
        raise ValueError(f"indices and logprobs must have K >= 1 slots on their last axis, got shape {index_shape}")


def _rows_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _first_axis_pieces(array: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``array`` along its first axis, each of about ``_CHUNK_SLOTS`` elements (at least one index)."""
    if array.ndim < 2:
        yield array
        return
    step = max(1, _CHUNK_SLOTS // max(1, math.prod(array.shape[1:])))
    for start in range(0, array.shape[0], step):
        yield array[start : start + step]


class SparseTeacher:
    r"""A teacher's distribution kept as a few classes per row: a top-k or sampled cache of its outputs.

    Parameters
    ----------
    indices : array_like of int32 or int64, shape (..., K)
        The classes each row lists, in [0, C), each at most once in a row. The index of an empty slot is ignored
        (padding may repeat any value).
    logprobs : array_like of float16, float32 or float64, shape (..., K)
        The natural log of the teacher's probability of each listed class, at the temperature the loss uses;
        ``-inf`` marks an empty slot (a row may list fewer than K classes). A row's probabilities sum to at most
        1 (+1e-6 for rounding); the rest, the *tail*, is the mass of the classes it does not list.
    temperature : float, optional
        The temperature the log-probabilities are at, in [1e-30, 1e6] (None: not recorded). Metadata: stored
        with the cache, never applied to the values.
    vocab_size : int, optional
        C, the number of classes of the teacher's distribution (None: not recorded), at least K.
    method : str, optional
        How the cache was built, e.g. ``"top_k"`` or ``"sample"`` (the builders :func:`kdloss.top_k` and
        :func:`kdloss.sample_teacher` record theirs). Free text, stored with the cache.

    Raises
    ------
    TypeError
        If ``indices`` are not int32/int64 (nothing is cast: an int16 or uint32 array is refused, not converted),
        ``logprobs`` not float16/float32/float64, or a parameter is of the wrong type.
    ValueError
        If the two shapes differ, are 0-d or have K = 0, ``temperature`` is not in [1e-30, 1e6], or
        ``vocab_size`` is below 1 or below K.

    Notes
    -----
    **Rows.** The leading shape ``(...)`` is that of the student logits ``(..., C)`` the cache goes with: ``(B,)``
    for a batch, ``(B, S)`` for sequences, and ``()`` for the one row of ``(C,)`` logits (arrays of shape
    ``(K,)``). ``len(cache)`` is the length of the first axis (a ``TypeError`` for one row, as for a 0-d array).

    **No copies.** NumPy arrays, memory maps and CPU arrays with ``__dlpack__`` (PyTorch tensors) are kept as they
    are, views of the caller's memory; any layout is kept, but the loss reads in place only arrays whose last
    axis is contiguous (C-contiguous arrays, and row slices of them). Only the structure is checked here, in
    O(1); :meth:`validate` checks the contents (index range, duplicates, NaN, sums above 1), in O(rows * K).

    **Indexing** over the leading axes (never the K axis): ``cache[i]``, ``cache[i:j]``, ``cache[..., 3]``,
    ``cache[None]`` give a ``SparseTeacher`` that views the same memory, with the same metadata; an integer or
    boolean array index gives a copy, as in NumPy.

    **Equality** is identity (``==`` is not defined on the contents, which may be gigabytes of memory maps):
    compare ``indices`` and ``logprobs`` with NumPy.

    **Storage** (:meth:`save`, :class:`SparseTeacherWriter`, :meth:`load`): a directory holding

    - ``indices.npy``: the indices, C order, of the dtype given (``np.save``'s format);
    - ``logprobs.npy``: the log-probabilities, C order, of the dtype given;
    - ``metadata.json``: ``{"format": "kdloss.sparse_teacher", "version": 1, "shape": [...], "k": K,
      "indices_dtype": "int32", "logprobs_dtype": "float16", "temperature": 2.0, "vocab_size": 32000,
      "method": "top_k", "kdloss_version": "..."}``, ``shape`` being the leading shape and ``null`` standing for
      what is not recorded.

    NumPy alone reads it: ``np.load(path / "indices.npy", mmap_mode="r")``. The directory appears whole, with its
    metadata, or not at all: it is written under a temporary name next to ``path`` and renamed when complete.

    Examples
    --------
    >>> import numpy as np
    >>> from kdloss import SparseTeacher
    >>> indices = np.array([[2, 0], [1, 0]], np.int32)     # row 1 lists class 1 alone: its second slot is empty
    >>> logprobs = np.array([[np.log(0.7), np.log(0.2)], [np.log(0.9), -np.inf]])
    >>> cache = SparseTeacher(indices, logprobs, temperature=2.0, vocab_size=3)
    >>> cache
    SparseTeacher(shape=(2,), k=2, indices=int32, logprobs=float64, temperature=2.0, vocab_size=3, method=None)
    >>> cache.tail_mass().round(12)
    array([0.1, 0.1])
    >>> np.shares_memory(cache[1:].logprobs, logprobs)
    True
    """

    __slots__ = ("_indices", "_logprobs", "_temperature", "_vocab_size", "_method", "__weakref__")

    def __init__(
        self,
        indices: npt.ArrayLike,
        logprobs: npt.ArrayLike,
        *,
        temperature: float | None = None,
        vocab_size: int | None = None,
        method: str | None = None,
    ) -> None:
        # Any ndarray as it is: a memory map stays one (DLPack would give a plain view of it).
        index_array = indices if isinstance(indices, np.ndarray) else _arrays._as_array(indices)
        logprob_array = logprobs if isinstance(logprobs, np.ndarray) else _arrays._as_array(logprobs)
        check_structure(index_array.dtype, index_array.shape, logprob_array.dtype, logprob_array.shape)
        self._indices = index_array
        self._logprobs = logprob_array
        self._temperature = _check_temperature(temperature)
        self._vocab_size = _check_vocab_size(vocab_size, index_array.shape[-1])
        self._method = _check_method(method)

    def _like(self, indices: np.ndarray, logprobs: np.ndarray) -> SparseTeacher:
        """Arrays of a checked structure (a view or a piece of this cache's) with this cache's metadata."""
        cache = object.__new__(SparseTeacher)
        cache._indices, cache._logprobs = indices, logprobs
        cache._temperature, cache._vocab_size, cache._method = self._temperature, self._vocab_size, self._method
        return cache

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def indices(self) -> np.ndarray:
        """The listed classes, int32 or int64, shape ``(..., K)``; the caller's array itself, not a copy."""
        return self._indices

    @property
    def logprobs(self) -> np.ndarray:
        """Log-probabilities of the listed classes (``-inf``: an empty slot), float16/32/64, shape ``(..., K)``."""
        return self._logprobs

    @property
    def shape(self) -> tuple[int, ...]:
        """The leading shape: the rows, as the student logits' shape without its last axis."""
        return self._indices.shape[:-1]

    @property
    def k(self) -> int:
        """K, the slots of a row."""
        return self._indices.shape[-1]

    @property
    def temperature(self) -> float | None:
        """The temperature the log-probabilities are at (None: not recorded)."""
        return self._temperature

    @property
    def vocab_size(self) -> int | None:
        """C, the classes of the teacher's distribution (None: not recorded)."""
        return self._vocab_size

    @property
    def method(self) -> str | None:
        """How the cache was built, e.g. ``"top_k"`` or ``"sample"`` (None: not recorded)."""
        return self._method

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the log-probabilities (float16, float32 or float64)."""
        return self._logprobs.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the two arrays' elements (of the view, for a slice)."""
        return self._indices.nbytes + self._logprobs.nbytes

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a SparseTeacher of one row (leading shape ())")
        return self.shape[0]

    def __iter__(self) -> Iterator[SparseTeacher]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"SparseTeacher(shape={self.shape}, k={self.k}, indices={self._indices.dtype}, "
            f"logprobs={self._logprobs.dtype}, temperature={self._temperature!r}, vocab_size={self._vocab_size!r}, "
            f"method={self._method!r})"
        )

    # -- indexing ---------------------------------------------------------------------------------------------

    def __getitem__(self, key: Any) -> SparseTeacher:
        key = key if isinstance(key, tuple) else (key,)
        # The axes a key takes up, as NumPy counts them: None, Ellipsis and boolean scalars none, a boolean array
        # its own ndim, anything else one. More than the leading axes would reach into the K slots.
        taken = 0
        for item in key:
            if item is None or item is Ellipsis:
                continue
            if isinstance(item, (slice, numbers.Integral)) and not isinstance(item, bool):
                taken += 1
                continue
            item = np.asarray(item)
            taken += item.ndim if item.dtype == bool else 1
        if taken > len(self.shape):
            raise IndexError(
                f"too many indices for a SparseTeacher of leading shape {self.shape}: {taken} given; the K slots of "
                f"a row cannot be indexed"
            )
        if any(item is Ellipsis for item in key):
            key = (*key, slice(None))  # the Ellipsis stands for the leading axes that the key leaves out
        return self._like(self._indices[key], self._logprobs[key])

    # -- contents ---------------------------------------------------------------------------------------------

    def _row_pieces(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first flat row, indices, logprobs) of consecutive pieces of rows, each as a (rows, K) array."""
        if not self.shape:
            yield 0, self._indices.reshape(1, -1), self._logprobs.reshape(1, -1)
            return
        first = 0
        for indices, logprobs in zip(_first_axis_pieces(self._indices), _first_axis_pieces(self._logprobs)):
            indices, logprobs = indices.reshape(-1, self.k), logprobs.reshape(-1, self.k)
            yield first, indices, logprobs
            first += indices.shape[0]

    def _row(self, flat_row: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(flat_row, self.shape)) if self.shape else ()

    def validate(self, vocab_size: int | None = None) -> None:
        """Checks the contents, the first bad row raising a ``ValueError`` that names it.

        A row is bad if, in this order of precedence, its log-probabilities hold NaN or +inf, an index of a listed
        (not empty) slot is outside [0, C), a class is listed twice, or the probabilities sum to more than
        1 + 1e-6 (in float64; a positive log-probability makes the sum exceed 1; float16 log-probabilities get what
        their rounding can add, ``2^-11 sum p |log p|``, on top). An empty slot's index is not
        checked. Rows are taken in C order of the leading shape, a piece at a time (memory maps are not read
        whole into memory). The loss checks the same things with the same messages.

        Parameters
        ----------
        vocab_size : int, optional
            C, the number of classes the indices must be below; default the cache's :attr:`vocab_size`. Without
            either, only negative indices are refused.

        Raises
        ------
        ValueError
            On the first bad row, e.g. ``"indices of row (0, 5) list class 7 more than once"``,
            ``"indices of row (2,) hold 40000, outside [0, 32000)"``, ``"logprobs of row (1,) hold NaN"``,
            ``"logprobs of row (1,) hold +inf"``, ``"logprobs of row (3, 17) sum to probability 1.2 > 1 (+1e-6
            for rounding)"``.
        """
        classes = self._vocab_size if vocab_size is None else _check_vocab_size(vocab_size, self.k)
        for first, indices, logprobs in self._row_pieces():
            message = _first_bad_row(indices, logprobs, classes)
            if message is not None:
                row, describe = message
                raise ValueError(describe(self._row(first + row)))

    def tail_mass(self) -> np.ndarray:
        """The tail of each row, r = max(0, 1 - sum of its listed probabilities), in float64, of the leading shape.

        Computed from the log-probabilities as ``-expm1(logsumexp(logprobs))``, the log-sum-exp taken as the
        largest plus ``log1p`` of the others' ratios to it: a tail of 1e-12 behind a class of log-probability
        -1e-12 keeps its relative precision, which ``1 - sum(exp(logprobs))`` would round away. A row with no
        listed class has a tail of 1; NaN log-probabilities give NaN.
        """
        tails = np.empty(_rows_of(self.shape), dtype=np.float64)
        for first, _, logprobs in self._row_pieces():
            tails[first : first + logprobs.shape[0]] = _tails(logprobs)
        return tails.reshape(self.shape)

    # -- storage ----------------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return _metadata(
            self.shape,
            self.k,
            self._indices.dtype,
            self._logprobs.dtype,
            self._temperature,
            self._vocab_size,
            self._method,
        )

    def save(self, path: PathLike, *, overwrite: bool = False) -> None:
        """Writes the cache as the directory ``path`` (see the class's Notes), whole or not at all.

        The files are written into a temporary directory next to ``path`` (the same file system) and synced, and
        the directory renamed to ``path`` when complete: a failure on the way leaves nothing at ``path``, and no
        temporary directory behind. The arrays are written in C order with their own dtypes; a memory-mapped or
        non-contiguous cache is written a piece at a time.

        Parameters
        ----------
        path : str or os.PathLike
            The directory to create; its parent must exist.
        overwrite : bool, default False
            Whether an existing cache at ``path`` may be replaced (only a directory with a kdloss cache's
            metadata, never another file or directory). The old cache stays whole until the new one is
            complete, and is then removed; a cache memory-mapped from ``path`` may be saved over itself (on POSIX
            systems; Windows refuses to move files that are mapped, and the save then fails, leaving the old cache).

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is False, or it exists and is not a kdloss cache.
        """
        path = Path(path)
        _check_target(path, overwrite)
        temporary = _temporary_directory(path)
        try:
            _write_npy(temporary / INDICES_FILE, self._indices)
            _write_npy(temporary / LOGPROBS_FILE, self._logprobs)
            _write_metadata(temporary, self._metadata())
            _commit(temporary, path, overwrite)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: PathLike, mmap_mode: str | None = "r") -> SparseTeacher:
        """Reads a cache that :meth:`save` or :class:`SparseTeacherWriter` wrote, memory-mapped by default.

        Parameters
        ----------
        path : str or os.PathLike
            The cache's directory.
        mmap_mode : {"r", "r+", "c", None}, default "r"
            As ``np.load``'s: "r" maps the files read-only, "r+" read-write (writes reach the files), "c"
            copy-on-write (writes stay in memory); None reads the arrays into memory.

        Raises
        ------
        ValueError
            If ``path`` is not a cache (no directory, no ``metadata.json``, another format or version, a missing
            ``.npy`` file), or the arrays do not have the shape and dtypes the metadata states; the message names
            the path.
        """
        if mmap_mode not in MMAP_MODES:
            raise ValueError(f"mmap_mode must be one of None, 'r', 'r+', 'c', got {mmap_mode!r}")
        path = Path(path)
        meta = _read_metadata(path)
        shape = (*meta["shape"], meta["k"])
        arrays = []
        for name, dtype_key in ((INDICES_FILE, "indices_dtype"), (LOGPROBS_FILE, "logprobs_dtype")):
            file = path / name
            if not file.is_file():
                raise ValueError(f"{path} is not a complete kdloss sparse-teacher cache: {file} does not exist")
            try:
                array = np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
            except ValueError as error:
                raise ValueError(f"{file} is not a readable .npy file: {error}") from error
            if array.shape != shape or array.dtype.name != meta[dtype_key] or not array.dtype.isnative:
                raise ValueError(
                    f"{file} holds an array of shape {array.shape} and dtype {array.dtype}, but "
                    f"{path / METADATA_FILE} states shape {shape} and dtype {meta[dtype_key]}"
                )
            arrays.append(array)
        try:
            return cls(*arrays, temperature=meta["temperature"], vocab_size=meta["vocab_size"], method=meta["method"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path / METADATA_FILE} holds a bad value: {error}") from error

    @staticmethod
    def concatenate(caches: Sequence[SparseTeacher]) -> SparseTeacher:
        """The rows of several caches, one after the other along the first axis, in a new cache in memory.

        Every cache must have the same K, dtypes, leading shape but for the first axis, temperature, vocab_size
        and method (to build a cache larger than memory, use :class:`SparseTeacherWriter`).

        Raises
        ------
        TypeError
            If an element is not a ``SparseTeacher`` or the dtypes differ.
        ValueError
            If there are none, a cache has one row (leading shape ``()``: give it a first axis, ``cache[None]``),
            or K, the other leading axes or the metadata differ.
        """
        caches = list(caches)
        if not caches:
            raise ValueError("concatenate needs at least one SparseTeacher")
        for i, cache in enumerate(caches):
            if not isinstance(cache, SparseTeacher):
                raise TypeError(f"caches[{i}] must be a SparseTeacher, got {type(cache).__name__}")
            if not cache.shape:
                raise ValueError(f"caches[{i}] has one row (leading shape ()), no first axis to concatenate along")
        first = caches[0]
        for i, cache in enumerate(caches[1:], start=1):
            _check_same_kind(cache, f"caches[{i}]", first, "caches[0]", casting=False)
        indices = np.concatenate([cache.indices for cache in caches])
        logprobs = np.concatenate([cache.logprobs for cache in caches])
        return first._like(indices, logprobs)


def _check_same_kind(cache: SparseTeacher, name: str, like: Any, like_name: str, *, casting: bool) -> None:
    """Whether ``cache`` fits with ``like`` (a cache or a writer): K, the leading axes after the first, the
    metadata (which ``cache`` must state alike, or not at all when ``casting``) and, unless ``casting``, dtypes."""
    if cache.k != like.k:
        raise ValueError(f"{name} has K = {cache.k}, {like_name} K = {like.k}")
    if cache.shape[1:] != like.shape[1:] or len(cache.shape) != len(like.shape):
        raise ValueError(
            f"{name} has leading shape {cache.shape}, which must be {like.shape} but for the first axis "
            f"(that of {like_name})"
        )
    if not casting:
        for what in ("indices", "logprobs"):
            dtype, like_dtype = getattr(cache, what).dtype, getattr(like, what).dtype
            if dtype != like_dtype:
                raise TypeError(f"{name} has {what} of dtype {dtype}, {like_name} {like_dtype}")
    for what in ("temperature", "vocab_size", "method"):
        value, like_value = getattr(cache, what), getattr(like, what)
        if value != like_value and (value is not None or not casting):
            raise ValueError(f"{name} has {what} {value!r}, {like_name} {like_value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Content checks and the tail, over a piece of rows as (rows, K) arrays.
# ---------------------------------------------------------------------------------------------------------------


def _first_bad_row(indices: np.ndarray, logprobs: np.ndarray, vocab_size: int | None):
    """(row, message builder) of the first bad row of a piece, or None."""
    half = logprobs.dtype == np.float16
    logprobs = logprobs.astype(np.float64)
    indices = indices.astype(np.int64)
    listed = logprobs != -np.inf  # NaN slots count as listed: their index is checked too, after the NaN itself
    nan = np.isnan(logprobs).any(axis=1)
    positive_infinity = (logprobs == np.inf).any(axis=1)
    out_of_range = listed & ((indices < 0) | (indices >= vocab_size if vocab_size is not None else False))
    bad_index = out_of_range.any(axis=1)
    # Sorted with the empty slots made -1: equal neighbours that are classes (>= 0) are a class listed twice.
    # Sentinels can equal only negative indices, whose row is refused for its range first.
    ordered = np.sort(np.where(listed, indices, -1), axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    duplicate = repeated.any(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        probabilities = np.exp(logprobs)
        totals = probabilities.sum(axis=1)
        tolerances = np.full(totals.shape, PROBABILITY_TOLERANCE)
        if half:
            entropy_terms = np.where(probabilities > 0, probabilities * np.abs(logprobs), 0.0)
            tolerances += HALF_ROUNDING * entropy_terms.sum(axis=1)
    too_much = totals > 1.0 + tolerances  # NaN rows are caught above

    kinds = (nan, positive_infinity, bad_index, duplicate, too_much)
    bad = np.logical_or.reduce(kinds)
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    if nan[row]:
        return row, nan_message
    if positive_infinity[row]:
        return row, positive_infinity_message
    if bad_index[row]:
        index = int(indices[row, np.argmax(out_of_range[row])])
        return row, lambda name: index_range_message(name, index, vocab_size)
    if duplicate[row]:
        index = int(ordered[row, 1:][np.argmax(repeated[row])])
        return row, lambda name: duplicate_message(name, index)
    total, tolerance = float(totals[row]), float(tolerances[row])
    return row, lambda name: probability_sum_message(name, total, tolerance)


def _tails(logprobs: np.ndarray) -> np.ndarray:
    """max(0, 1 - sum exp(logprobs)) per row of a (rows, K) array, in float64 (see SparseTeacher.tail_mass)."""
    logprobs = logprobs.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        largest_slot = np.argmax(np.where(np.isnan(logprobs), np.inf, logprobs), axis=1)[:, None]
        largest = np.take_along_axis(logprobs, largest_slot, axis=1)
        ratios = np.exp(logprobs - largest)
        np.put_along_axis(ratios, largest_slot, 0.0, axis=1)  # the largest's own ratio, 1, is log1p's 1
        # A row with nothing listed: the largest is -inf and the ratios NaN; its log-sum-exp is -inf.
        log_total = np.where(largest[:, 0] == -np.inf, -np.inf, largest[:, 0] + np.log1p(ratios.sum(axis=1)))
        return np.maximum(-np.expm1(log_total), 0.0)  # NaN stays NaN


# ---------------------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------------------


def _metadata(shape, k, indices_dtype, logprobs_dtype, temperature, vocab_size, method) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "shape": [int(n) for n in shape],
        "k": int(k),
        "indices_dtype": np.dtype(indices_dtype).name,
        "logprobs_dtype": np.dtype(logprobs_dtype).name,
        "temperature": temperature,
        "vocab_size": vocab_size,
        "method": method,
        "kdloss_version": __version__,
    }


def _is_cache(path: Path) -> bool:
    try:
        with open(path / METADATA_FILE, encoding="utf-8") as file:
            return json.load(file).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(path: Path, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace a kdloss cache there)")
    if path.is_symlink() or not path.is_dir() or not _is_cache(path):
        raise FileExistsError(f"{path} exists and is not a kdloss sparse-teacher cache; refusing to replace it")


def _temporary_directory(path: Path) -> Path:
    """An empty directory next to ``path``, so that renaming it to ``path`` stays on one file system."""
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _commit(temporary: Path, path: Path, overwrite: bool) -> None:
    """Renames the complete ``temporary`` to ``path``; an old cache there is moved aside first, and put back if
    the rename fails. (A directory cannot be renamed over a non-empty one, so there is a moment without a cache
    at ``path``; there is never a partial one.)"""
    _check_target(path, overwrite)  # again: something may have appeared at path since the writing began
    aside = None
    if os.path.lexists(path):
        aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        os.rename(path, aside)
    try:
        os.rename(temporary, path)
    except BaseException:
        if aside is not None:
            os.rename(aside, path)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _write_npy(file: Path, array: np.ndarray) -> None:
    """``np.save``'s format, always in C order (``np.save`` writes an F-contiguous array in F order), a piece at a
    time when ``array`` is not C-contiguous, synced to the disk."""
    header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
    with open(file, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        if array.flags.c_contiguous:
            handle.write(array.data)
        else:
            for piece in _first_axis_pieces(array):
                handle.write(np.ascontiguousarray(piece).data)
        handle.flush()
        os.fsync(handle.fileno())


def _discard(temporary: Path, arrays: list[np.memmap]) -> None:
    """A writer's clean-up: its memory maps dropped (unmapped), its temporary directory removed."""
    arrays.clear()
    shutil.rmtree(temporary, ignore_errors=True)


def _write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    with open(directory / METADATA_FILE, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_metadata(path: Path) -> dict[str, Any]:
    file = path / METADATA_FILE
    if not path.is_dir():
        raise ValueError(f"{path} is not a kdloss sparse-teacher cache: no such directory")
    if not file.is_file():
        raise ValueError(f"{path} is not a kdloss sparse-teacher cache: {file} does not exist")
    try:
        with open(file, encoding="utf-8") as handle:
            meta = json.load(handle)
    except ValueError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kdloss sparse-teacher cache: {file} does not say format {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} is a cache of version {meta.get('version')!r}; this kdloss reads version {VERSION}")
    missing = [
        key
        for key in ("shape", "k", "indices_dtype", "logprobs_dtype", "temperature", "vocab_size", "method")
        if key not in meta
    ]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}")
    shape, k = meta["shape"], meta["k"]
    if (
        not isinstance(shape, list)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        or not isinstance(k, int)
        or isinstance(k, bool)
        or k < 1
    ):
        raise ValueError(f"{file} holds a bad shape {shape!r} or k {k!r}")
    return meta


class SparseTeacherWriter:
    """Writes a cache batch by batch into files on disk, for caches larger than memory.

    The arrays are preallocated as ``.npy`` memory maps in a temporary directory next to ``path``; :meth:`append`
    copies a batch of rows into them, and :meth:`close`, once every row is written, syncs them, writes the
    metadata last and renames the directory to ``path``. The result is what :meth:`SparseTeacher.save` writes,
    and appears whole or not at all. Used as a context manager, the writer closes when the block ends, and
    aborts (removes everything it wrote) when the block raises; a writer dropped without either is aborted.

    Parameters
    ----------
    path : str or os.PathLike
        The cache directory to create; its parent must exist.
    shape : int or tuple of ints
        The whole cache's leading shape (an int: that many rows); batches fill its first axis in order.
    k : int
        K, the slots of a row.
    vocab_size, temperature, method
        The cache's metadata, as in :class:`SparseTeacher`. A batch that states a value must state the same.
    indices_dtype : {"int32", "int64"}, default "int32"
    logprobs_dtype : {"float16", "float32", "float64"}, default "float32"
        The dtypes on disk. Batches of other dtypes are converted (float16 halves a cache; int32 holds any
        vocabulary); an index that int32 cannot hold is refused.
    overwrite : bool, default False
        As in :meth:`SparseTeacher.save`, checked now and again on closing.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from kdloss import SparseTeacher, SparseTeacherWriter
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "cache"
    >>> batch = SparseTeacher(np.array([[1, 2], [3, 4]]), np.log(np.full((2, 2), 0.5)), temperature=2.0)
    >>> with SparseTeacherWriter(path, 4, k=2, vocab_size=10, temperature=2.0, logprobs_dtype="float16") as writer:
    ...     writer.append(batch)                          # rows 0 and 1
    ...     writer.append(batch)                          # rows 2 and 3
    >>> SparseTeacher.load(path)
    SparseTeacher(shape=(4,), k=2, indices=int32, logprobs=float16, temperature=2.0, vocab_size=10, method=None)
    """

    def __init__(
        self,
        path: PathLike,
        shape: int | tuple[int, ...],
        k: int,
        *,
        vocab_size: int | None = None,
        temperature: float | None = None,
        indices_dtype: npt.DTypeLike = "int32",
        logprobs_dtype: npt.DTypeLike = "float32",
        method: str | None = None,
        overwrite: bool = False,
    ) -> None:
        shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
        if not shape or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError(f"shape must be a number of rows or a tuple of at least one size >= 0, got {shape}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self._path = Path(path)
        self._shape = tuple(int(n) for n in shape)
        self._k = int(k)
        self._vocab_size = _check_vocab_size(vocab_size, self._k)
        self._temperature = _check_temperature(temperature)
        self._method = _check_method(method)
        self._indices_dtype = _check_index_dtype(np.dtype(indices_dtype), "indices_dtype")
        self._logprobs_dtype = _check_logprob_dtype(np.dtype(logprobs_dtype), "logprobs_dtype")
        self._overwrite = bool(overwrite)
        self._rows_written = 0
        _check_target(self._path, self._overwrite)
        self._temporary = _temporary_directory(self._path)
        # The memory maps (indices, logprobs) are held in this list, which the clean-up empties before it removes
        # their files: a file still mapped cannot be deleted on Windows.
        self._arrays: list[np.memmap] = []
        self._cleanup = weakref.finalize(self, _discard, self._temporary, self._arrays)
        try:
            full = (*self._shape, self._k)
            for name, dtype in ((INDICES_FILE, self._indices_dtype), (LOGPROBS_FILE, self._logprobs_dtype)):
                self._arrays.append(np.lib.format.open_memmap(self._temporary / name, "w+", dtype, full))
        except BaseException:
            self.abort()
            raise

    @property
    def path(self) -> Path:
        """Where the cache appears on :meth:`close`."""
        return self._path

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole cache's leading shape."""
        return self._shape

    @property
    def k(self) -> int:
        """K, the slots of a row."""
        return self._k

    @property
    def temperature(self) -> float | None:
        """The cache's temperature (None: not recorded)."""
        return self._temperature

    @property
    def vocab_size(self) -> int | None:
        """The cache's vocabulary size C (None: not recorded)."""
        return self._vocab_size

    @property
    def method(self) -> str | None:
        """How the cache was built (None: not recorded)."""
        return self._method

    @property
    def rows_written(self) -> int:
        """How much of the first axis the batches appended so far fill."""
        return self._rows_written

    @property
    def closed(self) -> bool:
        """Whether the writer has closed or aborted (it accepts nothing more)."""
        return not self._cleanup.alive

    def append(self, cache: SparseTeacher) -> None:
        """Writes the rows of ``cache`` after those written so far. Checked first: on an error nothing is written.

        Raises
        ------
        ValueError
            If the writer is closed, ``cache`` does not have K and the leading axes after the first of the
            writer's, it would overfill the first axis, it states other metadata than the writer's, or it holds
            an index that the writer's int32 cannot hold.
        TypeError
            If ``cache`` is not a ``SparseTeacher``.
        """
        if self.closed:
            raise ValueError(f"the writer of {self._path} is closed")
        if not isinstance(cache, SparseTeacher):
            raise TypeError(f"cache must be a SparseTeacher, got {type(cache).__name__}")
        _check_same_kind(cache, "the batch", self, "the writer", casting=True)
        start, stop = self._rows_written, self._rows_written + cache.shape[0]
        if stop > self._shape[0]:
            raise ValueError(
                f"the batch's {cache.shape[0]} rows would make {stop}, more than the writer's {self._shape[0]}"
            )
        indices = cache.indices
        if indices.dtype.itemsize > self._indices_dtype.itemsize and indices.size:
            limits = np.iinfo(self._indices_dtype)
            low, high = int(indices.min()), int(indices.max())
            if low < limits.min or high > limits.max:
                bad = low if low < limits.min else high
                raise ValueError(f"the batch holds index {bad}, which {self._indices_dtype} cannot hold")
        written_indices, written_logprobs = self._arrays
        written_indices[start:stop] = indices
        written_logprobs[start:stop] = cache.logprobs
        self._rows_written = stop

    def close(self) -> None:
        """Completes the cache at :attr:`path`: syncs the arrays, writes the metadata, renames the directory.

        Closing a closed writer does nothing.

        Raises
        ------
        ValueError
            If fewer rows were appended than the writer's shape holds; the writer is then aborted and nothing is
            left at :attr:`path`.
        FileExistsError
            If something that may not be replaced appeared at :attr:`path` meanwhile (the writer is aborted).
        """
        if self.closed:
            return
        try:
            if self._rows_written != self._shape[0]:
                raise ValueError(
                    f"the writer of {self._path} was closed after {self._rows_written} of its {self._shape[0]} rows"
                )
            for array in self._arrays:
                array.flush()
            self._arrays.clear()  # unmapped before the files are synced and renamed
            for name in (INDICES_FILE, LOGPROBS_FILE):
                with open(self._temporary / name, "rb+") as handle:
                    os.fsync(handle.fileno())
            _write_metadata(
                self._temporary,
                _metadata(
                    self._shape,
                    self._k,
                    self._indices_dtype,
                    self._logprobs_dtype,
                    self._temperature,
                    self._vocab_size,
                    self._method,
                ),
            )
            _commit(self._temporary, self._path, self._overwrite)
            self._cleanup.detach()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drops what was written: nothing appears at :attr:`path`, the temporary directory is removed."""
        self._cleanup()

    def __enter__(self) -> SparseTeacherWriter:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"SparseTeacherWriter({str(self._path)!r}, shape={self._shape}, k={self._k}, rows_written="
            f"{self._rows_written}, indices={self._indices_dtype}, logprobs={self._logprobs_dtype}, "
            f"temperature={self._temperature!r}, vocab_size={self._vocab_size!r}, method={self._method!r})"
        )
