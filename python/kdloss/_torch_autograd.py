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

import math
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
    soft = soft_gradient_graph(student, teacher, temperature, params.divergence, params.beta, params.skew)
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


def soft_gradient_graph(
    student: Tensor, teacher: Tensor, temperature: float, divergence: str, beta: float = 0.5, skew: float = 0.1
) -> Tensor:
    r"""d(T^2 D)/d(student) per row, with :math:`p`, :math:`q` the teacher's and student's softmax at :math:`T`:

    - forward KL: :math:`T\,(q - p)`;
    - reverse KL: :math:`T\,q\,(r - E_q[r])`, :math:`r = \log q - \log p`;
    - JSD, :math:`0 < \beta < 1`: :math:`T\,(1-\beta)\,q\,(r - E_q[r])`, :math:`r = \log q - \log m`,
      :math:`m = \beta p + (1-\beta) q` (:math:`E_q[r] = \mathrm{KL}(q\,\|\,m)`); :math:`\beta = 0` and
      :math:`\beta = 1` are forward and reverse KL exactly (TRL's convention, and the kernel's);
    - skew forward KL, :math:`m = \lambda p + (1-\lambda) q`: :math:`T\,(q\,W - p\,w)`,
      :math:`w = (1-\lambda)\,q/m`, :math:`W = \sum p\,w`; :math:`\lambda = 0` is forward KL;
    - skew reverse KL, :math:`m = \lambda q + (1-\lambda) p`: :math:`T\,q\,(v - E_q[v])`,
      :math:`v = \log(q/m) - \lambda\,q/m`; :math:`\lambda = 0` is reverse KL.

    These are the derivatives the kernel returns (it arranges them differently, for float precision), written so
    that autograd can differentiate them again, with finite results wherever the kernel's gradient is finite:
    every log-probability comes from ``log_softmax``, a mixture's log from ``logaddexp`` of the two weighted logs
    (never the log of a sum of rounded probabilities), and each ``-inf`` is replaced by a finite stand-in *before*
    an operation whose derivative would multiply it (``torch.where`` masks a value, not the NaN that ``0 * inf``
    leaves in its derivative). A class that both sides rule out therefore contributes nothing, to the gradient or
    to its derivatives.
    """
    if divergence == "jsd":
        divergence = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else divergence
    elif divergence in ("skew_forward_kl", "skew_reverse_kl") and skew == 0:
        divergence = divergence.removeprefix("skew_")
    if divergence not in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"):
        raise ValueError(f"unknown divergence {divergence!r}")  # validated long before; a guard for new ones
    q = torch.softmax(student / temperature, -1)
    if divergence == "forward_kl":
        return temperature * (q - torch.softmax(teacher / temperature, -1))
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    # Where the student has no mass its factor q is 0 whatever the log-ratio says (as in the kernel): no 0 * inf.
    student_rules_out = q == 0
    if divergence == "reverse_kl":
        ratio = torch.where(student_rules_out, zero, log_q - log_p)
        return temperature * q * (ratio - (q * ratio).sum(-1, keepdim=True))
    if divergence == "jsd":
        # d/dq_i of beta KL(p||m) + (1-beta) KL(q||m) is (1-beta) log(q_i/m_i): the p/m terms cancel.
        log_m = _log_mixture(log_p, log_q, beta)
        ratio = torch.where(student_rules_out, zero, log_q - log_m)  # finite: m >= (1-beta) q > 0 where q > 0
        return (temperature * (1 - beta)) * q * (ratio - (q * ratio).sum(-1, keepdim=True))
    if divergence == "skew_forward_kl":
        log_m = _log_mixture(log_p, log_q, skew)
        # w = (1-skew) q/m in [0, 1], from logs; 0 where the student has no mass (m may be 0 there too).
        log_w = torch.where(student_rules_out, -math.inf, log_q - log_m)
        pw = torch.exp(log_p) * torch.exp(log_w + math.log1p(-skew))
        return temperature * (q * pw.sum(-1, keepdim=True) - pw)
    # skew_reverse_kl: d/dq_i of KL(q || skew q + (1-skew) p) is log(q_i/m_i) + 1 - skew q_i/m_i; the 1 cancels.
    log_m = _log_mixture(log_q, log_p, skew)
    ratio = torch.where(student_rules_out, zero, log_q - log_m)  # finite: m >= skew q > 0 where q > 0
    v = ratio - skew * torch.exp(ratio)
    return temperature * q * (v - (q * v).sum(-1, keepdim=True))


def _log_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(weight e^log_a + (1-weight) e^log_b) for 0 < weight < 1, as ``logaddexp`` of the weighted logs.

    ``-inf`` where both are ``-inf`` (a class both sides rule out), with derivative 0 there rather than the NaN
    of logaddexp's derivative at (-inf, -inf): the inputs are made finite first, the result masked after.
    """
    neither = (log_a == -math.inf) & (log_b == -math.inf)
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    log_a = torch.where(neither, zero, log_a) + math.log(weight)
    log_b = torch.where(neither, zero, log_b) + math.log1p(-weight)
    return torch.where(neither, -math.inf, torch.logaddexp(log_a, log_b))


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
