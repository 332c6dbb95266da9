"""The custom operators ``torch.ops.kdloss.loss_and_grad`` and ``torch.ops.kdloss.loss``, and their counterparts for
a sparse teacher, ``torch.ops.kdloss.sparse_loss_and_grad`` and ``torch.ops.kdloss.sparse_loss``: what
torch.compile sees.

Their contract is narrower than the public functions': student and teacher are tensors of the same shape and
dtype, float32 or float64; labels are int64 class indices or target distributions in that dtype. The sparse
operators take a ``kdloss.SparseTeacher``'s two arrays in place of the teacher, ``indices`` (int32 or int64) and
``logprobs`` (float16, float32 or float64) of shape ``(..., K)``, and the parameter ``tail`` after the others.
Each has a fake implementation (which checks what does not depend on values, with the messages of a CPU call) and an
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
from ._sparse_teacher import SparseTeacher
from ._torch_autograd import gradient_graph, loss_tensor, scale_per_row
from ._torch_checks import check_shapes, check_sparse_shapes, check_sparse_structure, engine, validated_params


def _normalizer_value(normalizer: Optional[Tensor]) -> Optional[float]:
    # .item() is fine here: an operator's implementation runs on CPU tensors, outside any graph.
    return None if normalizer is None else float(normalizer.item())


def operator_arguments(params: Parameters, normalizer: Optional[Tensor]) -> tuple:
    """The dense operators' arguments after (student, teacher, labels), in their schemas' order."""
    # (tail is not among them: it means nothing for a dense teacher.)
    return (*params[:4], normalizer, params.num_threads, params.divergence, params.beta, params.skew)


def sparse_operator_arguments(params: Parameters, normalizer: Optional[Tensor]) -> tuple:
    """The sparse operators' arguments after (student, indices, logprobs, labels): the dense ones', then tail."""
    return (*operator_arguments(params, normalizer), params.tail)


def _parameters(arguments: tuple) -> tuple[Parameters, Optional[Tensor]]:
    """(Parameters, normalizer) from an operator's arguments after its tensors (the inverse of the above)."""
    return Parameters(*arguments[:4], *arguments[5:]), arguments[4]


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


def _save_inputs(ctx: Any, inputs: tuple, *outputs: Tensor, teacher_tensors: int = 1) -> None:
    """Saves (student, teacher tensors, labels, outputs...) and the parameters; a sparse teacher is two tensors."""
    tensors = inputs[: 2 + teacher_tensors]
    ctx.params, ctx.normalizer = _parameters(inputs[2 + teacher_tensors :])
    ctx.teacher_tensors, ctx.inputs = teacher_tensors, len(inputs)
    ctx.save_for_backward(*tensors, *outputs)


def _saved_inputs(ctx: Any) -> tuple:
    """(student, teacher, labels) as saved, the teacher a tensor or a sparse teacher's (indices, logprobs)."""
    saved = ctx.saved_tensors
    student, teacher, labels = saved[0], saved[1 : 1 + ctx.teacher_tensors], saved[1 + ctx.teacher_tensors]
    return student, teacher[0] if ctx.teacher_tensors == 1 else teacher, labels


def _no_gradient(ctx: Any) -> tuple:
    """None for each input after the student: the teacher, the labels and the parameters never receive a gradient."""
    return (None,) * (ctx.inputs - 1)


def _differentiable_gradient(ctx: Any, grad_loss: Tensor) -> Tensor:
    """create_graph=True: a gradient autograd can differentiate again (see _torch_autograd)."""
    student, teacher, labels = _saved_inputs(ctx)
    gradient = gradient_graph(student, teacher, labels, ctx.params, ctx.normalizer)
    return gradient * scale_per_row(grad_loss, ctx.params.reduction == "none")


