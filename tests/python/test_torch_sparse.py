"""kdloss.torch against a sparse teacher (kdloss.SparseTeacher): every path of the dense tests, with a cache.

Three oracles: the NumPy class (same kernel: the torch plumbing must not change a bit), the float64 reference
``reference.sparse_soft_reference`` (the issue's formulas on the scattered cache), and the loss written in torch
primitives (:func:`plain_sparse_loss`, checked against that reference here), whose autograd gives first and higher
derivatives that neither the kernel nor ``_torch_autograd.sparse_soft_gradient_graph`` computes.
"""

from __future__ import annotations

import copy
import math
import pickle
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kdloss  # noqa: E402
from kdloss.torch import DistillationLoss, distillation_loss  # noqa: E402
from reference import dense_equivalent, sparse_soft_reference  # noqa: E402
from torch_helpers import (  # noqa: E402
    F64,
    IGNORE,
    LABEL_FORMS,
    REDUCTIONS,
    assert_close,
    backward_grad,
    gen,  # noqa: F401  (a fixture)
    make_batch,
    plain_torch_loss,
)

TAILS = ("bucket", "renormalize")
PARAMS = dict(temperature=2.0, alpha=0.4)


# ------------------------------------------------------------------------------------------------------------
# Caches and the oracle in torch primitives
# ------------------------------------------------------------------------------------------------------------


def top_k_cache(teacher, k, temperature=2.0, index_dtype=torch.int64, logprob_dtype=F64, *, empty_slots=True):
    """The k most probable classes of each row with their float64 log-softmax, as a SparseTeacher of CPU tensors;
    with `empty_slots`, every other row lists one class fewer (its last slot -inf, its index left as it was)."""
    log_p = torch.log_softmax(teacher.detach().to(F64) / temperature, -1)
    logprobs, indices = log_p.topk(k, -1)
    if empty_slots and logprobs.ndim > 1:
        logprobs.reshape(-1, k)[::2, -1] = -math.inf
    return kdloss.SparseTeacher(indices.to(index_dtype), logprobs.to(logprob_dtype))


def cache_tensors(cache):
    return torch.from_numpy(np.array(cache.indices)), torch.from_numpy(np.array(cache.logprobs))


def plain_sparse_loss(s, cache, y, *, tail="bucket", **params):
    """The loss against a sparse teacher in torch primitives: plain_torch_loss's hard term and reductions, with the
    issue's soft term T² [Σ_k p_k (log p_k − log q_k) + r (log r − log Q_u)] ("bucket") or T² KL(p̃ || q) over the
    listed classes ("renormalize"), Q_u the logsumexp of the unlisted classes' log q. Rows that list nothing have no
    soft term. (For rows with an unlisted class: where every class is listed, logsumexp of nothing but -inf would
    put NaN into the derivatives.)"""
    indices, logprobs = cache_tensors(cache)

    def divergence(_teacher_log_p, log_q):
        rows, classes = log_q.shape
        index = indices.reshape(rows, -1).to(torch.int64)
        log_p = logprobs.reshape(rows, -1).to(F64)
        filled = log_p != -math.inf
        count = filled.sum(-1)
        safe_index = torch.where(filled, index, 0)
        listed = torch.zeros(rows, classes, dtype=torch.bool)
        listed[torch.arange(rows).unsqueeze(-1).expand_as(index)[filled], index[filled]] = True
        if tail == "renormalize":
            log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
        p = torch.exp(log_p)
        log_q_listed = log_q.gather(-1, safe_index)
        soft = torch.where(filled, p * (log_p - log_q_listed), 0.0).sum(-1)
        if tail == "bucket":
            r = (1 - p.sum(-1)).clamp(min=0)
            log_unlisted = torch.logsumexp(torch.where(listed, -math.inf, log_q), -1)
            soft = soft + torch.where(r > 0, r * (torch.log(r) - log_unlisted), 0.0)
        return torch.where(count > 0, soft, 0.0)

    return plain_torch_loss(s, s.detach(), y, soft_divergence=divergence, **params)


def numpy_result(s, cache, y, **params):
    """The NumPy class's loss (a float, or an array for reduction "none") and gradient (a tensor)."""
    loss, grad = kdloss.DistillationLoss(**params).loss_and_gradient(
        s.detach().numpy(), cache, None if y is None else y.numpy()
    )
    return loss, torch.from_numpy(grad)


