"""kdloss.torch with a divergence other than forward KL: the same values, gradients and higher derivatives as the
loss written in torch primitives, through the module, the function, the operators and torch.compile.

The mixture divergences ("jsd", "skew_forward_kl", "skew_reverse_kl") are checked against :func:`primitive_loss`,
their definitions in torch primitives (``kl_div`` of log-softmaxes, the mixture's log by ``logsumexp`` of a
stacked pair, as TRL writes GKD's), whose gradient and Hessian come from autograd: so the kernel's first gradient
and the graph that ``create_graph=True`` differentiates (``_torch_autograd.soft_gradient_graph``) are both
checked against derivatives that neither of them computes.
"""

from __future__ import annotations

import math
import re

import pytest

torch = pytest.importorskip("torch")

import kdloss  # noqa: E402
from kdloss._torch_autograd import soft_gradient_graph  # noqa: E402
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

F = torch.nn.functional

# (divergence, its parameter): the mixtures at their defaults, inside, and at the ends that are plain KLs.
CASES = [
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"skew": 0.1}),
    ("skew_forward_kl", {"skew": 0.7}),
    ("skew_forward_kl", {"skew": 0.0}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.7}),
    ("skew_reverse_kl", {"skew": 0.0}),
]
CASE_IDS = [name + "".join(f"-{key}{value}" for key, value in extra.items()) for name, extra in CASES]
MIXTURES = [case for case in CASES if case[0] != "reverse_kl"]
MIXTURE_IDS = [name for name, case in zip(CASE_IDS, CASES) if case[0] != "reverse_kl"]
PARAMS = dict(temperature=2.0, alpha=0.4)


def case_params(case, **extra):
    divergence, parameter = case
    return dict(PARAMS, divergence=divergence, **parameter, **extra)


# ------------------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------------------


def _kl(log_a, log_b):
    """KL(a || b) per row; kl_div(input, target) is KL(target || input)."""
    return F.kl_div(log_b, log_a, log_target=True, reduction="none").sum(-1)


def _log_mix(log_a, log_b, weight):
    """log(weight a + (1 - weight) b), TRL's way: logsumexp of the stacked weighted logs."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight), log_b + math.log1p(-weight)]), dim=0)


def soft_divergence(log_p, log_q, divergence, beta=0.5, skew=0.1):
    """D(p, q) per row, from the definitions (issue 16's table; beta = 0 / 1 are TRL's forward / reverse KL)."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if divergence == "skew_forward_kl":
        return _kl(log_p, _log_mix(log_p, log_q, skew) if skew else log_q)
    assert divergence == "skew_reverse_kl"
    return _kl(log_q, _log_mix(log_q, log_p, skew) if skew else log_p)


def primitive_loss(
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
    beta=0.5,
    skew=0.1,
):
    """The distillation loss from torch primitives, any divergence (torch_helpers.plain_torch_loss's rules)."""
    return plain_torch_loss(
        s,
        t,
        y,
        temperature=temperature,
        alpha=alpha,
        reduction=reduction,
        ignore_index=ignore_index,
        normalizer=normalizer,
        soft_divergence=lambda log_p, log_q: soft_divergence(log_p, log_q, divergence, beta, skew),
    )


def test_the_oracle_is_the_plain_one_for_the_plain_divergences(gen):
    s, t, y = make_batch(gen, (5, 9), "index")
    for divergence in ("forward_kl", "reverse_kl"):
        for reduction in REDUCTIONS:
            params = dict(PARAMS, divergence=divergence, reduction=reduction)
            assert_close(primitive_loss(s, t, y, **params), plain_torch_loss(s, t, y, **params), rtol=1e-15)


# ------------------------------------------------------------------------------------------------------------
# Values and first derivatives
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("form", LABEL_FORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_the_loss_in_torch_primitives(gen, case, form, reduction):
    s, t, y = make_batch(gen, (3, 4, 37), form)
    params = case_params(case, reduction=reduction)
    ours, theirs = s.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    loss = DistillationLoss(**params)(ours, t, y)
    expected = primitive_loss(theirs, t, y, **params)
    assert_close(loss, expected, rtol=1e-12, what="loss")
    weights = torch.rand(loss.shape, generator=gen, dtype=F64)
    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_close(ours.grad, theirs.grad, rtol=1e-11, what="gradient")


@pytest.mark.parametrize("case", MIXTURES, ids=MIXTURE_IDS)
@pytest.mark.parametrize("classes", [7, 1000])
def test_float32_within_the_tolerances_of_the_float64_oracle(gen, case, classes):
    s, t, y = make_batch(gen, (6, classes), "index")
    s, t = s * 4, t * 4  # logits up to about +-30: saturated rows too
    params = case_params(case, reduction="sum", normalizer=3.0)
    leaf = s.float().requires_grad_(True)
    loss = distillation_loss(leaf, t.float(), y, **params)
    loss.backward()
    exact = s.clone().requires_grad_(True)
    expected = primitive_loss(exact, t, y, **params)
    expected.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, expected, rtol=1e-5, what="loss")
    assert_close(leaf.grad, exact.grad, rtol=1e-5, what="gradient")


