"""Explicit initial latents: a request may bring the noise its loop starts from, as diffusers
pipelines take `latents=`, so a run can be compared step by step with another implementation
given the same noise. A `.npy` file (read without pickle) or an array, (C, h, w) or (1, C, h, w),
finite, float; used in place of the noise drawn from the request's seed."""

from __future__ import annotations

import io
import os

import numpy as np

from runtime.errors import InputError
from runtime.inputs.files import read_capped

FIELD = "latents"
MAX_FILE_BYTES = 64 * 1024 * 1024


def load_latents(source: str | os.PathLike[str] | np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(C, h, w) float32 from a `.npy` file or an array; `shape` is what the canvas needs."""
    if isinstance(source, np.ndarray):
        array = source
    else:
        raw = read_capped(source, FIELD, MAX_FILE_BYTES, "a .npy file")
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as e:  # not a .npy file, or one holding objects
            raise InputError(FIELD, "expected a .npy file of numbers (saved with numpy.save)", f"{type(e).__name__}: {e}") from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != tuple(shape):
        raise InputError(FIELD, f"expected shape {tuple(shape)} (C, H/8, W/8) for this canvas", tuple(array.shape))
    if array.dtype.kind != "f":
        raise InputError(FIELD, "expected floating-point values", str(array.dtype))
    if not np.isfinite(array).all():
        raise InputError(FIELD, "expected finite values", "NaN or Inf")
    return np.ascontiguousarray(array, dtype=np.float32)
