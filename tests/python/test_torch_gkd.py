"""kdloss.torch.generalized_jsd_loss, the drop-in for TRL's GKD loss (``GKDTrainer.generalized_jsd_loss``, TRL 1.16).

Checked against :func:`reference_gkd`, TRL's semantics written independently in float64 torch primitives (always,
where torch is installed), and against TRL itself where it is installed (``pip install trl``; those tests skip
otherwise): values, gradients, dtypes and shapes for every reduction, masking, ``num_items_in_batch``, (B, S, V)
and (N, V) logits, and the one-assignment swap into ``GKDTrainer`` run through TRL's own ``compute_loss``.
"""

from __future__ import annotations

import doctest
import math
import os
import re

import pytest

torch = pytest.importorskip("torch")

import kdloss._gkd  # noqa: E402
from kdloss.torch import generalized_jsd_loss  # noqa: E402
from torch_helpers import F64, assert_close, gen  # noqa: E402, F401  (gen: a fixture)

REDUCTIONS = ("batchmean", "sum", "mean", "none")
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
SHAPES = ((2, 5, 13), (7, 13))  # (B, S, V) and (N, V)
COUNTS = (None, 6, "tensor")  # num_items_in_batch: absent, a Python int, an int64 tensor (as HF Trainer passes it)


def reference_gkd(student, teacher, labels=None, beta=0.5, temperature=1.0, reduction="batchmean", num_items=None):
    """TRL's generalized_jsd_loss from its definition, in float64 probabilities (no log-sum-exp tricks: the test
    logits are moderate). Per element beta p log(p/m) + (1-beta) q log(q/m), m = beta p + (1-beta) q; beta = 0 is
    p log(p/q), beta = 1 is q log(q/p); masked by labels != -100, then reduced as TRL reduces."""
    p = torch.softmax(teacher.to(F64) / temperature, -1)
    q = torch.softmax(student.to(F64) / temperature, -1)
    if beta == 0:
        terms = p * torch.log(p / q)
    elif beta == 1:
        terms = q * torch.log(q / p)
    else:
        m = beta * p + (1 - beta) * q
        terms = beta * p * torch.log(p / m) + (1 - beta) * q * torch.log(q / m)
    if labels is not None:
        terms = terms[labels != -100]
    if num_items is not None:
        return terms.sum() / num_items
    if reduction == "batchmean":
        return terms.sum() / (max((labels != -100).sum().item(), 1) if labels is not None else max(terms.shape[0], 1))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


def make_inputs(gen, shape, masked, dtype=F64):
    s = torch.randn(shape, generator=gen, dtype=F64) * 2
    t = torch.randn(shape, generator=gen, dtype=F64) * 2
    labels = None
    if masked:
        labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        labels.view(-1)[::3] = -100
    return s.to(dtype), t.to(dtype), labels


def count_argument(count):
    return torch.tensor(6) if count == "tensor" else count


def loss_and_gradient(loss_fn, s, t, labels, weights_gen=None, **kwargs):
    """The loss and d(sum(loss * w))/ds (w random for "none", 1 otherwise) on a fresh leaf copy of s."""
    leaf = s.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, t, labels, **kwargs)
    weights = torch.ones(loss.shape, dtype=F64)
    if loss.dim() and weights_gen is not None:
        weights = torch.rand(loss.shape, generator=weights_gen, dtype=F64)
    (loss.to(F64) * weights).sum().backward()
    return loss, leaf.grad


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


