"""``python -m kdloss bench``: it runs and prints its table.

Only that: no timing is asserted, ever (timing never lives in the unit tests). The command runs in a subprocess
from a scratch directory, on the tiny shape in its ``--quick`` mode, with ``-W error``. Runs against an
installed wheel too: ``kdloss._bench`` ships with the package (``benchmarks/bench.py`` does not).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kdloss import _bench

TIMEOUT_S = 600  # only a guard against a hang: no timing is asserted


def run_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-W", "error", "-m", "kdloss", "bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)


def test_bench_quick_prints_one_row_per_dtype(tmp_path: Path) -> None:
    done = run_bench("--quick", "--shapes", "32x100", cwd=tmp_path)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    header = next((line for line in lines if line.startswith("shape ")), None)
    assert header is not None, done.stdout
    for column in ("dtype", "kdloss 1T", "NumPy", "NumPy/1T"):
        assert column in header, header
    rows = [line.split() for line in lines if line.startswith("32x100 ")]
    assert [row[1] for row in rows] == ["float32", "float64"], done.stdout
    # every cell holds a time or a ratio: no n/a, no failed candidate
    assert all(len(row) == len(rows[0]) for row in rows), done.stdout
    assert "WARNING" not in done.stdout, done.stdout


def test_bench_bad_shape_is_a_one_line_error(tmp_path: Path) -> None:
    done = run_bench("--shapes", "32by100", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("python -m kdloss bench: error: argument --shapes:"), done.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_implementation_matches_kdloss(dtype: str) -> None:
    from kdloss import DistillationLoss

    s, t, y = _bench.make_inputs(7, 13, dtype)
    loss, grad = _bench.numpy_loss_and_gradient(s, t, y)
    ref_loss, ref_grad = DistillationLoss(_bench.TEMPERATURE, _bench.ALPHA).loss_and_gradient(s, t, y)
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    assert loss == pytest.approx(ref_loss, rel=tolerance)
    assert grad.dtype == s.dtype
    assert abs(grad - ref_grad).max() <= tolerance * abs(ref_grad).max()


def test_measure_interleaved_reports_a_median_per_candidate() -> None:
    stats = _bench.measure_interleaved({"a": lambda: None, "b": lambda: sum(range(10))}, 0.01, 3, 5, 0.0005)
    assert set(stats) == {"a", "b"}
    for entry in stats.values():
        assert 3 <= entry["rounds"] <= 5
        assert len(entry["samples_s"]) == entry["rounds"]
        assert entry["min_s"] <= entry["q1_s"] <= entry["median_s"] <= entry["q3_s"]
