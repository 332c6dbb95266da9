"""A placeholder for ``kdloss.SparseTeacher``, which another branch writes (issue 17).

It holds what the builders (``kdloss.top_k``, ``kdloss.sample_teacher``) give it, with the constructor that class
has: ``SparseTeacher(indices, logprobs, *, temperature=None, vocab_size=None, method=None)``. Nothing else; when
that branch is merged, its module replaces this one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SparseTeacher"]


class SparseTeacher:
    """A teacher's distribution kept as a few classes per row: ``indices`` and ``logprobs``, both ``(..., K)``."""

    __slots__ = ("indices", "logprobs", "temperature", "vocab_size", "method")

    def __init__(
        self,
        indices: np.ndarray,
        logprobs: np.ndarray,
        *,
        temperature: float | None = None,
        vocab_size: int | None = None,
        method: Any = None,
    ) -> None:
        self.indices = indices
        self.logprobs = logprobs
        self.temperature = temperature
        self.vocab_size = vocab_size
        self.method = method
