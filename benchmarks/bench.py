#!/usr/bin/env python
"""Benchmark of ``kdloss.DistillationLoss.loss_and_gradient`` (forward + backward, one call).

Run ``python benchmarks/bench.py`` (``--help`` for the options). Every number this script prints for one
shape/dtype was measured in the same run, with the candidates interleaved, so the *ratios* can be compared
even when absolute times are noisy. See ``benchmarks/README.md`` for how to read them.

What is timed, for every shape (B, C) and dtype (float32, float64), with class-index labels (int64, shape
(B,)), ``reduction="mean"``, temperature 3 and alpha 0.3, inputs C-contiguous:

``kdloss 1T``
    ``kd.loss_and_gradient(s, t, y)`` with ``kd = DistillationLoss(3, 0.3, num_threads=1)``. Until the
    ``num_threads`` keyword exists (detected with ``try/except TypeError``) this is the default constructor,
    whose kernel is serial.
``1T out=``
    The same call writing into a preallocated ``out=`` array (no allocation of the gradient per call).
``kdloss 2T``
    As ``kdloss 1T`` with ``num_threads=2``; ``n/a`` while the keyword does not exist.
``NumPy``
    ``numpy_loss_and_gradient`` (in ``kdloss._bench``): a vectorised NumPy forward + backward (log-softmax by max
    subtraction and log-sum-exp, in-place updates, row dot products with ``einsum``) computing the same loss and
    gradient.
``PyTorch``
    PyTorch eager on one thread (``torch.set_num_threads(1)``), when importable: ``s.grad = None``, then
    ``kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="batchmean") * T*T*(1-a)
    + a * cross_entropy(s, y)`` and ``.backward()`` on a leaf student tensor. Clearing the gradient is inside
    the timed call, so each call allocates its ``.grad`` like ``kd.loss_and_gradient`` allocates its result.
``bound``
    ``np.copyto(dst, src)`` of ``1.5*B*C`` elements of the dtype: it reads and writes ``3*B*C*itemsize``
    bytes, what a fused kernel must move (read student and teacher once, write the gradient once).
``bound 2T`` (C >= 1000 and at least 16 MiB moved; not a column)
    The same copy in two halves, side by side on two threads (``np.copyto`` releases the GIL). The targets'
    lines print ``copy 1T/2T``: how much a second core adds to this machine's memory bandwidth, which caps
    ``1T/2T`` wherever the kernel waits on memory.
``empty call`` (tiny shapes only, B*C <= 10 000)
    ``kd.loss_and_gradient`` itself on (0, C) inputs of the dtype with (0,) int64 labels: the fixed cost of a
    call, whatever its size.

``PyTorch training step`` (a section of its own, ``torch_steps.py``; with PyTorch, when ``--shapes`` is not given)
    ``kdloss.torch.DistillationLoss`` forward + backward at (4, 256, 32000) and (8, 128256) float32 and (64, 32000)
    float64, one and two threads, against the raw call on the same tensors and PyTorch eager (issue 14's targets).

``Divergences`` (a section of its own, ``divergences.py``; when ``--shapes`` is not given)
    Each divergence's ``loss_and_gradient`` against forward KL's, and ``loss_parts`` against ``compute_loss``, one
    thread, at 256x1000 and 8x128256 float32 and 64x32000 float64 (issue 16's targets).

How it is timed: each candidate is first warmed up and calibrated (batches of 1, 2, 4, ... calls until a batch
takes a few ms), then all candidates of one shape/dtype are sampled round-robin (rotating the order each
round) with the garbage collector off; a sample is a batch of calls sized so that every candidate gets about
``--budget`` seconds in total. The reported time is the median over the samples of the time per call; the
``noise`` column is the largest interquartile range / median among the row's candidates.

Peak memory (skipped with ``--no-memory``): for each shape/dtype and each of kdloss 1T, kdloss 2T, NumPy and
PyTorch, a fresh subprocess builds the inputs, warms the implementation up on a small input of the same dtype
(lazy initialisation, thread pools), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, "5"),
makes one call and keeps its result, and reports ``VmHWM - VmRSS before the call``: the extra resident memory
at the peak of the call, *including the gradient it returns* (every implementation must allocate that, unless
kdloss is given ``out=``). Where the counter cannot be reset (not Linux), it falls back to the growth of
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a lower bound. The child also reports the ``tracemalloc`` peak of
a second call: the allocations made through Python/NumPy (kdloss's output and any NumPy temporaries; not the
C++ scratch, nor PyTorch's allocator, which tracemalloc cannot see).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from divergences import DEFAULT_SHAPES as DIVERGENCE_SHAPES  # benchmarks/, next to this script
from divergences import run_divergences

# The implementations, inputs and timer shared with ``python -m kdloss bench`` (installed with the package).
from kdloss._bench import (
    ALPHA,
    DTYPES,
    TEMPERATURE,
    fmt_time,
    make_inputs,
    make_torch_step,
    measure_interleaved,
    numpy_loss_and_gradient,
    parse_shape,
    proc_status_kib,
)
from torch_steps import DEFAULT_STEP_SHAPES, run_steps

DEFAULT_SHAPES = ((256, 1000), (64, 32000), (8, 128256), (4096, 10), (32, 100))
DEFAULT_DTYPES = DTYPES
TINY_MAX_ELEMENTS = 10_000  # shapes up to this many elements also time the empty binding call
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"
NOISY_RELATIVE_IQR = 0.10  # rows where a candidate's samples spread more get a '!'

# Table columns: (key, title, width). Keys of times are candidate names, the others are ratios.
TIME_COLUMNS = (
    ("kdloss_1t", "kdloss 1T"),
    ("kdloss_1t_out", "1T out="),
    ("kdloss_2t", "kdloss 2T"),
    ("numpy", "NumPy"),
    ("torch", "PyTorch"),
    ("bound", "bound"),
)
RATIO_COLUMNS = (
    ("torch_over_1t", "torch/1T"),
    ("numpy_over_1t", "NumPy/1T"),
    ("1t_over_bound", "1T/bound"),
    ("1t_over_2t", "1T/2T"),
)


# --------------------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------------------


def make_kdloss(threads: Optional[int]) -> Tuple[Any, bool]:
    """``(DistillationLoss, num_threads_supported)``; without the keyword, threads=1 gets the default object."""
    import kdloss

    try:
        return kdloss.DistillationLoss(TEMPERATURE, ALPHA, reduction="mean", num_threads=threads), True
    except TypeError:
        if threads == 1:
            return kdloss.DistillationLoss(TEMPERATURE, ALPHA, reduction="mean"), False
        return None, False


def make_empty_call(kd: Any, cols: int, dtype: np.dtype) -> Tuple[Optional[Callable[[], Any]], str]:
    """The same public call, ``kd.loss_and_gradient``, on an empty batch: (0, C) logits, (0,) labels.

    Everything a call costs besides the rows themselves (argument checks, the binding, allocating the
    outputs): the yardstick of the tiny-call target.
    """
    s0, t0, y0 = np.empty((0, cols), dtype), np.empty((0, cols), dtype), np.empty((0,), np.int64)

    def call() -> Any:
        return kd.loss_and_gradient(s0, t0, y0)

    return call, "kd.loss_and_gradient on a (0, C) batch"


# --------------------------------------------------------------------------------------------------------------
# Correctness cross-check (a benchmark of implementations that disagree would be meaningless)
# --------------------------------------------------------------------------------------------------------------


def _agreement(loss: float, grad: np.ndarray, ref_loss: float, ref_grad: np.ndarray) -> Dict[str, float]:
    scale = float(np.max(np.abs(ref_grad))) or 1.0
    return {
        "loss_rel_err": abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-300),
        "grad_err_over_max": float(np.max(np.abs(np.asarray(grad, dtype=np.float64) - ref_grad))) / scale,
    }


# --------------------------------------------------------------------------------------------------------------
# Memory (one fresh subprocess per measurement)
# --------------------------------------------------------------------------------------------------------------

MEMORY_IMPLS = ("kdloss_1t", "kdloss_2t", "numpy", "torch")


def _maxrss_bytes() -> int:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def memory_child(impl: str, shape: Tuple[int, int], dtype: str) -> Dict[str, Any]:
    rows, cols = shape
    s, t, y = make_inputs(rows, cols, dtype)
    warm = make_inputs(4, min(cols, 64), dtype)

    # prepare(s, t, y) builds everything outside the measured call (e.g. PyTorch's leaf tensor) and returns it.
    if impl.startswith("kdloss"):
        kd, _ = make_kdloss(1 if impl == "kdloss_1t" else 2)
        if kd is None:
            return {"skipped": "num_threads keyword not supported"}

        def prepare(s: np.ndarray, t: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
            return lambda: kd.loss_and_gradient(s, t, y)

    elif impl == "numpy":

        def prepare(s: np.ndarray, t: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
            return lambda: numpy_loss_and_gradient(s, t, y)

    elif impl == "torch":
        try:
            import torch
        except ImportError:
            return {"skipped": "torch not importable"}
        torch.set_num_threads(1)

        def prepare(s: np.ndarray, t: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
            step, student = make_torch_step(torch, s, t, y)
            return lambda: (step(), student.grad)

    else:
        raise SystemExit(f"unknown implementation {impl!r}")

    prepare(*warm)()
    call = prepare(s, t, y)
    gc.collect()
    maxrss_before = _maxrss_bytes()
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        reset = True
    except OSError:
        pass
    rss_before = proc_status_kib("VmRSS")
    result = call()
    hwm = proc_status_kib("VmHWM")
    maxrss_after = _maxrss_bytes()
    if reset and hwm is not None and rss_before is not None:
        extra, method = max(0, hwm - rss_before) * 1024, "VmHWM after reset - VmRSS before"
    else:
        extra, method = max(0, maxrss_after - maxrss_before), "ru_maxrss growth (lower bound)"
    del result
    gc.collect()

    import tracemalloc

    tracemalloc.start()
    result = call()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return {
        "extra_peak_bytes": extra,
        "method": method,
        "tracemalloc_peak_bytes": traced_peak,
        "gradient_bytes": s.nbytes,
    }


def measure_memory(impl: str, shape: Tuple[int, int], dtype: str) -> Dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", impl, f"{shape[0]}x{shape[1]}", dtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "unreadable child output: " + done.stdout[-200:]}


# --------------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------------


def fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def fmt_mib(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "n/a"
    mib = nbytes / 2**20
    return f"{0.0 if abs(mib) < 0.005 else mib:.2f}"


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


SHAPE_WIDTH, DTYPE_WIDTH, TIME_WIDTH, RATIO_WIDTH, NOISE_WIDTH = 11, 8, 10, 9, 6


def table_header() -> str:
    cells = [f"{'shape':<{SHAPE_WIDTH}}", f"{'dtype':<{DTYPE_WIDTH}}"]
    cells += [f"{title:>{TIME_WIDTH}}" for _, title in TIME_COLUMNS]
    cells += [f"{title:>{RATIO_WIDTH}}" for _, title in RATIO_COLUMNS]
    cells.append(f"{'noise':>{NOISE_WIDTH}}")
    return " ".join(cells)


def table_row(cell: Dict[str, Any]) -> str:
    medians = cell["median_s"]
    cells = [f"{cell['shape_text']:<{SHAPE_WIDTH}}", f"{cell['dtype']:<{DTYPE_WIDTH}}"]
    cells += [f"{fmt_time(medians.get(key)):>{TIME_WIDTH}}" for key, _ in TIME_COLUMNS]
    cells += [f"{fmt_ratio(cell['ratios'].get(key)):>{RATIO_WIDTH}}" for key, _ in RATIO_COLUMNS]
    noise = max(cell["relative_iqr"].values(), default=0.0)
    cells.append(f"{noise:>{NOISE_WIDTH}.0%}" + ("!" if noise > NOISY_RELATIVE_IQR else " "))
    return " ".join(cells)


MEMORY_TITLES = (("kdloss_1t", "kdloss 1T"), ("kdloss_2t", "kdloss 2T"), ("numpy", "NumPy"), ("torch", "PyTorch"))


def memory_header() -> str:
    cells = [f"{'shape':<{SHAPE_WIDTH}}", f"{'dtype':<{DTYPE_WIDTH}}", f"{'gradient':>10}"]
    cells += [f"{title:>10}" for _, title in MEMORY_TITLES]
    cells += [f"{'1T-grad':>10}", f"{'torch/1T':>9}"]
    return " ".join(cells)


def memory_row(cell: Dict[str, Any]) -> str:
    memory = cell["memory"]

    def extra(key: str) -> Optional[float]:
        entry = memory.get(key) or {}
        return entry.get("extra_peak_bytes")

    def text(key: str) -> str:
        entry = memory.get(key) or {}
        if "error" in entry:
            return "error"
        return fmt_mib(entry.get("extra_peak_bytes"))

    grad = cell["gradient_bytes"]
    kd1 = extra("kdloss_1t")
    cells = [f"{cell['shape_text']:<{SHAPE_WIDTH}}", f"{cell['dtype']:<{DTYPE_WIDTH}}", f"{fmt_mib(grad):>10}"]
    cells += [f"{text(key):>10}" for key, _ in MEMORY_TITLES]
    cells += [f"{fmt_mib(None if kd1 is None else kd1 - grad):>10}", f"{fmt_ratio(_ratio(extra('torch'), kd1)):>9}"]
    return " ".join(cells)


# Copies of at least this many bytes moved are also timed on two threads (bound 2T): below, handing half of
# the copy to a Python thread costs about as much as copying it.
COPY_2T_MIN_BYTES = 2**24
_copy_worker: Optional[Any] = None


def _copy_on_two_threads(dst: np.ndarray, src: np.ndarray, half: int) -> None:
    global _copy_worker
    if _copy_worker is None:
        from concurrent.futures import ThreadPoolExecutor

        _copy_worker = ThreadPoolExecutor(max_workers=1)
    other = _copy_worker.submit(np.copyto, dst[half:], src[half:])
    np.copyto(dst[:half], src[:half])
    other.result()


# --------------------------------------------------------------------------------------------------------------
# Targets of issue 3 (all ratios measured side by side)
# --------------------------------------------------------------------------------------------------------------


def evaluate_targets(cell: Dict[str, Any], threads: int) -> List[Dict[str, Any]]:
    rows, cols = cell["shape"]
    ratios = cell["ratios"]
    targets = []

    def add(name: str, value: Optional[float], op: str, limit: float) -> None:
        if value is None:
            verdict = "n/a"
        else:
            verdict = "ok" if (value >= limit if op == ">=" else value <= limit) else "MISS"
        targets.append({"target": name, "value": value, "op": op, "limit": limit, "verdict": verdict})

    if cols >= 1000:
        add("torch/1T", ratios.get("torch_over_1t"), ">=", 6.0)
        add("1T/bound", ratios.get("1t_over_bound"), "<=", 3.0 if cell["dtype"] == "float32" else 4.0)
        add("1T/2T", ratios.get("1t_over_2t"), ">=", 1.8)
        targets[-1]["copy_1t_over_2t"] = ratios.get("bound_over_bound_2t")
    elif cols <= 32 and rows >= 1024:
        add("torch/1T", ratios.get("torch_over_1t"), ">=", 10.0)
    if rows * cols <= TINY_MAX_ELEMENTS:
        add("call/empty", ratios.get("call_over_empty"), "<=", 3.0)
    memory = cell.get("memory") or {}
    for key, thread_count in (("kdloss_1t", 1), ("kdloss_2t", threads)):
        entry = memory.get(key) or {}
        if "extra_peak_bytes" in entry and cell["gradient_bytes"] >= 2**19:
            # O(C * threads) beyond the returned gradient: a generous 64 bytes per class and thread + 1 MiB slack.
            limit = (64 * cols * thread_count + 2**20) / 2**20
            add(f"{key} MiB beyond gradient", (entry["extra_peak_bytes"] - cell["gradient_bytes"]) / 2**20, "<=", limit)
    return targets


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def _load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def _split(values: Optional[List[str]]) -> List[str]:
    return [part for value in values or [] for part in value.split(",") if part]


def machine_info(torch: Any, kd_supported: bool) -> Dict[str, Any]:
    import kdloss

    cpu, flags = "", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    build_info = kdloss.build_info() if hasattr(kdloss, "build_info") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "isa_flags": sorted(
            flags & {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "asimd", "sve"}
        ),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "kdloss": getattr(kdloss, "__version__", None),
        "kdloss_path": str(Path(kdloss.__file__).resolve().parent),
        "kdloss_build_info": build_info,
        "num_threads_keyword": kd_supported,
        "kdloss_env": {key: value for key, value in os.environ.items() if key.startswith("KDLOSS_")},
    }


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    shapes = [parse_shape(text) for text in _split(args.shapes)] or list(DEFAULT_SHAPES)
    dtypes = _split(args.dtypes) or list(DEFAULT_DTYPES)
    for dtype in dtypes:
        if dtype not in DEFAULT_DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {dtype!r} (float32, float64)")
    if args.quick:
        budget, min_rounds, max_rounds, min_batch = args.budget or 0.02, 3, 5, 0.002
    else:
        budget, min_rounds, max_rounds, min_batch = args.budget or 0.3, 7, 31, 0.02

    torch = None
    torch_note = "disabled with --no-torch"
    if not args.no_torch:
        try:
            import torch  # noqa: F811

            torch.set_num_threads(1)
            torch_note = ""
        except ImportError as error:
            torch, torch_note = None, f"not importable ({error})"

    kd1, kd_supported = make_kdloss(1)
    kd2 = make_kdloss(2)[0] if kd_supported else None
    info = machine_info(torch, kd_supported)
    info["kdloss_num_threads"] = {"1T": getattr(kd1, "num_threads", None), "2T": getattr(kd2, "num_threads", None)}

    print(
        f"kdloss benchmark -- loss_and_gradient (fwd+bwd), int64 labels, reduction='mean', T={TEMPERATURE}, "
        f"alpha={ALPHA}"
    )
    print(f"  cpu: {info['cpu']} ({info['cpus_usable']} usable), ISA flags: {' '.join(info['isa_flags']) or '?'}")
    print(
        f"  python {info['python']}, numpy {info['numpy']}, torch {info['torch'] or torch_note}, "
        f"kdloss {info['kdloss']} ({info['kdloss_path']})"
    )
    if info["kdloss_build_info"] is not None:
        print(f"  kdloss.build_info(): {info['kdloss_build_info']}")
    if info["kdloss_env"]:
        print(f"  environment: {info['kdloss_env']}")
    if not kd_supported:
        print(
            "  num_threads keyword not available: 'kdloss 1T' is the default constructor (serial kernel), "
            "'kdloss 2T' is n/a"
        )
    print(
        f"  median of interleaved samples, ~{budget:g} s per cell{' (--quick)' if args.quick else ''}; "
        "ratios > 1 mean the first is slower"
    )
    load_start = _load_average()
    if load_start is not None:
        print(
            f"  load average at start: {load_start[0]:.2f} (1 min) on {info['cpus_usable']} usable CPUs"
            + ("  -- the machine is busy: expect noisy times" if load_start[0] > 0.5 else "")
        )
    print()
    print(table_header(), flush=True)

    cells = []
    notes = []
    for rows, cols in shapes:
        for dtype in dtypes:
            s, t, y = make_inputs(rows, cols, dtype)
            shape_text = f"{rows}x{cols}"
            candidates: Dict[str, Callable[[], Any]] = {}
            checks: Dict[str, Any] = {}

            ref_loss, ref_grad = kd1.loss_and_gradient(s, t, y)
            ref_grad = np.array(ref_grad, dtype=np.float64)
            candidates["kdloss_1t"] = lambda kd=kd1, s=s, t=t, y=y: kd.loss_and_gradient(s, t, y)
            out = np.empty_like(s)
            loss_out, _ = kd1.loss_and_gradient(s, t, y, out=out)
            checks["kdloss_1t_out"] = _agreement(loss_out, out, ref_loss, ref_grad)
            candidates["kdloss_1t_out"] = lambda kd=kd1, s=s, t=t, y=y, out=out: kd.loss_and_gradient(s, t, y, out=out)
            if kd2 is not None:
                loss2, grad2 = kd2.loss_and_gradient(s, t, y)
                checks["kdloss_2t_bitwise_equal_1t"] = bool(
                    loss2 == ref_loss and np.array_equal(np.asarray(grad2, dtype=np.float64), ref_grad)
                )
                if not checks["kdloss_2t_bitwise_equal_1t"]:
                    notes.append(f"{shape_text} {dtype}: kdloss 2T result is not bitwise identical to 1T")
                candidates["kdloss_2t"] = lambda kd=kd2, s=s, t=t, y=y: kd.loss_and_gradient(s, t, y)
            np_loss, np_grad = numpy_loss_and_gradient(s, t, y)
            checks["numpy"] = _agreement(np_loss, np_grad, ref_loss, ref_grad)
            candidates["numpy"] = lambda s=s, t=t, y=y: numpy_loss_and_gradient(s, t, y)
            if torch is not None:
                step, student = make_torch_step(torch, s, t, y)
                torch_loss = step().item()
                checks["torch"] = _agreement(torch_loss, student.grad.numpy(), ref_loss, ref_grad)
                candidates["torch"] = step
            copy_elements = (3 * rows * cols + 1) // 2
            src = np.random.default_rng(0).standard_normal(copy_elements).astype(dtype)
            dst = np.zeros_like(src)
            candidates["bound"] = lambda dst=dst, src=src: np.copyto(dst, src)
            if cols >= 1000 and 2 * copy_elements * s.itemsize >= COPY_2T_MIN_BYTES:
                # The same copy on two threads, halves side by side (np.copyto releases the GIL): how much a
                # second core adds to this machine's memory bandwidth, the ceiling of 1T/2T where the
                # kernel is bound by memory.
                half = copy_elements // 2
                candidates["bound_2t"] = lambda dst=dst, src=src, half=half: _copy_on_two_threads(dst, src, half)
            tiny = rows * cols <= TINY_MAX_ELEMENTS
            empty_note = None
            if tiny:
                empty_call, empty_note = make_empty_call(kd1, cols, np.dtype(dtype))
                if empty_call is not None:
                    candidates["empty_call"] = empty_call

            tolerance = 1e-4 if dtype == "float32" else 1e-9
            for name in ("kdloss_1t_out", "numpy", "torch"):
                if name in checks and max(checks[name].values()) > tolerance:
                    notes.append(f"{shape_text} {dtype}: {name} disagrees with kdloss: {checks[name]}")

            stats = measure_interleaved(candidates, budget, min_rounds, max_rounds, min_batch)
            medians = {name: entry["median_s"] for name, entry in stats.items()}
            ratios = {
                "torch_over_1t": _ratio(medians.get("torch"), medians["kdloss_1t"]),
                "numpy_over_1t": _ratio(medians["numpy"], medians["kdloss_1t"]),
                "1t_over_bound": _ratio(medians["kdloss_1t"], medians["bound"]),
                "1t_over_2t": _ratio(medians["kdloss_1t"], medians.get("kdloss_2t")),
                "bound_over_bound_2t": _ratio(medians["bound"], medians.get("bound_2t")),
                "1t_out_over_bound": _ratio(medians["kdloss_1t_out"], medians["bound"]),
            }
            if tiny:
                ratios["call_over_empty"] = _ratio(medians["kdloss_1t"], medians.get("empty_call"))
            cell = {
                "shape": [rows, cols],
                "shape_text": shape_text,
                "dtype": dtype,
                "gradient_bytes": s.nbytes,
                "bound_bytes_moved": 2 * copy_elements * s.itemsize,
                "median_s": medians,
                "stats": stats,
                "ratios": ratios,
                "checks": checks,
                "empty_call_note": empty_note,
            }
            spread = {
                name: (entry["q3_s"] - entry["q1_s"]) / entry["median_s"]
                for name, entry in stats.items()
                if entry["median_s"] > 0
            }
            cell["relative_iqr"] = spread
            cells.append(cell)
            print(table_row(cell), flush=True)

    print()
    print(
        "times: median per call; bound = np.copyto of 1.5*B*C elements (3*B*C*itemsize bytes moved); "
        "noise: largest interquartile range / median among the row's candidates"
        f" ('!' above {NOISY_RELATIVE_IQR:.0%}: compare with care)"
    )
    for cell in cells:
        if "call_over_empty" in cell["ratios"]:
            medians = cell["median_s"]
            print(
                f"tiny call {cell['shape_text']} {cell['dtype']}: loss_and_gradient {fmt_time(medians['kdloss_1t'])}"
                f" vs the same call on B=0 {fmt_time(medians.get('empty_call'))}"
                f" -> ratio {fmt_ratio(cell['ratios']['call_over_empty'])} (target <= 3)"
            )
            if cell["empty_call_note"]:
                print(f"  empty call inputs: {cell['empty_call_note']}")

    if not args.no_memory:
        print()
        print(
            "extra peak memory of one call, MiB (fresh subprocess each; includes the returned gradient; "
            "1T-grad = kdloss 1T beyond its output)"
        )
        print(memory_header(), flush=True)
        for cell in cells:
            rows, cols = cell["shape"]
            cell["memory"] = {}
            for impl in MEMORY_IMPLS:
                if impl == "kdloss_2t" and not kd_supported:
                    continue
                if impl == "torch" and torch is None:
                    continue
                cell["memory"][impl] = measure_memory(impl, (rows, cols), cell["dtype"])
            print(memory_row(cell), flush=True)
            methods = {entry.get("method") for entry in cell["memory"].values() if entry.get("method")}
            cell["memory_method"] = sorted(methods)

    print()
    print("targets (issue 3):")
    threads = 2
    for cell in cells:
        cell["targets"] = evaluate_targets(cell, threads)
        if cell["targets"]:
            parts = [
                f"{entry['target']} {fmt_ratio(entry['value'])} ({entry['op']} {entry['limit']:.4g}) {entry['verdict']}"
                + (f" [copy 1T/2T {fmt_ratio(entry['copy_1t_over_2t'])}]" if entry.get("copy_1t_over_2t") else "")
                for entry in cell["targets"]
            ]
            print(f"  {cell['shape_text']:<{SHAPE_WIDTH}} {cell['dtype']:<{DTYPE_WIDTH}} " + "; ".join(parts))
    for note in notes:
        print(f"NOTE: {note}")

    step_cells = None
    step_shapes = args.step_shapes if args.step_shapes is not None else ([] if args.shapes else DEFAULT_STEP_SHAPES)
    if torch is not None and step_shapes and step_shapes != ["none"]:
        step_cells = run_steps(step_shapes, max(budget, 0.5), (min_rounds, max_rounds), not args.no_memory)
    # The divergences' section (divergences.py), with the default shapes only.
    divergence_cells = None if args.shapes else run_divergences(DIVERGENCE_SHAPES, budget, (min_rounds, max_rounds))

    elapsed = time.perf_counter() - started
    load_end = _load_average()
    if load_end is not None:
        print(f"load average at end: {load_end[0]:.2f} (1 min)")
    info["load_average_start"], info["load_average_end"] = load_start, load_end
    report = {
        "machine": info,
        "settings": {
            "temperature": TEMPERATURE,
            "alpha": ALPHA,
            "reduction": "mean",
            "labels": "int64 class indices",
            "quick": args.quick,
            "budget_s_per_cell": budget,
            "memory": not args.no_memory,
            "torch": torch_note or "enabled, 1 thread",
            "argv": sys.argv[1:],
        },
        "results": cells,
        "torch_steps": step_cells,
        "divergences": divergence_cells,
        "notes": notes,
        "total_time_s": elapsed,
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nJSON written to {json_path.resolve()}")
    print(f"total time: {elapsed:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See benchmarks/README.md for what is measured and how to read it.",
    )
    parser.add_argument("--quick", action="store_true", help="few, short repeats (smoke runs; numbers are rough)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-torch", action="store_true", help="do not import or time PyTorch")
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="BxC",
        help="shapes, e.g. 256x1000 64x32000 (or comma-separated); default: "
        + " ".join(f"{b}x{c}" for b, c in DEFAULT_SHAPES),
    )
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE", help="float32 and/or float64 (default both)")
    parser.add_argument(
        "--budget", type=float, metavar="SECONDS", help="time per candidate and cell (default 0.3, --quick 0.02)"
    )
    parser.add_argument(
        "--json", default=str(DEFAULT_JSON), metavar="PATH", help=f"where to write the results (default {DEFAULT_JSON})"
    )
    parser.add_argument(
        "--step-shapes",
        nargs="+",
        metavar="SHAPE:DTYPE",
        help="shapes of the PyTorch training-step section (torch_steps.py), e.g. 4x256x32000:float32,"
        " or 'none'; default: " + " ".join(DEFAULT_STEP_SHAPES) + " (none when --shapes is given)",
    )
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "BxC", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        impl, shape, dtype = args.memory_child
        print(json.dumps(memory_child(impl, parse_shape(shape), dtype)))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