def same_loss(loss, numpy_loss):
    """Whether a loss tensor holds bitwise the NumPy class's loss, in the tensor's dtype."""
    return torch.equal(loss, torch.as_tensor(numpy_loss, dtype=loss.dtype))


def batch(gen, shape, form, k=6, **cache_options):
    s, t, y = make_batch(gen, shape, form)
    return s, top_k_cache(t, k, PARAMS["temperature"], **cache_options), y


def test_the_oracle_is_the_reference(gen):
    """plain_sparse_loss and its autograd gradient are the float64 reference's, rows listing fewer than K included."""
    s, cache, _ = batch(gen, (5, 3, 30), "none")
    for tail in TAILS:
        want = sparse_soft_reference(s.numpy(), cache.indices, cache.logprobs, 2.0, tail)
        loss, grad = backward_grad(plain_sparse_loss, s, cache, None, temperature=2.0, alpha=0.3, reduction="none",
                                   tail=tail)  # fmt: skip
        assert_close(loss, torch.from_numpy(want.soft), what=f"{tail} soft")
        assert_close(grad, torch.from_numpy(want.grad), what=f"{tail} gradient")


# ------------------------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 40), (3, 4, 25), (30,)], ids=["BC", "BSV", "C"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", LABEL_FORMS)
@pytest.mark.parametrize("tail", TAILS)
def test_matches_numpy_class_and_plain_torch(gen, shape, reduction, form, tail):
    s, cache, y = batch(gen, shape, form)
    params = dict(PARAMS, reduction=reduction, tail=tail)
    loss, grad = backward_grad(distillation_loss, s, cache, y, **params)
    np_loss, np_grad = numpy_result(s, cache, y, **params)
    assert same_loss(loss, np_loss) and torch.equal(grad, np_grad)  # the same kernel: not a bit changed
    ref_loss, ref_grad = backward_grad(plain_sparse_loss, s, cache, y, **params)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="gradient")
    assert loss.dtype == F64 and loss.shape == (shape[:-1] if reduction == "none" else ())
    with torch.no_grad():  # the loss-only path
        assert torch.equal(distillation_loss(s, cache, y, **params), loss)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("logprob_dtype", [torch.float16, torch.float32, F64])
def test_every_cache_dtype_and_numpy_arrays(gen, index_dtype, logprob_dtype):
    s, t, y = make_batch(gen, (4, 3, 60), "index")
    cache = top_k_cache(t, 8, 2.0, index_dtype, logprob_dtype)
    as_numpy = kdloss.SparseTeacher(np.array(cache.indices), np.array(cache.logprobs))
    for student in (s, s.float()):
        loss, grad = backward_grad(distillation_loss, student, cache, y, **PARAMS)
        np_loss, np_grad = numpy_result(student, cache, y, **PARAMS)
        assert same_loss(loss, np_loss) and torch.equal(grad, np_grad)
        assert loss.dtype == student.dtype  # the compute dtype is the student's, whatever the cache's
        assert torch.equal(backward_grad(distillation_loss, student, as_numpy, y, **PARAMS)[1], grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_students_compute_in_float32(gen, dtype):
    s, cache, y = batch(gen, (6, 4, 20), "index")
    s = s.to(dtype).requires_grad_(True)
    loss = distillation_loss(s, cache, y, temperature=2.0)
    (loss * 1024.0).backward()  # a GradScaler's scale, applied before the cast to half
    np_loss, np_grad = numpy_result(s.detach().float(), cache, y, temperature=2.0)
    assert loss.dtype == torch.float32 and s.grad.dtype == dtype
    assert loss.item() == np.float32(np_loss)
    assert torch.equal(s.grad, (np_grad * 1024.0).to(dtype))


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("normalizer", [7.0, torch.tensor(7), torch.tensor([7.0], dtype=torch.float32)])
def test_normalizer_number_or_tensor(gen, reduction, normalizer):
    s, cache, y = batch(gen, (3, 4, 9), "index")
    params = dict(PARAMS, reduction=reduction, tail="renormalize")
    loss, grad = backward_grad(distillation_loss, s, cache, y, normalizer=normalizer, **params)
    ref_loss, ref_grad = backward_grad(plain_sparse_loss, s, cache, y, normalizer=7.0, **params)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="gradient")


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_grad_output_weights_each_row(gen, form):
    s, cache, y = batch(gen, (4, 3, 12), form)
    w = torch.randn(4, 3, generator=gen, dtype=F64)
    params = dict(PARAMS, reduction="none")
    loss, grad = backward_grad(distillation_loss, s, cache, y, weights=w, **params)
    ref_loss, ref_grad = backward_grad(plain_sparse_loss, s, cache, y, weights=w, **params)
    assert_close(loss, ref_loss, what="row losses")
    assert_close(grad, ref_grad, what="gradient")
    scaled = lambda x, *a, **k: distillation_loss(x, *a, **k) * -2.75  # noqa: E731
    assert_close(backward_grad(scaled, s, cache, y, **PARAMS)[1], -2.75 * numpy_result(s, cache, y, **PARAMS)[1])


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(gen, tail, reduction):
    s, cache, y = batch(gen, (3, 2, 7), "index", k=3)
    s.requires_grad_(True)
    fn = lambda x: distillation_loss(x, cache, y, **PARAMS, reduction=reduction, tail=tail)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_a_cache_of_every_class_is_the_dense_teacher(gen):
    s, t, y = make_batch(gen, (4, 9), "index")
    indices, logprobs = dense_equivalent(t.numpy(), 2.0)
    cache = kdloss.SparseTeacher(indices, logprobs)
    dense_loss, dense_grad = backward_grad(distillation_loss, s, t, y, **PARAMS)
    for tail in TAILS:
        loss, grad = backward_grad(distillation_loss, s, cache, y, **PARAMS, tail=tail)
        assert_close(loss, dense_loss, what=f"{tail} loss")
        assert_close(grad, dense_grad, what=f"{tail} gradient")
        # And the exact second derivatives of the two agree.
        hessians = [
            torch.autograd.functional.hessian(lambda x, teacher=teacher: distillation_loss(x, teacher, y, **PARAMS), s)
            for teacher in (cache, t)
        ]
        assert_close(hessians[0], hessians[1], rtol=1e-11, what=f"{tail} Hessian")


