"""Shared fixtures and Hypothesis settings for the kdloss Python test suite.

The directory of this file is put on ``sys.path`` so that the test modules can
``from reference import ...`` / ``from helpers import ...`` whatever pytest's
import mode is.  There is deliberately no ``__init__.py`` in ``tests/``.

Hypothesis runs under the "kdloss" profile: the same examples on every machine
and every run (derandomized, no example database), no deadline (a first call
on a loaded machine may be slow). ``pytest --hypothesis-profile=explore``
draws new examples on every run instead, for a look beyond the fixed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

settings.register_profile(
    "kdloss",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", parent=settings.get_profile("kdloss"), derandomize=False)
settings.load_profile("kdloss")


@pytest.fixture
def rng(request):
    """A deterministic generator, seeded from the test's node id."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
