"""``python -m kdloss bench``: loss + gradient time of kdloss next to NumPy and PyTorch.

For each shape ``(B, C)`` and dtype, one call computes the loss ("mean" over rows, int64 class-index labels,
temperature 3, alpha 0.3) and its gradient with respect to the student logits, with:

``kdloss 1T`` / ``kdloss NT``
    ``DistillationLoss(3, 0.3, num_threads=1)`` / ``num_threads=None`` (every core), ``loss_and_gradient``.
``NumPy``
    :func:`numpy_loss_and_gradient`, a vectorised NumPy forward and backward.
``PyTorch``
    eager PyTorch on one thread, forward and ``.backward()`` (:func:`make_torch_step`), when torch imports.

The candidates of a row are timed interleaved (:func:`measure_interleaved`) and the table shows the median time
per call, so a busy or throttling machine slows a row's candidates alike and their ratios stay comparable.

This module also holds the pieces that ``benchmarks/bench.py`` (the full benchmark, with memory measurements and
JSON output, not shipped in the wheel) shares with the command: the NumPy and PyTorch implementations, the inputs
and the timer. It imports NumPy and the standard library only; PyTorch is imported when the command runs.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

__all__ = [
    "ALPHA",
    "DTYPES",
    "HELP",
    "TEMPERATURE",
    "add_arguments",
    "fmt_time",
    "make_inputs",
    "make_torch_step",
    "measure_interleaved",
    "numpy_loss_and_gradient",
    "parse_shape",
    "run",
]

HELP = "time loss + gradient of kdloss (1 thread, all threads), NumPy and PyTorch side by side (~30 s)"

TEMPERATURE = 3.0
ALPHA = 0.3
DTYPES = ("float32", "float64")
DEFAULT_SHAPES = ((256, 1000), (64, 32000), (4096, 10), (32, 100))
# Seconds per candidate and row, and the bounds on the number of interleaved rounds (samples per candidate).
BUDGET_S, QUICK_BUDGET_S = 0.6, 0.03
ROUNDS, QUICK_ROUNDS = (7, 31), (3, 5)
MIN_BATCH_S, QUICK_MIN_BATCH_S = 0.01, 0.002

# ----------------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------------


def numpy_loss_and_gradient(
    s: np.ndarray, t: np.ndarray, y: np.ndarray, temperature: float = TEMPERATURE, alpha: float = ALPHA
) -> Tuple[float, np.ndarray]:
    """The KD loss ("mean" over rows, class-index labels) and its gradient w.r.t. ``s``, vectorised NumPy.

    Four B x C work arrays, reused in place; the last one becomes the gradient. With ``a = s/T - max``,
    ``b = t/T - max`` and their exps ``es``, ``et`` (sums ``zs``, ``zt``), per row:
    ``T^2 KL(p_T || q_T) = T^2 (sum(et * (b - a)) / zt - log zt + log zs)`` and, at temperature 1 (``T*a`` is
    ``s - max s``), ``CE = log z1 - T*a[y]``. Gradient: ``(1-alpha) T (q_T - p_T) + alpha (p_1 - onehot(y))``,
    divided by B. (No ignore_index handling: the benchmark's labels are all valid.)
    """
    rows, _ = s.shape
    scalar = s.dtype.type
    index = np.arange(rows)
    a = np.multiply(s, scalar(1.0 / temperature))
    a -= a.max(axis=1, keepdims=True)
    es = np.exp(a)
    zs = es.sum(axis=1)
    b = np.multiply(t, scalar(1.0 / temperature))
    b -= b.max(axis=1, keepdims=True)
    et = np.exp(b)
    zt = et.sum(axis=1)
    cross = np.einsum("ij,ij->i", et, b) - np.einsum("ij,ij->i", et, a)
    soft = (temperature * temperature) * (cross / zt - np.log(zt) + np.log(zs))
    np.multiply(a, scalar(temperature), out=b)  # s - max(s): logits at temperature 1, shifted
    picked = b[index, y]
    np.exp(b, out=b)
    z1 = b.sum(axis=1)
    hard = np.log(z1) - picked
    loss = float(((1.0 - alpha) * soft + alpha * hard).mean())
    c_soft = (1.0 - alpha) * temperature / rows
    c_hard = alpha / rows
    es *= (c_soft / zs)[:, None]
    et *= (c_soft / zt)[:, None]
    es -= et
    b *= (c_hard / z1)[:, None]
    es += b
    es[index, y] -= c_hard
    return loss, es


def make_torch_step(torch: Any, s: np.ndarray, t: np.ndarray, y: np.ndarray) -> Tuple[Callable[[], Any], Any]:
    """A forward+backward closure on a fresh leaf student tensor, and that tensor.

    Each call clears ``student.grad`` (so it allocates a new gradient, as ``loss_and_gradient`` does), computes
    ``kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="batchmean") * T*T*(1-a)
    + a * cross_entropy(s, y)`` and calls ``.backward()``; it returns the loss tensor.
    """
    functional = torch.nn.functional
    student = torch.from_numpy(s.copy()).requires_grad_(True)
    teacher = torch.from_numpy(t)
    labels = torch.from_numpy(y)
    temperature, alpha = TEMPERATURE, ALPHA
    soft_weight = temperature * temperature * (1.0 - alpha)

    def step() -> Any:
        student.grad = None
        loss = functional.kl_div(
            functional.log_softmax(student / temperature, dim=1),
            functional.log_softmax(teacher / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * soft_weight + alpha * functional.cross_entropy(student, labels)
        loss.backward()
        return loss

    return step, student


def make_inputs(rows: int, cols: int, dtype: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student and teacher logits (standard normal x 3) and int64 labels, the same for the same arguments."""
    rng = np.random.default_rng([rows, cols, DTYPES.index(dtype) if dtype in DTYPES else 9])
    scalar = np.dtype(dtype).type
    student = rng.standard_normal((rows, cols), dtype=scalar) * scalar(3.0)
    teacher = rng.standard_normal((rows, cols), dtype=scalar) * scalar(3.0)
    labels = rng.integers(0, cols, size=rows, dtype=np.int64)
    return student, teacher, labels


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def _time_batch(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in itertools.repeat(None, calls):
        fn()
    return (time.perf_counter_ns() - start) * 1e-9


def _calibrate(fn: Callable[[], Any], min_batch_s: float) -> float:
    """Warm-up and an estimate of the seconds per call: batches of 1, 2, 4, ... until one lasts min_batch_s."""
    fn()
    calls = 1
    while True:
        elapsed = _time_batch(fn, calls)
        if elapsed >= min_batch_s or calls >= 1 << 22:
            return elapsed / calls
        calls *= 2


def measure_interleaved(
    candidates: Dict[str, Callable[[], Any]], budget_s: float, min_rounds: int, max_rounds: int, min_batch_s: float
) -> Dict[str, Dict[str, Any]]:
    """Median seconds per call of each candidate, all sampled round-robin in the same loop.

    Each candidate is warmed up and calibrated, then every round times one batch of calls of each candidate (the
    order rotating every round) with the garbage collector off; a batch is sized so that every candidate gets
    about ``budget_s`` seconds over ``min_rounds`` to ``max_rounds`` rounds.

    Returns
    -------
    dict
        Per candidate: ``median_s``, ``min_s``, ``q1_s``, ``q3_s`` (seconds per call), ``rounds``,
        ``calls_per_sample`` and ``samples_s``.
    """
    estimates = {name: _calibrate(fn, min_batch_s) for name, fn in candidates.items()}
    rounds = int(budget_s / max(estimates.values()))
    rounds = max(min_rounds, min(max_rounds, rounds))
    batch_s = budget_s / rounds
    calls = {name: max(1, round(batch_s / estimate)) for name, estimate in estimates.items()}
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    names = list(candidates)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_batch(candidates[name], calls[name]) / calls[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    result = {}
    for name, values in samples.items():
        ordered = sorted(values)
        quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
        result[name] = {
            "median_s": statistics.median(ordered),
            "min_s": ordered[0],
            "q1_s": quartiles[0],
            "q3_s": quartiles[2],
            "rounds": rounds,
            "calls_per_sample": calls[name],
            "samples_s": values,
        }
    return result


# ----------------------------------------------------------------------------------------------------------------
# Formatting and arguments
# ----------------------------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> Optional[int]:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None where there is no such file."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def fmt_time(seconds: Optional[float]) -> str:
    """``12.3 us`` / ``4.56 ms``, or ``n/a`` for None."""
    if seconds is None:
        return "n/a"
    if seconds < 1e-4:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def parse_shape(text: str) -> Tuple[int, int]:
    """``"256x1000"`` -> ``(256, 1000)``; raises ``argparse.ArgumentTypeError`` otherwise."""
    try:
        rows, cols = (int(part) for part in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 256x1000, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return rows, cols


def _shapes(text: str) -> List[Tuple[int, int]]:
    """One ``--shapes`` word: a shape or comma-separated shapes."""
    return [parse_shape(part) for part in text.split(",") if part]


def _dtypes(text: str) -> List[str]:
    names = [part for part in text.split(",") if part]
    for name in names:
        if name not in DTYPES:
            raise argparse.ArgumentTypeError(f"dtype must be float32 or float64, got {name!r}")
    return names


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m kdloss bench``."""
    default_shapes = " ".join(f"{rows}x{cols}" for rows, cols in DEFAULT_SHAPES)
    parser.add_argument("--quick", action="store_true", help="short repeats: a few seconds, rough numbers")
    parser.add_argument(
        "--shapes", nargs="+", type=_shapes, metavar="BxC", help=f"batch x classes (default: {default_shapes})"
    )
    parser.add_argument(
        "--dtypes", nargs="+", type=_dtypes, metavar="DTYPE", help="float32 and/or float64 (default: both)"
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if it is installed")
    parser.add_argument(
        "--budget",
        type=_positive,
        metavar="SECONDS",
        help=f"time per implementation and row (default {BUDGET_S:g}, with --quick {QUICK_BUDGET_S:g})",
    )


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _import_torch() -> Tuple[Any, str]:
    """``(torch, "")`` or ``(None, why not)``."""
    try:
        import torch
    except ImportError as error:
        return None, f"not installed ({error}); 'pip install torch' adds its column"
    return torch, ""


def _agreement(loss: float, grad: np.ndarray, ref_loss: float, ref_grad: np.ndarray) -> float:
    """The larger of the loss's relative error and the gradient's largest error over its largest entry."""
    scale = float(np.max(np.abs(ref_grad))) or 1.0
    loss_error = abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-300)
    grad_error = float(np.max(np.abs(np.asarray(grad, dtype=np.float64) - ref_grad))) / scale
    return max(loss_error, grad_error)


def run(args: argparse.Namespace) -> int:
    """Time every shape and dtype and print the table.

    Returns
    -------
    int
        0, or 1 if an implementation disagreed with kdloss (the table is printed all the same).
    """
    from . import DistillationLoss, __version__, build_info

    started = time.perf_counter()
    shapes = [shape for group in args.shapes or [] for shape in group] or list(DEFAULT_SHAPES)
    dtypes = [dtype for group in args.dtypes or [] for dtype in group] or list(DTYPES)
    budget = args.budget or (QUICK_BUDGET_S if args.quick else BUDGET_S)
    min_rounds, max_rounds = QUICK_ROUNDS if args.quick else ROUNDS
    min_batch = QUICK_MIN_BATCH_S if args.quick else MIN_BATCH_S

    torch, torch_note = (None, "left out (--no-torch)") if args.no_torch else _import_torch()
    torch_threads = torch.get_num_threads() if torch is not None else None

    kd_one = DistillationLoss(TEMPERATURE, ALPHA, num_threads=1)
    kd_all = DistillationLoss(TEMPERATURE, ALPHA, num_threads=None)
    threads = int(build_info()["hardware_threads"])  # what num_threads=None takes
    columns = [("kdloss_1", "kdloss 1T")]
    if threads > 1:
        columns.append(("kdloss_all", f"kdloss {threads}T"))
    columns.append(("numpy", "NumPy"))
    if torch is not None:
        columns.append(("torch", "PyTorch 1T"))
    ratios = [("numpy", "NumPy/1T")] + ([("torch", "torch/1T")] if torch is not None else [])

    print(
        f"kdloss {__version__} bench: one loss + gradient call (fwd+bwd), int64 class labels, reduction='mean', "
        f"T={TEMPERATURE:g}, alpha={ALPHA:g}"
    )
    print(
        f"  {_cpu_name()}, {_usable_cpus()} usable CPUs; Python {platform.python_version()}, NumPy {np.__version__}, "
        f"PyTorch {torch.__version__ if torch is not None else torch_note}"
    )
    print(
        f"  median time per call over interleaved repeats, ~{budget:g} s per implementation and row"
        f"{' (--quick: rough)' if args.quick else ''}; X/1T = how many times longer X takes than kdloss 1T"
    )
    load = _load_average()
    if load is not None and load > 0.5 * _usable_cpus():
        print(f"  load average {load:.1f}: other work is running, so expect noisy times (compare ratios)")
    print()
    header = f"{'shape':<11} {'dtype':<8}" + "".join(f" {title:>11}" for _, title in columns)
    header += "".join(f" {title:>9}" for _, title in ratios)
    print(header, flush=True)

    disagreements = []
    if torch is not None:
        torch.set_num_threads(1)
    try:
        for rows, cols in shapes:
            for dtype in dtypes:
                s, t, y = make_inputs(rows, cols, dtype)
                ref_loss, ref_grad = kd_one.loss_and_gradient(s, t, y)
                ref_grad = np.asarray(ref_grad, dtype=np.float64)
                candidates: Dict[str, Callable[[], Any]] = {
                    "kdloss_1": lambda s=s, t=t, y=y: kd_one.loss_and_gradient(s, t, y),
                    "numpy": lambda s=s, t=t, y=y: numpy_loss_and_gradient(s, t, y),
                }
                if threads > 1:
                    candidates["kdloss_all"] = lambda s=s, t=t, y=y: kd_all.loss_and_gradient(s, t, y)
                errors = {"numpy": _agreement(*numpy_loss_and_gradient(s, t, y), ref_loss, ref_grad)}
                if torch is not None:
                    step, student = make_torch_step(torch, s, t, y)
                    errors["torch"] = _agreement(step().item(), student.grad.numpy(), ref_loss, ref_grad)
                    candidates["torch"] = step
                tolerance = 1e-4 if dtype == "float32" else 1e-9
                for name, error in errors.items():
                    if not error <= tolerance:
                        disagreements.append(f"{rows}x{cols} {dtype}: {name} differs from kdloss by {error:.2g}")

                stats = measure_interleaved(candidates, budget, min_rounds, max_rounds, min_batch)
                medians = {name: entry["median_s"] for name, entry in stats.items()}
                line = f"{f'{rows}x{cols}':<11} {dtype:<8}"
                line += "".join(f" {fmt_time(medians[key]):>11}" for key, _ in columns)
                line += "".join(f" {medians[key] / medians['kdloss_1']:>9.1f}" for key, _ in ratios)
                print(line, flush=True)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)

    print()
    if torch is None:
        print(f"PyTorch: {torch_note}")
    for note in disagreements:
        print(f"WARNING: {note}")
    print(
        f"done in {time.perf_counter() - started:.1f} s; benchmarks/bench.py in the source tree measures more "
        "(memory, the bandwidth bound, JSON)"
    )
    return 1 if disagreements else 0
