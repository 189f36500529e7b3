"""Smooth random fields: cubic B-splines on a lattice fixed in millimetres, so a case's fields do
not depend on the grid's shape."""

from __future__ import annotations

import numpy as np

from fedmodal.data.phantoms.grid import BRATS_FOV_MM, FOV_CENTRE_MNI

_BSPLINE_STD = 0.4794**1.5  # std of a unit-coefficient cubic B-spline field in 3D


def _bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    out = np.where(t < 1.0, 2.0 / 3.0 - t**2 + t**3 / 2.0, 0.0)
    return np.where((t >= 1.0) & (t < 2.0), (2.0 - t) ** 3 / 6.0, out)


class Lattice:
    """Cubic B-spline lattice with ``step_mm`` spacing covering the field of view."""

    def __init__(self, step_mm: float, fov_mm=BRATS_FOV_MM):
        self.step = float(step_mm)
        self.lo = np.asarray(FOV_CENTRE_MNI) - np.asarray(fov_mm) / 2.0
        self.n = tuple(int(np.ceil(f / self.step)) + 3 for f in fov_mm)

    def draw(self, rng: np.random.Generator, count: int = 1) -> np.ndarray:
        """Coefficients of ``count`` independent unit-std fields."""
        return rng.standard_normal((count,) + self.n).astype(np.float32) / _BSPLINE_STD

    def _weights(self, axis: int, coords: np.ndarray) -> np.ndarray:
        u = (np.asarray(coords, dtype=np.float64) - self.lo[axis]) / self.step + 1.0
        return _bspline(u[:, None] - np.arange(self.n[axis])[None, :]).astype(np.float32)

    def on_grid(self, coef: np.ndarray, axes) -> np.ndarray:
        """Evaluate one field on the grid spanned by 1-D world ``axes`` (x, y, z)."""
        wx, wy, wz = (self._weights(a, c) for a, c in enumerate(axes))
        t = (wx @ coef.reshape(self.n[0], -1)).reshape(len(axes[0]), self.n[1], self.n[2])
        t = np.matmul(wy, t)  # (X, Y, nz), batched over x
        return t @ wz.T

    def at_points(self, coef: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Evaluate one field at world points (P, 3)."""
        wx, wy, wz = (self._weights(a, points[:, a]) for a in range(3))
        return np.einsum("pa,pb,pc,abc->p", wx, wy, wz, coef)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, as float32 (soft region edges)."""
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
