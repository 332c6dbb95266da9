"""PyTorch integration: a ``torch.nn.Module`` and a functional form of the kdloss distillation loss.

Importing this module imports torch (install it with ``pip install kdloss[torch]``); ``import kdloss`` alone
never does.

How it is wired
---------------
The forward pass is one native call that computes the loss *and* its gradient with respect to the student
logits; the logits are read in place and the gradient is written into a buffer that autograd later receives
as it is (``_torch_autograd``): backward scales it in place by ``grad_output`` (or not at all when
that is 1), and nothing is recomputed or copied. A gradient that must itself be differentiated
(``create_graph=True``) is rebuilt as torch operations, so second and higher derivatives are exact.

Under ``torch.compile`` the same call goes through the custom operators ``torch.ops.kdloss.loss_and_grad`` and
``torch.ops.kdloss.loss`` (``_torch_ops``), with fake implementations and functional autograd formulas that the
compiler traces. ``torch.ops.kdloss.loss`` computes the loss alone: it serves calls that want no gradient
(``torch.no_grad()``, a student that does not require grad), so evaluation does not pay for a gradient buffer.

A ``kdloss.SparseTeacher`` in place of the teacher logits takes the same paths: the eager autograd function hands it
to the kernel as it is, and the operators ``torch.ops.kdloss.sparse_loss_and_grad`` and
``torch.ops.kdloss.sparse_loss`` take its two arrays, viewed as tensors.
"""

import numbers
from typing import Callable, Optional, Union

import numpy as np

try:
    import torch
except ImportError as error:  # say how to get it rather than just "No module named 'torch'"
    raise ImportError("kdloss.torch needs PyTorch: pip install 'kdloss[torch]'") from error
from torch import Tensor

from ._params import Parameters, check_normalizer
from ._sparse_teacher import SparseTeacher
from ._torch_autograd import DistillationFunction, sparse_tensors
from ._torch_checks import check_floating_labels, check_shapes, check_sparse_shapes, validated_params
from ._torch_ops import operator_arguments, sparse_operator_arguments  # also registers torch.ops.kdloss.*

__all__ = ["DistillationLoss", "distillation_loss", "generalized_jsd_loss"]

Teacher = Union[Tensor, SparseTeacher]
"""Teacher logits, or a teacher kept as a few classes a row (a top-k or sampled cache)."""

Normalizer = Union[float, Tensor, None]
"""A positive finite number, a one-element tensor holding one (e.g. an all-reduced count), or None."""

# The native kernels run on the CPU; "meta" tensors only carry shapes and go through the fake
# implementations, so that shape inference (and torch.compile's tracing) works on them too.
_SUPPORTED_DEVICES = ("cpu", "meta")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _check_logits(name: str, logits: object) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.device.type not in _SUPPORTED_DEVICES:
        raise RuntimeError(
            f"kdloss computes on the CPU, but {name} is on {logits.device}. Move the tensors explicitly, "
            "e.g. distillation_loss(student.cpu(), teacher.cpu(), labels.cpu()): .cpu() is differentiable, "
            f"so the student's gradient still arrives on {logits.device}, and the transfer cost is visible "
            "in your code (for logits that live on a GPU, a GPU loss is usually the better choice)."
        )
    return logits


def _prepare_labels(labels: object, dtype: torch.dtype, student: Tensor) -> Optional[Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"true_labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.device != student.device:
        raise RuntimeError(f"true_labels is on {labels.device} but the logits are on {student.device}")
    # Labels never receive a gradient (soft targets produced by a model are constants to this loss).
    labels = labels.detach()
    if labels.is_floating_point():
        check_floating_labels(labels, student)  # before the cast, so that the message names the caller's dtype
        return labels.to(dtype)  # target distributions, in the compute dtype (no-op when already there)
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"true_labels must be integer class indices or floating targets, got {labels.dtype}")
    return labels.to(torch.int64)  # class indices (no-op for int64)


def _prepare_normalizer(normalizer: object) -> Optional[Tensor]:
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must hold one value, got a tensor of shape {tuple(normalizer.shape)}")
        # A count all-reduced across processes stays a tensor: no .item() sync (or graph break) here.
        return normalizer.detach().reshape(()).to(device="cpu", dtype=torch.float64)
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a real number, a one-element tensor or None, got {normalizer!r}")
    return torch.tensor(check_normalizer(normalizer), dtype=torch.float64)


