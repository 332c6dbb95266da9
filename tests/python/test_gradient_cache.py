"""The gradient buffer kdloss keeps for the next call: reused only once nothing else can see it.

Each test holds on to an earlier gradient in some way a user might (the array, a view, a torch tensor, another
thread's call) and checks that a later call neither wrote into it nor returned it; and that a buffer truly let
go of is reused, since that is the point.
"""

from __future__ import annotations

import threading

import kdloss
import numpy as np
import pytest
from kdloss import _gradient_cache

SHAPE = (64, 32768)  # 8 MiB in float32: above the cache's threshold


@pytest.fixture(autouse=True)
def empty_cache():
    kdloss.clear_gradient_cache()
    yield
    kdloss.clear_gradient_cache()


def batch(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=SHAPE).astype(dtype)
    t = rng.normal(size=SHAPE).astype(dtype)
    y = rng.integers(0, SHAPE[1], SHAPE[0])
    return s, t, y


KD = kdloss.DistillationLoss(2.0, 0.4, num_threads=1)


def test_a_dropped_gradient_is_reused_and_rewritten_whole():
    s1, t1, y1 = batch(1)
    s2, t2, y2 = batch(2)
    first = KD.compute_gradient(s1, t1, y1)
    address = first.ctypes.data
    del first
    second = KD.compute_gradient(s2, t2, y2)
    assert second.ctypes.data == address
    np.testing.assert_array_equal(second, KD.compute_gradient(s2, t2, y2, out=np.empty_like(s2)))


@pytest.mark.parametrize("hold", ["array", "view", "tensor"])
def test_a_gradient_still_referenced_is_never_reused(hold):
    s1, t1, y1 = batch(1)
    s2, t2, y2 = batch(2)
    first = KD.compute_gradient(s1, t1, y1)
    want = first.copy()
    if hold == "view":
        held, want = first[3:5, 100:], want[3:5, 100:]
    elif hold == "tensor":
        torch = pytest.importorskip("torch")
        held = torch.from_numpy(first)
    else:
        held = first
    del first
    second = KD.compute_gradient(s2, t2, y2)
    held_values = held.numpy() if hold == "tensor" else held
    np.testing.assert_array_equal(held_values, want)
    assert not np.shares_memory(second, held_values)


def test_other_shapes_and_dtypes_allocate_afresh():
    s, t, y = batch(1)
    first = KD.compute_gradient(s, t, y)
    address = first.ctypes.data
    del first
    other = KD.compute_gradient(s[:32], t[:32], y[:32])
    assert other.shape == (32, SHAPE[1])
    doubles = KD.compute_gradient(s.astype(np.float64), t, y)
    assert doubles.dtype == np.float64 and doubles.ctypes.data != address


def test_threads_never_share_a_buffer():
    inputs = [batch(seed) for seed in range(4)]
    want = [KD.compute_gradient(s, t, y, out=np.empty_like(s)) for s, t, y in inputs]
    failures = []

    def work(index):
        s, t, y = inputs[index]
        for _ in range(10):
            got = KD.compute_gradient(s, t, y)
            if not np.array_equal(got, want[index]):
                failures.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_clear_gives_the_buffer_back():
    s, t, y = batch(1)
    KD.compute_gradient(s, t, y)
    assert _gradient_cache._buffers
    kdloss.clear_gradient_cache()
    assert not _gradient_cache._buffers


def test_torch_steps_reuse_the_gradient_once_dropped():
    torch = pytest.importorskip("torch")
    from kdloss.torch import DistillationLoss

    kd = DistillationLoss(2.0, 0.4, num_threads=1)
    s1, t1, y1 = (torch.from_numpy(a) for a in batch(1))
    s2, t2, y2 = (torch.from_numpy(a) for a in batch(2))
    s1.requires_grad_(True)
    s2.requires_grad_(True)
    kd(s1, t1, y1).backward()
    held = s1.grad  # an optimiser keeping last step's gradient, say
    want = held.clone()
    kd(s2, t2, y2).backward()
    assert torch.equal(held, want)
    assert s2.grad.data_ptr() != held.data_ptr()

    address = s2.grad.data_ptr()
    s2.grad = None  # zero_grad(set_to_none=True)
    kd(s2, t2, y2).backward()
    assert s2.grad.data_ptr() == address
    assert torch.equal(
        s2.grad, torch.from_numpy(KD.compute_gradient(s2.detach(), t2, y2, out=np.empty(SHAPE, np.float32)))
    )