def test_rows_listing_nothing_masked_classes_and_sums_above_1():
    s = torch.tensor(
        [[1.0, 2.0, 0.5, -1.0], [1.0, -math.inf, 0.5, -1.0], [0.0, 1.0, 2.0, -0.5], [0.5, -1.0, 1.5, 0.0]], dtype=F64
    )
    indices = torch.tensor([[0, 1], [1, 0], [3, 0], [0, 2]])
    # The last row's probabilities sum to 1 + 5e-7 (within the rounding allowed): no tail, and P = 1 + 5e-7.
    logprobs = torch.tensor(
        [
            [-math.inf, -math.inf],
            [math.log(0.5), math.log(0.3)],
            [math.log(0.6), -math.inf],
            [math.log(0.6), math.log(0.4 + 5e-7)],
        ],
        dtype=F64,
    )
    cache = kdloss.SparseTeacher(indices, logprobs, vocab_size=4)
    for tail in TAILS:
        params = dict(temperature=1.0, reduction="none", tail=tail)
        loss, grad = backward_grad(distillation_loss, s, cache, None, **params)
        want = sparse_soft_reference(s.numpy(), indices, logprobs, 1.0, tail)
        assert loss[0] == 0 and torch.equal(grad[0], torch.zeros(4, dtype=F64))  # nothing listed: no soft term
        assert loss[1] == math.inf and torch.isfinite(grad[1]).all()  # a listed class the student rules out
        assert_close(grad, torch.from_numpy(want.grad), what=f"{tail} gradient")
        # create_graph=True: the gradient rebuilt from torch operations is the kernel's, and its derivative is
        # finite, 0 for the row that lists nothing and the oracle's for the others (whose own derivative leaves
        # NaN in the row that lists nothing, and across rows from it: only the rows' own blocks are compared).
        leaf = s.clone().requires_grad_(True)
        (rebuilt,) = torch.autograd.grad(distillation_loss(leaf, cache, None, **params).sum(), leaf, create_graph=True)
        assert_close(rebuilt, grad, what=f"{tail} rebuilt gradient")
        hessian = torch.autograd.functional.hessian(
            lambda x, params=params: distillation_loss(x, cache, None, **params).sum(), s
        )
        oracle = torch.autograd.functional.hessian(
            lambda x, params=params: plain_sparse_loss(x, cache, None, alpha=0.3, **params).sum(), s
        )
        assert torch.isfinite(hessian).all() and torch.equal(hessian[0], torch.zeros(4, 4, 4, dtype=F64))
        for row in (1, 2, 3):
            assert_close(hessian[row, :, row], oracle[row, :, row], what=f"{tail} Hessian of row {row}")
        assert hessian[1, :, 1].abs().max() > 0.1