# ------------------------------------------------------------------------------------------------------------
# Against the reference (always)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=["BSV", "NV"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_the_reference(gen, shape, masked, reduction, beta):
    for dtype in (torch.float64, torch.float32):
        for temperature in (1.0, 2.5):
            for count in COUNTS:
                s, t, labels = make_inputs(gen, shape, masked, dtype)
                kwargs = dict(beta=beta, temperature=temperature, reduction=reduction)
                what = f"{dtype} T={temperature} num_items={count}"
                seed = int(torch.randint(0, 2**31, (), generator=gen))
                loss, grad = loss_and_gradient(
                    generalized_jsd_loss, s, t, labels, torch.Generator().manual_seed(seed),
                    num_items_in_batch=count_argument(count), **kwargs,
                )  # fmt: skip
                want, want_grad = loss_and_gradient(
                    reference_gkd, s.to(F64), t.to(F64), labels, torch.Generator().manual_seed(seed),
                    num_items=count_argument(count), **kwargs,
                )  # fmt: skip
                assert loss.dtype == dtype, what
                assert grad.dtype == dtype, what
                assert_close(loss, want, rtol=TOLERANCE[dtype], what=f"loss, {what}")
                assert_close(grad, want_grad, rtol=TOLERANCE[dtype], what=f"gradient, {what}")


def test_none_returns_trl_per_element_terms(gen):
    s, t, labels = make_inputs(gen, (3, 4, 9), True)
    assert generalized_jsd_loss(s, t, reduction="none").shape == (3, 4, 9)
    kept = int((labels != -100).sum())
    assert generalized_jsd_loss(s, t, labels, reduction="none").shape == (kept, 9)
    # num_items_in_batch overrides the reduction, as in TRL: a sum, divided
    assert_close(generalized_jsd_loss(s, t, labels, reduction="none", num_items_in_batch=4),
                 reference_gkd(s, t, labels).mul(kept / 4), rtol=1e-12)  # fmt: skip


def test_masked_positions_get_no_gradient_and_labels_only_mask(gen):
    s, t, labels = make_inputs(gen, (2, 6, 11), True)
    odd = labels.clone()
    odd[labels != -100] = torch.tensor([5000, -1, -7, 11, 10**9, 3, 2, 1])  # out of the vocabulary: still kept
    loss, grad = loss_and_gradient(generalized_jsd_loss, s, t, odd)
    want, want_grad = loss_and_gradient(reference_gkd, s, t, odd)
    assert_close(loss, want, rtol=1e-12)
    assert_close(grad, want_grad, rtol=1e-12)
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_everything_masked_is_trl_s_answer(gen, reduction):
    """batchmean and sum: 0; mean: NaN (TRL's mean of no elements); none: (0, V). The gradient is 0."""
    s, t, _ = make_inputs(gen, (2, 3, 5), False)
    labels = torch.full((2, 3), -100)
    loss, grad = loss_and_gradient(generalized_jsd_loss, s, t, labels, reduction=reduction)
    if reduction == "mean":
        assert math.isnan(loss.item())
    elif reduction == "none":
        assert loss.shape == (0, 5)
    else:
        assert loss.item() == 0
    assert (grad == 0).all()


def test_batchmean_without_labels_divides_by_the_first_axis(gen):
    """TRL's jsd.size(0): B for (B, S, V) logits, not B * S."""
    s, t, _ = make_inputs(gen, (2, 5, 7), False)
    total = generalized_jsd_loss(s, t, reduction="sum")
    assert_close(generalized_jsd_loss(s, t), total / 2, rtol=1e-15)
    assert_close(generalized_jsd_loss(s, t, reduction="mean"), total / (2 * 5 * 7), rtol=1e-15)


def test_one_row_of_logits(gen):
    s, t, _ = make_inputs(gen, (9,), False)
    for labels in (None, torch.tensor(3), torch.tensor(-100)):
        for reduction in REDUCTIONS:
            loss, grad = loss_and_gradient(generalized_jsd_loss, s, t, labels, reduction=reduction)
            want, want_grad = loss_and_gradient(reference_gkd, s, t, labels, reduction=reduction)
            assert loss.shape == want.shape
            assert_close(loss.nan_to_num(7.0), want.nan_to_num(7.0), rtol=1e-12, what=f"{labels} {reduction}")
            assert_close(grad, want_grad, rtol=1e-12, what=f"{labels} {reduction}")


