"""Autograd for kdloss.torch in eager mode: the kernel's gradient handed to autograd as it is.

The forward pass is one native call that writes the loss's gradient into a NumPy buffer: the one the last step
dropped, when there is one (``_gradient_cache``), else a new one (NumPy advises the kernel to back it with huge
pages, so its first touch costs a fraction of what a buffer from torch's CPU allocator costs). The backward pass
then gives autograd that
buffer itself, scaled in place by ``grad_output`` unless that is exactly 1, whenever nothing can read the buffer
again (the graph is not retained); autograd adopts it as the student's ``.grad`` or passes it on, without a
copy. When the graph is retained the buffer is kept for the next backward and a scaled copy is returned.

A gradient that must itself be differentiable (``create_graph=True``: Hessians, gradient penalties) is
recomputed as a graph of torch operations (:func:`gradient_graph`), so every higher derivative is exact; the
saved buffer would be a constant to autograd, and its derivative silently zero.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._params import Parameters
from ._torch_checks import engine


def graph_is_retained() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``/``create_graph``), so that this node's
    backward may run again. Torch asks the same for its compiled graphs' saved buffers; a torch without the
    query is answered "yes", the choice that is always correct."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def loss_tensor(loss: Any, dtype: torch.dtype) -> Tensor:
    """The NumPy API returns a Python float for "mean"/"sum" and an owned ndarray for "none"."""
    if isinstance(loss, float):
        return torch.scalar_tensor(loss, dtype=dtype)
    return torch.from_numpy(loss)  # freshly allocated by kdloss: adopted, no copy


def gradient_graph(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    params: Parameters,
    normalizer: Union[float, Tensor, None],
) -> Tensor:
    r"""d(loss)/d(student) as differentiable torch operations (for ``create_graph=True`` only).

    Per counted row, :math:`(1-\alpha)\,g_D + \alpha\,(p_1 \sum_c y_c - y)` (no labels: :math:`g_D`), with
    :math:`g_D` the soft term's gradient (:func:`soft_gradient_graph`), divided as the reduction divides; the
    formula the kernel computes, so autograd differentiates the very gradient the kernel returns. Labels were
    validated by the kernel in the forward pass.
    """
    temperature, alpha = params.temperature, params.alpha
    soft = soft_gradient_graph(student, teacher, temperature, params.divergence)
    counted = None
    if labels is None:
        rows = soft
    else:
        if labels.is_floating_point():
            target = labels
        else:
            counted = labels != params.ignore_index
            classes = torch.arange(student.shape[-1], device=student.device)
            target = (labels.unsqueeze(-1) == classes).to(student.dtype)  # one-hot; ignored rows all zero
        hard = torch.softmax(student, -1) * target.sum(-1, keepdim=True) - target
        # A term whose weight is 0 is absent, as in the kernel (so it cannot turn a row into 0 * inf = NaN).
        rows = soft if alpha == 0 else hard if alpha == 1 else alpha * hard + (1 - alpha) * soft
    if counted is not None:
        rows = torch.where(counted.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if normalizer is not None:
        return rows / normalizer
    if params.reduction == "mean":
        # A tensor count, not a Python number: this also runs on fake tensors, under torch.compile.
        return rows / (max(student[..., 0].numel(), 1) if counted is None else counted.sum().clamp(min=1))
    return rows


def soft_gradient_graph(student: Tensor, teacher: Tensor, temperature: float, divergence: str) -> Tensor:
    r"""d(T^2 D)/d(student) per row: :math:`T\,(q - p)` for forward KL, and for reverse KL
    :math:`T\,q\,(r - E_q[r])` with :math:`r = \log q - \log p` (the kernel's formula)."""
    if divergence not in ("forward_kl", "reverse_kl"):
        raise NotImplementedError(f"second derivatives of divergence {divergence!r} are not implemented yet")
    q = torch.softmax(student / temperature, -1)
    if divergence == "forward_kl":
        return temperature * (q - torch.softmax(teacher / temperature, -1))
    # Where the student has no mass the term is 0 whatever log p says (as in the kernel): no 0 * inf.
    ratio = torch.log_softmax(student / temperature, -1) - torch.log_softmax(teacher / temperature, -1)
    ratio = torch.where(q == 0, torch.zeros((), dtype=q.dtype, device=q.device), ratio)
    mean = (q * ratio).sum(-1, keepdim=True)
    return temperature * q * (ratio - mean)


def _is_one(grad_loss: Tensor) -> bool:
    return grad_loss.item() == 1.0 if grad_loss.dim() == 0 else bool((grad_loss == 1).all())


def scale_per_row(grad_loss: Tensor, row_losses: bool) -> Tensor:
    """``grad_output`` shaped to scale the gradient: one number, or one per row broadcast over the classes."""
    return grad_loss.unsqueeze(-1) if row_losses else grad_loss


class DistillationFunction(torch.autograd.Function):
    """The eager path: loss and gradient from one native call; backward hands the gradient to autograd."""

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        labels: Optional[Tensor],
        params: Parameters,
        normalizer: Optional[float],
    ) -> Tensor:
        # Plain CPU tensors (DistillationLoss's eager path takes no others): .numpy() views them, for less
        # than a DLPack exchange costs. Inside forward the student still requires grad; detach() is free.
        loss, gradient = engine(params).loss_and_gradient(
            student.detach().numpy(), teacher.numpy(), None if labels is None else labels.numpy(), normalizer=normalizer
        )
        # The gradient buffer is private to this node (an attribute, not a saved tensor or an output): nothing
        # else holds it, so handing it to autograd in backward aliases nothing a user can see.
        ctx.gradient = torch.from_numpy(gradient)
        ctx.params, ctx.normalizer = params, normalizer
        ctx.save_for_backward(student, teacher, labels)  # read only for create_graph=True, or to raise
        return loss_tensor(loss, student.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        row_losses = ctx.params.reduction == "none"
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be a graph of the student
            student, teacher, labels = ctx.saved_tensors
            gradient = gradient_graph(student, teacher, labels, ctx.params, ctx.normalizer)
            return gradient * scale_per_row(grad_loss, row_losses), None, None, None, None
        gradient = ctx.gradient
        if gradient is None:  # a second backward through a freed graph: torch's own error, in its words
            _ = ctx.saved_tensors
            raise RuntimeError("kdloss: the gradient of this loss was already handed to an earlier backward")
        if graph_is_retained():
            # This node may run again and must still have the buffer then; a caller of autograd.grad owns what
            # it gets and may write to it. So the caller gets a copy, scaled on the way.
            return gradient * scale_per_row(grad_loss, row_losses), None, None, None, None
        ctx.gradient = None  # handed over: this node will not read it again
        if not _is_one(grad_loss):  # exactly 1 for a plain loss.backward(): nothing to scale
            gradient.mul_(scale_per_row(grad_loss, row_losses))
        return gradient, None, None, None, None
