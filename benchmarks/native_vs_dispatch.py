"""The run-time dispatched kernels against kernels compiled with -march=native for this machine.

Wheels carry kernels for fixed instruction sets (baseline, AVX2, AVX-512) and pick one at import; this
measures what that costs against a build tuned for the CPU at hand. It needs a build that also compiled the
"native" copy, which only KDLOSS_FORCE_ISA=native selects:

    pip install . -C cmake.define.KDLOSS_NATIVE_KERNELS=ON
    python benchmarks/native_vs_dispatch.py

Both variants run in their own interpreter (the kernels are chosen once, at import), alternating for several
rounds so that both see the same machine load; the table shows the median of the per-round medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import kdloss

SHAPES = [(256, 1000), (64, 32000), (8, 128256), (4096, 10), (32, 100)]

TIMER = r"""
import json, sys, time
import numpy as np
import kdloss
shapes, dtypes, repeats = json.loads(sys.argv[1])
kd = kdloss.DistillationLoss(3.0, 0.3, num_threads=1)
rng = np.random.default_rng(0)
result = {}
for rows, classes in shapes:
    for dtype in dtypes:
        s = rng.standard_normal((rows, classes)).astype(dtype) * 3
        t = rng.standard_normal((rows, classes)).astype(dtype) * 3
        y = rng.integers(0, classes, size=rows)
        out = np.empty_like(s)
        kd.loss_and_gradient(s, t, y, out=out)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kd.loss_and_gradient(s, t, y, out=out)
            times.append(time.perf_counter() - start)
        result[f"{rows}x{classes} {dtype}"] = sorted(times)[len(times) // 2]
print(json.dumps({"isa": kdloss.build_info()["active_isa"], "times": result}))
"""


def time_with(isa: str, shapes: list[tuple[int, int]], dtypes: list[str], repeats: int) -> dict[str, float]:
    env = dict(os.environ, KDLOSS_FORCE_ISA=isa)
    proc = subprocess.run(
        [sys.executable, "-c", TIMER, json.dumps([shapes, dtypes, repeats])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout)
    assert report["isa"] == isa
    return report["times"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    info = kdloss.build_info()
    if "native" not in info["compiled_isas"]:
        print("this build has no native kernels: pip install . -C cmake.define.KDLOSS_NATIVE_KERNELS=ON")
        return 2
    dispatched = info["active_isa"]
    dtypes = ["float32", "float64"]
    samples: dict[str, dict[str, list[float]]] = {dispatched: {}, "native": {}}
    for _ in range(args.rounds):
        for isa in (dispatched, "native"):
            for key, value in time_with(isa, SHAPES, dtypes, args.repeats).items():
                samples[isa].setdefault(key, []).append(value)
    print(
        f"kdloss {kdloss.__version__}, {info['compiler']}: dispatched '{dispatched}' vs -march=native, "
        f"one thread, median of {args.rounds} rounds x {args.repeats} calls"
    )
    print(f"{'case':<22}{dispatched:>14}{'native':>14}{'ratio':>9}")
    worst = 0.0
    for key in samples["native"]:
        a = statistics.median(samples[dispatched][key])
        b = statistics.median(samples["native"][key])
        worst = max(worst, a / b)
        print(f"{key:<22}{a * 1e6:>12.1f}us{b * 1e6:>12.1f}us{a / b:>9.3f}")
    print(f"worst dispatched/native ratio: {worst:.3f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