def test_trainer_shaped_inputs(gen):
    """GKDTrainer passes shifted views, logits[:, :-1, :] (not contiguous), and a tensor num_items_in_batch."""
    s, t, labels = make_inputs(gen, (3, 8, 17), True, torch.float32)
    leaf = s.clone().requires_grad_(True)
    count = (labels[:, 1:] != -100).sum()
    loss = generalized_jsd_loss(leaf[:, :-1, :], t[:, :-1, :], labels[:, 1:], num_items_in_batch=count)
    loss.backward()
    exact = s.to(F64).requires_grad_(True)
    want = reference_gkd(exact[:, :-1, :], t[:, :-1, :], labels[:, 1:], num_items=count)
    want.backward()
    assert_close(loss, want, rtol=1e-5)
    assert_close(leaf.grad, exact.grad, rtol=1e-5)


def test_num_items_in_batch_divides_as_trl_divides(gen):
    s, t, labels = make_inputs(gen, (2, 4, 6), True, torch.float32)
    total = generalized_jsd_loss(s, t, labels, reduction="sum")
    # a float64 count promotes TRL's result to float64; an integer one does not
    assert generalized_jsd_loss(s, t, labels, num_items_in_batch=torch.tensor(3.0, dtype=F64)).dtype == F64
    assert generalized_jsd_loss(s, t, labels, num_items_in_batch=torch.tensor(3)).dtype == torch.float32
    assert_close(generalized_jsd_loss(s, t, labels, num_items_in_batch=2.5), total / 2.5, rtol=1e-6)
    shaped = generalized_jsd_loss(s, t, labels, num_items_in_batch=torch.tensor([2]))  # broadcasts, as TRL's
    assert shaped.shape == (1,)
    assert_close(shaped, (total / 2).reshape(1), rtol=1e-6)
    assert generalized_jsd_loss(s, t, labels, num_items_in_batch=0).item() == math.inf  # TRL's x / 0


def test_result_dtype_is_trl_s(gen):
    s, t, labels = make_inputs(gen, (2, 3, 8), True)
    assert generalized_jsd_loss(s.float(), t, labels).dtype == F64
    assert generalized_jsd_loss(s.float(), t.float(), labels).dtype == torch.float32
    assert generalized_jsd_loss(s.bfloat16(), t.float(), labels).dtype == torch.float32
    assert generalized_jsd_loss(s.half(), t.bfloat16(), labels).dtype == torch.float32


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bfloat16_is_computed_in_float32(gen, beta, reduction):
    """bfloat16 logits: the loss is bfloat16 (TRL's dtype) and within bfloat16's rounding of the exact value for
    those logits; the gradient arrives in bfloat16."""
    s, t, labels = make_inputs(gen, (2, 6, 40), True)
    s, t = s.bfloat16(), t.bfloat16()
    loss, grad = loss_and_gradient(generalized_jsd_loss, s, t, labels, beta=beta, reduction=reduction)
    want, want_grad = loss_and_gradient(reference_gkd, s.to(F64), t.to(F64), labels, beta=beta, reduction=reduction)
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    assert_close(loss, want, rtol=2**-8, what="loss")
    assert_close(grad, want_grad, rtol=2**-7, what="gradient")


def test_no_gradient_wanted_and_teacher_gets_none(gen):
    s, t, labels = make_inputs(gen, (2, 3, 8), True)
    teacher = t.clone().requires_grad_(True)
    with torch.no_grad():
        evaluated = generalized_jsd_loss(s, teacher, labels)
    assert_close(evaluated, reference_gkd(s, t, labels), rtol=1e-12)
    leaf = s.clone().requires_grad_(True)
    generalized_jsd_loss(leaf, teacher, labels).backward()
    assert teacher.grad is None and leaf.grad is not None


