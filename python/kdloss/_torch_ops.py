"""The custom operators ``torch.ops.kdloss.loss_and_grad`` and ``torch.ops.kdloss.loss``: what torch.compile sees.

Their contract is narrower than the public functions': student and teacher are tensors of the same shape and
dtype, float32 or float64; labels are int64 class indices or target distributions in that dtype. Each has a
fake implementation (which checks what does not depend on values, with the messages of a CPU call) and an
autograd formula written in functional torch operations, which the compiler can trace. The public functions use
them under torch.compile, on meta tensors and for the loss alone; eager calls that want a gradient go through
:class:`kdloss._torch_autograd.DistillationFunction` instead, whose backward hands its buffer to autograd,
something a traced graph cannot express.
"""

# No ``from __future__ import annotations`` here: torch.library.custom_op infers the operator schemas from the
# annotations, and not every torch release this package supports resolves string annotations.
from typing import Any, Optional

import torch
from torch import Tensor

from ._params import Parameters
from ._torch_autograd import gradient_graph, loss_tensor, scale_per_row
from ._torch_checks import check_shapes, engine, validated_params


def _normalizer_value(normalizer: Optional[Tensor]) -> Optional[float]:
    # .item() is fine here: an operator's implementation runs on CPU tensors, outside any graph.
    return None if normalizer is None else float(normalizer.item())


def operator_arguments(params: Parameters, normalizer: Optional[Tensor]) -> tuple:
    """The operators' arguments after (student, teacher, labels), in their schemas' order."""
    # (tail is not among them: kdloss.torch takes dense teachers, for which it means nothing.)
    return (*params[:4], normalizer, params.num_threads, params.divergence, params.beta, params.skew)


def _detached(labels: Optional[Tensor]) -> Optional[Tensor]:
    return None if labels is None else labels.detach()


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
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Loss and d(loss)/d(student) from one native call; the gradient is a new tensor."""
    params = Parameters(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew)
    # The gradient is a NumPy buffer (the cached one a caller let go of, or a new one); the tensor adopts it.
    loss, gradient = engine(params).loss_and_gradient(
        student.detach(), teacher.detach(), _detached(labels), normalizer=_normalizer_value(normalizer)
    )
    return loss_tensor(loss, student.dtype), torch.from_numpy(gradient)


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
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[Tensor, Tensor]:
    params = validated_params(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew)
    check_shapes(student, teacher, labels, params, normalizer is not None)
    return _loss_fake(student, params), torch.empty_like(student, memory_format=torch.contiguous_format)


def _loss_fake(student: Tensor, params: Parameters) -> Tensor:
    return student.new_empty(student.shape[:-1] if params.reduction == "none" else ())


def _save_inputs(ctx: Any, inputs: tuple, *outputs: Tensor) -> None:
    student, teacher, labels, *params = inputs
    ctx.params = Parameters(*params[:4], *params[5:])
    normalizer = params[4]
    ctx.normalizer = normalizer
    ctx.save_for_backward(student, teacher, labels, *outputs)


def _differentiable_gradient(ctx: Any, grad_loss: Tensor) -> Tensor:
    """create_graph=True: a gradient autograd can differentiate again (see _torch_autograd)."""
    student, teacher, labels = ctx.saved_tensors[:3]
    gradient = gradient_graph(student, teacher, labels, ctx.params, ctx.normalizer)
    return gradient * scale_per_row(grad_loss, ctx.params.reduction == "none")


_NO_GRADIENT = (None,) * 11  # teacher, labels and the parameters never receive a gradient


def _setup_loss_and_grad(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save_inputs(ctx, inputs, output[1])
    ctx.mark_non_differentiable(output[1])  # a by-product, not a function to differentiate


def _backward_loss_and_grad(ctx: Any, grad_loss: Tensor, _grad_of_gradient: Optional[Tensor]) -> tuple:
    if torch.is_grad_enabled():
        return (_differentiable_gradient(ctx, grad_loss), *_NO_GRADIENT)
    gradient = ctx.saved_tensors[3]
    return (gradient * scale_per_row(grad_loss, ctx.params.reduction == "none"), *_NO_GRADIENT)


torch.library.register_autograd("kdloss::loss_and_grad", _backward_loss_and_grad, setup_context=_setup_loss_and_grad)


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
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """The loss alone (no gradient buffer), for evaluation."""
    params = Parameters(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew)
    loss = engine(params).compute_loss(
        student.detach(), teacher.detach(), _detached(labels), normalizer=_normalizer_value(normalizer)
    )
    return loss_tensor(loss, student.dtype)


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
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    params = validated_params(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew)
    check_shapes(student, teacher, labels, params, normalizer is not None)
    return _loss_fake(student, params)


def _backward_loss(ctx: Any, grad_loss: Tensor) -> tuple:
    if torch.is_grad_enabled():
        return (_differentiable_gradient(ctx, grad_loss), *_NO_GRADIENT)
    # The loss-only operator kept no gradient: the fused operator computes it (direct calls only; the public
    # functions use loss_and_grad whenever a gradient may be wanted).
    student, teacher, labels = ctx.saved_tensors
    params = ctx.params
    _, gradient = torch.ops.kdloss.loss_and_grad(student, teacher, labels, *operator_arguments(params, ctx.normalizer))
    return (gradient * scale_per_row(grad_loss, params.reduction == "none"), *_NO_GRADIENT)


def _setup_loss(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save_inputs(ctx, inputs)


torch.library.register_autograd("kdloss::loss", _backward_loss, setup_context=_setup_loss)
