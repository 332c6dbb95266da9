"""Sphinx configuration of kdloss's documentation (``sphinx-build -W --keep-going docs docs/_build``).

The pages are Markdown (MyST); the API reference comes from the installed package's docstrings (autodoc with
napoleon, which reads their NumPy style). Every example on a page runs in ``tests/python/test_docs_examples.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_version_header = (ROOT / "csrc" / "include" / "kdloss" / "version.hpp").read_text()
release = ".".join(
    re.search(rf"#define KDLOSS_VERSION_{part} (\d+)", _version_header)[1] for part in ("MAJOR", "MINOR", "PATCH")
)
version = release

project = "kdloss"
author = "the kdloss developers"
copyright = "the kdloss developers, MIT licence"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",  # formulas render in the reader's browser: nothing is fetched at build time
]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
# Types as written ("array_like, shape (..., C)"), not cross-referenced word by word.
napoleon_use_param = False

html_theme = "furo"
html_title = f"kdloss {release}"
html_static_path = ["_static"]
