"""kdloss.torch's backward: the kernel's gradient handed to autograd, retained graphs, and exact higher derivatives.

The eager backward gives autograd the buffer the kernel wrote (scaled in place) when the graph is not retained,
and a copy when it is; a gradient with a graph (``create_graph=True``) is rebuilt from torch operations. Each
test here would catch a wrong answer from one of those paths: a buffer read after it was handed over, scaled
twice, or written by a caller; a second derivative that is silently zero.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kdloss.torch import DistillationLoss, distillation_loss  # noqa: E402
from torch_helpers import (  # noqa: E402
    F64,
    IGNORE,
    LABEL_FORMS,
    REDUCTIONS,
    assert_close,
    gen,  # noqa: F401  (a fixture)
    make_batch,
    plain_torch_loss,
)

PARAMS = dict(temperature=2.0, alpha=0.4)


def single_gradient(s, t, y, **params):
    leaf = s.detach().clone().requires_grad_(True)
    plain_torch_loss(leaf, t, y, **PARAMS, **params).sum().backward()
    return leaf.grad


# ------------------------------------------------------------------------------------------------------------
# Second and higher derivatives
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", LABEL_FORMS)
def test_hessian_matches_plain_torch(gen, reduction, form):
    s, t, y = make_batch(gen, (3, 5), form)
    hessian = torch.autograd.functional.hessian(
        lambda x: distillation_loss(x, t, y, **PARAMS, reduction=reduction).sum(), s
    )
    expected = torch.autograd.functional.hessian(
        lambda x: plain_torch_loss(x, t, y, **PARAMS, reduction=reduction).sum(), s
    )
    assert expected.abs().max() > 1e-3  # a Hessian of zeros would not pass
    assert_close(hessian, expected, rtol=1e-12, what="Hessian")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", LABEL_FORMS)
def test_gradgradcheck(gen, reduction, form):
    s, t, y = make_batch(gen, (2, 2, 4), form)
    s.requires_grad_(True)

    def loss(x):
        return distillation_loss(x, t, y, **PARAMS, reduction=reduction)

    assert torch.autograd.gradgradcheck(loss, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)
    if reduction != "none":

        def normalised(x):
            return distillation_loss(x, t, y, **PARAMS, reduction=reduction, normalizer=torch.tensor(5.0))

        assert torch.autograd.gradgradcheck(normalised, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("form", ["index", "soft"])
def test_gradient_penalty_trains_on_the_second_order_part(gen, form):
    """The issue's example: (loss + 10 |d loss/ds|²).backward() through kdloss and through plain torch."""
    s, t, y = make_batch(gen, (4, 6), form)

    def penalised_gradient(loss_fn):
        leaf = s.detach().clone().requires_grad_(True)
        loss = loss_fn(leaf, t, y, **PARAMS)
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        assert g.requires_grad
        (loss + 10 * g.pow(2).sum()).backward()
        return leaf.grad

    assert_close(penalised_gradient(distillation_loss), penalised_gradient(plain_torch_loss), what="gradient")


