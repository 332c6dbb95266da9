"""PyTorch integration: a ``torch.nn.Module`` and a functional form of the kdloss distillation loss.

Importing this module imports torch (install it with ``pip install kdloss[torch]``); ``import kdloss`` alone
never does.

How it is wired
---------------
The forward pass is one native call that computes the loss *and* its gradient with respect to the student
logits; the gradient is written straight into a preallocated torch tensor (``out=tensor.numpy()``) and the
logits are read in place through DLPack. The backward pass only scales that saved gradient by
``grad_output``: nothing is recomputed.

Both steps are registered as the custom operator ``torch.ops.kdloss.loss_and_grad`` (with a fake
implementation for shape propagation and an autograd formula), so the loss works in eager mode, under
``torch.compile`` and on ``meta`` tensors. A second operator, ``torch.ops.kdloss.loss``, computes the loss
alone; it is used when no gradient is wanted (``torch.no_grad()``, a student that does not require grad),
so evaluation does not pay for a gradient buffer.
"""

# No ``from __future__ import annotations`` here: torch.library.custom_op infers the operator schemas from the
# annotations, and not every torch release this package supports resolves string annotations.
import functools
import numbers
from typing import Optional, Union

import numpy as np

try:
    import torch
except ImportError as error:  # say how to get it rather than just "No module named 'torch'"
    raise ImportError("kdloss.torch needs PyTorch: pip install 'kdloss[torch]'") from error
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._loss import DistillationLoss as _NumpyDistillationLoss

__all__ = ["DistillationLoss", "distillation_loss"]

Normalizer = Union[float, Tensor, None]
"""A positive finite number, a one-element tensor holding one (e.g. an all-reduced count), or None."""

# The native kernels run on the CPU; "meta" tensors only carry shapes and go through the fake
# implementations, so that shape inference (and torch.compile's tracing) works on them too.
_SUPPORTED_DEVICES = ("cpu", "meta")


@functools.lru_cache(maxsize=64)
def _engine(
    temperature: float, alpha: float, reduction: str, ignore_index: int, num_threads: Optional[int]
) -> _NumpyDistillationLoss:
    """The NumPy-facing loss object for these parameters (it validates them).

    Cached because a training loop calls the operator with the same parameters every step; the objects are
    immutable here (their setters are never used) and safe to share between threads.
    """
    return _NumpyDistillationLoss(
        temperature, alpha, reduction=reduction, ignore_index=ignore_index, num_threads=num_threads
    )


def _normalizer_value(normalizer: Optional[Tensor]) -> Optional[float]:
    # .item() is fine here: the operator's implementation runs on CPU tensors, outside any graph.
    return None if normalizer is None else float(normalizer.item())


def _loss_tensor(loss: Union[float, np.ndarray], dtype: torch.dtype) -> Tensor:
    """The NumPy API returns a Python float for "mean"/"sum" and an owned ndarray for "none"."""
    if isinstance(loss, float):
        return torch.tensor(loss, dtype=dtype)
    return torch.from_numpy(loss)  # the array was freshly allocated by kdloss: adopt it, no copy


# ---------------------------------------------------------------------------------------------------------
# Custom operators. Their contract is narrower than the public functions': student and teacher are CPU
# tensors of the same shape and dtype, float32 or float64; labels are int64 class indices or target
# distributions in that dtype. distillation_loss() takes care of everything else.
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("kdloss::loss_and_grad", mutates_args=())
def _loss_and_grad(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    alpha: float,
    reduction: str,
    ignore_index: int,
    normalizer: Optional[Tensor],
    num_threads: Optional[int],
) -> tuple[Tensor, Tensor]:
    """Loss and d(loss)/d(student) from one native call; the gradient is written into a new tensor."""
    engine = _engine(temperature, alpha, reduction, ignore_index, num_threads)
    # A fresh contiguous tensor: kdloss's out= needs a C-contiguous array, and the operator's outputs must
    # not alias its inputs. .numpy() is a view of the same memory, so kdloss writes into the tensor itself.
    grad = torch.empty(student.shape, dtype=student.dtype)
    # Inputs still carry requires_grad inside the operator; detach() is free and lets DLPack see them.
    loss, _ = engine.loss_and_gradient(
        student.detach(),
        teacher.detach(),
        None if labels is None else labels.detach(),
        out=grad.numpy(),
        normalizer=_normalizer_value(normalizer),
    )
    return _loss_tensor(loss, student.dtype), grad