def _runs_eagerly(student: Tensor) -> bool:
    """Plain CPU tensors outside torch.compile take the eager autograd path, whose backward hands the kernel's
    buffer to autograd; fake, functional and meta tensors (compilation, shape inference) take the operators."""
    return (
        not torch.compiler.is_compiling()
        and student.device.type == "cpu"
        and type(student) in (Tensor, torch.nn.Parameter)
    )


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Teacher,
    true_labels: Optional[Tensor] = None,
    *,
    temperature: float = 3.0,
    alpha: float = 0.3,
    reduction: str = "mean",
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    num_threads: Optional[int] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    tail: str = "bucket",
) -> Tensor:
    r"""Knowledge-distillation loss of a batch, differentiable with respect to the student logits.

    The loss and its gradient are computed together by one native call in the forward pass; the backward
    pass hands that gradient to autograd, scaled by ``grad_output``. See :class:`kdloss.DistillationLoss` for the
    formula:
    :math:`\alpha\,\mathrm{CE}(s, y) + (1-\alpha)\,T^2\,\mathrm{KL}(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T))`
    per row, the KL term alone without labels.

    Parameters
    ----------
    student_logits : torch.Tensor, shape (..., C)
        Student outputs on the CPU: (B, C), one row (C,), or sequences (B, S, C) whose leading axes are
        all rows. float32/float64 tensors are read in place; float16/bfloat16 are computed in float32.
    teacher_logits : torch.Tensor, same shape as `student_logits`, or kdloss.SparseTeacher
        Teacher outputs. Never receives a gradient, even if it requires one (it is detached). Or a sparse teacher
        of the student's leading shape (a top-k or sampled cache, whose arrays are NumPy arrays or CPU tensors),
        read in place; the soft term is then forward KL against it, with its tail as `tail` says, and the compute
        dtype is the student's (float32 at least).
    true_labels : torch.Tensor, optional
        Integer class indices of the logits' leading shape (entries equal to `ignore_index` are skipped),
        or floating target distributions of the logits' shape. Never receives a gradient.
    temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail
        As in :class:`DistillationLoss`.
    normalizer : float or torch.Tensor, optional
        Divide the sum of the row losses (and the gradient) by this instead of what `reduction` says, e.g.
        the number of counted rows over all micro-batches and processes. Reduction "mean" or "sum" only.
        Under ``torch.compile`` prefer a tensor: a Python float is a constant of the compiled graph, so a
        count that changes every step would recompile every step.

    Returns
    -------
    torch.Tensor
        A 0-d tensor, or the logits' leading shape for ``reduction="none"``. Its dtype is the compute dtype:
        float64 if either logits tensor is float64, float32 otherwise (also for float16/bfloat16 inputs).

    Raises
    ------
    TypeError
        If the logits are not floating-point tensors, or labels/normalizer have the wrong type.
    ValueError
        On shape mismatches, invalid parameters or labels, a bad sparse teacher (an index out of range or
        listed twice in a row, NaN, probabilities summing above 1: the row is named) or a divergence other than
        forward KL with a sparse teacher, with the messages of :class:`kdloss.DistillationLoss` (on ``meta``
        tensors too, apart from the values of labels and sparse teachers).
    RuntimeError
        If a tensor is on a device other than the CPU (or meta).
    """
    params = validated_params(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail)
    return _distillation_loss(params, student_logits, teacher_logits, true_labels, normalizer)


def _distillation_loss(
    params: Parameters,
    student_logits: Tensor,
    teacher_logits: Teacher,
    true_labels: Optional[Tensor],
    normalizer: Normalizer,
) -> Tensor:
    """distillation_loss() with its parameters validated (the module validated them once, when they were set)."""
    if isinstance(teacher_logits, SparseTeacher):
        return _sparse_distillation_loss(params, student_logits, teacher_logits, true_labels, normalizer)
    student = _check_logits("student_logits", student_logits)
    teacher = _check_logits("teacher_logits", teacher_logits)
    if teacher.device != student.device:
        raise RuntimeError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    # float64 if either side is float64 (as np.result_type would say), float32 otherwise; half precision
    # computes in float32. The casts are autograd ops: for a float16 student, torch's own backward of .to()
    # turns the float32 gradient into float16 *after* it has been multiplied by grad_output (e.g. a
    # GradScaler's scale), so small gradients do not underflow in float16 first. Same-dtype casts are no-ops.
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    student = student.to(dtype)
    teacher = teacher.detach().to(dtype)  # the teacher is a constant: never a gradient
    labels = _prepare_labels(true_labels, dtype, student)
    normalizer = _prepare_normalizer(normalizer)
    check_shapes(student, teacher, labels, params, normalizer is not None)
    wants_gradient = torch.is_grad_enabled() and student.requires_grad
    if wants_gradient and _runs_eagerly(student):
        # .item() of a CPU tensor: eager code, no graph to break.
        number = None if normalizer is None else normalizer.item()
        return DistillationFunction.apply(student, teacher, labels, params, number)
    args = (teacher, labels, *operator_arguments(params, normalizer))
    if wants_gradient:
        loss, _ = torch.ops.kdloss.loss_and_grad(student, *args)
        return loss
    # No gradient wanted: skip the gradient buffer entirely.
    return torch.ops.kdloss.loss(student, *args)


