"""kdloss.torch with a divergence other than forward KL: the same values, gradients and higher derivatives as the
loss written in torch primitives, through the module, the function, the operators and torch.compile."""

from __future__ import annotations

import re

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

DIVERGENCES = ["reverse_kl"]
PARAMS = dict(temperature=2.0, alpha=0.4)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("form", LABEL_FORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_the_loss_in_torch_primitives(gen, divergence, form, reduction):
    s, t, y = make_batch(gen, (3, 4, 37), form)
    params = dict(PARAMS, reduction=reduction, divergence=divergence)
    ours, theirs = s.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    loss = DistillationLoss(**params)(ours, t, y)
    expected = plain_torch_loss(theirs, t, y, **params)
    assert_close(loss, expected, rtol=1e-12, what="loss")
    loss.sum().backward()
    expected.sum().backward()
    assert_close(ours.grad, theirs.grad, rtol=1e-11, what="gradient")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_second_derivatives_are_exact(gen, divergence):
    s, t, y = make_batch(gen, (3, 6), "index")
    params = dict(PARAMS, divergence=divergence)
    hessian = torch.autograd.functional.hessian(lambda x: distillation_loss(x, t, y, **params), s)
    expected = torch.autograd.functional.hessian(lambda x: plain_torch_loss(x, t, y, **params), s)
    assert expected.abs().max() > 1e-3  # a Hessian worth comparing
    assert_close(hessian, expected, rtol=1e-10, what="Hessian")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_operators_pass_opcheck(gen, divergence):
    s, t, y = make_batch(gen, (3, 4, 5), "index")
    s.requires_grad_(True)
    args = (s, t, y, 2.0, 0.3, "mean", IGNORE, torch.tensor(7.0, dtype=F64), 1, divergence)
    for operator in (torch.ops.kdloss.loss_and_grad.default, torch.ops.kdloss.loss.default):
        torch.library.opcheck(operator, args)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_compiled_matches_eager(gen, divergence):
    s, t, y = make_batch(gen, (2, 3, 50), "index")
    params = dict(PARAMS, divergence=divergence)
    compiled = torch.compile(lambda a, b, c: distillation_loss(a, b, c, **params), backend="aot_eager")
    ours, theirs = s.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    loss = compiled(ours, t, y)
    expected = distillation_loss(theirs, t, y, **params)
    loss.backward()
    expected.backward()
    assert_close(loss, expected, rtol=1e-14, what="loss")
    assert_close(ours.grad, theirs.grad, rtol=1e-14, what="gradient")


def test_module_validates_the_divergence_as_the_numpy_class():
    names = "'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl'"
    with pytest.raises(ValueError, match=re.escape(f"divergence must be one of {names}, got 'js'")):
        DistillationLoss(divergence="js")
    with pytest.raises(TypeError, match="divergence must be one of"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), divergence=None)