@_loss_and_grad.register_fake
def _loss_and_grad_fake(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    alpha: float,
    reduction: str,
    ignore_index: int,
    normalizer: Optional[Tensor],
    num_threads: Optional[int],
) -> tuple[Tensor, Tensor]:
    loss_shape = student.shape[:-1] if reduction == "none" else ()
    return student.new_empty(loss_shape), torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    _, grad = output
    ctx.row_losses = inputs[5] == "none"
    ctx.save_for_backward(grad)
    # The gradient output is a by-product, not a function the user may differentiate.
    ctx.mark_non_differentiable(grad)


# once_differentiable: the saved gradient is a constant to autograd, so a second derivative through it would
# be silently wrong (zero Hessian). This makes create_graph=True double backward raise instead.
@once_differentiable
def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_of_grad: Optional[Tensor]
) -> tuple[Optional[Tensor], ...]:
    (grad,) = ctx.saved_tensors
    if ctx.row_losses:
        # "none": the saved gradient is that of the *sum* of the row losses, so row r's gradient scales by
        # grad_loss[r]; broadcast over the class axis.
        grad_loss = grad_loss.unsqueeze(-1)
    # Student only: the teacher and the labels never receive a gradient; the rest are not tensors.
    return grad * grad_loss, None, None, None, None, None, None, None, None


torch.library.register_autograd("kdloss::loss_and_grad", _backward, setup_context=_setup_context)


@torch.library.custom_op("kdloss::loss", mutates_args=())
def _loss_only(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    alpha: float,
    reduction: str,
    ignore_index: int,
    normalizer: Optional[Tensor],
    num_threads: Optional[int],
) -> Tensor:
    """The loss alone (no gradient buffer), for evaluation."""
    engine = _engine(temperature, alpha, reduction, ignore_index, num_threads)
    loss = engine.compute_loss(
        student.detach(),
        teacher.detach(),
        None if labels is None else labels.detach(),
        normalizer=_normalizer_value(normalizer),
    )
    return _loss_tensor(loss, student.dtype)


@_loss_only.register_fake
def _loss_only_fake(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    temperature: float,
    alpha: float,
    reduction: str,
    ignore_index: int,
    normalizer: Optional[Tensor],
    num_threads: Optional[int],
) -> Tensor:
    return student.new_empty(student.shape[:-1] if reduction == "none" else ())


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


def _prepare_labels(labels: object, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"true_labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.device != device:
        raise RuntimeError(f"true_labels is on {labels.device} but the logits are on {device}")
    # Labels never receive a gradient (soft targets produced by a model are constants to this loss).
    labels = labels.detach()
    if labels.is_floating_point():
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
    return torch.tensor(float(normalizer), dtype=torch.float64)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    true_labels: Optional[Tensor] = None,
    *,
    temperature: float = 3.0,
    alpha: float = 0.3,
    reduction: str = "mean",
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    num_threads: Optional[int] = None,
) -> Tensor:
    r"""Knowledge-distillation loss of a batch, differentiable with respect to the student logits.

    The loss and its gradient are computed together by one native call in the forward pass; the backward
    pass multiplies the saved gradient by ``grad_output``. See :class:`kdloss.DistillationLoss` for the
    formula:
    :math:`\alpha\,\mathrm{CE}(s, y) + (1-\alpha)\,T^2\,\mathrm{KL}(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T))`
    per row, the KL term alone without labels.

    Parameters
    ----------
    student_logits : torch.Tensor, shape (..., C)
        Student outputs on the CPU: (B, C), one row (C,), or sequences (B, S, C) whose leading axes are
        all rows. float32/float64 tensors are read in place; float16/bfloat16 are computed in float32.
    teacher_logits : torch.Tensor, same shape as `student_logits`
        Teacher outputs. Never receives a gradient, even if it requires one (it is detached).
    true_labels : torch.Tensor, optional
        Integer class indices of the logits' leading shape (entries equal to `ignore_index` are skipped),
        or floating target distributions of the logits' shape. Never receives a gradient.
    temperature, alpha, reduction, ignore_index, num_threads
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
        On shape mismatches, invalid parameters or labels (from the native validation).
    RuntimeError
        If a tensor is on a device other than the CPU (or meta).
    """
    student = _check_logits("student_logits", student_logits)
    teacher = _check_logits("teacher_logits", teacher_logits)
    if teacher.device != student.device:
        raise RuntimeError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    # float64 if either side is float64 (as np.result_type would say), float32 otherwise; half precision
    # computes in float32. The casts are autograd ops: for a float16 student, torch's own backward of .to()
    # turns the float32 gradient into float16 *after* it has been multiplied by grad_output (e.g. a
    # GradScaler's scale), so small gradients do not underflow in float16 first. Same-dtype casts are no-ops.
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    student = student.to(dtype)
    teacher = teacher.detach().to(dtype)  # the teacher is a constant: never a gradient
    labels = _prepare_labels(true_labels, dtype, student.device)
    args = (
        teacher,
        labels,
        float(temperature),
        float(alpha),
        reduction,
        int(ignore_index),
        _prepare_normalizer(normalizer),
        num_threads,
    )
    if torch.is_grad_enabled() and student.requires_grad:
        loss, _ = torch.ops.kdloss.loss_and_grad(student, *args)
        return loss
    # No gradient wanted: skip the gradient buffer entirely.
    return torch.ops.kdloss.loss(student, *args)


