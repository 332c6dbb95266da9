"""kdloss: the knowledge-distillation loss of Hinton et al. (2015) and its exact gradient, computed natively."""

from __future__ import annotations

from ._core import __version__, build_info
from ._loss import DistillationLoss, clear_gradient_cache
from ._sparse_builders import sample_teacher, top_k
from ._sparse_teacher import SparseTeacher, SparseTeacherWriter

__all__ = [
    "DistillationLoss",
    "SparseTeacher",
    "SparseTeacherWriter",
    "__version__",
    "build_info",
    "clear_gradient_cache",
    "sample_teacher",
    "top_k",
]
