"""kdloss.torch: the nn.Module, the functional form, the custom operator, autograd and torch.compile.

Every numerical check compares against two independent oracles: kdloss's NumPy API (same kernel, so the
torch plumbing must not change a bit of it) and the loss written with plain PyTorch primitives (so the
formula and its autograd gradient agree).
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import kdloss  # noqa: E402
from helpers import SEEDS, cases, with_examples  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kdloss.torch import DistillationLoss, distillation_loss  # noqa: E402
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

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

# ------------------------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 11), (3, 5, 7), (9,)], ids=["BC", "BSV", "C"])
@settings(max_examples=6)
@given(reduction=st.sampled_from(REDUCTIONS), form=st.sampled_from(LABEL_FORMS), seed=SEEDS)
@with_examples(cases([dict(form=form) for form in LABEL_FORMS], reduction=REDUCTIONS, seed=[0]))
def test_matches_numpy_api_and_plain_torch(shape, reduction, form, seed):
    """distillation_loss on a batch (B, C), sequences (B, S, C) or one row (C,) gives bitwise the NumPy class's
    loss and gradient, and those of the loss written with plain torch, for every reduction and label form."""
    s, t, y = make_batch(torch.Generator().manual_seed(seed), shape, form)
    params = dict(temperature=2.5, alpha=0.35, reduction=reduction)
    loss, grad = backward_grad(distillation_loss, s, t, y, **params)

    np_loss, np_grad = kdloss.DistillationLoss(**params).loss_and_gradient(
        s.numpy(), t.numpy(), None if y is None else y.numpy()
    )
    # Same kernel underneath: the torch plumbing must not change a single bit.
    assert torch.equal(loss, torch.as_tensor(np_loss, dtype=F64))
    assert torch.equal(grad, torch.from_numpy(np_grad))

    ref_loss, ref_grad = backward_grad(plain_torch_loss, s, t, y, **params)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="gradient")
    assert loss.dtype == F64 and loss.shape == (shape[:-1] if reduction == "none" else ())


def test_check_value_from_the_spec():
    kd = DistillationLoss(temperature=3.0, alpha=0.5)
    s = torch.tensor([[1.0, 2.0, 0.5]], dtype=F64, requires_grad=True)
    t = torch.tensor([[1.5, 1.8, 0.6]], dtype=F64)
    loss = kd(s, t, torch.tensor([1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.25465032, abs=1e-8)
    np.testing.assert_allclose(s.grad.numpy()[0], [0.05121834, -0.12252327, 0.07130493], atol=1e-8)


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("normalizer", [7.0, torch.tensor(7), torch.tensor([7.0], dtype=torch.float32)])
def test_normalizer_number_or_tensor(gen, reduction, normalizer):
    s, t, y = make_batch(gen, (3, 4, 6), "index")
    loss, grad = backward_grad(
        distillation_loss, s, t, y, temperature=2.0, alpha=0.4, reduction=reduction, normalizer=normalizer
    )
    ref_loss, ref_grad = backward_grad(
        plain_torch_loss, s, t, y, temperature=2.0, alpha=0.4, reduction=reduction, normalizer=7.0
    )
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="gradient")


def test_grad_output_scales_the_saved_gradient(gen):
    s, t, y = make_batch(gen, (4, 3, 8), "index")
    scaled = lambda x, *a, **k: distillation_loss(x, *a, **k) * -2.75  # noqa: E731
    scaled_ref = lambda x, *a, **k: plain_torch_loss(x, *a, **k) * -2.75  # noqa: E731
    _, grad = backward_grad(scaled, s, t, y, temperature=3.0, alpha=0.3)
    _, ref = backward_grad(scaled_ref, s, t, y, temperature=3.0, alpha=0.3)
    assert_close(grad, ref, what="gradient")


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_reduction_none_backward_weights_each_row(gen, form):
    s, t, y = make_batch(gen, (4, 3, 8), form)
    w = torch.randn(4, 3, generator=gen, dtype=F64)  # a different grad_output per row
    loss, grad = backward_grad(distillation_loss, s, t, y, weights=w, temperature=1.5, alpha=0.6, reduction="none")
    ref_loss, ref = backward_grad(plain_torch_loss, s, t, y, weights=w, temperature=1.5, alpha=0.6, reduction="none")
    assert_close(loss, ref_loss, what="row losses")
    assert_close(grad, ref, what="gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", LABEL_FORMS)
def test_gradcheck(gen, reduction, form):
    s, t, y = make_batch(gen, (3, 2, 5), form)
    s.requires_grad_(True)
    fn = lambda x: distillation_loss(x, t, y, temperature=2.0, alpha=0.4, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8, rtol=1e-6)
    if reduction != "none":
        fn = lambda x: distillation_loss(x, t, y, alpha=0.4, reduction=reduction, normalizer=5.0)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_teacher_and_labels_get_no_gradient(gen):
    s, t, y = make_batch(gen, (5, 6), "soft")
    s.requires_grad_(True)
    t.requires_grad_(True)  # even when asked for: the teacher is a constant of this loss
    y.requires_grad_(True)
    distillation_loss(s, t, y).backward()
    assert s.grad is not None
    assert t.grad is None
    assert y.grad is None


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the NumPy-class methods kdloss.torch calls (the native entry points), in order."""
    calls = []
    for name in ("compute_loss", "loss_and_gradient"):
        real = getattr(kdloss.DistillationLoss, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(kdloss.DistillationLoss, name, spy)
    return calls


def test_no_grad_uses_the_loss_only_operator(gen, kernel_calls):
    s, t, y = make_batch(gen, (4, 7), "index")
    with torch.no_grad():
        loss = distillation_loss(s.requires_grad_(True), t, y)
    assert kernel_calls == ["compute_loss"]
    assert loss.grad_fn is None
    s.requires_grad_(False)
    assert torch.equal(distillation_loss(s, t, y), loss) and kernel_calls == ["compute_loss"] * 2
    s.requires_grad_(True)
    distillation_loss(s, t, y).backward()  # one native call computes both; backward calls nothing
    assert kernel_calls[2:] == ["loss_and_gradient"]


# ------------------------------------------------------------------------------------------------------------
# Dtypes and devices
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(gen, dtype):
    s, t, y = make_batch(gen, (6, 4, 10), "index", dtype=dtype)
    s.requires_grad_(True)
    loss = distillation_loss(s, t, y, temperature=2.0)
    scale = 1024.0  # like a GradScaler: applied to the float32 gradient before the cast to half
    (loss * scale).backward()
    assert loss.dtype == torch.float32
    assert s.grad.dtype == dtype

    np_loss, np_grad = kdloss.DistillationLoss(temperature=2.0).loss_and_gradient(
        s.detach().float().numpy(), t.float().numpy(), y.numpy()
    )
    assert loss.item() == np.float32(np_loss)
    assert torch.equal(s.grad, (torch.from_numpy(np_grad) * scale).to(dtype))


def test_mixed_float32_student_float64_teacher(gen):
    s, t, y = make_batch(gen, (5, 9), "index")
    s32 = s.float().requires_grad_(True)
    loss = distillation_loss(s32, t, y)  # computes in float64, like np.result_type
    loss.backward()
    np_loss, np_grad = kdloss.DistillationLoss().loss_and_gradient(s32.detach().numpy(), t.numpy(), y.numpy())
    assert loss.dtype == F64 and loss.item() == np_loss
    assert s32.grad.dtype == torch.float32
    assert torch.equal(s32.grad, torch.from_numpy(np_grad).float())


def test_non_contiguous_logits_and_int32_labels(gen):
    s, t, y = make_batch(gen, (7, 12), "index")
    s_view = s.t().contiguous().t()  # same values, column-major: kdloss converts it once
    loss, grad = backward_grad(distillation_loss, s_view, t, y.to(torch.int32))
    ref_loss, ref_grad = backward_grad(plain_torch_loss, s, t, y, temperature=3.0, alpha=0.3)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="gradient")


