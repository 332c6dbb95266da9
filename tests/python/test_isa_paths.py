"""Every compiled SIMD path this CPU can run agrees with the reference, not only the one chosen at import.

Each path is forced with KDLOSS_FORCE_ISA in a fresh interpreter (the choice is made once, at import) that
reruns the reference-agreement, finite-difference, non-finite, sparse-loss and sparse-builder suites.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kdloss
import pytest

HERE = Path(__file__).parent
SUITES = [
    "test_reference_agreement.py",
    "test_gradient_fd.py",
    "test_masks_nonfinite.py",
    "test_kernel_shapes.py",
    "test_divergences.py",
    "test_sparse_loss.py",
    "test_sparse_builders.py",
]


def _run(env_isa: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KDLOSS_FORCE_ISA=env_isa)
    return subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("isa", kdloss.build_info()["cpu_isas"])
def test_forced_isa_matches_reference(isa: str) -> None:
    probe = _run(isa, "-c", "import kdloss; print(kdloss.build_info()['active_isa'])")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == isa
    result = _run(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_unknown_isa_fails_the_import_clearly() -> None:
    result = _run("sse9", "-c", "import kdloss")
    assert result.returncode != 0
    assert "KDLOSS_FORCE_ISA=sse9" in result.stderr
    assert "baseline" in result.stderr


def test_build_info_reports_the_kernels() -> None:
    info = kdloss.build_info()
    assert info["version"] == kdloss.__version__
    # MSVC has no GNU vector extensions; g++ and clang use them unless told not to (KDLOSS_NO_VECTOR_EXTENSIONS).
    assert info["vectors"] in {"gnu", "intrinsics"}
    if info["compiler"].startswith("msvc"):
        assert info["vectors"] == "intrinsics"
    assert "baseline" in info["compiled_isas"]
    assert set(info["cpu_isas"]) <= set(info["compiled_isas"])
    # The widest set this CPU runs, never the opt-in "native" copy (KDLOSS_NATIVE_KERNELS) unless forced.
    assert info["active_isa"] == [isa for isa in info["cpu_isas"] if isa != "native"][-1]
    assert info["hardware_threads"] >= 1
    # The kernels' limits: blocks of `lanes` rows up to these lengths, never shorter than one vector.
    assert set(info["block_max_classes"]) == {"float32", "float64"}
    assert all(limit >= info["lanes"] >= 1 for limit in info["block_max_classes"].values())
