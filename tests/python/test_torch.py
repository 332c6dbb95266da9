"""Cross-check against PyTorch autograd (float64), when torch is importable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from helpers import SEEDS, TEMPERATURES, cases, with_examples  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kdloss import DistillationLoss  # noqa: E402

# hypothesis imports mypy_extensions lazily while reporting a failure; under
# filterwarnings=error its DeprecationWarning would hide the real failure.
pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


def torch_loss(s, t, y, *, temperature, alpha, reduction, ignore_index=-100):
    """Loss built from torch primitives; returns (loss ndarray/float, grad ndarray)."""
    s_t = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    t_t = torch.tensor(t, dtype=torch.float64)
    T = temperature
    one_d = s_t.ndim == 1
    S = s_t.unsqueeze(0) if one_d else s_t
    Tt = t_t.unsqueeze(0) if one_d else t_t
    soft = (
        F.kl_div(F.log_softmax(S / T, dim=-1), F.log_softmax(Tt / T, dim=-1), log_target=True, reduction="none").sum(-1)
        * T
        * T
    )
    counted = torch.ones(S.shape[0], dtype=torch.bool)
    if y is None:
        rows = soft
    else:
        y_arr = np.asarray(y)
        if y_arr.dtype.kind in "iu":
            yt = torch.tensor(y_arr.reshape(-1).astype(np.int64))
            hard = F.cross_entropy(S, yt, reduction="none", ignore_index=ignore_index)
            counted = yt != ignore_index
        else:
            yt = torch.tensor(y_arr.reshape(S.shape).astype(np.float64))
            hard = F.cross_entropy(S, yt, reduction="none")  # probability targets
        rows = alpha * hard + (1 - alpha) * soft
        rows = torch.where(counted, rows, torch.zeros_like(rows))
    if reduction == "none":
        total = rows.sum()
        value = rows.detach().numpy()
        value = value.reshape(()) if one_d else value
    elif reduction == "sum":
        total = rows.sum()
        value = float(total.detach())
    else:
        n = int(counted.sum())
        total = rows.sum() / n if n else rows.sum() * 0
        value = float(total.detach())
    total.backward()
    return value, s_t.grad.numpy()


def _labels(rng, form, B, C):
    if form == "none":
        return None
    if form == "index":
        y = rng.integers(0, C, size=B)
        y[0] = -100
        return y
    return rng.random((B, C))


@settings(max_examples=20)
@given(
    reduction=st.sampled_from(["mean", "sum", "none"]),
    form=st.sampled_from(["none", "index", "soft"]),
    temperature=TEMPERATURES,
    alpha=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    seed=SEEDS,
)
@with_examples(
    cases(
        [
            dict(form=form, temperature=temperature, alpha=alpha)
            for form, (temperature, alpha) in itertools.product(
                ["none", "index", "soft"], [(3.0, 0.3), (1.0, 0.7), (0.5, 0.0), (5.0, 1.0)]
            )
        ],
        reduction=["mean", "sum", "none"],
        seed=[0],
    )
)
def test_matches_torch_autograd(reduction, form, temperature, alpha, seed):
    """float64 loss and gradient equal the loss written with torch primitives and its autograd gradient,
    for every reduction and label form (class indices with an ignored row, soft targets), temperature and
    alpha, the endpoints included."""
    B, C = 7, 19
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((B, C)) * 3
    t = rng.standard_normal((B, C)) * 3
    y = _labels(rng, form, B, C)
    kd = DistillationLoss(temperature, alpha, reduction=reduction)
    loss, grad = kd.loss_and_gradient(s, t, y)
    t_loss, t_grad = torch_loss(s, t, y, temperature=temperature, alpha=alpha, reduction=reduction)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, t_grad, rtol=0, atol=1e-12 * np.abs(t_grad).max() + 1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["none", "index", "soft"])
def test_matches_torch_1d(rng, reduction, form):
    C = 11
    s = rng.standard_normal(C)
    t = rng.standard_normal(C)
    y = {"none": None, "index": np.int64(4), "soft": rng.random(C)}[form]
    kd = DistillationLoss(2.0, 0.4, reduction=reduction)
    loss, grad = kd.loss_and_gradient(s, t, y)
    t_loss, t_grad = torch_loss(s, t, y, temperature=2.0, alpha=0.4, reduction=reduction)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, t_grad, rtol=0, atol=1e-12 * np.abs(t_grad).max() + 1e-15)


def test_matches_torch_huge_logits(rng):
    B, C = 4, 500
    s = rng.uniform(-1e4, 1e4, (B, C))
    t = rng.uniform(-1e4, 1e4, (B, C))
    y = rng.integers(0, C, size=B)
    for reduction in ("mean", "sum", "none"):
        kd = DistillationLoss(3.0, 0.3, reduction=reduction)
        loss, grad = kd.loss_and_gradient(s, t, y)
        t_loss, t_grad = torch_loss(s, t, y, temperature=3.0, alpha=0.3, reduction=reduction)
        np.testing.assert_allclose(loss, t_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, t_grad, rtol=0, atol=1e-12 * np.abs(t_grad).max() + 1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_float32_inputs(rng, reduction):
    # float32 library result vs torch in float64 on the same float32 values
    B, C = 6, 1000
    s = (rng.standard_normal((B, C)) * 3).astype(np.float32)
    t = (rng.standard_normal((B, C)) * 3).astype(np.float32)
    y = rng.integers(0, C, size=B)
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    loss, grad = kd.loss_and_gradient(s, t, y)
    assert grad.dtype == np.float32
    t_loss, t_grad = torch_loss(
        s.astype(np.float64), t.astype(np.float64), y, temperature=2.0, alpha=0.3, reduction=reduction
    )
    np.testing.assert_allclose(np.asarray(loss, dtype=np.float64), t_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, t_grad, rtol=0, atol=1e-5 * np.abs(t_grad).max())
