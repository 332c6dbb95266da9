"""A gradient buffer the caller has let go of, kept for the next call of the same shape.

A large gradient freshly allocated is fresh memory from the operating system, which zeroes every page as the
kernel first writes it: at (4, 256, 32000) float32 that costs a quarter of the call. A training loop asks for a
gradient of the same shape every step and drops the last one before (``zero_grad``, or the update that consumed
it), so the buffer of one step can serve the next, as an ``out=`` array would.

Whether the caller has let go is read from the buffer's reference count: the NumPy array is referenced by every
view of it and by every torch tensor made from it (``torch.from_numpy`` keeps the array alive through the
tensor's storage), so when only the cache holds it, nothing can read or write it but the next call. One buffer
per dtype is kept, the most recent one; :func:`kdloss.clear_gradient_cache` gives its memory back.
"""

from __future__ import annotations

import sys
import threading
from typing import Dict, Optional, Tuple

import numpy as np

# Below this a gradient comes from the allocator's own heap, already touched: nothing to save.
MIN_CACHED_BYTES = 1 << 22

_lock = threading.Lock()
_buffers: Dict[np.dtype, np.ndarray] = {}

# References to a cached buffer that nobody else holds, counted inside take(): the dictionary's, take()'s
# local variable and getrefcount's own argument.
_OWN_REFERENCES = 3


def take(shape: Tuple[int, ...], dtype: np.dtype) -> Optional[np.ndarray]:
    """The cached buffer of this shape and dtype if nothing but the cache holds it, else None.

    The caller holds the returned array while it uses it, which marks it as taken for any other thread.
    """
    with _lock:
        buffer = _buffers.get(dtype)
        if buffer is None or buffer.shape != shape or sys.getrefcount(buffer) != _OWN_REFERENCES:
            return None
        return buffer


def keep(buffer: np.ndarray) -> None:
    """Remember a freshly allocated gradient (if large enough to be worth it) for a later call."""
    if buffer.nbytes >= MIN_CACHED_BYTES:
        with _lock:
            _buffers[buffer.dtype] = buffer


def clear() -> None:
    with _lock:
        _buffers.clear()
