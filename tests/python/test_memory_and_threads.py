"""No hidden copies of large same-dtype contiguous inputs, and thread safety.

* tracemalloc sees every NumPy data allocation made from Python (and from the
  binding through the NumPy C API): its peak during a call on ~100 MB inputs must
  stay below 1 % of one input.
* A subprocess compares the peak RSS before and after large calls, which also
  catches copies made by the C++ side with plain malloc/new.
* 8 Python threads calling one object concurrently get exactly the serial results,
  and the kernel lets other Python threads run (the GIL is released).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from kdloss import DistillationLoss

BIG_SHAPES = {np.float64: (1250, 10000), np.float32: (2500, 10000)}  # 100 MB per array


@pytest.fixture(scope="module", params=[np.float32, np.float64], ids=["float32", "float64"])
def big(request):
    dtype = request.param
    rng = np.random.default_rng(2024)
    shape = BIG_SHAPES[dtype]
    s = rng.standard_normal(shape, dtype=dtype)
    t = rng.standard_normal(shape, dtype=dtype)
    y = rng.integers(0, shape[1], size=shape[0])
    y[::7] = -100
    return dtype, s, t, y


def traced_peak(fn):
    """Peak bytes traced by tracemalloc while fn() runs (result kept alive)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - base


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("labels", ["none", "index"])
def test_compute_loss_does_not_copy(big, reduction, labels):
    dtype, s, t, y = big
    kd = DistillationLoss(2.0, 0.3, reduction=reduction)
    yy = None if labels == "none" else y
    kd.compute_loss(s[:4], t[:4], None if yy is None else yy[:4])  # warm-up
    peak = traced_peak(lambda: kd.compute_loss(s, t, yy))
    assert peak < 0.01 * s.nbytes, f"compute_loss allocated {peak / 1e6:.1f} MB for {s.nbytes / 1e6:.0f} MB inputs"


@pytest.mark.parametrize("method", ["compute_gradient", "loss_and_gradient"])
@pytest.mark.parametrize("labels", ["none", "index"])
def test_gradient_into_out_does_not_copy(big, method, labels):
    dtype, s, t, y = big
    kd = DistillationLoss(2.0, 0.3, reduction="sum")
    yy = None if labels == "none" else y
    out = np.empty_like(s)
    getattr(kd, method)(s[:4], t[:4], None if yy is None else yy[:4], out=out[:4])  # warm-up
    peak = traced_peak(lambda: getattr(kd, method)(s, t, yy, out=out))
    assert peak < 0.01 * s.nbytes, f"{method}(out=) allocated {peak / 1e6:.1f} MB for {s.nbytes / 1e6:.0f} MB inputs"


def test_gradient_without_out_allocates_only_the_result(big):
    dtype, s, t, y = big
    kd = DistillationLoss(2.0, 0.3)
    peak = traced_peak(lambda: kd.compute_gradient(s, t, y))
    assert peak < 1.01 * s.nbytes, f"allocated {peak / 1e6:.1f} MB, result is {s.nbytes / 1e6:.0f} MB"


def test_soft_labels_are_not_copied(big):
    dtype, s, t, _ = big
    # a same-dtype contiguous target distribution is an input like the logits
    y = np.zeros_like(s)
    y[:, 3] = 1.0
    kd = DistillationLoss(2.0, 0.3)
    out = np.empty_like(s)
    peak = traced_peak(lambda: kd.compute_loss(s, t, y))
    assert peak < 0.01 * s.nbytes, f"compute_loss allocated {peak / 1e6:.1f} MB with soft labels"
    peak = traced_peak(lambda: kd.compute_gradient(s, t, y, out=out))
    assert peak < 0.01 * s.nbytes, f"compute_gradient(out=) allocated {peak / 1e6:.1f} MB with soft labels"


