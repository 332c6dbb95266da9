#!/usr/bin/env python
"""A PyTorch training step's loss, forward + backward: ``kdloss.torch`` against the raw kernel and PyTorch eager.

Run alone (``python benchmarks/torch_steps.py``) or as the last section of ``benchmarks/bench.py``. For each
shape (leading axes x classes) and thread count, side by side in one run, with class-index labels (every
seventh token ignored, -100), T = 2, alpha = 0.5, ``reduction="mean"``:

``kdloss.torch``
    ``DistillationLoss(2, 0.5, num_threads=n)(s, t, y).backward()`` on a leaf student tensor, whose ``.grad`` is
    then taken off it (set to None), as a training loop's ``zero_grad()`` does.
``raw``
    ``kdloss.DistillationLoss(2, 0.5, num_threads=n).loss_and_gradient(s, t, y)`` on the same tensors' NumPy
    views: the kernel with a freshly allocated gradient, what the PyTorch path should cost.
``raw out=``
    The same, writing into a preallocated gradient (no allocation, pages already touched).
``PyTorch`` (one thread only)
    Eager ``log_softmax``/``kl_div`` masked by the ignored tokens, plus ``cross_entropy(..., ignore_index=-100)``,
    forward and backward on a leaf student (its ``.grad`` taken off too), ``torch.set_num_threads(1)``.

``step/raw`` comes from the first three, timed interleaved; ``torch/step`` from a second interleaved run of
``kdloss.torch`` and PyTorch alone, whose long, allocation-heavy steps would otherwise perturb the others.

Peak memory (a fresh subprocess per measurement, as in bench.py): the extra resident memory at the peak of
one training step, its gradient included, as a multiple of one gradient's bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from kdloss._bench import fmt_time, measure_interleaved, proc_status_kib

TEMPERATURE, ALPHA, IGNORE = 2.0, 0.5, -100
DEFAULT_STEP_SHAPES = ("4x256x32000:float32", "8x128256:float32", "64x32000:float64")
TARGET_STEP_OVER_RAW = 1.3  # kdloss.torch within 1.3x of the raw call with a fresh gradient
TARGET_TORCH_OVER_STEP = 20.0  # at the language-model shape, one thread
TARGET_MEMORY_OVER_GRADIENT = 1.2


def parse_step_shape(text: str) -> Tuple[Tuple[int, ...], str]:
    shape, _, dtype = text.partition(":")
    dims = tuple(int(part) for part in shape.lower().split("x"))
    if not dims or min(dims) < 1 or dtype not in ("float32", "float64"):
        raise ValueError(f"a step shape is like 4x256x32000:float32, got {text!r}")
    return dims, dtype


def make_tensors(torch: Any, shape: Tuple[int, ...], dtype: str) -> Tuple[Any, Any, Any]:
    generator = torch.Generator().manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    student = (torch.randn(shape, generator=generator, dtype=torch_dtype) * 2).requires_grad_(True)
    teacher = torch.randn(shape, generator=generator, dtype=torch_dtype) * 2
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    labels.view(-1)[::7] = IGNORE
    return student, teacher, labels


def make_candidates(torch: Any, student: Any, teacher: Any, labels: Any, threads: int) -> Dict[str, Callable]:
    import kdloss
    import kdloss.torch

    module = kdloss.torch.DistillationLoss(TEMPERATURE, ALPHA, num_threads=threads)
    engine = kdloss.DistillationLoss(TEMPERATURE, ALPHA, num_threads=threads)
    s, t, y = student.detach().numpy(), teacher.numpy(), labels.numpy()
    out = np.empty_like(s)

    def kdloss_torch() -> Any:
        module(student, teacher, labels).backward()
        return take_gradient(student)

    candidates = {
        "kdloss_torch": kdloss_torch,
        "raw": lambda: engine.loss_and_gradient(s, t, y),
        "raw_out": lambda: engine.loss_and_gradient(s, t, y, out=out),
    }
    if threads == 1:
        candidates["torch"] = lambda: torch_eager_step(torch, student, teacher, labels)
    return candidates


def take_gradient(student: Any) -> Any:
    """The step's gradient, taken off the student: like the raw call's result, it is gone once the caller drops
    it, so no candidate runs while another's gradient still holds memory."""
    gradient, student.grad = student.grad, None
    return gradient


