#!/usr/bin/env python
"""TRL's GKD loss against kdloss's drop-in, forward + backward on one thread, timed interleaved in one run.

Each candidate is one training step's loss as ``GKDTrainer.compute_loss`` calls it (TRL 1.16): labels with the
prompt masked (-100), ``beta`` (default 0.5), temperature 1, ``num_items_in_batch`` the number of kept positions
(an int64 tensor, as the HF Trainer passes it), then ``.backward()`` on a leaf student tensor whose ``.grad`` is
cleared first:

``trl``
    ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``, PyTorch eager, ``torch.set_num_threads(1)``.
``kdloss``
    ``kdloss.torch.generalized_jsd_loss`` (the drop-in), ``num_threads=1``.

Issue 16's target: kdloss's "jsd" at least 10x faster than TRL's forward + backward. Before timing, both are
compared with TRL's function run on float64 copies of the logits: their errors in the loss and in the gradient
(of its largest entry) are printed, and kdloss's must be within 1e-5 for float32 (1e-10 for float64). TRL's own
float32 arithmetic is the less accurate of the two at LM vocabularies (e.g. 7e-5 of the gradient at 8x128256).

    python benchmarks/gkd.py [--shapes 8x128256:float32 4x256x32000:float32 ...] [--beta 0.5] [--budget 2]

A shape is ``NxV`` (N rows) or ``BxSxV``, with a dtype. A shape whose TRL step would need more than half of the
available memory (TRL keeps about a dozen tensors of the logits' size alive at its peak) is skipped, and said so.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from kdloss._bench import fmt_time, measure_interleaved, proc_status_kib  # noqa: E402
from kdloss.torch import generalized_jsd_loss  # noqa: E402

DEFAULT_SHAPES = ["8x128256:float32", "4x256x32000:float32"]
TARGET = 10.0  # x: kdloss's jsd at least this much faster than TRL's
TRL_PEAK_TENSORS = 12  # logits-sized tensors alive at TRL's peak (inputs, log-probs, the stack, kl terms, grads)
PROMPT_FRACTION = 0.25  # the first quarter of each sequence is prompt, masked with -100


def parse_shape(text: str) -> Tuple[Tuple[int, ...], str]:
    shape, _, dtype = text.partition(":")
    sizes = shape.split("x")
    if not (2 <= len(sizes) <= 3 and all(size.isdigit() and int(size) > 0 for size in sizes)):
        raise argparse.ArgumentTypeError(f"expected NxV:DTYPE or BxSxV:DTYPE, got {text!r}")
    if dtype not in ("float32", "float64"):
        raise argparse.ArgumentTypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return tuple(int(size) for size in sizes), dtype


def checked_shape(text: str) -> str:
    parse_shape(text)  # argparse reports its ArgumentTypeError as a usage error
    return text


def available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_inputs(shape: Tuple[int, ...], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits (standard normal x 3) and labels with each sequence's prompt masked."""
    generator = torch.Generator().manual_seed(math.prod(shape))
    student = torch.randn(shape, generator=generator, dtype=dtype) * 3
    teacher = torch.randn(shape, generator=generator, dtype=dtype) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    positions = shape[-2]  # (B, S, V): per sequence; (N, V): the first rows
    labels[..., : int(positions * PROMPT_FRACTION)] = -100
    return student, teacher, labels


def make_step(loss_fn: Callable[..., torch.Tensor], student: torch.Tensor, **kwargs: Any) -> Callable[[], Any]:
    leaf = student.clone().requires_grad_(True)

    def step() -> Any:
        leaf.grad = None
        loss = loss_fn(leaf, **kwargs)
        loss.backward()
        return loss

    step.leaf = leaf  # type: ignore[attr-defined]
    return step


def candidates(
    shape: Tuple[int, ...], dtype: str, beta: float
) -> Tuple[Dict[str, Callable[[], Any]], Callable[[], Any]]:
    """The two steps, and TRL's step on float64 copies of the same logits: the reference both are checked against."""
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = make_inputs(shape, getattr(torch, dtype))
    count = (labels != -100).sum()
    common = dict(labels=labels, beta=beta, num_items_in_batch=count)
    steps = {
        "trl": make_step(GKDTrainer.generalized_jsd_loss, student, teacher_logits=teacher, **common),
        "kdloss": make_step(generalized_jsd_loss, student, teacher_logits=teacher, num_threads=1, **common),
    }
    reference = make_step(GKDTrainer.generalized_jsd_loss, student.double(), teacher_logits=teacher.double(), **common)
    return steps, reference


