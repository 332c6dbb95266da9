"""The C++ API and the Python package compute the same loss.

The host program ``tests/cmake_consumer`` is built with CMake into ``tmp_path`` the way a C++ host that
vendors kdloss builds it (``add_subdirectory`` of this repository, ``kdloss::header_only``, no Python involved),
run, and the loss it prints with 17 significant digits is compared with ``kdloss.DistillationLoss`` at 1e-15
relative. ``.ci/cpp-tests.sh`` builds the same program against an install prefix too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from kdloss import DistillationLoss

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = ROOT / "tests" / "cmake_consumer"

# The batch in tests/cmake_consumer/main.cpp: the specification's check value in row 0, and a row whose
# label is ignore_index, which the loss leaves out.
STUDENT = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 4.0]])
TEACHER = np.array([[1.5, 1.8, 0.6], [0.0, 0.0, 2.0]])
LABELS = np.array([1, -100])
CHECK_LOSS = 0.25465032
CHECK_GRADIENT = np.array([0.05121834, -0.12252327, 0.07130493])


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH: building the C++ consumer needs CMake >= 3.15")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    if match is None or (int(match[1]), int(match[2])) < (3, 15):
        pytest.skip(f"the C++ consumer build needs CMake >= 3.15, found: {out.strip()!r}")
    return cmake


def _cxx() -> str:
    requested = os.environ.get("CXX")
    if requested:
        found = shutil.which(shlex.split(requested)[0])
        if found is None:
            pytest.skip(f"CXX={requested!r} is not an executable: no C++ compiler for the consumer build")
        return found
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found is not None:
            return found
    pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) on PATH: cannot build the C++ consumer")


def _run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        pytest.fail(
            f"{shlex.join(args)} failed with exit code {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result.stdout


@pytest.fixture(scope="module")
def consumer_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    if not (CONSUMER / "CMakeLists.txt").is_file():
        pytest.skip(f"{CONSUMER} is not there (not a source checkout)")
    cmake, cxx = _cmake(), _cxx()
    build = tmp_path_factory.mktemp("cmake_consumer")
    _run(
        [
            cmake,
            "-S",
            str(CONSUMER),
            "-B",
            str(build),
            # Debug (-O0 with g++ and clang++): the kernels compile in a fifth of Release's time (~15 s rather than
            # ~75 s here), and this test is about the C++ API's numbers, which carry no optimiser's choices beyond a
            # few ulps (ULPS below). .ci/cpp-tests.sh builds the consumer for release, with warnings as errors.
            "-DCMAKE_BUILD_TYPE=Debug",
            f"-DCMAKE_CXX_COMPILER={cxx}",
            "-DKDLOSS_CONSUMER_MODE=add_subdirectory",
            # The headers alone: kdloss::kdloss would compile its kernels three times (once per instruction set),
            # which .ci/cpp-tests.sh does; this test is about the C++ API's numbers.
            "-DKDLOSS_CONSUMER_TARGET=kdloss::header_only",
            f"-DKDLOSS_SOURCE_TREE={ROOT}",
        ],
        cwd=build,
    )
    _run([cmake, "--build", str(build), "--config", "Debug"], cwd=build)
    candidates = [build / name for name in ("kdloss_consumer", "kdloss_consumer.exe")]
    candidates += [build / "Debug" / name for name in ("kdloss_consumer", "kdloss_consumer.exe")]
    program = next((path for path in candidates if path.is_file()), None)
    assert program is not None, f"no kdloss_consumer executable in {build}"
    printed = {}
    for line in _run([str(program)], cwd=build).splitlines():
        name, *values = line.split()
        printed[name] = np.array([float(value) for value in values])
    return printed


def test_consumer_prints_the_check_value(consumer_output):
    assert consumer_output["loss"].shape == (1,)
    assert abs(consumer_output["loss"][0] - CHECK_LOSS) <= 1e-8
    np.testing.assert_allclose(consumer_output["gradient"], CHECK_GRADIENT, rtol=0, atol=1e-8)


# The host compiles the kernels with its own flags while Python runs the copy chosen for this CPU (AVX-512
# with fused multiply-adds, say): the same formula, rounded a little differently. A few ulps, not bits.
ULPS = 1e-14


def test_consumer_loss_equals_python_loss(consumer_output):
    kd = DistillationLoss(3.0, 0.5)
    expected = kd.compute_loss(STUDENT, TEACHER, LABELS)
    cpp = consumer_output["loss"][0]
    assert abs(cpp - expected) <= ULPS * abs(expected), f"C++ {cpp!r} vs Python {expected!r}"


def test_consumer_gradient_equals_python_gradient(consumer_output):
    gradient = DistillationLoss(3.0, 0.5).compute_gradient(STUDENT, TEACHER, LABELS)
    np.testing.assert_allclose(consumer_output["gradient"], gradient[0], rtol=ULPS, atol=1e-17)
    assert np.all(gradient[1] == 0.0)  # the ignored row


@pytest.mark.skipif(not (ROOT / "README.md").is_file(), reason="README.md is not next to the tests")
def test_readme_shows_lines_of_the_consumer_program():
    """README's C++ lines are the consumer's, which CI builds and runs: the two cannot drift apart."""
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```cpp\n(.*?)```", readme, flags=re.DOTALL)
    program = {line.strip() for line in (CONSUMER / "main.cpp").read_text().splitlines()}
    shown = [line.strip() for line in block.splitlines() if line.strip()]
    assert len(shown) >= 3
    assert [line for line in shown if line not in program] == []


@pytest.mark.skipif(not (ROOT / "docs").is_dir(), reason="docs/ is not next to the tests")
def test_the_cpp_guide_includes_the_consumer_program():
    """The C++ guide shows the whole program by including the file, not a copy of it."""
    guide = (ROOT / "docs" / "guide" / "cpp.md").read_text()
    assert "```{literalinclude} ../../tests/cmake_consumer/main.cpp" in guide