def _sparse_distillation_loss(
    params: Parameters,
    student_logits: Tensor,
    teacher: SparseTeacher,
    true_labels: Optional[Tensor],
    normalizer: Normalizer,
) -> Tensor:
    """_distillation_loss() against a sparse teacher: the same steps, the teacher's arrays read as they are."""
    if torch.compiler.is_compiling() and (
        isinstance(teacher.indices, np.memmap) or isinstance(teacher.logprobs, np.memmap)
    ):
        return _sparse_distillation_loss_outside_the_graph(params, student_logits, teacher, true_labels, normalizer)
    student = _check_logits("student_logits", student_logits)
    # The compute dtype is the student's (float32 at least), as the NumPy class has it: a sparse teacher's
    # log-probabilities, float16 included, are read in their own dtype. The cast is an autograd op (see above).
    student = student.to(torch.float64 if student.dtype == torch.float64 else torch.float32)
    labels = _prepare_labels(true_labels, student.dtype, student)
    normalizer = _prepare_normalizer(normalizer)
    check_sparse_shapes(student, teacher.indices.shape, labels, params, normalizer is not None)
    wants_gradient = torch.is_grad_enabled() and student.requires_grad
    if wants_gradient and _runs_eagerly(student):
        number = None if normalizer is None else normalizer.item()
        return DistillationFunction.apply(student, teacher, labels, params, number)
    args = (*sparse_tensors(teacher, student.device.type), labels, *sparse_operator_arguments(params, normalizer))
    if wants_gradient:
        loss, _ = torch.ops.kdloss.sparse_loss_and_grad(student, *args)
        return loss
    return torch.ops.kdloss.sparse_loss(student, *args)


def _outside_the_graph(function: Callable[..., Tensor], reason: str) -> Callable[..., Tensor]:
    try:
        return torch.compiler.disable(function, reason=reason)
    except TypeError:  # a torch without the reason (before 2.8)
        return torch.compiler.disable(function)


# Dynamo cannot take a memory map (np.memmap) as an input of a graph: the loss against a memory-mapped cache is
# computed outside the graph, at a graph break (under fullgraph=True, an error that says why).
_sparse_distillation_loss_outside_the_graph = _outside_the_graph(
    _sparse_distillation_loss,
    "kdloss.torch: a memory-mapped SparseTeacher (np.memmap) cannot be an input of a torch.compile graph; "
    "pass the batch's rows in memory, e.g. cache[batch_indices] or SparseTeacher.load(path, mmap_mode=None)",
)


