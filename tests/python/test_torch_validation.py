"""kdloss.torch refuses what the NumPy class refuses, with the same error and message, on every device.

Each bad call is made through the NumPy class, the functional form and the module on CPU tensors, and on
``meta`` tensors (which never reach a kernel: the fake implementations check them); all must say the same.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kdloss  # noqa: E402
import kdloss.torch as kdt  # noqa: E402

PARAMETER_ERRORS = [
    dict(temperature="3"),
    dict(temperature=True),
    dict(temperature=-1.0),
    dict(temperature=math.nan),
    dict(temperature=[3.0]),
    dict(alpha=1.5),
    dict(alpha="0.3"),
    dict(reduction="avg"),
    dict(reduction=3),
    dict(ignore_index=1.7),
    dict(ignore_index="1"),
    dict(ignore_index=True),
    dict(ignore_index=2**64),
    dict(num_threads=0),
    dict(num_threads=1.5),
    dict(num_threads=True),
    dict(num_threads=2**64),
    dict(beta=1.5),
    dict(beta=-0.1),
    dict(beta=math.nan),
    dict(beta="0.5"),
    dict(beta=True),
    dict(divergence="jsd", beta=-1e-300),
    dict(skew=1.0),
    dict(skew=math.inf),
    dict(skew=None),
    dict(divergence="skew_reverse_kl", skew=1),
]


def error_of(call):
    with pytest.raises((TypeError, ValueError)) as info:  # which one is part of what must agree
        call()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("bad", PARAMETER_ERRORS, ids=repr)
def test_parameters_are_checked_as_the_numpy_class_checks_them(bad):
    """A bad parameter raises the NumPy class's error and message from the functional form (with and without
    autograd), the module's constructor and its setters, for CPU and meta tensors alike."""
    want = error_of(lambda: kdloss.DistillationLoss(**bad))
    for device in ("cpu", "meta"):
        s = torch.zeros(2, 3, device=device, requires_grad=True)
        t = torch.zeros(2, 3, device=device)
        assert error_of(lambda s=s, t=t: kdt.distillation_loss(s, t, **bad)) == want, device
        with torch.no_grad():
            assert error_of(lambda s=s, t=t: kdt.distillation_loss(s, t, **bad)) == want, device
    assert error_of(lambda: kdt.DistillationLoss(**bad)) == want
    module = kdt.DistillationLoss()
    for name in ("temperature", "alpha"):
        if name in bad:
            assert error_of(lambda name=name: setattr(module, name, bad[name])) == want
            assert getattr(module, name) == getattr(kdt.DistillationLoss(), name)  # unchanged


# (student shape, teacher shape, labels: shape and "index"/"soft" or None, keyword arguments)
SHAPE_ERRORS = {
    "teacher shape": ((2, 3), (2, 4), None, {}),
    "teacher rank": ((2, 3), (6,), None, {}),
    "0-d logits": ((), (), None, {}),
    "no classes": ((2, 0), (2, 0), None, {}),
    "no classes, sequences": ((2, 3, 0), (2, 3, 0), None, {}),
    "index labels shape": ((2, 3), (2, 3), ((3,), "index"), {}),
    "index labels of the logits' shape": ((2, 3), (2, 3), ((2, 3), "index"), {}),
    "soft labels shape": ((2, 3), (2, 3), ((2, 4), "soft"), {}),
    "normalizer with reduction none": ((2, 3), (2, 3), None, dict(reduction="none", normalizer=2.0)),
    "normalizer 0": ((2, 3), (2, 3), None, dict(normalizer=0.0)),
    "normalizer -inf": ((2, 3), (2, 3), None, dict(normalizer=-math.inf)),
    "labels before classes": ((2, 0), (2, 0), ((5,), "index"), {}),
    "float class indices": ((4, 5), (4, 5), ((4,), "soft"), {}),
    "float class index of one row": ((5,), (5,), ((), "soft"), {}),
}


@pytest.mark.parametrize("case", SHAPE_ERRORS, ids=str)
def test_shapes_are_checked_as_the_numpy_class_checks_them(case):
    """A bad shape (or normaliser) raises the NumPy class's error and message from the functional form and the
    module, for CPU and meta tensors, in training (the student requires grad) and in evaluation."""
    student_shape, teacher_shape, labels, kwargs = SHAPE_ERRORS[case]
    kwargs = dict(kwargs)
    reduction = kwargs.pop("reduction", "mean")
    numpy_labels = None
    if labels is not None:
        shape, form = labels
        numpy_labels = np.zeros(shape, dtype=np.int64 if form == "index" else np.float64)
    want = error_of(
        lambda: kdloss.DistillationLoss(reduction=reduction).compute_loss(
            np.zeros(student_shape), np.zeros(teacher_shape), numpy_labels, **kwargs
        )
    )

    for device in ("cpu", "meta"):
        for requires_grad in (True, False):
            s = torch.zeros(student_shape, dtype=torch.float64, device=device, requires_grad=requires_grad)
            t = torch.zeros(teacher_shape, dtype=torch.float64, device=device)
            y = None if numpy_labels is None else torch.from_numpy(numpy_labels).to(device)
            where = f"{device}, requires_grad={requires_grad}"
            assert (
                error_of(lambda s=s, t=t, y=y: kdt.distillation_loss(s, t, y, reduction=reduction, **kwargs)) == want
            ), where
            assert (
                error_of(lambda s=s, t=t, y=y: kdt.DistillationLoss(reduction=reduction)(s, t, y, **kwargs)) == want
            ), where


def test_operators_called_directly_check_on_meta_tensors():
    s = torch.zeros(2, 3, device="meta")
    y = torch.zeros(3, dtype=torch.int64, device="meta")
    for operator in (torch.ops.kdloss.loss_and_grad, torch.ops.kdloss.loss):
        with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
            operator(s, s, None, 3.0, 0.3, "avg", -100, None, None)
        with pytest.raises(
            ValueError, match=re.escape("temperature must be in [1e-30, 1e6] (where kdloss is accurate), got 0")
        ):
            operator(s, s, None, 0.0, 0.3, "mean", -100, None, None)
        with pytest.raises(ValueError, match=r"true_labels as class indices must have shape \(2,\), got \(3,\)"):
            operator(s, s, y, 3.0, 0.3, "mean", -100, None, None)


def test_valid_meta_calls_give_shapes_without_a_kernel():
    s = torch.zeros(2, 3, 7, device="meta", requires_grad=True)
    t = torch.zeros(2, 3, 7, device="meta")
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (2, 3))):
        loss = kdt.distillation_loss(s, t, torch.zeros(2, 3, 7, device="meta"), reduction=reduction)
        assert loss.shape == shape and loss.device.type == "meta"