def test_threads_do_not_change_the_result(gen):
    s, t, labels = make_inputs(gen, (4, 16, 300), True, torch.float32)
    one = loss_and_gradient(generalized_jsd_loss, s, t, labels, num_threads=1)
    two = loss_and_gradient(generalized_jsd_loss, s, t, labels, num_threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_compiled_matches_eager(gen):
    s, t, labels = make_inputs(gen, (2, 3, 20), True)
    compiled = torch.compile(generalized_jsd_loss, backend="aot_eager")
    for kwargs in (dict(beta=0.3), dict(beta=0.5, reduction="mean", temperature=2.0), dict(reduction="sum")):
        loss, grad = loss_and_gradient(compiled, s, t, labels, **kwargs)
        want, want_grad = loss_and_gradient(generalized_jsd_loss, s, t, labels, **kwargs)
        assert_close(loss, want, rtol=1e-14, what=str(kwargs))
        assert_close(grad, want_grad, rtol=1e-14, what=str(kwargs))


def test_infinite_logits_stay_finite_for_the_mixture():
    """Where TRL's kl_div returns NaN (0 * -inf), kdloss gives the divergence: a class both sides rule out adds
    nothing, and with 0 < beta < 1 the mixture is finite where either side has mass."""
    s = torch.tensor([[0.5, -math.inf, 1.0, -math.inf], [2.0, 0.0, 1.0, 3.0]], dtype=F64)
    t = torch.tensor([[1.0, -math.inf, -math.inf, 0.0], [1.0, 0.5, 0.0, 2.0]], dtype=F64)
    leaf = s.clone().requires_grad_(True)
    loss = generalized_jsd_loss(leaf, t, beta=0.5, reduction="sum")
    loss.backward()
    finite = torch.tensor([[0.5, -1e4, 1.0, -1e4], [2.0, 0.0, 1.0, 3.0]], dtype=F64)  # exactly-0 probabilities
    want = generalized_jsd_loss(finite, torch.where(torch.isinf(t), -1e4, t), beta=0.5, reduction="sum")
    assert math.isfinite(loss.item()) and torch.isfinite(leaf.grad).all()
    assert_close(loss, want, rtol=1e-14)
    elements = generalized_jsd_loss(s, t, beta=0.5, reduction="none")
    assert torch.isfinite(elements).all() and elements[0, 1] == 0
    assert_close(elements.sum(), loss, rtol=1e-13)


BAD = [
    (dict(reduction="batch_mean"), ValueError,
     "reduction must be one of 'batchmean', 'sum', 'mean', 'none', got 'batch_mean'"),
    (dict(beta=1.5), ValueError, "beta must be in [0, 1], got 1.5"),
    (dict(beta=-0.5), ValueError, "beta must be in [0, 1], got -0.5"),
    (dict(temperature=0.0), ValueError, "temperature must be in [1e-30, 1e6]"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError,
     "labels must have the logits' leading shape (2, 3), got (2, 4)"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(sorted(case[0])) for case in BAD])
def test_invalid_arguments_raise(kwargs, error, message):
    """Where TRL returns NaN (beta outside [0, 1], temperature 0) or treats an unknown reduction as "none"."""
    with pytest.raises(error, match=re.escape(message)):
        generalized_jsd_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), **kwargs)