def test_the_cache_and_the_labels_are_constants(gen):
    s, t, y = make_batch(gen, (5, 16), "soft")
    logprobs, indices = torch.log_softmax(t, -1).topk(4, -1)
    kept = indices.clone(), logprobs.clone()
    s.requires_grad_(True)
    y.requires_grad_(True)  # even when asked for, as with dense teachers
    for create_graph in (False, True):
        loss = distillation_loss(s, kdloss.SparseTeacher(indices, logprobs), y)
        student_grad, label_grad = torch.autograd.grad(loss, (s, y), create_graph=create_graph, allow_unused=True)
        assert student_grad is not None and label_grad is None
        assert torch.equal(logprobs, kept[1]) and torch.equal(indices, kept[0])  # read, never written


def test_empty_batch_and_all_ignored(gen):
    s = torch.zeros(0, 5, dtype=F64, requires_grad=True)
    empty = kdloss.SparseTeacher(np.zeros((0, 2), np.int64), np.zeros((0, 2)))
    loss = distillation_loss(s, empty)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, 5)
    s, cache, _ = batch(gen, (3, 5), "none", k=2)
    s.requires_grad_(True)
    loss = distillation_loss(s, cache, torch.full((3,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The NumPy-class methods kdloss.torch calls, in order, with the teacher each was given."""
    calls = []
    for name in ("compute_loss", "loss_and_gradient"):
        real = getattr(kdloss.DistillationLoss, name)

        def spy(self, student, teacher, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, teacher))
            return _real(self, student, teacher, *args, **kwargs)

        monkeypatch.setattr(kdloss.DistillationLoss, name, spy)
    return calls


def test_the_cache_is_read_in_place_and_no_grad_skips_the_gradient(gen, kernel_calls, tmp_path):
    s, cache, y = batch(gen, (4, 30), "index")
    cache.save(tmp_path / "cache")
    loaded = kdloss.SparseTeacher.load(tmp_path / "cache")  # read-only memory maps: no warning, no copy
    leaf = s.clone().requires_grad_(True)
    distillation_loss(leaf, loaded, y).backward()
    assert kernel_calls == [("loss_and_gradient", loaded)]  # the eager path hands over the cache itself
    with torch.no_grad():
        loss = distillation_loss(leaf, loaded, y)
    name, given = kernel_calls[1]
    assert name == "compute_loss" and given is not loaded  # the operator's view of the cache's arrays
    for array in ("indices", "logprobs"):
        assert getattr(given, array).ctypes.data == getattr(loaded, array).ctypes.data
    assert loss.grad_fn is None and loss.item() == kdloss.DistillationLoss().compute_loss(s.numpy(), cache, y)
    assert torch.equal(leaf.grad, numpy_result(s, cache, y)[1])


# ------------------------------------------------------------------------------------------------------------
# Second and higher derivatives
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", LABEL_FORMS)
def test_hessian_matches_plain_torch(gen, tail, reduction, form):
    """The gradient rebuilt for create_graph=True is the kernel's, and its derivative the oracle's."""
    s, cache, y = batch(gen, (3, 7), form, k=3)
    params = dict(PARAMS, reduction=reduction, tail=tail)
    leaf = s.clone().requires_grad_(True)
    (rebuilt,) = torch.autograd.grad(distillation_loss(leaf, cache, y, **params).sum(), leaf, create_graph=True)
    assert rebuilt.requires_grad
    assert_close(rebuilt, numpy_result(s, cache, y, **params)[1], what="rebuilt gradient")
    hessian = torch.autograd.functional.hessian(lambda x: distillation_loss(x, cache, y, **params).sum(), s)
    expected = torch.autograd.functional.hessian(lambda x: plain_sparse_loss(x, cache, y, **params).sum(), s)
    assert expected.abs().max() > 1e-3  # a Hessian of zeros would not pass
    assert_close(hessian, expected, rtol=1e-12, what="Hessian")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("form", LABEL_FORMS)
def test_gradgradcheck(gen, tail, form):
    s, cache, y = batch(gen, (2, 2, 6), form, k=3)
    s.requires_grad_(True)
    for normalizer in (None, torch.tensor(5.0)):

        def loss(x, normalizer=normalizer):
            return distillation_loss(x, cache, y, **PARAMS, tail=tail, normalizer=normalizer)

        assert torch.autograd.gradgradcheck(loss, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
def test_gradient_penalty_and_float32(gen, tail):
    """(loss + 10 |d loss/ds|²).backward() through kdloss and through plain torch, in float64 and float32."""
    s, cache, y = batch(gen, (4, 10), "index", k=4)
    for dtype, rtol in ((F64, 1e-12), (torch.float32, 1e-5)):

        def penalised_gradient(loss_fn, dtype=dtype):
            leaf = s.detach().to(dtype).requires_grad_(True)
            loss = loss_fn(leaf, cache, y, **PARAMS, tail=tail)
            (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
            (loss + 10 * g.pow(2).sum()).backward()
            return leaf.grad

        want = penalised_gradient(plain_sparse_loss, F64)
        assert_close(penalised_gradient(distillation_loss), want, rtol=rtol, what=f"{dtype} gradient")


@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_retained_graph_twice_and_a_callers_gradient(gen, scale):
    s, cache, y = batch(gen, (3, 4, 11), "index")
    leaf = s.clone().requires_grad_(True)
    loss = distillation_loss(leaf, cache, y, **PARAMS) * scale
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    kept = first.clone()
    first.zero_()  # the caller's own: writing to it changes nothing kdloss keeps
    loss.backward(retain_graph=True)
    loss.backward()
    want = numpy_result(s, cache, y, **PARAMS)[1] * scale
    assert torch.equal(kept, want) and torch.equal(leaf.grad, 2 * want)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


# ------------------------------------------------------------------------------------------------------------
# The operators, torch.compile and meta tensors
# ------------------------------------------------------------------------------------------------------------


def operator_args(s, cache, y, reduction="mean", tail="bucket", normalizer=None):
    return (s, *cache_tensors(cache), y, 2.0, 0.3, reduction, IGNORE, normalizer, 1, "forward_kl", 0.5, 0.1, tail)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_operators_pass_opcheck(gen, tail, reduction):
    s, cache, y = batch(gen, (3, 4, 9), "index", index_dtype=torch.int32, logprob_dtype=torch.float16)
    normalizer = None if reduction == "none" else torch.tensor(7.0, dtype=F64)
    # Every test of torch.library.opcheck: schema, fake implementation, autograd registration, and
    # AOTAutograd with dynamic shapes; with and without a student that requires grad.
    for student in (s.requires_grad_(True), s.detach()):
        args = operator_args(student, cache, y, reduction, tail, normalizer)
        for operator in (torch.ops.kdloss.sparse_loss_and_grad.default, torch.ops.kdloss.sparse_loss.default):
            torch.library.opcheck(operator, args)


@pytest.mark.parametrize("tail", TAILS)
def test_operators_have_exact_autograd_formulas(gen, tail):
    s, cache, y = batch(gen, (4, 8), "soft", k=3)
    leaf = s.clone().requires_grad_(True)
    loss = torch.ops.kdloss.sparse_loss(*operator_args(leaf, cache, y, "sum", tail))
    want = numpy_result(s, cache, y, temperature=2.0, alpha=0.3, reduction="sum", tail=tail)
    assert same_loss(loss, want[0])
    (grad,) = torch.autograd.grad(loss * 3, leaf)  # the loss-only operator computes its gradient when asked
    assert torch.equal(grad, 3 * want[1])
    hessian = torch.autograd.functional.hessian(
        lambda x: torch.ops.kdloss.sparse_loss_and_grad(*operator_args(x, cache, y, "sum", tail))[0], s
    )
    params = dict(temperature=2.0, alpha=0.3, reduction="sum", tail=tail)
    assert_close(hessian, torch.autograd.functional.hessian(lambda x: plain_sparse_loss(x, cache, y, **params), s))


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_matches_eager(gen, tail, reduction):
    kd = DistillationLoss(temperature=2.0, alpha=0.4, reduction=reduction, tail=tail)
    model = torch.nn.Linear(6, 20, dtype=F64)
    x = torch.randn(4, 3, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 20, (4, 3), generator=gen)
    y[0, 1] = IGNORE
    caches = [top_k_cache(torch.randn(4, 3, 20, generator=gen, dtype=F64), 5) for _ in range(2)]

    def step(x, cache, y):
        return kd(model(x), cache, y).sum() * 1.5

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for cache in caches:  # a second cache of the same shape: an input of the graph, not a constant of it
        results = []
        for fn in (step, compiled):
            model.zero_grad()
            loss = fn(x, cache, y)
            loss.backward()
            results.append((loss.detach(), model.weight.grad.clone(), model.bias.grad.clone()))
        for eager, compiled_result in zip(*results):
            assert_close(compiled_result, eager, rtol=1e-14)
    assert not torch.equal(step(x, caches[0], y), step(x, caches[1], y))

    def evaluate(x, cache, y, count):
        with torch.no_grad():
            return kd(model(x), cache, y, normalizer=count if reduction != "none" else None)

    count = (y != IGNORE).sum()
    got = torch.compile(evaluate, backend="aot_eager", fullgraph=True)(x, caches[0], y, count)
    assert_close(got, evaluate(x, caches[0], y, count), rtol=1e-14)


# Dynamo's own warning when it resumes after a graph break with a non-leaf tensor (the loss) in hand.
RESUME_WARNING = "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"


@pytest.mark.filterwarnings(RESUME_WARNING)
def test_compile_with_a_memory_mapped_cache(gen, tmp_path):
    """Dynamo takes no np.memmap as a graph input: the loss is computed outside the graph (a graph break), and
    under fullgraph=True that is an error that says why."""
    s, cache, y = batch(gen, (4, 12), "index")
    cache.save(tmp_path / "cache")
    loaded = kdloss.SparseTeacher.load(tmp_path / "cache")
    leaf = s.clone().requires_grad_(True)
    loss = torch.compile(lambda x, c: distillation_loss(x, c, y) * 2, backend="aot_eager")(leaf, loaded)
    loss.backward()
    want = numpy_result(s, cache, y)
    assert loss.item() == 2 * want[0] and torch.equal(leaf.grad, 2 * want[1])
    with pytest.raises(torch._dynamo.exc.Unsupported, match="a memory-mapped SparseTeacher"):
        torch.compile(lambda x, c: distillation_loss(x, c, y), backend="aot_eager", fullgraph=True)(leaf, loaded)


def test_meta_tensors_give_shapes():
    cache = kdloss.SparseTeacher(np.zeros((2, 3, 4), np.int32), np.full((2, 3, 4), -np.inf, np.float16))
    s = torch.empty(2, 3, 7, device="meta", requires_grad=True)
    y = torch.empty(2, 3, dtype=torch.int64, device="meta")
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (2, 3))):
        loss = distillation_loss(s, cache, y, reduction=reduction)
        assert loss.device.type == "meta" and loss.shape == shape
    loss.sum().backward()
    assert s.grad.shape == (2, 3, 7) and s.grad.device.type == "meta"


def test_other_devices_raise_a_clear_error(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, cache, _ = batch(gen, (2, 5), "none", k=2)
    with FakeTensorMode():
        s = torch.empty(2, 5, device="cuda")
        with pytest.raises(RuntimeError, match=r"kdloss computes on the CPU.*cuda.*\.cpu\(\)"):
            distillation_loss(s, cache)
    with pytest.raises(RuntimeError, match="true_labels is on meta but the logits are on cpu"):
        distillation_loss(torch.zeros(2, 5), cache, torch.zeros(2, dtype=torch.int64, device="meta"))


# ------------------------------------------------------------------------------------------------------------
# Checks and messages: the NumPy class's
# ------------------------------------------------------------------------------------------------------------


def error_of(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


# (student shape, cache leading shape, labels: shape and "index"/"soft" or None, keyword arguments)
SHAPE_ERRORS = {
    "leading shape": ((2, 5), (3,), None, {}),
    "leading rank": ((2, 3, 5), (6,), None, {}),
    "one row against a batch": ((5,), (2,), None, {}),
    "0-d logits": ((), (), None, {}),
    "no classes": ((2, 0), (2,), None, {}),
    "index labels shape": ((2, 5), (2,), ((3,), "index"), {}),
    "soft labels shape": ((2, 5), (2,), ((2, 4), "soft"), {}),
    "float class indices": ((4, 5), (4,), ((4,), "soft"), {}),
    "normalizer with reduction none": ((2, 5), (2,), None, dict(reduction="none", normalizer=2.0)),
    "normalizer 0": ((2, 5), (2,), None, dict(normalizer=0.0)),
    "divergence": ((2, 5), (2,), None, dict(divergence="jsd")),
    "labels before divergence": ((2, 5), (2,), ((3,), "index"), dict(divergence="reverse_kl")),
    "divergence before classes": ((2, 0), (2,), None, dict(divergence="skew_forward_kl")),
    "tail": ((2, 5), (2,), None, dict(tail="top")),
    "tail type": ((2, 5), (2,), None, dict(tail=1)),
    "temperature above 100": ((2, 5), (2,), None, dict(temperature=100.5)),
    "divergence before temperature": ((2, 5), (2,), None, dict(divergence="jsd", temperature=1e3)),
}


@pytest.mark.parametrize("case", SHAPE_ERRORS, ids=str)
def test_shapes_are_checked_as_the_numpy_class_checks_them(case):
    """A bad shape or parameter raises the NumPy class's error and message from the functional form and the
    module, for CPU and meta tensors, in training and in evaluation."""
    student_shape, leading, labels, kwargs = SHAPE_ERRORS[case]
    kwargs = dict(kwargs)
    constructor = {
        name: kwargs.pop(name) for name in ("temperature", "reduction", "divergence", "tail") if name in kwargs
    }
    cache = kdloss.SparseTeacher(np.zeros((*leading, 2), np.int64), np.full((*leading, 2), -np.inf))
    numpy_labels = None
    if labels is not None:
        numpy_labels = np.zeros(labels[0], dtype=np.int64 if labels[1] == "index" else np.float64)
    want = error_of(
        lambda: kdloss.DistillationLoss(**constructor).compute_loss(
            np.zeros(student_shape), cache, numpy_labels, **kwargs
        )  # fmt: skip
    )
    for device in ("cpu", "meta"):
        for requires_grad in (True, False):
            s = torch.zeros(student_shape, dtype=F64, device=device, requires_grad=requires_grad)
            y = None if numpy_labels is None else torch.from_numpy(numpy_labels).to(device)
            where = f"{device}, requires_grad={requires_grad}"
            got = error_of(lambda s=s, y=y: distillation_loss(s, cache, y, **constructor, **kwargs))
            assert got == want, where
            got = error_of(lambda s=s, y=y: DistillationLoss(**constructor)(s, cache, y, **kwargs))
            assert got == want, where


BAD_CACHES = [
    (lambda i, p: p.__setitem__((1, 2, 1), np.nan), "logprobs of row (1, 2) hold NaN"),
    (lambda i, p: p.__setitem__((0, 1, 0), np.inf), "logprobs of row (0, 1) hold +inf"),
    (lambda i, p: i.__setitem__((1, 0, 2), 20), "indices of row (1, 0) hold 20, outside [0, 20)"),
    (lambda i, p: i.__setitem__((0, 2, 1), -1), "indices of row (0, 2) hold -1, outside [0, 20)"),
    (lambda i, p: i.__setitem__((1, 1, 2), i[1, 1, 0]), "indices of row (1, 1) list class {dup} more than once"),
    (lambda i, p: p.__setitem__((0, 0), np.log(0.3)), "logprobs of row (0, 0) sum to probability 1.2 > 1"),
]


@pytest.mark.parametrize(("spoil", "message"), BAD_CACHES)
def test_a_bad_cache_is_refused_naming_its_row(gen, spoil, message):
    """The kernel's checks of the cache's values, with its messages, on every path: eager with and without a
    gradient, and compiled; nothing reaches the student's gradient."""
    s, t, _ = make_batch(gen, (2, 3, 20), "none")
    good = top_k_cache(t, 4, 1.0, empty_slots=False)
    indices, logprobs = np.array(good.indices), np.array(good.logprobs)
    spoil(indices, logprobs)
    message = re.escape(message.format(dup=indices[1, 1, 0]))
    cache = kdloss.SparseTeacher(indices, logprobs)
    with pytest.raises(ValueError, match=message):
        kdloss.DistillationLoss(1.0).compute_loss(s.numpy(), cache)
    leaf = s.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=message):
        distillation_loss(leaf, cache, temperature=1.0)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        distillation_loss(leaf, cache, temperature=1.0)
    with pytest.raises(ValueError, match=message):
        torch.compile(lambda x, c: distillation_loss(x, c, temperature=1.0), backend="aot_eager")(leaf, cache)
    assert leaf.grad is None


def test_operators_called_directly_check_as_the_numpy_class(gen):
    s, cache, _ = batch(gen, (2, 9), "none", k=3)
    indices, logprobs = cache_tensors(cache)
    args = (2.0, 0.3, "mean", IGNORE, None, None)
    for device in ("cpu", "meta"):
        student = s.to(device)
        for operator in (torch.ops.kdloss.sparse_loss_and_grad, torch.ops.kdloss.sparse_loss):
            for bad_indices, bad_logprobs, wanted in (
                (indices.to(torch.int16), logprobs, "indices must be int32 or int64, got dtype int16"),
                (indices, logprobs.to(torch.bfloat16), "logprobs must be float16, float32 or float64, got dtype"),
                (indices, logprobs[:, :2], "indices and logprobs must have the same shape"),
            ):
                with pytest.raises((TypeError, ValueError), match=re.escape(wanted)):
                    operator(student, bad_indices.to(device), bad_logprobs.to(device), None, *args)
            with pytest.raises(ValueError, match="a sparse teacher takes divergence 'forward_kl' only"):
                operator(student, indices.to(device), logprobs.to(device), None, *args, "jsd")
            with pytest.raises(ValueError, match="tail must be one of 'bucket', 'renormalize', got 'top'"):
                operator(student, indices.to(device), logprobs.to(device), None, *args, "forward_kl", 0.5, 0.1, "top")


# ------------------------------------------------------------------------------------------------------------
# The module, and training
# ------------------------------------------------------------------------------------------------------------


def test_module_tail_property_repr_and_pickling(gen):
    kd = DistillationLoss(2.0, 0.25, num_threads=1, tail="renormalize")
    assert kd.tail == "renormalize" and DistillationLoss().tail == "bucket"
    assert repr(kd).endswith("beta=0.5, skew=0.1, tail='renormalize')")
    with pytest.raises(AttributeError):
        kd.tail = "bucket"  # read-only, as in the NumPy class
    s, cache, y = batch(gen, (4, 12), "index")
    loss = kd(s, cache, y)
    assert torch.equal(loss, distillation_loss(s, cache, y, temperature=2.0, alpha=0.25, tail="renormalize"))
    assert not torch.equal(loss, DistillationLoss(2.0, 0.25)(s, cache, y))  # the tail is what differs
    for clone in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        assert repr(clone) == repr(kd) and clone.tail == "renormalize"
        assert torch.equal(clone(s, cache, y), loss)


def test_gradient_accumulation_over_slices_of_a_cache(gen, tmp_path):
    """Micro-batches of a memory-mapped cache's rows, each given the whole batch's count: the full-batch gradient."""
    s, cache, y = batch(gen, (12, 5, 16), "index")
    cache.save(tmp_path / "cache")
    loaded = kdloss.SparseTeacher.load(tmp_path / "cache")
    kd = DistillationLoss(temperature=2.0, alpha=0.5)
    _, full_grad = backward_grad(kd, s, cache, y)
    total = (y != IGNORE).sum()
    leaf = s.clone().requires_grad_(True)
    for part in (slice(0, 5), slice(5, 7), slice(7, 12)):
        kd(leaf[part], loaded[part], y[part], normalizer=total).backward()
    assert_close(leaf.grad, full_grad, rtol=1e-13, what="accumulated gradient")


def test_training_trajectory_matches_plain_torch_loss():
    gen = torch.Generator().manual_seed(99)
    teacher = torch.nn.Linear(5, 30).to(F64).requires_grad_(False)
    batches = []
    for _ in range(15):
        x = torch.randn(8, 5, generator=gen, dtype=F64)
        y = torch.randint(0, 30, (8,), generator=gen)
        batches.append((x, top_k_cache(teacher(x), 6, 2.0), y))
    losses = {
        "kdloss": DistillationLoss(temperature=2.0, alpha=0.3),
        "torch": lambda s, c, y: plain_sparse_loss(s, c, y, temperature=2.0, alpha=0.3),
    }
    history = {}
    for name, loss_fn in losses.items():
        torch.manual_seed(7)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 30)).to(F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        history[name] = []
        for x, cache, y in batches:
            optimizer.zero_grad()
            loss = loss_fn(model(x), cache, y)
            loss.backward()
            optimizer.step()
            history[name].append(loss.item())
    assert history["kdloss"][-1] < history["kdloss"][0]
    np.testing.assert_allclose(history["kdloss"], history["torch"], rtol=1e-10)
