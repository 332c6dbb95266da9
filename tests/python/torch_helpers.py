"""PyTorch oracles and data shared by the kdloss.torch test modules (imported only where torch is)."""

from __future__ import annotations

import pytest
import torch

F = torch.nn.functional

F64 = torch.float64
IGNORE = -100
REDUCTIONS = ("mean", "sum", "none")
LABEL_FORMS = ("none", "index", "soft")


# ------------------------------------------------------------------------------------------------------------
# Oracles and data
# ------------------------------------------------------------------------------------------------------------


def plain_torch_loss(
    s,
    t,
    y,
    *,
    temperature,
    alpha,
    reduction="mean",
    ignore_index=IGNORE,
    normalizer=None,
    divergence="forward_kl",
    soft_divergence=None,
):
    """The distillation loss from torch primitives (autograd gives its gradient). ``soft_divergence(log_p,
    log_q)``, when given, is the soft term's per-row D in place of the KL that ``divergence`` names.

    For reduction "mean" with class-index labels this is
    ``kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction='sum') * T² * (1-α) / N
    + α * cross_entropy(s, y, ignore_index=...)`` with N the number of counted rows.
    """
    c = s.shape[-1]
    s2, t2 = s.reshape(-1, c), t.reshape(-1, c)
    counted = torch.ones(s2.shape[0], dtype=torch.bool)
    if y is not None and not y.is_floating_point():
        counted = y.reshape(-1) != ignore_index
    student, teacher = F.log_softmax(s2 / temperature, dim=-1), F.log_softmax(t2 / temperature, dim=-1)
    if soft_divergence is not None:
        soft = soft_divergence(teacher, student) * temperature**2
    else:
        # kl_div(input, target) is KL(target || input): forward KL(teacher || student), or reverse.
        pair = (student, teacher) if divergence == "forward_kl" else (teacher, student)
        soft = F.kl_div(*pair, log_target=True, reduction="none").sum(-1) * temperature**2
    if y is None:
        rows = soft
    else:
        if y.is_floating_point():
            hard = -(y.reshape(-1, c) * F.log_softmax(s2, dim=-1)).sum(-1)
        else:
            hard = F.cross_entropy(s2, y.reshape(-1), ignore_index=ignore_index, reduction="none")
        rows = alpha * hard + (1 - alpha) * soft
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    if normalizer is not None:
        return rows.sum() / normalizer
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / counted.sum().clamp(min=1)


def make_batch(gen, shape, form, dtype=F64, *, ignored=True):
    """Student/teacher logits of `shape` and labels of the given form (index labels with ignored rows)."""
    s = torch.randn(shape, generator=gen, dtype=dtype) * 2
    t = torch.randn(shape, generator=gen, dtype=dtype) * 2
    if form == "none":
        y = None
    elif form == "index":
        y = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        if ignored and y.numel() > 1:
            y.view(-1)[::3] = IGNORE  # every third row ignored
    else:
        y = torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), dim=-1)
    return s, t, y


@pytest.fixture
def gen(request):
    """A torch generator seeded from the test's node id (deterministic, different per test)."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


def assert_close(got, want, rtol=1e-12, what=""):
    got = torch.as_tensor(got, dtype=F64)
    want = torch.as_tensor(want, dtype=F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale + 1e-15, f"{what}: max error {err:.3e} (scale {scale:.3e})"


def backward_grad(loss_fn, s, *args, weights=None, **kwargs):
    """(loss, d(sum(loss * weights))/ds) for a fresh leaf copy of s."""
    leaf = s.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, *args, **kwargs)
    w = torch.ones_like(loss) if weights is None else weights
    loss.backward(w)
    return loss.detach(), leaf.grad