def _setup_loss_and_grad(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save_inputs(ctx, inputs, output[1])
    ctx.mark_non_differentiable(output[1])  # a by-product, not a function to differentiate


def _backward_loss_and_grad(ctx: Any, grad_loss: Tensor, _grad_of_gradient: Optional[Tensor]) -> tuple:
    if torch.is_grad_enabled():
        return (_differentiable_gradient(ctx, grad_loss), *_no_gradient(ctx))
    gradient = ctx.saved_tensors[-1]
    return (gradient * scale_per_row(grad_loss, ctx.params.reduction == "none"), *_no_gradient(ctx))


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
        return (_differentiable_gradient(ctx, grad_loss), *_no_gradient(ctx))
    # The loss-only operator kept no gradient: the fused operator computes it (direct calls only; the public
    # functions use loss_and_grad whenever a gradient may be wanted).
    student, teacher, labels = _saved_inputs(ctx)
    params = ctx.params
    if isinstance(teacher, tuple):
        arguments = sparse_operator_arguments(params, ctx.normalizer)
        _, gradient = torch.ops.kdloss.sparse_loss_and_grad(student, *teacher, labels, *arguments)
    else:
        arguments = operator_arguments(params, ctx.normalizer)
        _, gradient = torch.ops.kdloss.loss_and_grad(student, teacher, labels, *arguments)
    return (gradient * scale_per_row(grad_loss, params.reduction == "none"), *_no_gradient(ctx))


def _setup_loss(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save_inputs(ctx, inputs)


torch.library.register_autograd("kdloss::loss", _backward_loss, setup_context=_setup_loss)


# ---------------------------------------------------------------------------------------------------------------
# A sparse teacher: the same operators with its (indices, logprobs) in place of the teacher, and tail. The kernel
# is the NumPy class's, given a kdloss.SparseTeacher that views the two tensors.
# ---------------------------------------------------------------------------------------------------------------


def _sparse_teacher(indices: Tensor, logprobs: Tensor) -> SparseTeacher:
    check_sparse_structure(indices, logprobs)  # as the fake implementations do: before DLPack sees a bfloat16
    return SparseTeacher(indices.detach(), logprobs.detach())


@torch.library.custom_op("kdloss::sparse_loss_and_grad", mutates_args=())
def _sparse_loss_and_grad(
    student: Tensor,
    indices: Tensor,
    logprobs: Tensor,
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
    tail: str = "bucket",
) -> tuple[Tensor, Tensor]:
    """Loss and d(loss)/d(student) against a sparse teacher from one native call; the gradient is a new tensor."""
    params = Parameters(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail)
    loss, gradient = engine(params).loss_and_gradient(
        student.detach(),
        _sparse_teacher(indices, logprobs),
        _detached(labels),
        normalizer=_normalizer_value(normalizer),
    )
    return loss_tensor(loss, student.dtype), torch.from_numpy(gradient)


@_sparse_loss_and_grad.register_fake
def _sparse_loss_and_grad_fake(
    student: Tensor,
    indices: Tensor,
    logprobs: Tensor,
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
    tail: str = "bucket",
) -> tuple[Tensor, Tensor]:
    params = validated_params(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail)
    check_sparse_structure(indices, logprobs)
    check_sparse_shapes(student, indices.shape, labels, params, normalizer is not None)
    return _loss_fake(student, params), torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_sparse_loss_and_grad(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save_inputs(ctx, inputs, output[1], teacher_tensors=2)
    ctx.mark_non_differentiable(output[1])


torch.library.register_autograd(
    "kdloss::sparse_loss_and_grad", _backward_loss_and_grad, setup_context=_setup_sparse_loss_and_grad
)


@torch.library.custom_op("kdloss::sparse_loss", mutates_args=())
def _sparse_loss_only(
    student: Tensor,
    indices: Tensor,
    logprobs: Tensor,
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
    tail: str = "bucket",
) -> Tensor:
    """The loss against a sparse teacher alone (no gradient buffer), for evaluation."""
    params = Parameters(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail)
    loss = engine(params).compute_loss(
        student.detach(),
        _sparse_teacher(indices, logprobs),
        _detached(labels),
        normalizer=_normalizer_value(normalizer),
    )
    return loss_tensor(loss, student.dtype)


@_sparse_loss_only.register_fake
def _sparse_loss_only_fake(
    student: Tensor,
    indices: Tensor,
    logprobs: Tensor,
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
    tail: str = "bucket",
) -> Tensor:
    params = validated_params(temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail)
    check_sparse_structure(indices, logprobs)
    check_sparse_shapes(student, indices.shape, labels, params, normalizer is not None)
    return _loss_fake(student, params)


def _setup_sparse_loss(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _save_inputs(ctx, inputs, teacher_tensors=2)


torch.library.register_autograd("kdloss::sparse_loss", _backward_loss, setup_context=_setup_sparse_loss)