class DistillationLoss(torch.nn.Module):
    r"""Knowledge-distillation loss (Hinton et al., 2015) as a ``torch.nn.Module``, computed natively on the CPU.

    Per row, :math:`\alpha\,\mathrm{CE}(\mathrm{softmax}(s), y) + (1-\alpha)\,T^2\,
    \mathrm{KL}(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T))`, or the :math:`T^2\,\mathrm{KL}` term
    alone without labels; rows are combined by `reduction`. The forward pass computes the loss and its
    gradient in one native call; backward hands that gradient to autograd, scaled by ``grad_output``.

    Parameters
    ----------
    temperature : float, default 3.0
        Softmax temperature, in [1e-30, 1e6] (where the loss meets its accuracy; up to 100 with a sparse teacher).
    alpha : float, default 0.3
        Weight of the hard (cross-entropy) term when labels are given, in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" averages over the counted (not ignored) rows, "sum" adds them, "none" returns one loss per
        row (the logits' leading shape).
    ignore_index : int, default -100
        Rows whose class-index label equals this are left out: no loss, zero gradient, not counted.
    num_threads : int or None, default None
        Most threads one call uses (None: all cores).
    divergence : {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"}, default "forward_kl"
        The soft term's divergence, as in :class:`kdloss.DistillationLoss`.
    beta : float, default 0.5
        The weight of "jsd"'s mixture, in [0, 1].
    skew : float, default 0.1
        The weight of the skew divergences' mixture, in [0, 1).
    tail : {"bucket", "renormalize"}, default "bucket"
        What a sparse teacher's tail (the probability its listed classes leave of 1) is matched against, as in
        :class:`kdloss.DistillationLoss`; unused with teacher logits.

    Raises
    ------
    ValueError, TypeError
        On invalid parameters, as :class:`kdloss.DistillationLoss`.

    Notes
    -----
    - Tensors must be on the CPU (or ``meta``, for shape inference); other devices raise a
      ``RuntimeError`` that suggests ``.cpu()``, which is differentiable.
    - float32/float64 logits are read without a copy and the gradient is written in place into the tensor
      autograd keeps. float16/bfloat16 logits are computed in float32; the loss is float32 and the student's
      gradient arrives in its own dtype.
    - The teacher logits and the labels never receive a gradient, even if they require one.
    - A ``kdloss.SparseTeacher`` may stand in for the teacher logits everywhere: the soft term is then forward KL
      against its listed classes and its tail (``tail``), with the same paths, checks and exact derivatives.
    - Backward hands the kernel's gradient buffer to autograd (no copy) unless the graph is retained; with
      ``create_graph=True`` the gradient is rebuilt from torch operations, so second and higher derivatives
      (Hessians, gradient penalties) are exact.

    Examples
    --------
    >>> import torch
    >>> from kdloss.torch import DistillationLoss
    >>> kd = DistillationLoss(temperature=3.0, alpha=0.5)
    >>> s = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    >>> t = torch.tensor([[1.5, 1.8, 0.6]], dtype=torch.float64)
    >>> loss = kd(s, t, torch.tensor([1]))
    >>> round(loss.item(), 8)
    0.25465032
    >>> loss.backward()
    """

    def __init__(
        self,
        temperature: float = 3.0,
        alpha: float = 0.3,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        num_threads: Optional[int] = None,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        skew: float = 0.1,
        tail: str = "bucket",
    ) -> None:
        super().__init__()
        # Plain Python values (not the NumPy object's properties) so that torch.compile can read them.
        self._params = validated_params(
            temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail
        )

    @property
    def temperature(self) -> float:
        """Softmax temperature ``T``, in [1e-30, 1e6]; settable."""
        return self._params.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._params = validated_params(value, *self._params[1:])

    @property
    def alpha(self) -> float:
        """Weight of the hard-label term, in [0, 1]; settable."""
        return self._params.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._params = validated_params(self._params.temperature, value, *self._params[2:])

    @property
    def reduction(self) -> str:
        """How row losses combine: "mean", "sum" or "none"."""
        return self._params.reduction

    @property
    def ignore_index(self) -> int:
        """Class-index label value whose rows are ignored."""
        return self._params.ignore_index

    @property
    def num_threads(self) -> Optional[int]:
        """Most threads one call uses (None: all cores)."""
        return self._params.num_threads

    @property
    def divergence(self) -> str:
        """The soft term's divergence, as in :class:`kdloss.DistillationLoss`."""
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

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Teacher,
        true_labels: Optional[Tensor] = None,
        *,
        normalizer: Normalizer = None,
    ) -> Tensor:
        """Distillation loss of a batch; see :func:`distillation_loss`.

        Parameters
        ----------
        student_logits : torch.Tensor, shape (..., C)
            Student outputs (requires grad for training).
        teacher_logits : torch.Tensor, same shape, or kdloss.SparseTeacher
            Teacher outputs, or a sparse teacher of the student's leading shape; never receives a gradient.
        true_labels : torch.Tensor, optional
            Class indices of the leading shape or target distributions of the logits' shape.
        normalizer : float or torch.Tensor, optional
            Divide the summed loss and gradient by this (e.g. the global count of counted rows) instead of
            what `reduction` says. Reduction "mean" or "sum" only.

        Returns
        -------
        torch.Tensor
            The reduced loss (0-d), or one loss per row for ``reduction="none"``.
        """
        return _distillation_loss(self._params, student_logits, teacher_logits, true_labels, normalizer)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._params._asdict().items())


# TRL's GKD loss on this module's distillation_loss; imported last, since it calls back into this module.
from ._gkd import generalized_jsd_loss  # noqa: E402