@pytest.mark.parametrize(
    "plain, mixture",
    [
        ("forward_kl", ("jsd", {"beta": 0.0})),
        ("reverse_kl", ("jsd", {"beta": 1.0})),
        ("forward_kl", ("skew_forward_kl", {"skew": 0.0})),
        ("reverse_kl", ("skew_reverse_kl", {"skew": 0.0})),
    ],
)
@pytest.mark.parametrize("create_graph", [False, True])
def test_the_ends_are_the_plain_kls_exactly(gen, plain, mixture, create_graph):
    s, t, y = make_batch(gen, (4, 3, 29), "index", dtype=torch.float32)
    results = []
    for params in (dict(PARAMS, divergence=plain), case_params(mixture)):
        leaf = s.clone().requires_grad_(True)
        loss = distillation_loss(leaf, t, y, **params)
        (gradient,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
        results.append((loss.detach(), gradient.detach()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------------------------
# Second derivatives: the graph create_graph=True differentiates
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_second_derivatives_are_exact(gen, case):
    s, t, y = make_batch(gen, (3, 6), "index")
    params = case_params(case)
    hessian = torch.autograd.functional.hessian(lambda x: distillation_loss(x, t, y, **params), s)
    expected = torch.autograd.functional.hessian(lambda x: primitive_loss(x, t, y, **params), s)
    assert expected.abs().max() > 1e-3  # a Hessian worth comparing
    assert_close(hessian, expected, rtol=1e-10, what="Hessian")


@pytest.mark.parametrize("case", MIXTURES, ids=MIXTURE_IDS)
@pytest.mark.parametrize(
    "form, reduction, normalizer",
    [("none", "none", None), ("index", "sum", None), ("index", "mean", 5.0), ("soft", "mean", None)],
)
def test_hessian_vector_products_are_exact(gen, case, form, reduction, normalizer):
    """Double backward through the module, as a gradient penalty or a Newton step does it."""
    s, t, y = make_batch(gen, (2, 3, 23), form)
    params = case_params(case, reduction=reduction)
    vector = torch.randn(s.shape, generator=gen, dtype=F64)
    products = []
    for loss_fn in (DistillationLoss(**params), lambda *a, **k: primitive_loss(*a, **params, **k)):
        leaf = s.clone().requires_grad_(True)
        loss = loss_fn(leaf, t, y, normalizer=normalizer) if normalizer is not None else loss_fn(leaf, t, y)
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=F64).reshape(loss.shape)
        (gradient,) = torch.autograd.grad((loss * weights).sum(), leaf, create_graph=True)
        (product,) = torch.autograd.grad((gradient * vector).sum(), leaf)
        products.append((gradient.detach(), product))
    assert_close(products[0][0], products[1][0], rtol=1e-11, what="gradient (create_graph)")
    assert_close(products[0][1], products[1][1], rtol=1e-10, what="Hessian-vector product")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_the_gradient_graph_is_the_derivative_of_the_divergence(gen, case, temperature):
    """soft_gradient_graph itself, against autograd of T^2 D, and its own derivative against autograd's second."""
    divergence, parameter = case
    s = torch.randn(4, 17, generator=gen, dtype=F64).mul(3).requires_grad_(True)
    t = torch.randn(4, 17, generator=gen, dtype=F64) * 3
    log_p, log_q = F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1)
    soft = soft_divergence(log_p, log_q, divergence, **parameter).sum() * temperature**2
    (expected,) = torch.autograd.grad(soft, s, create_graph=True)
    graph = soft_gradient_graph(s, t, temperature, divergence, **parameter)
    assert_close(graph, expected, rtol=1e-13, what="gradient")
    vector = torch.randn(s.shape, generator=gen, dtype=F64)
    (second,) = torch.autograd.grad((graph * vector).sum(), s)
    (expected_second,) = torch.autograd.grad((expected * vector).sum(), s)
    assert_close(second, expected_second, rtol=1e-12, what="Hessian-vector product")


def _masked_pair(gen, divergence, parameter):
    """Logits with -inf where both sides rule a class out, where the student does, and where the teacher does;
    no class that makes the divergence infinite (forward KL's student -inf, reverse KL's teacher -inf)."""
    s = torch.randn(3, 8, generator=gen, dtype=F64) * 2
    t = torch.randn(3, 8, generator=gen, dtype=F64) * 2
    s[0, 1] = t[0, 1] = -math.inf
    s[1, [2, 5]] = t[0, 6] = -math.inf
    t[2, [3, 4]] = s[2, 7] = -math.inf
    forward = divergence == "forward_kl" or (divergence == "jsd" and parameter.get("beta") == 0)
    forward = forward or (divergence == "skew_forward_kl" and parameter.get("skew") == 0)
    reverse = divergence == "reverse_kl" or (divergence == "jsd" and parameter.get("beta") == 1)
    reverse = reverse or (divergence == "skew_reverse_kl" and parameter.get("skew") == 0)
    if forward:
        t[1, [2, 5]] = -math.inf  # the teacher must rule out what the student does
    if reverse:
        s[2, [3, 4]] = s[0, 6] = -math.inf
    return s, t


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_masks_stay_exact_in_the_higher_derivatives(gen, case):
    """-inf logits: the create_graph gradient is the kernel's, and it and its derivative are finite and equal to
    those with -1e4 in place of -inf (a class whose probability is then exactly 0 too): a class that both sides
    rule out contributes nothing, and no 0 * log 0 or logaddexp(-inf, -inf) leaves a NaN in a derivative."""
    s, t = _masked_pair(gen, *case)
    params = case_params(case, reduction="sum")
    vector = torch.randn(s.shape, generator=gen, dtype=F64)
    results = []
    for fill in (-math.inf, -1e4):
        student = torch.where(torch.isinf(s), fill, s).requires_grad_(True)
        teacher = torch.where(torch.isinf(t), fill, t)
        (kernel_gradient,) = torch.autograd.grad(distillation_loss(student, teacher, **params), student)
        (gradient,) = torch.autograd.grad(distillation_loss(student, teacher, **params), student, create_graph=True)
        (product,) = torch.autograd.grad((gradient * vector).sum(), student)
        assert torch.isfinite(gradient).all() and torch.isfinite(product).all(), f"fill {fill}"
        assert_close(gradient, kernel_gradient, rtol=1e-13, what=f"create_graph gradient, fill {fill}")
        results.append((gradient.detach(), product))
    assert_close(results[0][0], results[1][0], rtol=1e-14, what="gradient: -inf against -1e4")
    assert_close(results[0][1], results[1][1], rtol=1e-14, what="Hessian-vector product: -inf against -1e4")


# ------------------------------------------------------------------------------------------------------------
# Operators and torch.compile
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_operators_pass_opcheck(gen, case):
    divergence, parameter = case
    s, t, y = make_batch(gen, (3, 4, 5), "index")
    s.requires_grad_(True)
    beta, skew = parameter.get("beta", 0.5), parameter.get("skew", 0.1)
    args = (s, t, y, 2.0, 0.3, "mean", IGNORE, torch.tensor(7.0, dtype=F64), 1, divergence, beta, skew)
    for operator in (torch.ops.kdloss.loss_and_grad.default, torch.ops.kdloss.loss.default):
        torch.library.opcheck(operator, args)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_matches_eager(gen, case):
    s, t, y = make_batch(gen, (2, 3, 50), "index")
    params = case_params(case)
    compiled = torch.compile(lambda a, b, c: distillation_loss(a, b, c, **params), backend="aot_eager")
    ours, theirs = s.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    loss = compiled(ours, t, y)
    expected = distillation_loss(theirs, t, y, **params)
    loss.backward()
    expected.backward()
    assert_close(loss, expected, rtol=1e-14, what="loss")
    assert_close(ours.grad, theirs.grad, rtol=1e-14, what="gradient")


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def test_module_validates_the_divergence_as_the_numpy_class():
    names = "'forward_kl', 'reverse_kl', 'jsd', 'skew_forward_kl', 'skew_reverse_kl'"
    with pytest.raises(ValueError, match=re.escape(f"divergence must be one of {names}, got 'js'")):
        DistillationLoss(divergence="js")
    with pytest.raises(TypeError, match="divergence must be one of"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), divergence=None)