def test_converted_input_is_converted_once():
    # A float16 student is converted to float32 (that allocation is visible) - but
    # only once per call, however many passes the computation makes.
    rng = np.random.default_rng(9)
    B, C = 800, 10000
    s16 = rng.standard_normal((B, C), dtype=np.float32).astype(np.float16)
    t32 = rng.standard_normal((B, C), dtype=np.float32)
    y = rng.integers(0, C, size=B)
    kd = DistillationLoss(2.0, 0.3)
    out = np.empty((B, C), dtype=np.float32)
    converted = s16.size * 4
    peak = traced_peak(lambda: kd.loss_and_gradient(s16, t32, y, out=out))
    assert peak < 1.05 * converted, f"allocated {peak / 1e6:.1f} MB, one conversion is {converted / 1e6:.1f} MB"
    peak = traced_peak(lambda: kd.compute_loss(s16, t32, y))
    assert peak < 1.05 * converted, f"allocated {peak / 1e6:.1f} MB, one conversion is {converted / 1e6:.1f} MB"


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from kdloss import DistillationLoss

    dtype = np.dtype(sys.argv[1])
    rng = np.random.default_rng(5)
    B, C = (1250, 10000) if dtype == np.float64 else (2500, 10000)
    s = rng.standard_normal((B, C), dtype=dtype)
    t = rng.standard_normal((B, C), dtype=dtype)
    soft = np.full((B, C), 0.5, dtype=dtype)  # every page written: resident before the calls
    out = np.full_like(s, 7.0)
    y = rng.integers(0, C, size=B)
    kd = DistillationLoss(2.0, 0.3)
    kd_none = DistillationLoss(2.0, 0.3, reduction="none")
    for obj in (kd, kd_none):  # warm-up: load code, create any thread pools
        obj.compute_loss(s[:8], t[:8], y[:8])
        obj.loss_and_gradient(s[:8], t[:8], soft[:8], out=out[:8])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kd.compute_loss(s, t, y)
    kd.compute_loss(s, t)
    kd_none.compute_loss(s, t, soft)
    kd.compute_gradient(s, t, y, out=out)
    kd.loss_and_gradient(s, t, soft, out=out)
    kd_none.loss_and_gradient(s, t, None, out=out)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(after - before, s.nbytes // 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux-specific")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_peak_rss_does_not_grow(dtype):
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, dtype], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    grow_kib, input_kib = map(int, proc.stdout.split())
    assert grow_kib < 0.05 * input_kib, (
        f"peak RSS grew by {grow_kib / 1024:.1f} MiB during calls on {input_kib / 1024:.0f} MiB inputs"
    )


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------


def _workload(seed, dtype):
    rng = np.random.default_rng(seed)
    B, C = 32, 3000
    s = (rng.standard_normal((B, C)) * 3).astype(dtype)
    t = (rng.standard_normal((B, C)) * 3).astype(dtype)
    y = rng.integers(0, C, size=B)
    y[::5] = -100
    soft = rng.random((B, C)).astype(dtype)
    return s, t, y, soft


def _run_all(kd, s, t, y, soft):
    res = []
    for labels in (None, y, soft):
        res.append(kd.compute_loss(s, t, labels))
        res.append(kd.compute_gradient(s, t, labels))
        loss, grad = kd.loss_and_gradient(s, t, labels)
        res.extend([loss, grad])
        out = np.empty_like(grad)
        kd.compute_gradient(s, t, labels, out=out)
        res.append(out)
        res.append(kd(s, t, labels))
    return res


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_concurrent_calls_match_serial(reduction, dtype):
    kd = DistillationLoss(2.5, 0.35, reduction=reduction)
    n_threads, repeats = 8, 2
    work = [_workload(1000 + i, dtype) for i in range(n_threads)]
    serial = [_run_all(kd, *w) for w in work]
    barrier = threading.Barrier(n_threads)

    def worker(i):
        barrier.wait()
        return [_run_all(kd, *work[(i + r) % n_threads]) for r in range(repeats)]

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        results = list(pool.map(worker, range(n_threads)))
    for i, per_thread in enumerate(results):
        for r, got in enumerate(per_thread):
            expected = serial[(i + r) % n_threads]
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert type(a) is type(b)
                np.testing.assert_array_equal(a, b)


def test_concurrent_calls_on_shared_inputs():
    kd = DistillationLoss(2.0, 0.3, reduction="none")
    s, t, y, soft = _workload(77, np.float64)
    expected = _run_all(kd, s, t, y, soft)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: _run_all(kd, s, t, y, soft), range(8)))
    for got in results:
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_gil_is_released_during_the_kernel():
    """While one thread is inside the kernel, another runs Python: it sees the gradient half written.

    With the GIL held for the whole call, the state in which the first row of ``out`` has been written and the
    last has not could never be observed from Python; with it released, the polling thread sees it at once.
    No timing is asserted, only what was seen.
    """
    rng = np.random.default_rng(3)
    s = rng.standard_normal((200, 50000))
    t = rng.standard_normal((200, 50000))
    out = np.full_like(s, np.nan)
    kd = DistillationLoss(2.0, 0.3, num_threads=1)  # rows in order, the last one last
    worker = threading.Thread(target=kd.compute_gradient, args=(s, t), kwargs={"out": out})
    seen_half_written = False
    worker.start()
    while worker.is_alive() and not seen_half_written:
        seen_half_written = not np.isnan(out[0, 0]) and np.isnan(out[-1, -1])
    worker.join()
    assert seen_half_written, "no Python thread ran while the kernel wrote the gradient: GIL held?"
    np.testing.assert_array_equal(out, kd.compute_gradient(s, t))