def errors(steps: Dict[str, Callable[[], Any]], reference: Callable[[], Any]) -> Dict[str, Tuple[float, float]]:
    """Each candidate's relative error in loss and gradient (of its largest entry) from the float64 reference."""
    want_loss = reference().item()
    want = reference.leaf.grad  # type: ignore[attr-defined]
    scale = want.abs().max().clamp(min=1e-300)
    result = {}
    for name, step in steps.items():
        loss = step().item()
        grad = step.leaf.grad.double()  # type: ignore[attr-defined]
        result[name] = (abs(loss - want_loss) / max(abs(want_loss), 1e-300), ((grad - want).abs().max() / scale).item())
    return result


def run(shapes: List[str], beta: float, budget: float, rounds: Tuple[int, int]) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    print(f"GKD loss, forward + backward on one thread (labels with the prompt masked, beta={beta}, T=1, "
          f"num_items_in_batch), torch {torch.__version__}")  # fmt: skip
    print(f"{'shape':<19} {'dtype':<8} {'trl':>11} {'kdloss':>11} {'trl/kdloss':>11}   "
          "error from float64: kdloss (loss, grad), trl (loss, grad)")  # fmt: skip
    cells, verdicts = [], []
    memory = available_bytes()
    for text in shapes:
        shape, dtype = parse_shape(text)
        shape_text = "x".join(map(str, shape))
        need = TRL_PEAK_TENSORS * math.prod(shape) * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        if memory is not None and need > memory / 2:
            print(f"{shape_text:<19} {dtype:<8} skipped: TRL's step needs about {need / 2**30:.1f} GiB, "
                  f"{memory / 2**30:.1f} GiB available", flush=True)  # fmt: skip
            continue
        steps, reference = candidates(shape, dtype, beta)
        error = errors(steps, reference)
        del reference
        tolerance = 1e-5 if dtype == "float32" else 1e-10
        accurate = max(error["kdloss"]) <= tolerance
        stats = measure_interleaved(steps, budget, rounds[0], rounds[1], 0.0)
        medians = {name: entry["median_s"] for name, entry in stats.items()}
        ratio = medians["trl"] / medians["kdloss"]
        print(
            f"{shape_text:<19} {dtype:<8} {fmt_time(medians['trl']):>11} {fmt_time(medians['kdloss']):>11} "
            f"{ratio:10.1f}x   {error['kdloss'][0]:.1e}, {error['kdloss'][1]:.1e}; {error['trl'][0]:.1e}, "
            f"{error['trl'][1]:.1e}{'' if accurate else f'  NOTE: kdloss beyond {tolerance:g}'}",
            flush=True,
        )
        cells.append({"shape": shape_text, "dtype": dtype, "median_s": medians, "trl_over_kdloss": ratio,
                      "rounds": stats["trl"]["rounds"], "errors": error})  # fmt: skip
        verdicts.append(f"  {shape_text:<19} {dtype:<8} kdloss {ratio:.1f}x faster than TRL (>= {TARGET}) "
                        f"{'ok' if ratio >= TARGET else 'MISS'}")  # fmt: skip
        del steps
    peak = proc_status_kib("VmHWM")
    if peak is not None:
        print(f"(peak resident memory of this process: {peak / 2**20:.2f} GiB, TRL's steps included)")
    print("\ntargets (issue 16):")
    print("\n".join(verdicts))
    return cells


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="SHAPE:DTYPE", type=checked_shape)
    parser.add_argument("--beta", type=float, default=0.5, help="GKD's beta (default 0.5; 0 and 1 are plain KLs)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per candidate and shape (default 2)")
    args = parser.parse_args(argv)
    try:
        import trl.experimental.gkd  # noqa: F401
    except ImportError as error:
        print(f"needs TRL's GKD trainer (pip install trl): {error}", file=sys.stderr)
        return 2
    run(args.shapes, args.beta, args.budget, (5, 200))
    return 0


if __name__ == "__main__":
    sys.exit(main())
