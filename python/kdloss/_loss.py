"""The public ``DistillationLoss`` class."""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import numpy.typing as npt

from . import _arrays, _core, _gradient_cache
from ._params import Parameters
from ._params import check_normalizer as _normalizer
from ._sparse_teacher import SparseTeacher

__all__ = ["DistillationLoss", "clear_gradient_cache"]

Loss = Union[float, np.ndarray]
"""A Python float for reductions "mean" and "sum"; an array of the logits' leading shape for "none"."""


def clear_gradient_cache() -> None:
    """Give back the memory of the gradient buffer kdloss keeps for the next call.

    A gradient of 4 MiB or more that a call returned (from the NumPy class or ``kdloss.torch``) is remembered,
    one per dtype, the most recent; once its caller has dropped it (every array and tensor viewing it gone),
    the next call of the same shape writes into it instead of into fresh memory, whose pages the operating
    system would zero on first touch (a quarter of a (4, 256, 32000) float32 call). A buffer still referenced
    anywhere is never reused. Call this to release that buffer, e.g. between training and evaluation.
    """
    _gradient_cache.clear()


def _student_and_teacher(student_logits: Any, teacher_logits: Any, temperature: float) -> tuple[np.ndarray, Any]:
    """The student's logits in the compute dtype, and the teacher as the native class takes it: logits in the same
    dtype, or a SparseTeacher's (indices, logprobs), read in place (a copy only of an array whose layout the
    kernels cannot read). With a sparse teacher the compute dtype is the student's (float32 at least): its
    log-probabilities, float16 included, are read as they are and computed with in double. A cache that says it
    was built at another temperature, or for another vocabulary, is refused: its numbers would mean something
    else."""
    if not isinstance(teacher_logits, SparseTeacher):
        return _arrays.logits_pair(student_logits, teacher_logits)
    student = _arrays.real_array(student_logits, "student_logits")
    if teacher_logits.temperature is not None and teacher_logits.temperature != temperature:
        raise ValueError(
            f"the sparse teacher's log-probabilities are at temperature {teacher_logits.temperature!r}, "
            f"the loss's temperature is {temperature!r}: build the cache at the loss's temperature"
        )
    if teacher_logits.vocab_size is not None and student.ndim >= 1 and teacher_logits.vocab_size != student.shape[-1]:
        raise ValueError(
            f"the sparse teacher is of a vocabulary of {teacher_logits.vocab_size} classes, student_logits of "
            f"{student.shape[-1]}"
        )
    return _arrays.student_alone(student), _arrays.sparse_teacher_arrays(
        teacher_logits.indices, teacher_logits.logprobs
    )


def _rebuild(*parameters: Any) -> DistillationLoss:
    """Unpickles: the fields of Parameters, in order (pickles of earlier releases hold the first five or six)."""
    return DistillationLoss(**Parameters(*parameters)._asdict())