def test_create_graph_through_a_weighted_loss_and_half_precision(gen):
    s, t, y = make_batch(gen, (4, 5), "index")
    results = []
    for loss_fn in (distillation_loss, plain_torch_loss):
        leaf = s.detach().clone().requires_grad_(True)
        weight = torch.tensor(2.0, dtype=F64, requires_grad=True)
        (g,) = torch.autograd.grad(loss_fn(leaf, t, y, **PARAMS) * weight, leaf, create_graph=True)
        (g.sin().sum()).backward()  # reaches both the student and the weight
        results.append((g.detach(), leaf.grad, weight.grad))
    for got, want, what in zip(results[0], results[1], ("gradient", "student", "weight")):
        assert_close(got, want, what=what)

    half = s.to(torch.bfloat16).requires_grad_(True)
    (g,) = torch.autograd.grad(distillation_loss(half, t.float(), y, **PARAMS), half, create_graph=True)
    (h,) = torch.autograd.grad(g.float().sum(), half)
    want = torch.autograd.grad(plain_torch_loss(half.float(), t.float(), y, **PARAMS), half, create_graph=True)[0]
    assert h.dtype == torch.bfloat16 and g.dtype == torch.bfloat16
    assert torch.allclose(g.float(), want.float(), rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# Retained graphs and the handed-over buffer
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_backward_with_retain_graph_twice_accumulates_exactly(gen, scale):
    s, t, y = make_batch(gen, (3, 4, 7), "index")
    leaf = s.detach().clone().requires_grad_(True)
    loss = distillation_loss(leaf, t, y, **PARAMS) * scale
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()  # the last one may hand the buffer over
    want = single_gradient(s, t, y) * scale
    assert_close(first, want, what="first backward")
    assert_close(leaf.grad, 3 * want, what="three backwards")
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_a_callers_gradient_is_its_own(gen):
    """autograd.grad hands the caller a tensor; writing to it must not change what a later backward returns."""
    s, t, y = make_batch(gen, (5, 6), "soft")
    leaf = s.detach().clone().requires_grad_(True)
    loss = distillation_loss(leaf, t, y, **PARAMS)
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    kept = first.clone()
    first.zero_()  # e.g. an optimiser working in place
    (second,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(second, kept)
    assert_close(second, single_gradient(s, t, y), what="gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_existing_grad_and_several_uses_of_one_loss(gen, reduction):
    s, t, y = make_batch(gen, (4, 6), "index")
    leaf = s.detach().clone().requires_grad_(True)
    leaf.grad = torch.ones_like(leaf)
    loss = distillation_loss(leaf, t, y, **PARAMS, reduction=reduction)
    (loss.sum() * 2 + loss.sum() * 3).backward()  # one backward of this node, grad_output 5
    want = 1 + 5 * single_gradient(s, t, y, reduction=reduction)
    assert_close(leaf.grad, want, what="accumulated gradient")


def test_per_row_weights_scale_the_handed_over_buffer(gen):
    s, t, y = make_batch(gen, (3, 4, 6), "index")
    weights = torch.randn(3, 4, generator=gen, dtype=F64)
    leaf = s.detach().clone().requires_grad_(True)
    distillation_loss(leaf, t, y, **PARAMS, reduction="none").backward(weights)
    ref = s.detach().clone().requires_grad_(True)
    plain_torch_loss(ref, t, y, **PARAMS, reduction="none").backward(weights)
    assert_close(leaf.grad, ref.grad, what="gradient")


def test_student_from_a_layer_trains_like_plain_torch(gen):
    """The usual case: the logits are an intermediate result, and the gradient flows on into the layer."""
    x = torch.randn(6, 3, 8, generator=gen, dtype=F64)
    t = torch.randn(6, 3, 11, generator=gen, dtype=F64)
    y = torch.randint(0, 11, (6, 3), generator=gen)
    y[0] = IGNORE
    grads = []
    for loss_fn in (DistillationLoss(**PARAMS), lambda s, t, y: plain_torch_loss(s, t, y, **PARAMS)):
        torch.manual_seed(3)
        layer = torch.nn.Linear(8, 11, dtype=F64)
        loss_fn(layer(x), t, y).backward()
        grads.append((layer.weight.grad, layer.bias.grad))
    for got, want in zip(*grads):
        assert_close(got, want, what="layer gradient")


# ------------------------------------------------------------------------------------------------------------
# The custom operators called directly
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_operators_pass_opcheck(gen, reduction):
    s, t, y = make_batch(gen, (3, 4, 5), "index")
    s.requires_grad_(True)
    normalizer = None if reduction == "none" else torch.tensor(7.0, dtype=F64)
    args = (s, t, y, 2.0, 0.3, reduction, IGNORE, normalizer, 1)
    # Every test of torch.library.opcheck: schema, fake implementation, autograd registration, and
    # AOTAutograd with dynamic shapes.
    for operator in (torch.ops.kdloss.loss_and_grad.default, torch.ops.kdloss.loss.default):
        torch.library.opcheck(operator, args)


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_loss_operator_has_an_exact_autograd_formula(gen, form):
    s, t, y = make_batch(gen, (4, 6), form)
    leaf = s.detach().clone().requires_grad_(True)
    loss = torch.ops.kdloss.loss(leaf, t, y, 2.0, 0.4, "sum", IGNORE, None, None)
    (grad,) = torch.autograd.grad(loss * 3, leaf, create_graph=True)
    assert_close(grad, 3 * single_gradient(s, t, y, reduction="sum"), what="gradient")
    hessian = torch.autograd.functional.hessian(
        lambda x: torch.ops.kdloss.loss_and_grad(x, t, y, 2.0, 0.4, "sum", IGNORE, None, None)[0], s
    )
    want = torch.autograd.functional.hessian(lambda x: plain_torch_loss(x, t, y, **PARAMS, reduction="sum"), s)
    assert_close(hessian, want, what="Hessian")
