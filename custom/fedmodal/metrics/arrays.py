"""Array plumbing the metrics share: numpy from torch, boolean masks, shape and spacing checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_bool(x: Any) -> np.ndarray:
    """``x`` as a boolean numpy array (non-zero = True)."""
    arr = to_numpy(x)
    return arr if arr.dtype == bool else arr != 0


def check_pair(a: np.ndarray, b: np.ndarray, names: str = "prediction and truth") -> None:
    """Raise ValueError unless ``a`` and ``b`` are 2D or 3D arrays of one shape."""
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}.")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D array, got shape {a.shape}.")


def spacing_tuple(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Normalise ``spacing`` (None, a scalar or one value per axis) to ``ndim`` floats."""
    if spacing is None:
        return (1.0,) * ndim
    values = np.atleast_1d(to_numpy(spacing)).astype(float).ravel()
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise ValueError(f"spacing must have one value per axis ({ndim}), got {tuple(values)}.")
    if np.any(values <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(values)}.")
    return tuple(float(v) for v in values)
