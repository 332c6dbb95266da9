"""Package-level requirements: the compiled module, typing, docstrings, the
`python -m kdloss` check-value printout, and a Python-free C++ core."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import typing
from pathlib import Path

import kdloss
import numpy as np
import pytest
from kdloss import DistillationLoss
from reference import reference

REPO = Path(__file__).resolve().parents[2]
PUBLIC_METHODS = ["compute_loss", "compute_gradient", "loss_and_gradient"]


def test_compiled_core_module():
    spec = importlib.util.find_spec("kdloss._core")
    assert spec is not None, "kdloss._core is missing"
    origin = spec.origin or ""
    assert origin.endswith((".so", ".pyd")) or ".cpython-" in origin, f"kdloss._core is not an extension: {origin}"


def test_py_typed_marker():
    pkg_dir = Path(kdloss.__file__).resolve().parent
    assert (pkg_dir / "py.typed").is_file()


@pytest.mark.parametrize("name", PUBLIC_METHODS + ["__call__", "__init__"])
def test_type_hints(name):
    hints = typing.get_type_hints(getattr(DistillationLoss, name))
    params = [p for p in inspect.signature(getattr(DistillationLoss, name)).parameters if p != "self"]
    for p in params:
        assert p in hints, f"{name}: parameter {p!r} has no type hint"
    if name != "__init__":
        assert "return" in hints, f"{name}: no return annotation"


def test_signatures():
    sig = inspect.signature(DistillationLoss.__init__)
    params = sig.parameters
    assert params["temperature"].default == 3.0
    assert params["alpha"].default == 0.3
    assert params["reduction"].kind is inspect.Parameter.KEYWORD_ONLY and params["reduction"].default == "mean"
    assert params["ignore_index"].kind is inspect.Parameter.KEYWORD_ONLY and params["ignore_index"].default == -100
    for name in ("compute_gradient", "loss_and_gradient"):
        p = inspect.signature(getattr(DistillationLoss, name)).parameters
        assert list(p)[:4] == ["self", "student_logits", "teacher_logits", "true_labels"]
        assert p["true_labels"].default is None
        assert p["out"].kind is inspect.Parameter.KEYWORD_ONLY and p["out"].default is None
        assert p["normalizer"].kind is inspect.Parameter.KEYWORD_ONLY and p["normalizer"].default is None
    p = inspect.signature(DistillationLoss.compute_loss).parameters
    assert list(p) == ["self", "student_logits", "teacher_logits", "true_labels", "normalizer"]
    assert p["normalizer"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", PUBLIC_METHODS)
def test_numpy_style_docstrings(name):
    assert DistillationLoss.__doc__ and DistillationLoss.__doc__.strip()
    doc = inspect.getdoc(getattr(DistillationLoss, name)) or ""
    assert doc.strip(), f"{name} has no docstring"
    for section in ("Parameters", "Returns"):
        assert re.search(rf"^{section}\n-+$", doc, re.M), f"{name} docstring lacks a NumPy-style {section!r} section"


def _floats(text):
    return [float(m) for m in re.findall(r"-?\d+\.\d+(?:[eE][-+]?\d+)?", text)]


def test_python_m_kdloss_prints_check_values():
    proc = subprocess.run([sys.executable, "-m", "kdloss"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    nums = _floats(proc.stdout)
    s, t, y = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.8, 0.6]), np.array([0.0, 1.0, 0.0])
    with_labels = reference(s, t, y, temperature=3.0, alpha=0.5)
    no_labels = reference(s, t, None, temperature=3.0, alpha=0.5)
    expected = [with_labels.loss, *with_labels.grad, no_labels.loss]
    for value in expected:
        close = [n for n in nums if abs(n - value) <= 1e-7 * abs(value)]
        # the library's value and the reference printed next to it
        assert len(close) >= 2, f"{value:.10g} not printed twice (library and reference) in:\n{proc.stdout}"


def test_cpp_core_has_no_python_includes():
    include_dir = REPO / "csrc" / "include" / "kdloss"
    if not include_dir.is_dir():
        pytest.skip("source tree not available")
    headers = list(include_dir.rglob("*.h*"))
    assert headers
    for h in headers:
        text = h.read_text(encoding="utf-8", errors="replace")
        for bad in ("Python.h", "pybind11", "numpy/"):
            assert not re.search(rf"#\s*include\s*[<\"][^>\"]*{re.escape(bad)}", text), f"{h} includes {bad}"
