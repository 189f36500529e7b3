"""A case's anatomy: the template under a small random affine and a smooth displacement."""

from __future__ import annotations

import numpy as np

from fedmodal.data.phantoms.fields import Lattice
from fedmodal.data.phantoms.grid import FOV_CENTRE_MNI


def _rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.normal(0.0, [2.0, 2.0, 4.0]))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Anatomy:
    """A random deformation of the template: subject point p -> MNI q = c + t + A (p - c) + u(p)."""

    def __init__(self, rng: np.random.Generator):
        self.centre = np.asarray(FOV_CENTRE_MNI, dtype=np.float32)
        scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3)
        self.linear = (_rotation(rng) * scale[None, :]).astype(np.float32)
        self.shift = rng.normal(0.0, 2.5, size=3).astype(np.float32)
        self.warp = Lattice(36.0)
        self.warp_coef = self.warp.draw(rng, 3) * np.float32(rng.uniform(2.0, 4.5))

    def points(self, p: np.ndarray) -> np.ndarray:
        """Map subject points (P, 3) to MNI."""
        moved = (p - self.centre) @ self.linear.T + self.centre + self.shift
        return moved + np.stack([self.warp.at_points(self.warp_coef[a], p) for a in range(3)], 1)

    def grid(self, axes, push_from: np.ndarray, push_radius: float, push: float) -> np.ndarray:
        """MNI coordinates (3, X, Y, Z) of the grid, the tumour's mass effect included.

        Tissue at p comes from p - m(p), m(p) = k R^2 (p - c_t) / (|p - c_t|^2 + R^2): pushed
        away from the tumour centre c_t, most at distance R, without folding for k < 1.
        """
        grid = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        rel = [g - c for g, c in zip(grid, push_from)]
        r2 = np.float32(push_radius**2)
        factor = np.float32(push) * r2 / (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 + r2)
        src = [g - factor * r - c for g, r, c in zip(grid, rel, self.centre)]
        q = np.empty((3,) + tuple(len(a) for a in axes), dtype=np.float32)
        for a in range(3):
            q[a] = self.linear[a, 0] * src[0] + self.linear[a, 1] * src[1] + self.linear[a, 2] * src[2]
            q[a] += self.centre[a] + self.shift[a]
            q[a] += self.warp.on_grid(self.warp_coef[a], axes)
        return q
