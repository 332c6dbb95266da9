"""Shared fixtures for the kdloss Python test suite.

The directory of this file is put on ``sys.path`` so that the test modules can
``from reference import ...`` / ``from helpers import ...`` whatever pytest's
import mode is.  There is deliberately no ``__init__.py`` in ``tests/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def rng(request):
    """A deterministic generator, seeded from the test's node id."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