class DistillationLoss:
    r"""Knowledge-distillation loss (Hinton et al., 2015) and its exact gradient, computed natively.

    For student logits :math:`s`, teacher logits :math:`t`, temperature :math:`T` and optional labels
    :math:`y`, each row contributes

    .. math::

        \ell = \alpha\,\mathrm{CE}(\mathrm{softmax}(s), y)
               + (1-\alpha)\,T^2\,\mathrm{KL}(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T))

    and, without labels, only the :math:`T^2\,\mathrm{KL}` term. Rows are combined by ``reduction``. Other
    divergences replace the KL of the soft term, :math:`T^2\,D(p, q)` with :math:`p = \mathrm{softmax}(t/T)`
    and :math:`q = \mathrm{softmax}(s/T)` (see ``divergence``).

    Parameters
    ----------
    temperature : float, default 3.0
        Softmax temperature, in [1e-30, 1e6] (where the loss meets its accuracy; up to 100 with a sparse teacher).
        Higher values soften both distributions.
    alpha : float, default 0.3
        Weight of the hard (cross-entropy) term when labels are given, in [0, 1]. Unused without labels.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" averages over the counted (not ignored) rows, "sum" adds them, "none" returns one loss per
        row; the gradient of "none" is that of the sum.
    ignore_index : int, default -100
        Rows whose class-index label equals this are left out entirely: no loss, a zero gradient row, and
        not counted by "mean".
    num_threads : int or None, default None
        Rows are split across up to this many threads of a shared pool (None: all cores; 1: the calling
        thread only). Results are bitwise identical whatever the count.
    divergence : {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"}, default "forward_kl"
        The soft term's divergence D(p, q) between the teacher's p = softmax(t/T) and the student's
        q = softmax(s/T):

        - "forward_kl": KL(p || q), Hinton's;
        - "reverse_kl": KL(q || p), MiniLLM's mode-seeking one. A class that the teacher rules out (a -inf
          logit) but the student does not makes the row's loss +inf and its gradient NaN where the student
          has mass;
        - "jsd": GKD's generalized Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m),
          m = beta p + (1 - beta) q, as TRL's ``generalized_jsd_loss`` computes it: beta = 0 is KL(p || q) and
          beta = 1 is KL(q || p);
        - "skew_forward_kl": KL(p || skew p + (1 - skew) q), DistiLLM's; skew = 0 is KL(p || q);
        - "skew_reverse_kl": KL(q || skew q + (1 - skew) p), DistiLLM's; skew = 0 is KL(q || p).

        The mixtures are finite wherever either side has mass.
    beta : float, default 0.5
        The weight of "jsd"'s mixture, in [0, 1]. Unused by the other divergences.
    skew : float, default 0.1
        The weight of the skew divergences' mixture, in [0, 1). Unused by the other divergences.
    tail : {"bucket", "renormalize"}, default "bucket"
        What a sparse teacher's tail (the probability its listed classes leave of 1) is matched against; unused
        with dense teacher logits. With p_k the listed probabilities, r = max(0, 1 - sum p_k) and
        q = softmax(s/T) over all C classes:

        - "bucket": the tail is one more class, matched against the student's mass outside the listed classes:
          :math:`T^2 [\sum_k p_k (\log p_k - \log q_k) + r (\log r - \log \sum_{c \notin K} q_c)]`, the
          exact KL between the two distributions coarse-grained to K + 1 bins;
        - "renormalize": the listed probabilities scaled to sum to 1 (classic top-k distillation).

        For a sampled teacher (:func:`kdloss.sample_teacher`), whose weights sum to 1, both agree.

    Raises
    ------
    ValueError
        If ``temperature`` is not in [1e-30, 1e6], ``alpha`` or ``beta`` is not in [0, 1], ``skew`` is not in
        [0, 1), or ``reduction`` or ``divergence`` is unknown.
    TypeError
        If a parameter is not a number (or, for ``reduction`` and ``divergence``, a string).

    Notes
    -----
    Logits are ``(..., C)``: a batch ``(B, C)``, one row ``(C,)`` or sequences ``(B, S, C)``. The compute
    dtype is ``np.result_type(student, teacher, np.float32)``, float32 or float64; inputs already in it
    with contiguous rows are read in place (NumPy arrays, and any CPU array with ``__dlpack__``), others are
    converted once. ``-inf`` logits act as masks; ``NaN`` and
    ``+inf`` propagate as NaN, and so does a row whose logits are all ``-inf`` (it has no softmax).
    The object is immutable apart from its ``temperature`` and ``alpha`` setters and may be shared by threads.

    Examples
    --------
    >>> import numpy as np
    >>> from kdloss import DistillationLoss
    >>> kd = DistillationLoss(temperature=3.0, alpha=0.5)
    >>> s, t = np.array([[1.0, 2.0, 0.5]]), np.array([[1.5, 1.8, 0.6]])
    >>> round(kd.compute_loss(s, t, np.array([1])), 8)
    0.25465032
    """

    __slots__ = ("_engine", "_params")

    def __init__(
        self,
        temperature: float = 3.0,
        alpha: float = 0.3,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        num_threads: int | None = None,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        skew: float = 0.1,
        tail: str = "bucket",
    ) -> None:
        self._set(
            Parameters.checked(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail)
        )

    # Setters build a new engine rather than mutate the current one, so a call running in another thread
    # keeps the parameters it started with.
    def _set(self, params: Parameters) -> None:
        engine = _core.DistillationLoss(*params.native())  # checks the ranges; nothing changes if it raises
        self._engine, self._params = engine, params

    @property
    def temperature(self) -> float:
        """Softmax temperature ``T``, in [1e-30, 1e6]."""
        return self._params.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._set(Parameters.checked(value, *self._params[1:]))

    @property
    def alpha(self) -> float:
        """Weight of the hard-label term, in [0, 1]."""
        return self._params.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._set(Parameters.checked(self._params.temperature, value, *self._params[2:]))

    @property
    def reduction(self) -> str:
        """How row losses combine: "mean", "sum" or "none"."""
        return self._params.reduction

    @property
    def ignore_index(self) -> int:
        """Class-index label value whose rows are ignored."""
        return self._params.ignore_index

    @property
    def num_threads(self) -> int | None:
        """Most threads one call uses; None: every hardware thread of the machine the object is on."""
        return self._params.num_threads

    @property
    def divergence(self) -> str:
        """The soft term's divergence: "forward_kl", "reverse_kl", "jsd", "skew_forward_kl" or "skew_reverse_kl"."""
        return self._params.divergence

    @property
    def beta(self) -> float:
        """The weight of "jsd"'s mixture, in [0, 1]."""
        return self._params.beta

    @property
    def skew(self) -> float:
        """The weight of the skew divergences' mixture, in [0, 1)."""
        return self._params.skew

    @property
    def tail(self) -> str:
        """What a sparse teacher's tail is matched against: "bucket" or "renormalize"."""
        return self._params.tail

    def _evaluate(
        self,
        student_logits: npt.ArrayLike,
        teacher_logits: npt.ArrayLike,
        true_labels: npt.ArrayLike | None,
        out: np.ndarray | None,
        want_gradient: bool,
        normalizer: float | None = None,
    ) -> tuple[Loss, np.ndarray | None, int]:
        student, teacher = _student_and_teacher(student_logits, teacher_logits, self.temperature)
        labels = _arrays.true_labels(true_labels, student.dtype, student.shape)
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
            # The core checks the arrays it is given; a converted copy no longer shows an overlap with
            # the caller's array, so those are checked here.
            given_and_used = [(student_logits, student), (true_labels, labels)]
            if isinstance(teacher_logits, SparseTeacher):
                given_and_used += zip((teacher_logits.indices, teacher_logits.logprobs), teacher)
            else:
                given_and_used.append((teacher_logits, teacher))
            if any(
                used is not given and isinstance(given, np.ndarray) and np.may_share_memory(out, given)
                for given, used in given_and_used
            ):
                raise ValueError("out must not share memory with the inputs")
        normalizer = _normalizer(normalizer)
        if not want_gradient or out is not None:
            return self._engine.evaluate(student, teacher, labels, out, want_gradient, normalizer)
        # A fresh gradient: the buffer of an earlier call that the caller has dropped serves, if there is one.
        reused = _gradient_cache.take(student.shape, student.dtype)
        result = self._engine.evaluate(student, teacher, labels, reused, True, normalizer)
        if reused is None:
            _gradient_cache.keep(result[1])
        return result

    def compute_loss(
        self,
        student_logits: npt.ArrayLike,
        teacher_logits: npt.ArrayLike,
        true_labels: npt.ArrayLike | None = None,
        *,
        normalizer: float | None = None,
    ) -> Loss:
        """Distillation loss of a batch.

        Parameters
        ----------
        student_logits : array_like, shape (..., C)
            Raw student outputs: (B, C), one row (C,), or e.g. sequence logits (B, S, C), whose leading
            axes are all rows. Anything implementing ``__dlpack__`` on the CPU is read without a copy.
        teacher_logits : array_like, same shape as `student_logits`
            Raw teacher outputs.
        true_labels : array_like, optional
            Integer class indices of the logits' leading shape ((B,), a scalar for one row, (B, S) for
            sequences), each in [0, C) or equal to `ignore_index`; or floating target distributions (one-hot
            or soft, non-negative, finite) of the logits' shape. ``None`` computes the soft term alone.
        normalizer : float, optional
            Divide the sum of the row losses (and its gradient) by this instead of what `reduction` says,
            e.g. the number of counted rows over all micro-batches and processes (see :meth:`sum_and_count`).
            Needs reduction "mean" or "sum".

        Returns
        -------
        float or numpy.ndarray
            The reduced loss; for ``reduction="none"`` an array of the compute dtype with one loss per
            row, of the logits' leading shape.

        Raises
        ------
        ValueError
            On mismatched shapes, no classes, or a label that is out of range, negative or not finite.
        TypeError
            On bool, complex, object or string arrays, or logits that do not promote to float32/float64.
        """
        return self._evaluate(student_logits, teacher_logits, true_labels, None, False, normalizer)[0]

    __call__ = compute_loss

    def loss_parts(
        self,
        student_logits: npt.ArrayLike,
        teacher_logits: npt.ArrayLike,
        true_labels: npt.ArrayLike | None = None,
        *,
        normalizer: float | None = None,
    ) -> tuple[Loss, Loss]:
        """The loss's two terms apart, each reduced as the loss is: what a trainer logs every step.

        Arguments as :meth:`compute_loss`. Both terms are computed whatever ``alpha`` is, for the time of one
        :meth:`compute_loss` call.

        Returns
        -------
        (soft, hard)
            The soft term :math:`T^2 D(p, q)` and the hard term, the cross-entropy against the labels (0.0
            without labels), such that the loss is ``alpha * hard + (1 - alpha) * soft`` with labels and
            ``soft`` without. Floats, or for ``reduction="none"`` arrays of the logits' leading shape.
        """
        student, teacher = _student_and_teacher(student_logits, teacher_logits, self.temperature)
        labels = _arrays.true_labels(true_labels, student.dtype, student.shape)
        return self._engine.parts(student, teacher, labels, _normalizer(normalizer))

    def sum_and_count(
        self,
        student_logits: npt.ArrayLike,
        teacher_logits: npt.ArrayLike,
        true_labels: npt.ArrayLike | None = None,
    ) -> tuple[float, int]:
        """Sum of the row losses and the number of rows that count, from one call.

        The pieces of an exact mean over micro-batches or processes: add the sums and the counts up, and
        divide; or pass the total count as `normalizer` to get each piece's share of the loss and gradient.

        Parameters
        ----------
        student_logits, teacher_logits, true_labels
            As in :meth:`compute_loss`.

        Returns
        -------
        loss_sum : float
            Sum over rows of the row losses (ignored rows add 0).
        count : int
            Rows not labelled `ignore_index` (all rows without class-index labels).
        """
        engine = self._engine
        if self.reduction == "none":  # a normalizer needs a reduced loss
            engine = _core.DistillationLoss(*self._params._replace(reduction="sum").native())
        student, teacher = _student_and_teacher(student_logits, teacher_logits, self.temperature)
        labels = _arrays.true_labels(true_labels, student.dtype, student.shape)
        # Dividing by a normalizer of 1 turns either reduction into the plain sum, summed in double.
        loss_sum, _, count = engine.evaluate(student, teacher, labels, None, False, 1.0)
        return loss_sum, count

    def compute_gradient(
        self,
        student_logits: npt.ArrayLike,
        teacher_logits: npt.ArrayLike,
        true_labels: npt.ArrayLike | None = None,
        *,
        out: np.ndarray | None = None,
        normalizer: float | None = None,
    ) -> np.ndarray:
        """Exact gradient of the reduced loss with respect to the student logits.

        Parameters
        ----------
        student_logits, teacher_logits, true_labels
            As in :meth:`compute_loss`.
        out : numpy.ndarray, optional
            A writeable C-contiguous array of the student's shape and the compute dtype to write into.
            It is checked before anything is written; on any error it is left unchanged.
        normalizer : float, optional
            As in :meth:`compute_loss`.

        Returns
        -------
        numpy.ndarray
            The gradient, shaped like the student logits (``out`` itself when given). For
            ``reduction="none"`` it is the gradient of the sum of the row losses.
        """
        return self._evaluate(student_logits, teacher_logits, true_labels, out, True, normalizer)[1]

    def loss_and_gradient(
        self,
        student_logits: npt.ArrayLike,
        teacher_logits: npt.ArrayLike,
        true_labels: npt.ArrayLike | None = None,
        *,
        out: np.ndarray | None = None,
        normalizer: float | None = None,
    ) -> tuple[Loss, np.ndarray]:
        """Loss and its exact gradient, computed together in one pass over the data.

        Parameters
        ----------
        student_logits, teacher_logits, true_labels
            As in :meth:`compute_loss`.
        out : numpy.ndarray, optional
            As in :meth:`compute_gradient`.
        normalizer : float, optional
            As in :meth:`compute_loss`.

        Returns
        -------
        loss : float or numpy.ndarray
            As returned by :meth:`compute_loss`.
        gradient : numpy.ndarray
            As returned by :meth:`compute_gradient`.

        Raises
        ------
        ValueError, TypeError
            As in :meth:`compute_loss` and :meth:`compute_gradient`.
        """
        loss, gradient, _ = self._evaluate(student_logits, teacher_logits, true_labels, out, True, normalizer)
        return loss, gradient

    def __repr__(self) -> str:
        return f"DistillationLoss({self._params.arguments()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DistillationLoss):
            return NotImplemented
        return self._params == other._params

    __hash__ = None  # type: ignore[assignment]  # mutable through the setters

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild, tuple(self._params))