def _numpy_message(error, **kwargs):
    with pytest.raises(error) as raised:
        kdloss.DistillationLoss(**kwargs)
    return str(raised.value)


BAD_PARAMETERS = [
    (ValueError, {"beta": -0.1}, "beta must be in [0, 1], got -0.1"),
    (ValueError, {"beta": 1.5}, "beta must be in [0, 1], got 1.5"),
    (ValueError, {"beta": math.nan}, "beta must be in [0, 1], got nan"),
    (ValueError, {"beta": math.inf}, "beta must be in [0, 1], got inf"),
    (ValueError, {"skew": 1.0}, "skew must be in [0, 1), got 1"),
    (ValueError, {"skew": -0.5}, "skew must be in [0, 1), got -0.5"),
    (ValueError, {"skew": math.nan}, "skew must be in [0, 1), got nan"),
    (TypeError, {"beta": "0.5"}, "beta must be a real number, got '0.5'"),
    (TypeError, {"skew": None}, "skew must be a real number, got None"),
]


@pytest.mark.parametrize("error, bad, message", BAD_PARAMETERS, ids=[str(case[1]) for case in BAD_PARAMETERS])
@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "forward_kl"])
def test_module_and_function_validate_beta_and_skew_as_the_numpy_class(error, bad, message, divergence):
    """With the NumPy class's message, whatever the divergence (an unused parameter is still checked)."""
    assert _numpy_message(error, divergence=divergence, **bad) == message
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        DistillationLoss(divergence=divergence, **bad)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), divergence=divergence, **bad)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):  # shapes only: the same checks
        distillation_loss(
            torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, device="meta"), divergence=divergence, **bad
        )


def test_the_module_shows_its_mixture_parameters():
    module = DistillationLoss(divergence="jsd", beta=0.25, skew=0.5)
    assert (module.divergence, module.beta, module.skew) == ("jsd", 0.25, 0.5)
    assert "divergence='jsd', beta=0.25, skew=0.5" in repr(module)
