"""Smoke test of ``benchmarks/bench.py``: it runs and prints its table.

Only that: no timing is asserted here, ever (timing never lives in the unit tests). The benchmark is run as a
subprocess on the tiny shape only, in its ``--quick`` mode, without the memory subprocesses. Skipped when the
``benchmarks/`` folder is not next to ``tests/`` (e.g. when the tests run against an installed wheel).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
TIMEOUT_S = 600  # only a guard against a hang: no timing is asserted
HEADER_COLUMNS = ("shape", "dtype", "kdloss 1T", "kdloss 2T", "NumPy", "PyTorch", "bound", "torch/1T", "1T/bound")


@pytest.mark.skipif(not BENCH.is_file(), reason="benchmarks/bench.py is not next to the tests")
def test_bench_quick_run_prints_table(tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    command = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--no-memory",
        "--shapes",
        "32x100",
        "--dtypes",
        "float32",
        "--json",
        str(json_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert any(all(column in line for column in HEADER_COLUMNS) for line in done.stdout.splitlines()), done.stdout
    assert any(line.startswith("32x100 ") and "float32" in line for line in done.stdout.splitlines()), done.stdout
    report = json.loads(json_path.read_text())
    assert [cell["shape"] for cell in report["results"]] == [[32, 100]]


DIVERGENCES = BENCH.parent / "divergences.py"


@pytest.mark.skipif(not DIVERGENCES.is_file(), reason="benchmarks/divergences.py is not next to the tests")
def test_divergences_quick_run_prints_its_targets(tmp_path: Path) -> None:
    command = [sys.executable, str(DIVERGENCES), "--shapes", "32x100:float32", "--budget", "0.05"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert any(line.startswith("32x100 ") and "float32" in line for line in lines), done.stdout
    assert "targets (issue 16):" in lines, done.stdout


TEACHER_CACHE = BENCH.parent / "teacher_cache.py"


@pytest.mark.skipif(not TEACHER_CACHE.is_file(), reason="benchmarks/teacher_cache.py is not next to the tests")
def test_teacher_cache_quick_run_prints_its_targets(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    command = [sys.executable, str(TEACHER_CACHE), "--shapes", "4x1000", "--budget", "0.05"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert any(line.startswith("4x1000 ") for line in lines), done.stdout
    assert "targets (issue 17):" in lines, done.stdout


ROW_ACCURACY = BENCH.parent / "row_accuracy.py"


@pytest.mark.skipif(not ROW_ACCURACY.is_file(), reason="benchmarks/row_accuracy.py is not next to the tests")
def test_row_accuracy_prints_every_divergence(tmp_path: Path) -> None:
    command = [sys.executable, str(ROW_ACCURACY), "--rows", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = done.stdout.splitlines()
    for divergence in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"):
        assert any(line.startswith(divergence + " ") and "1e-3" in line for line in lines), done.stdout
