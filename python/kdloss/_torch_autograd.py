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
saved buffer would be a constant to autograd, and its derivative silently zero. The teacher is dense logits or a
``kdloss.SparseTeacher``; inside the graphs and the operators a sparse teacher is its two arrays as tensors,
``(indices, logprobs)`` (:func:`sparse_tensors`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._params import Parameters
from ._sparse_teacher import SparseTeacher
from ._torch_checks import TORCH_DTYPES, engine

Teacher = Union[Tensor, tuple[Tensor, Tensor]]
"""Teacher logits, or a sparse teacher's ``(indices, logprobs)``."""


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


def sparse_tensors(cache: SparseTeacher, device_type: str = "cpu") -> tuple[Tensor, Tensor]:
    """A sparse teacher's (indices, logprobs) as tensors viewing its arrays, never a copy of them.

    ``torch.from_dlpack`` takes read-only arrays (a memory-mapped cache) as they are, where ``torch.from_numpy``
    would warn; under torch.compile, which cannot trace it, ``torch.as_tensor`` makes the arrays inputs of the
    graph. For a student on the ``meta`` device, meta tensors of the arrays' shapes and dtypes stand in for them.
    """
    indices, logprobs = cache.indices, cache.logprobs
    if torch.compiler.is_compiling():
        return torch.as_tensor(indices), torch.as_tensor(logprobs)
    if device_type == "meta":
        return (
            torch.empty(indices.shape, dtype=TORCH_DTYPES[indices.dtype], device="meta"),
            torch.empty(logprobs.shape, dtype=TORCH_DTYPES[logprobs.dtype], device="meta"),
        )
    return torch.from_dlpack(indices), torch.from_dlpack(logprobs)


def gradient_graph(
    student: Tensor,
    teacher: Teacher,
    labels: Optional[Tensor],
    params: Parameters,
    normalizer: Union[float, Tensor, None],
) -> Tensor:
    r"""d(loss)/d(student) as differentiable torch operations (for ``create_graph=True`` only).

    Per counted row, :math:`(1-\alpha)\,g_D + \alpha\,(p_1 \sum_c y_c - y)` (no labels: :math:`g_D`), with
    :math:`g_D` the soft term's gradient (:func:`soft_gradient_graph`, or :func:`sparse_soft_gradient_graph` for a
    sparse teacher's ``(indices, logprobs)``), divided as the reduction divides; the formula the kernel computes,
    so autograd differentiates the very gradient the kernel returns. Labels and a sparse teacher's slots were
    validated by the kernel in the forward pass.
    """
    temperature, alpha = params.temperature, params.alpha
    if isinstance(teacher, tuple):
        soft = sparse_soft_gradient_graph(student, *teacher, temperature, params.tail)
    else:
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


def sparse_soft_gradient_graph(
    student: Tensor, indices: Tensor, logprobs: Tensor, temperature: float, tail: str
) -> Tensor:
    r"""d(T^2 D)/d(student) per row against a sparse teacher, as the kernel computes it (``sparse_kl.hpp``).

    With :math:`\pi` the listed probabilities (``tail="bucket"``: :math:`p`; ``"renormalize"``: :math:`p / \sum p`),
    :math:`\rho` the tail (``"bucket"``: :math:`\max(0, 1 - \sum p)`, 0 where every class is listed;
    ``"renormalize"``: 0), :math:`P = \sum \pi + \rho`, :math:`q` the student's softmax at :math:`T` and
    :math:`Q_u` its mass outside the listed classes:

    - :math:`T\,(P\,q_j - \pi_j)` at a listed class,
    - :math:`T\,q_j\,(P - \rho / Q_u)` elsewhere,

    and 0 for a row that lists nothing (it has no soft term). :math:`P` is 1, but for a ``"bucket"`` row without a
    tail (every class listed, or probabilities summing to 1 or more) it is their sum, whatever rounding left of 1,
    as in the kernel.

    The teacher's side (:math:`\pi`, :math:`\rho`, :math:`P`) is a constant, worked out in float64 from the cache
    as the kernel works it out, then scattered into the classes. :math:`q_j / Q_u` comes from the log-softmax as
    :math:`\exp(\log q_j - \mathrm{logsumexp}_{c \notin K} \log q_c)`, never from :math:`1 - \sum_k q_k`. In a
    row without a tail every class stands in for the unlisted ones (a finite value, multiplied by :math:`\rho = 0`),
    so that no ``logsumexp`` of nothing but ``-inf`` leaves a NaN in the derivatives. A row with a tail whose
    unlisted classes the student rules out entirely has an infinite loss: its gradient is NaN at those classes, as
    the kernel's is, and so are its higher derivatives.
    """
    classes = student.shape[-1]
    logprobs = logprobs.to(torch.float64)
    listed_slot = logprobs != -math.inf  # an empty slot's index may be anything, even out of range
    p = torch.exp(logprobs)
    p_sum = p.sum(-1, keepdim=True)
    count = listed_slot.sum(-1, keepdim=True)
    if tail == "renormalize":
        pi = torch.where(listed_slot, p / p_sum, 0.0)
        rho = torch.zeros_like(p_sum)
        total = (count > 0).to(torch.float64)
    elif tail == "bucket":
        pi = p
        rho = torch.where(count == classes, 0.0, (1.0 - p_sum).clamp(min=0.0))
        total = torch.where(rho > 0, 1.0, p_sum)
    else:
        raise ValueError(f"unknown tail {tail!r}")  # validated long before; a guard for new ones
    slots = torch.where(listed_slot, indices.to(torch.int64), 0)
    # Added, not written: an empty slot may name a listed class, and adds nothing to it.
    listed = torch.zeros(student.shape, dtype=torch.int32, device=student.device)
    listed = listed.scatter_add(-1, slots, listed_slot.to(torch.int32)) > 0
    pi = torch.zeros(student.shape, dtype=torch.float64, device=student.device).scatter_add(-1, slots, pi)
    pi, rho, total = pi.to(student.dtype), rho.to(student.dtype), total.to(student.dtype)
    log_q = torch.log_softmax(student / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    unlisted_log_q = torch.where(listed & (rho > 0), -math.inf, log_q)
    share = torch.exp(log_q - torch.logsumexp(unlisted_log_q, -1, keepdim=True))  # q_j / Q_u
    tail_part = torch.where(listed, torch.zeros((), dtype=q.dtype, device=q.device), rho * share)
    gradient = temperature * (total * q - pi - tail_part)
    return torch.where(count > 0, gradient, torch.zeros((), dtype=q.dtype, device=q.device))


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
        teacher: Union[Tensor, SparseTeacher],
        labels: Optional[Tensor],
        params: Parameters,
        normalizer: Optional[float],
    ) -> Tensor:
        # Plain CPU tensors (DistillationLoss's eager path takes no others): .numpy() views them, for less
        # than a DLPack exchange costs. Inside forward the student still requires grad; detach() is free.
        # A sparse teacher goes to the kernel as it is: its arrays are read in place.
        sparse = isinstance(teacher, SparseTeacher)
        loss, gradient = engine(params).loss_and_gradient(
            student.detach().numpy(),
            teacher if sparse else teacher.numpy(),
            None if labels is None else labels.numpy(),
            normalizer=normalizer,
        )
        # The gradient buffer is private to this node (an attribute, not a saved tensor or an output): nothing
        # else holds it, so handing it to autograd in backward aliases nothing a user can see.
        ctx.gradient = torch.from_numpy(gradient)
        ctx.params, ctx.normalizer = params, normalizer
        ctx.sparse_teacher = teacher if sparse else None
        # Read only for create_graph=True, or to raise.
        ctx.save_for_backward(student, None if sparse else teacher, labels)
        return loss_tensor(loss, student.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        row_losses = ctx.params.reduction == "none"
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be a graph of the student
            student, teacher, labels = ctx.saved_tensors
            if ctx.sparse_teacher is not None:
                teacher = sparse_tensors(ctx.sparse_teacher)
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