class DistillationLoss(torch.nn.Module):
    r"""Knowledge-distillation loss (Hinton et al., 2015) as a ``torch.nn.Module``, computed natively on the CPU.

    Per row, :math:`\alpha\,\mathrm{CE}(\mathrm{softmax}(s), y) + (1-\alpha)\,T^2\,
    \mathrm{KL}(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T))`, or the :math:`T^2\,\mathrm{KL}` term
    alone without labels; rows are combined by `reduction`. The forward pass computes the loss and its
    gradient in one native call; backward scales the saved gradient by ``grad_output``.

    Parameters
    ----------
    temperature : float, default 3.0
        Softmax temperature, finite and > 0.
    alpha : float, default 0.3
        Weight of the hard (cross-entropy) term when labels are given, in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" averages over the counted (not ignored) rows, "sum" adds them, "none" returns one loss per
        row (the logits' leading shape).
    ignore_index : int, default -100
        Rows whose class-index label equals this are left out: no loss, zero gradient, not counted.
    num_threads : int or None, default None
        Most threads one call uses (None: all cores).

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
    - Double backward (``create_graph=True`` through this loss) is not supported and raises.

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
    ) -> None:
        super().__init__()
        _engine(temperature, alpha, reduction, ignore_index, num_threads)  # validates, like the NumPy class
        # Plain Python attributes (not the NumPy object's properties) so that torch.compile can read them.
        self._temperature = float(temperature)
        self._alpha = float(alpha)
        self._reduction = reduction
        self._ignore_index = int(ignore_index)
        self._num_threads = num_threads

    def _validated(self, **changes: object) -> None:
        params = {
            "temperature": self._temperature,
            "alpha": self._alpha,
            "reduction": self._reduction,
            "ignore_index": self._ignore_index,
            "num_threads": self._num_threads,
        }
        params.update(changes)
        _NumpyDistillationLoss(**params)  # type: ignore[arg-type]  # raises on invalid values

    @property
    def temperature(self) -> float:
        """Softmax temperature ``T`` (finite, > 0); settable."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._validated(temperature=value)
        self._temperature = float(value)

    @property
    def alpha(self) -> float:
        """Weight of the hard-label term, in [0, 1]; settable."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._validated(alpha=value)
        self._alpha = float(value)

    @property
    def reduction(self) -> str:
        """How row losses combine: "mean", "sum" or "none"."""
        return self._reduction

    @property
    def ignore_index(self) -> int:
        """Class-index label value whose rows are ignored."""
        return self._ignore_index

    @property
    def num_threads(self) -> Optional[int]:
        """Most threads one call uses (None: all cores)."""
        return self._num_threads

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        true_labels: Optional[Tensor] = None,
        *,
        normalizer: Normalizer = None,
    ) -> Tensor:
        """Distillation loss of a batch; see :func:`distillation_loss`.

        Parameters
        ----------
        student_logits : torch.Tensor, shape (..., C)
            Student outputs (requires grad for training).
        teacher_logits : torch.Tensor, same shape
            Teacher outputs; never receives a gradient.
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
        return distillation_loss(
            student_logits,
            teacher_logits,
            true_labels,
            temperature=self._temperature,
            alpha=self._alpha,
            reduction=self._reduction,
            ignore_index=self._ignore_index,
            normalizer=normalizer,
            num_threads=self._num_threads,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self._temperature!r}, alpha={self._alpha!r}, reduction={self._reduction!r}, "
            f"ignore_index={self._ignore_index!r}, num_threads={self._num_threads!r}"
        )
