#!/usr/bin/env python
"""Building a sparse teacher cache, side by side with PyTorch: ``kdloss.top_k`` against ``torch.topk(t / T, k)``
plus its log-softmax (``values - torch.logsumexp(t / T, -1, keepdim=True)``), and ``kdloss.sample_teacher``
against ``torch.multinomial(torch.softmax(t / T, -1), num_samples, replacement=True)``, all on one thread, timed
interleaved in one run (float32 logits, standard normal x 3, T = 2, k = num_samples = 64).

Issue 17's targets: ``top_k`` at least 5x faster than PyTorch's top-k and log-softmax; ``sample_teacher`` faster
than ``torch.multinomial`` on the softmax (which returns the draws alone, where ``sample_teacher`` also counts
them, sorts the classes and takes the logarithms). Needs torch.

    python benchmarks/teacher_cache.py [--shapes 8x128256 1024x32000] [--budget 2] [--k 64]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import kdloss
import numpy as np
from kdloss._bench import fmt_time, measure_interleaved, parse_shape

DEFAULT_SHAPES = ["8x128256", "1024x32000"]
TEMPERATURE = 2.0
TOP_K_TARGET = 5.0  # torch's time / top_k's
SAMPLE_TARGET = 1.0  # torch's time / sample_teacher's


def candidates(torch: Any, logits: np.ndarray, k: int, num_samples: int) -> Dict[str, Callable[[], Any]]:
    tensor = torch.from_numpy(logits)

    def torch_top_k() -> Any:
        scaled = tensor / TEMPERATURE
        values, indices = torch.topk(scaled, k)
        return indices, values - torch.logsumexp(scaled, -1, keepdim=True)

    def torch_sample() -> Any:
        return torch.multinomial(torch.softmax(tensor / TEMPERATURE, -1), num_samples, replacement=True)

    return {
        "top_k": lambda: kdloss.top_k(logits, k, temperature=TEMPERATURE, num_threads=1),
        "torch top-k": torch_top_k,
        "sample_teacher": lambda: kdloss.sample_teacher(
            logits, num_samples, temperature=TEMPERATURE, seed=0, num_threads=1
        ),
        "torch multinomial": torch_sample,
    }


def agreement(torch: Any, logits: np.ndarray, k: int) -> float:
    """The largest difference of top_k's log-probabilities from torch's in float64, after checking that both list
    the same classes (continuous logits: no ties)."""
    cache = kdloss.top_k(logits, k, temperature=TEMPERATURE, num_threads=1)
    scaled = torch.from_numpy(logits).double() / TEMPERATURE
    values, indices = torch.topk(scaled, k)
    if not np.array_equal(cache.indices, indices.numpy()):
        raise AssertionError("kdloss.top_k and torch.topk list different classes")
    return float(np.abs(cache.logprobs - (values - torch.logsumexp(scaled, -1, keepdim=True)).numpy()).max())


def run(shapes: List[Tuple[int, int]], budget: float, k: int, num_samples: int) -> List[Dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    print(f"Teacher caches on one thread, float32, T = {TEMPERATURE}, k = {k}, num_samples = {num_samples}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(torch {torch.__version__}, kdloss {kdloss.__version__}, kernels {kdloss.build_info()['active_isa']}, "
          f"load average {load:.2f})")  # fmt: skip
    print(f"\n{'shape':<12} {'top_k':>10} {'torch':>10} {'ratio':>7}   {'sample':>10} {'torch':>10} {'ratio':>7}"
          f"   {'top_k ns/el':>11} {'max |dlogp|':>11}")  # fmt: skip
    cells, verdicts = [], []
    for rows, classes in shapes:
        logits = (np.random.default_rng(0).standard_normal((rows, classes)) * 3).astype(np.float32)
        error = agreement(torch, logits, k)
        stats = measure_interleaved(candidates(torch, logits, k, num_samples), budget, 5, 200, 0.0)
        median = {name: entry["median_s"] for name, entry in stats.items()}
        top_k_ratio = median["torch top-k"] / median["top_k"]
        sample_ratio = median["torch multinomial"] / median["sample_teacher"]
        shape = f"{rows}x{classes}"
        print(f"{shape:<12} {fmt_time(median['top_k']):>10} {fmt_time(median['torch top-k']):>10} {top_k_ratio:7.2f}"
              f"   {fmt_time(median['sample_teacher']):>10} {fmt_time(median['torch multinomial']):>10} "
              f"{sample_ratio:7.2f}   {median['top_k'] / logits.size * 1e9:11.3f} {error:11.2e}",
              flush=True)  # fmt: skip
        cells.append({"shape": shape, "median_s": median, "top_k_ratio": top_k_ratio, "sample_ratio": sample_ratio})
        verdicts.append(f"  {shape:<12} top_k {top_k_ratio:.2f}x faster than torch (>= {TOP_K_TARGET}) "
                        f"{'ok' if top_k_ratio >= TOP_K_TARGET else 'MISS'}; sample_teacher {sample_ratio:.2f}x "
                        f"(> {SAMPLE_TARGET}) {'ok' if sample_ratio > SAMPLE_TARGET else 'MISS'}")  # fmt: skip
    print("\ntargets (issue 17):")
    print("\n".join(verdicts))
    return cells


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="ROWSxCLASSES")  # fmt: skip
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per candidate and shape (default 2)")
    parser.add_argument("--k", type=int, default=64, help="k of top_k (default 64)")
    parser.add_argument("--num-samples", type=int, default=64, help="draws per row (default 64)")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("teacher_cache.py compares with PyTorch: pip install torch", file=sys.stderr)
        return 1
    run(args.shapes, args.budget, args.k, args.num_samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
