"""What a C++ host gets from each CMake target: ``benchmarks/cpp_kernels.cpp`` built as a host that ships one
binary builds it (``--flags``, default plain ``-O2``, no ``-march``) and linked with ``kdloss::kdloss`` (kernels
compiled per instruction set, chosen at run time) or ``kdloss::header_only`` (kernels compiled with the host's
flags), against header-only at ``-O3 -march=native`` (the fastest a host can build for its own machine). The three
programs run in turn, ``--rounds`` times, and each cell keeps its best, so that the machine's load touches all
three alike; the ratios are to ``-march=native``. No Python package needed, only CMake and a C++ compiler::

    python benchmarks/cpp_targets.py                   # g++ (c++ on PATH), -O2
    python benchmarks/cpp_targets.py --cxx clang++ --rounds 5
    KDLOSS_FORCE_ISA=baseline python benchmarks/cpp_targets.py   # the library's baseline kernels, say
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROGRAMS = {
    "dispatched": "kdloss::kdloss, host flags",
    "header_only": "kdloss::header_only, host flags",
    "native": "header-only, -O3 -march=native",
}


def build(cxx: str, flags: str, where: Path) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:
        sys.exit("cmake is not on PATH")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [cmake, "-S", str(HERE / "cpp_targets"), "-B", str(where), *generator, f"-DCMAKE_CXX_COMPILER={cxx}",
         "-DCMAKE_BUILD_TYPE=", f"-DCMAKE_CXX_FLAGS={flags}"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run([cmake, "--build", str(where), "-j", "2"], check=True, stdout=subprocess.DEVNULL)


def run(program: Path) -> dict[tuple[str, str], float]:
    """ns per element by (shape, dtype), from cpp_kernels' table."""
    out = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout.splitlines()
    cells = {}
    for line in out[1:]:
        shape, float32, float64 = line.split()
        cells[(shape, "float32")] = float(float32)
        cells[(shape, "float64")] = float(float64)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cxx", default="c++", help="the C++ compiler (default: c++)")
    parser.add_argument("--flags", default="-O2", help="the host's compiler flags (default: -O2)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each program, in turn (default: 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(scratch)
        print(f"building with {args.cxx} {args.flags} ...", flush=True)
        build(args.cxx, args.flags, where)
        best: dict[str, dict[tuple[str, str], float]] = {name: {} for name in PROGRAMS}
        for _ in range(args.rounds):
            for name in PROGRAMS:
                for cell, value in run(where / f"cpp_kernels_{name}").items():
                    best[name][cell] = min(value, best[name].get(cell, float("inf")))
        active = subprocess.run(
            [str(where / "cpp_kernels_dispatched"), "--isa"], check=True, capture_output=True, text=True
        ).stdout.strip()
    print(f"ns per element, best of {args.rounds} rounds; kdloss::kdloss ran its {active!r} kernels")
    print(f"{'shape':<12} {'dtype':<8} " + " ".join(f"{name:>12}" for name in PROGRAMS) + "   dispatched/native")
    for cell in best["native"]:
        values = [best[name][cell] for name in PROGRAMS]
        ratio = best["dispatched"][cell] / best["native"][cell]
        print(f"{cell[0]:<12} {cell[1]:<8} " + " ".join(f"{v:12.3f}" for v in values) + f"   {ratio:17.2f}")
    print("; ".join(f"{name}: {label}" for name, label in PROGRAMS.items()))


if __name__ == "__main__":
    main()