def test_empty_batch_and_all_ignored(gen):
    s = torch.zeros(0, 5, dtype=F64, requires_grad=True)
    loss = distillation_loss(s, torch.zeros(0, 5, dtype=F64))
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, 5)

    s, t, _ = make_batch(gen, (3, 5), "none")
    s.requires_grad_(True)
    loss = distillation_loss(s, t, torch.full((3,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_meta_tensors_give_shapes():
    s = torch.empty(2, 3, 7, device="meta", requires_grad=True)
    t = torch.empty(2, 3, 7, device="meta")
    y = torch.empty(2, 3, dtype=torch.int64, device="meta")
    loss = distillation_loss(s, t, y, reduction="none")
    assert loss.device.type == "meta" and loss.shape == (2, 3)
    loss.sum().backward()
    assert s.grad.shape == (2, 3, 7)


def test_other_devices_raise_a_clear_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # A fake CUDA tensor stands in for a real one (no GPU needed); the check happens before any kernel.
    with FakeTensorMode():
        s = torch.empty(2, 5, device="cuda")
        with pytest.raises(RuntimeError, match=r"kdloss computes on the CPU.*cuda.*\.cpu\(\)"):
            distillation_loss(s, s.clone())
    s = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="teacher_logits is on meta"):
        distillation_loss(s, torch.zeros(2, 5, device="meta"))


def test_input_validation(gen):
    s, t, y = make_batch(gen, (3, 5), "index")
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        distillation_loss(s.numpy(), t)
    with pytest.raises(TypeError, match="floating-point"):
        distillation_loss(s.long(), t)
    with pytest.raises(ValueError, match=r"teacher_logits must have the shape of student_logits \(3, 5\)"):
        distillation_loss(s, t[:2])
    with pytest.raises(TypeError, match="true_labels"):
        distillation_loss(s, t, y.bool())
    with pytest.raises(ValueError, match="row|label|index"):
        distillation_loss(s, t, torch.tensor([0, 1, 7]))  # class 7 of 5: the native validation speaks
    with pytest.raises(ValueError, match="normalizer"):
        distillation_loss(s, t, y, normalizer=0.0)
    with pytest.raises(ValueError, match="normalizer"):
        distillation_loss(s, t, y, reduction="none", normalizer=3.0)
    with pytest.raises(TypeError, match="normalizer"):
        distillation_loss(s, t, y, normalizer="3")


# ------------------------------------------------------------------------------------------------------------
# Zero copy
# ------------------------------------------------------------------------------------------------------------


def test_forward_is_zero_copy_and_backward_hands_over_the_gradient(gen, monkeypatch):
    rows, classes = 2_000, 2_000  # 32 MB per float64 array
    s = torch.randn(rows, classes, generator=gen, dtype=F64, requires_grad=True)
    t = torch.randn(rows, classes, generator=gen, dtype=F64)
    y = torch.randint(0, classes, (rows,), generator=gen)

    # Where kdloss actually reads and writes: the arrays its NumPy API receives and returns.
    seen = {}
    real = kdloss.DistillationLoss.loss_and_gradient

    def spy(self, student, teacher, labels, **kwargs):
        loss, gradient = real(self, student, teacher, labels, **kwargs)
        seen.update(student=np.from_dlpack(student), teacher=np.from_dlpack(teacher), gradient=gradient)
        return loss, gradient

    monkeypatch.setattr(kdloss.DistillationLoss, "loss_and_gradient", spy)

    # NumPy reports its allocations to tracemalloc (torch's allocator does not): the gradient kdloss returns is
    # one, and any copy of an input would show up as tens of MB more.
    tracemalloc.start()
    try:
        loss = distillation_loss(s, t, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gradient_bytes = s.numel() * s.element_size()
    assert peak < gradient_bytes + (1 << 20), f"forward allocated {peak / 2**20:.1f} MiB on the NumPy side"
    assert seen["student"].ctypes.data == s.data_ptr()
    assert seen["teacher"].ctypes.data == t.data_ptr()

    loss.backward()
    # The student's .grad is the very buffer the kernel wrote: no product with grad_output, no copy.
    assert s.grad.data_ptr() == seen["gradient"].ctypes.data
    np_grad = kdloss.DistillationLoss().compute_gradient(s.detach(), t, y)
    assert torch.equal(s.grad, torch.from_numpy(np_grad))


# ------------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------------


def test_custom_op_passes_opcheck(gen):
    # torch's own consistency checks: schema, fake implementation, autograd registration.
    s, t, y = make_batch(gen, (3, 4, 5), "index")
    s.requires_grad_(True)
    for reduction in REDUCTIONS:
        params = (2.0, 0.3, reduction, IGNORE, None, 1)
        torch.library.opcheck(torch.ops.kdloss.loss_and_grad.default, (s, t, y, *params))
        # The loss-only operator serves the no-gradient path and has no autograd formula by design.
        torch.library.opcheck(torch.ops.kdloss.loss.default, (s.detach(), t, y, *params))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_matches_eager(gen, reduction):
    # aot_eager traces the forward and backward graphs through the fake implementation and the autograd
    # registration, which is what torch.compile needs from a custom op; inductor works too but its first C++
    # compilation takes ~20 s, too slow for this suite.
    kd = DistillationLoss(temperature=2.0, alpha=0.4, reduction=reduction)
    model = torch.nn.Linear(6, 9, dtype=F64)
    teacher = torch.randn(4, 3, 9, generator=gen, dtype=F64)
    x = torch.randn(4, 3, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 9, (4, 3), generator=gen)
    y[0, 1] = IGNORE

    def step(x, teacher, y):
        return kd(model(x), teacher, y).sum() * 1.5

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        loss = fn(x, teacher, y)
        loss.backward()
        results.append((loss.detach(), model.weight.grad.clone(), model.bias.grad.clone()))
    for eager, compiled in zip(*results):
        assert_close(compiled, eager, rtol=1e-14)

    # Evaluation (the loss-only operator) and a tensor normalizer, compiled.
    def evaluate(x, teacher, y, count):
        with torch.no_grad():
            return kd(model(x), teacher, y, normalizer=count if reduction != "none" else None)

    count = (y != IGNORE).sum()
    compiled = torch.compile(evaluate, backend="aot_eager", fullgraph=True)(x, teacher, y, count)
    assert_close(compiled, evaluate(x, teacher, y, count), rtol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def _student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 7)).to(F64)


def test_training_trajectory_matches_plain_torch_loss():
    gen = torch.Generator().manual_seed(1234)
    teacher = torch.nn.Linear(5, 7).to(F64).requires_grad_(False)
    batches = []
    for _ in range(20):
        x = torch.randn(8, 4, 5, generator=gen, dtype=F64)  # (batch, sequence, features)
        y = torch.randint(0, 7, (8, 4), generator=gen)
        y[torch.rand(8, 4, generator=gen) < 0.25] = IGNORE
        batches.append((x, y))

    kd = DistillationLoss(temperature=2.0, alpha=0.3)
    losses = {
        "kdloss": lambda s, t, y: kd(s, t, y),
        "torch": lambda s, t, y: plain_torch_loss(s, t, y, temperature=2.0, alpha=0.3),
    }
    trained, history = {}, {}
    for name, loss_fn in losses.items():
        model = _student(seed=7)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        history[name] = []
        for x, y in batches:
            opt.zero_grad()
            loss = loss_fn(model(x), teacher(x), y)
            loss.backward()
            opt.step()
            history[name].append(loss.item())
        trained[name] = model

    assert history["kdloss"][-1] < history["kdloss"][0]  # it did learn something
    np.testing.assert_allclose(history["kdloss"], history["torch"], rtol=1e-10)
    for (name, p), q in zip(trained["kdloss"].named_parameters(), trained["torch"].parameters()):
        assert_close(p.detach(), q.detach(), rtol=1e-10, what=name)


@pytest.mark.parametrize("form", ["index", "none"])
def test_gradient_accumulation_with_normalizer_equals_full_batch(gen, form):
    s, t, y = make_batch(gen, (12, 5, 8), form)
    kd = DistillationLoss(temperature=2.0, alpha=0.5)
    _, full_grad = backward_grad(kd, s, t, y)  # mean over all counted rows of the full batch

    # The recipe: count the rows that count over *all* micro-batches first, then give each micro-batch's
    # loss that total as its normalizer; the accumulated gradients are then those of the full-batch mean.
    micro = [slice(0, 5), slice(5, 7), slice(7, 12)]  # uneven on purpose
    # A tensor count, as an all_reduce would leave it (kdloss takes a number or a one-element tensor).
    total = (y != IGNORE).sum() if y is not None else torch.tensor(s[..., 0].numel())
    leaf = s.detach().clone().requires_grad_(True)
    for part in micro:
        kd(leaf[part], t[part], None if y is None else y[part], normalizer=total).backward()
    assert_close(leaf.grad, full_grad, rtol=1e-13, what="accumulated gradient")


# ------------------------------------------------------------------------------------------------------------
# The module object
# ------------------------------------------------------------------------------------------------------------


def test_module_parameters_repr_and_validation():
    kd = DistillationLoss(2.0, 0.25, reduction="sum", ignore_index=-1, num_threads=1, divergence="reverse_kl")
    assert repr(kd) == (
        "DistillationLoss(temperature=2.0, alpha=0.25, reduction='sum', ignore_index=-1, num_threads=1, "
        "divergence='reverse_kl', beta=0.5, skew=0.1, tail='bucket')"
    )
    parameters = (kd.temperature, kd.alpha, kd.reduction, kd.ignore_index, kd.num_threads, kd.divergence)
    assert parameters == (2.0, 0.25, "sum", -1, 1, "reverse_kl")
    assert list(kd.state_dict()) == [] and list(kd.parameters()) == []
    kd.temperature, kd.alpha = 4.0, 0.5
    assert (kd.temperature, kd.alpha) == (4.0, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        kd.temperature = 0.0
    with pytest.raises(ValueError, match="alpha"):
        kd.alpha = 1.5
    assert kd.temperature == 4.0 and kd.alpha == 0.5  # unchanged after a rejected value
    with pytest.raises(ValueError, match="reduction"):
        DistillationLoss(reduction="avg")
    with pytest.raises(ValueError, match="num_threads"):
        DistillationLoss(num_threads=0)
    with pytest.raises(TypeError):
        DistillationLoss(temperature="3")
    for clone in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        assert repr(clone) == repr(kd)


def test_module_and_functional_agree(gen):
    s, t, y = make_batch(gen, (4, 6), "index")
    kd = DistillationLoss(1.5, 0.2, reduction="sum", ignore_index=IGNORE)
    params = dict(temperature=1.5, alpha=0.2, reduction="sum")
    assert torch.equal(kd(s, t, y), distillation_loss(s, t, y, **params))
    assert torch.equal(kd(s, t, y, normalizer=3), distillation_loss(s, t, y, **params, normalizer=3))


def test_import_kdloss_does_not_import_torch():
    code = "import sys, kdloss; assert 'torch' not in sys.modules, 'import kdloss imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
