#!/usr/bin/env python
"""Peak memory of building a sparse teacher cache and of distilling from one (issue 17: the output plus
O(C · threads)), each measured in a fresh interpreter as the growth of its peak resident set over what its inputs
and outputs take.

    python benchmarks/teacher_cache_memory.py [--rows 1024] [--classes 32000] [--k 64] [--threads 2]

Each line: the step, the bytes of its inputs and outputs, and the peak's growth beyond them: what the step itself
took, a few rows of scratch a thread at most, within the allocator's reuse of a warm-up call's (so it reads about
0, or a little below when the output fits in memory freed before). A B x V temporary would show as 125 MB at the
default shape.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import List, Optional

# Run in a child: allocate the inputs and the outputs first (touching every page), note the peak, run the step,
# note the peak again. ru_maxrss is in KiB on Linux.
CHILD = r"""
import resource, sys
import numpy as np
import kdloss
step, rows, classes, k, threads = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def logits():  # drawn in float32 in place: no float64 temporary raises the peak
    x = np.empty((rows, classes), dtype=np.float32)
    rng.standard_normal(dtype=np.float32, out=x)
    return x
if step in ("top_k", "sample_teacher"):
    teacher = logits()
    kdloss.top_k(teacher[:1], k, temperature=2.0, num_threads=threads)  # warm: code and thread pool
    held = teacher.nbytes
    if step == "top_k":
        run = lambda: kdloss.top_k(teacher, k, temperature=2.0, num_threads=threads)
    else:
        run = lambda: kdloss.sample_teacher(teacher, k, temperature=2.0, seed=0, num_threads=threads)
else:
    student, out = logits(), np.full((rows, classes), 1.0, dtype=np.float32)  # every page touched
    labels = rng.integers(0, classes, rows)
    # A valid cache of k distinct classes a row, made without a dense teacher.
    indices = ((np.arange(k) * (classes // k))[None, :] + np.arange(rows)[:, None]) % classes
    cache = kdloss.SparseTeacher(indices.astype(np.int32), np.full((rows, k), np.log(0.9 / k), np.float32))
    kd = kdloss.DistillationLoss(2.0, num_threads=threads)
    kd.loss_and_gradient(student[:1], cache[:1], labels[:1])  # warm
    held = student.nbytes + out.nbytes + cache.nbytes
    run = lambda: kd.loss_and_gradient(student, cache, labels, out=out)
before = peak()
result = run()
growth = peak() - before
output = result.nbytes if isinstance(result, kdloss.SparseTeacher) else 0
print(held + output, growth - output)
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"{args.rows}x{args.classes} float32, k = num_samples = {args.k}, {args.threads} threads")
    print(f"{'step':<34} {'inputs and outputs':>20} {'beyond them':>14}")
    for step, label in (
        ("top_k", "top_k"),
        ("sample_teacher", "sample_teacher"),
        ("loss", "loss_and_gradient from the cache"),
    ):
        command = [sys.executable, "-c", CHILD, step, str(args.rows), str(args.classes), str(args.k), str(args.threads)]
        held, growth = map(int, subprocess.run(command, capture_output=True, text=True, check=True).stdout.split())
        print(f"{label:<34} {held / 2**20:17.1f} MB {growth / 2**10:11.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
