"""The two ways the kernels' Packs are built, side by side: GNU vector extensions (g++, clang) and the intrinsics
registers that compilers without them get (MSVC: ``csrc/include/kdloss/detail/intrinsic_registers.hpp``), forced
here by ``-DKDLOSS_NO_VECTOR_EXTENSIONS``. ``benchmarks/cpp_kernels.cpp`` is built three times with the same flags:

``gnu``
    GNU vectors, as g++ and clang build kdloss.
``registers``
    the intrinsics registers, as g++ or clang build them (they fuse a multiply and an add of intrinsics where they
    may, as they do GNU vectors').
``unfused``
    the same with ``-ffp-contract=off``: no multiply-add fused but kdloss's own ``fused_multiply_add`` calls, which
    is what a compiler that does not fuse intrinsics (MSVC) runs.

The three programs run in turn, ``--rounds`` times, and each cell keeps its best; the ratios are to ``gnu``. Issue
18's target: the registers within 1.25x of GNU vectors at ``-mavx2 -mfma`` and at AVX-512 flags. Needs a C++
compiler only::

    python benchmarks/cpp_backends.py                      # g++ (c++ on PATH), -O2 -mavx2 -mfma
    python benchmarks/cpp_backends.py --flags="-O2 -mavx512f -mavx512dq -mavx512vl -mavx512bw"
    python benchmarks/cpp_backends.py --flags=-O2          # the x86-64 baseline, SSE2
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cpp_targets import run  # cpp_kernels' table, read (this folder is the script's, first on sys.path)

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {
    "gnu": [],
    "registers": ["-DKDLOSS_NO_VECTOR_EXTENSIONS"],
    "unfused": ["-DKDLOSS_NO_VECTOR_EXTENSIONS", "-ffp-contract=off"],
}


def build(cxx: str, flags: list[str], extra: list[str], program: Path) -> None:
    source = ROOT / "benchmarks" / "cpp_kernels.cpp"
    command = [cxx, "-std=c++17", *flags, *extra, f"-I{ROOT / 'csrc' / 'include'}", str(source), "-pthread"]
    subprocess.run([*command, "-o", str(program)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cxx", default="c++", help="the C++ compiler (default: c++)")
    parser.add_argument("--flags", default="-O2 -mavx2 -mfma", help="the compiler flags (default: -O2 -mavx2 -mfma)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each program, in turn (default: 3)")
    args = parser.parse_args()
    flags = args.flags.split()
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(scratch)
        print(f"building with {args.cxx} {args.flags} ...", flush=True)
        with ThreadPoolExecutor(max_workers=2) as pool:
            builds = [pool.submit(build, args.cxx, flags, extra, where / name) for name, extra in PROGRAMS.items()]
            for done in builds:
                done.result()
        best: dict[str, dict[tuple[str, str], float]] = {name: {} for name in PROGRAMS}
        for _ in range(args.rounds):
            for name in PROGRAMS:
                for cell, value in run(where / name).items():
                    best[name][cell] = min(value, best[name].get(cell, float("inf")))
    print(f"ns per element, best of {args.rounds} rounds, {args.cxx} {args.flags}")
    header = f"{'shape':<12} {'dtype':<8} " + " ".join(f"{name:>10}" for name in PROGRAMS)
    print(header + "  registers/gnu  unfused/gnu")
    for cell in best["gnu"]:
        values = [best[name][cell] for name in PROGRAMS]
        ratios = [best[name][cell] / best["gnu"][cell] for name in ("registers", "unfused")]
        print(
            f"{cell[0]:<12} {cell[1]:<8} "
            + " ".join(f"{v:10.3f}" for v in values)
            + f"  {ratios[0]:13.2f}  {ratios[1]:11.2f}"
        )


if __name__ == "__main__":
    main()