def test_docstring_examples_run():
    result = doctest.testmod(kdloss._gkd, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


# ------------------------------------------------------------------------------------------------------------
# Against TRL (where it is installed)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def gkd_trainer():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError as error:  # a TRL without the experimental GKD trainer (or without its dependencies)
        pytest.skip(f"trl.experimental.gkd does not import: {error}")
    return GKDTrainer


@pytest.mark.parametrize("shape", SHAPES, ids=["BSV", "NV"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl(gen, gkd_trainer, shape, masked, reduction, beta):
    trl_loss = gkd_trainer.generalized_jsd_loss
    for dtype in (torch.float64, torch.float32):
        for temperature in (1.0, 2.5):
            for count in COUNTS:
                s, t, labels = make_inputs(gen, shape, masked, dtype)
                kwargs = dict(beta=beta, temperature=temperature, reduction=reduction)
                kwargs["num_items_in_batch"] = count_argument(count)
                what = f"{dtype} T={temperature} num_items={count}"
                seed = int(torch.randint(0, 2**31, (), generator=gen))
                loss, grad = loss_and_gradient(
                    generalized_jsd_loss, s, t, labels, torch.Generator().manual_seed(seed), **kwargs
                )
                want, want_grad = loss_and_gradient(
                    trl_loss, s, t, labels, torch.Generator().manual_seed(seed), **kwargs
                )
                assert (loss.dtype, loss.shape, grad.dtype) == (want.dtype, want.shape, want_grad.dtype), what
                assert_close(loss, want, rtol=TOLERANCE[dtype], what=f"loss, {what}")
                assert_close(grad, want_grad, rtol=TOLERANCE[dtype], what=f"gradient, {what}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_edge_cases_match_trl(gen, gkd_trainer, reduction):
    trl_loss = gkd_trainer.generalized_jsd_loss
    s, t, labels = make_inputs(gen, (3, 7, 10), True, torch.float32)
    cases = [
        (s, t, torch.full((3, 7), -100), {}),  # everything masked
        (s[:, :-1, :], t[:, :-1, :], labels[:, 1:], {}),  # GKDTrainer's shifted views
        (s[0, 0], t[0, 0], torch.tensor(4), {}),  # one row, 0-d labels
        (s, t, labels, {"num_items_in_batch": torch.tensor(5.0, dtype=F64)}),  # promotes to float64
        (s, t, labels, {"num_items_in_batch": torch.tensor([5])}),  # broadcasts
        (s, t.double(), labels, {}),  # mixed dtypes
    ]
    for index, (student, teacher, mask, extra) in enumerate(cases):
        loss, grad = loss_and_gradient(generalized_jsd_loss, student, teacher, mask, reduction=reduction, **extra)
        want, want_grad = loss_and_gradient(trl_loss, student, teacher, mask, reduction=reduction, **extra)
        assert (loss.dtype, loss.shape) == (want.dtype, want.shape), index
        assert_close(loss.nan_to_num(7.0), want.nan_to_num(7.0), rtol=1e-5, what=f"case {index}")
        assert_close(grad, want_grad, rtol=1e-5, what=f"case {index}")


@pytest.mark.parametrize("beta", BETAS)
def test_bfloat16_is_at_least_as_close_as_trl(gen, gkd_trainer, beta):
    """TRL computes bfloat16 logits in bfloat16 (beta too): its value is off by up to a few percent; kdloss's is
    within bfloat16's rounding. Same dtype, and kdloss's error is no larger than TRL's (or than one rounding)."""
    s, t, labels = make_inputs(gen, (4, 6, 50), True)
    s, t = s.bfloat16(), t.bfloat16()
    exact = reference_gkd(s, t, labels, beta=beta, temperature=2.0)
    ours = generalized_jsd_loss(s, t, labels, beta=beta, temperature=2.0)
    theirs = gkd_trainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=2.0)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    error, trl_error = abs(ours.double() - exact).item(), abs(theirs.double() - exact).item()
    assert error <= max(trl_error, 2**-8 * abs(exact.item())), (error, trl_error)


def test_the_one_assignment_swap_in_gkd_trainer(gen, gkd_trainer, monkeypatch):
    """GKDTrainer.compute_loss, TRL's own call site (shifted logits, labels, beta, num_items_in_batch), gives the
    same loss and parameter gradients with the loss swapped in."""
    torch.manual_seed(0)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(31, 8)
            self.head = torch.nn.Linear(8, 31)

        def forward(self, input_ids, attention_mask):
            return type("Output", (), {"logits": self.head(torch.tanh(self.embed(input_ids)))})()

    student, teacher = TinyLM(), TinyLM()
    trainer = gkd_trainer.__new__(gkd_trainer)  # compute_loss reads only these attributes
    trainer.teacher_model, trainer.beta = teacher, 0.3
    input_ids = torch.randint(0, 31, (3, 9), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    def run():
        student.zero_grad()
        loss = gkd_trainer.compute_loss(trainer, student, inputs, num_items_in_batch=torch.tensor(13))
        loss.backward()
        return loss.detach(), [parameter.grad.clone() for parameter in student.parameters()]

    trl_loss, trl_grads = run()
    monkeypatch.setattr(gkd_trainer, "generalized_jsd_loss", staticmethod(generalized_jsd_loss))
    assert trainer.generalized_jsd_loss is generalized_jsd_loss
    loss, grads = run()
    assert_close(loss, trl_loss, rtol=1e-5, what="loss")
    for ours, theirs in zip(grads, trl_grads):
        assert_close(ours, theirs, rtol=1e-5, what="parameter gradient")
