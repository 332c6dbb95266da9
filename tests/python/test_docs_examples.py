"""Every code example in the documentation runs, and every output it shows is what the code prints.

The pages (``docs/**/*.md``) and ``README.md`` hold two kinds of Python examples: ```` ```python ```` blocks, run
in order, and ```` ```pycon ```` blocks, interactive sessions checked by doctest; both share one namespace per page,
as a reader going down the page would. A page whose examples use PyTorch is skipped without it. The docstrings'
examples run as doctests. The C++ example on the pages is ``tests/cmake_consumer/main.cpp`` itself (included, not
copied), which ``test_cmake_consumer.py`` builds and runs.
"""

from __future__ import annotations

import doctest
import importlib
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(python|pycon)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def examples(page: Path) -> list[tuple[str, str, int]]:
    """(kind, code, line number) of each Python example on the page, in order."""
    text = page.read_text()
    return [(m[1], m[2], text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


PAGES_WITH_EXAMPLES = [page for page in PAGES if page.is_file() and examples(page)]


def test_the_pages_have_examples():
    """The collection itself: a fence renamed or a page moved must not make this file test nothing."""
    names = {page.relative_to(ROOT).as_posix() for page in PAGES_WITH_EXAMPLES}
    assert {"README.md", "docs/getting-started.md", "docs/guide/numpy.md", "docs/guide/pytorch.md"} <= names


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_page_examples_run(page: Path, tmp_path, monkeypatch):
    blocks = examples(page)
    if any(re.search(r"\btorch\b", code) for _, code, _ in blocks):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    # torch.compile's inductor warns of torch's own deprecations (torch.jit, in 2.13); kdloss's warnings still fail.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
    namespace: dict = {"__name__": "__docs__"}
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    parser = doctest.DocTestParser()
    name = page.relative_to(ROOT).as_posix()
    for kind, code, line in blocks:
        where = f"{name}:{line}"
        if kind == "python":
            exec(compile(code, where, "exec"), namespace)
            continue
        test = parser.get_doctest(code, namespace, where, str(page), line)
        runner.run(test, clear_globs=False)
    failures = runner.summarize(verbose=False).failed
    assert failures == 0, f"{failures} interactive example(s) of {name} printed something else (see above)"


DOCSTRING_MODULES = [
    "kdloss._loss",
    "kdloss._sparse_teacher",
    "kdloss._sparse_builders",
    "kdloss._gradient_cache",
    "kdloss.torch",
    "kdloss._gkd",
]


@pytest.mark.parametrize("module_name", DOCSTRING_MODULES)
def test_docstring_examples_run(module_name: str):
    if module_name in ("kdloss.torch", "kdloss._gkd"):
        pytest.importorskip("torch")
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=FLAGS)
    assert result.failed == 0