def torch_eager_step(torch: Any, student: Any, teacher: Any, labels: Any) -> Any:
    functional = torch.nn.functional
    classes = student.shape[-1]
    s, t, y = student.reshape(-1, classes), teacher.reshape(-1, classes), labels.reshape(-1)
    counted = y != IGNORE
    kl = functional.kl_div(
        functional.log_softmax(s / TEMPERATURE, dim=-1),
        functional.log_softmax(t / TEMPERATURE, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    soft = (kl * counted).sum() / counted.sum() * TEMPERATURE**2
    loss = ALPHA * functional.cross_entropy(s, y, ignore_index=IGNORE) + (1 - ALPHA) * soft
    loss.backward()
    return take_gradient(student)


def check_agreement(torch: Any, candidates: Dict[str, Callable], dtype: str) -> List[str]:
    """A benchmark of candidates that disagree would be meaningless: compare every gradient with the raw call's."""
    reference = np.asarray(candidates["raw"]()[1], dtype=np.float64)
    scale = float(np.abs(reference).max()) or 1.0
    tolerance = 1e-4 if dtype == "float32" else 1e-9
    notes = []
    for name in ("kdloss_torch", "torch"):
        if name in candidates:
            got = candidates[name]().double().numpy()
            error = float(np.abs(got - reference).max()) / scale
            if error > tolerance:
                notes.append(f"{name} gradient differs from the raw call's by {error:.2e} of its largest entry")
    return notes


# ----------------------------------------------------------------------------------------------------------------
# Memory: one fresh subprocess per measurement
# ----------------------------------------------------------------------------------------------------------------


def memory_child(impl: str, shape: Tuple[int, ...], dtype: str, threads: int) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    warm = make_candidates(torch, *make_tensors(torch, (4, 64), dtype), threads)[impl]
    warm()
    call = make_candidates(torch, *make_tensors(torch, shape, dtype), threads)[impl]
    gc.collect()
    try:  # memory freed by the set-up goes back to the system, so that the step cannot hide in it
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return {"error": "cannot reset the peak-RSS counter (not Linux?)"}
    before = proc_status_kib("VmRSS")
    result = call()
    peak = proc_status_kib("VmHWM")
    del result
    gradient_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return {"extra_peak_bytes": (peak - before) * 1024, "gradient_bytes": gradient_bytes}


def measure_memory(impl: str, text: str, threads: int) -> Dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", impl, text, str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# The section
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = (("kdloss_torch", "kdloss.torch"), ("raw", "raw"), ("raw_out", "raw out="), ("torch", "PyTorch"))


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if numerator is None or not denominator else numerator / denominator


def _verdict(value: Optional[float], limit: float, at_most: bool) -> str:
    if value is None:
        return "n/a"
    return "ok" if (value <= limit if at_most else value >= limit) else "MISS"


def run_steps(
    step_shapes: List[str], budget: float, rounds: Tuple[int, int], memory: bool, threads_list=(1, 2)
) -> List[Dict[str, Any]]:
    """Times (and optionally measures the memory of) each shape and thread count; prints a table."""
    import torch

    torch.set_num_threads(1)
    print("\nPyTorch training step, forward + backward (int64 labels, every 7th ignored, T=2, alpha=0.5)")
    header = f"{'shape':<19} {'dtype':<8} {'thr':>3}" + "".join(f" {title:>12}" for _, title in COLUMNS)
    print(header + f" {'step/raw':>9} {'torch/step':>10} {'noise':>6}", flush=True)
    cells = []
    for text in step_shapes:
        shape, dtype = parse_step_shape(text)
        tensors = make_tensors(torch, shape, dtype)
        for threads in threads_list:
            candidates = make_candidates(torch, *tensors, threads)
            notes = check_agreement(torch, candidates, dtype)
            # Two interleaved groups, each ratio from one: PyTorch eager's step is 10-30x longer and churns
            # through several gradients' worth of fresh memory, which would perturb the kernel-scale candidates.
            eager = candidates.pop("torch", None)
            stats = measure_interleaved(candidates, budget, rounds[0], rounds[1], 0.0)
            medians = {name: entry["median_s"] for name, entry in stats.items()}
            spreads = [(entry["q3_s"] - entry["q1_s"]) / entry["median_s"] for entry in stats.values()]
            torch_over_step = None
            if eager is not None:
                pair = measure_interleaved(
                    {"kdloss_torch": candidates["kdloss_torch"], "torch": eager}, budget, rounds[0], rounds[1], 0.0
                )
                medians["torch"] = pair["torch"]["median_s"]
                torch_over_step = pair["torch"]["median_s"] / pair["kdloss_torch"]["median_s"]
                spreads += [(entry["q3_s"] - entry["q1_s"]) / entry["median_s"] for entry in pair.values()]
            noise = max(spreads)
            cell = {
                "shape": list(shape),
                "dtype": dtype,
                "threads": threads,
                "median_s": medians,
                "step_over_raw": _ratio(medians["kdloss_torch"], medians["raw"]),
                "torch_over_step": torch_over_step,
                "noise": noise,
                "notes": notes,
            }
            shape_text = "x".join(map(str, shape))
            print(
                f"{shape_text:<19} {dtype:<8} {threads:>3}"
                + "".join(f" {fmt_time(medians.get(key)):>12}" for key, _ in COLUMNS)
                + f" {cell['step_over_raw']:>9.2f} "
                + (f"{cell['torch_over_step']:>10.1f}" if cell["torch_over_step"] else f"{'':>10}")
                + f" {noise:>5.0%}{'!' if noise > 0.10 else ' '}",
                flush=True,
            )
            for note in notes:
                print(f"  NOTE: {note}")
            if memory:
                cell["memory"] = {
                    impl: measure_memory(impl, text, threads)
                    for impl in ("kdloss_torch", "raw", "torch")
                    if impl != "torch" or threads == 1
                }
            cells.append(cell)
    if memory:
        print("\nextra peak memory of one step, in gradients (the gradient itself included; fresh subprocess each)")
        for cell in cells:
            parts = []
            for impl, entry in cell["memory"].items():
                if "error" in entry:
                    parts.append(f"{impl} error: {entry['error']}")
                else:
                    parts.append(f"{impl} {entry['extra_peak_bytes'] / entry['gradient_bytes']:.2f}")
            shape_text = "x".join(map(str, cell["shape"]))
            print(f"  {shape_text:<19} {cell['dtype']:<8} {cell['threads']}T: " + ", ".join(parts))
    print("\ntargets (issue 14):")
    for cell in cells:
        shape_text = "x".join(map(str, cell["shape"]))
        parts = [
            f"step/raw {cell['step_over_raw']:.2f} (<= {TARGET_STEP_OVER_RAW}) "
            + _verdict(cell["step_over_raw"], TARGET_STEP_OVER_RAW, True)
        ]
        if cell["torch_over_step"] is not None and len(cell["shape"]) == 3:
            parts.append(
                f"torch/step {cell['torch_over_step']:.1f} (>= {TARGET_TORCH_OVER_STEP:g}) "
                + _verdict(cell["torch_over_step"], TARGET_TORCH_OVER_STEP, False)
            )
        entry = (cell.get("memory") or {}).get("kdloss_torch") or {}
        if "extra_peak_bytes" in entry:
            ratio = entry["extra_peak_bytes"] / entry["gradient_bytes"]
            parts.append(
                f"memory {ratio:.2f} gradients (<= {TARGET_MEMORY_OVER_GRADIENT}) "
                + _verdict(ratio, TARGET_MEMORY_OVER_GRADIENT, True)
            )
        print(f"  {shape_text:<19} {cell['dtype']:<8} {cell['threads']}T: " + "; ".join(parts))
    return cells


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-shapes", nargs="+", default=list(DEFAULT_STEP_SHAPES), metavar="SHAPE:DTYPE")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per candidate and cell (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        impl, text, threads = args.memory_child
        shape, dtype = parse_step_shape(text)
        print(json.dumps(memory_child(impl, shape, dtype, int(threads))))
        return 0
    cells = run_steps(args.step_shapes, args.budget, (5, 31), not args.no_memory)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch_steps": cells}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
