"""A glioma: necrotic core, enhancing rim and oedema, placed in deep white matter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from fedmodal.data.phantoms.anatomy import Anatomy
from fedmodal.data.phantoms.fields import Lattice, sigmoid
from fedmodal.data.phantoms.grid import BRATS_FOV_MM, Template, sample_template

if TYPE_CHECKING:  # scanner imports TUMOUR_SIZES_MM from here
    from fedmodal.data.phantoms.scanner import ScannerProfile

# Core radius ranges (mm) of the three tumour sizes a site's mix draws from.
TUMOUR_SIZES_MM = {"small": (6.0, 10.0), "medium": (10.0, 14.0), "large": (14.0, 19.0)}


class Tumour:
    """A glioma: lobes around a centre deep in supratentorial white matter, with noisy outlines."""

    NOISE_CLIP = 2.0  # outline noise is clipped to +-2 std, so the tumour's extent is bounded

    def __init__(self, rng: np.random.Generator, profile: ScannerProfile, spacing, anatomy: Anatomy, tpl: Template):
        mix = np.asarray(profile.tumour_mix) / sum(profile.tumour_mix)
        self.size = str(rng.choice(list(TUMOUR_SIZES_MM), p=mix))
        self.radius = float(rng.uniform(*TUMOUR_SIZES_MM[self.size]))
        # The enhancing rim stays at least 4 mm (and 1.5 voxels) thick so that it shows on the grid.
        self.rim_mm = max(4.0, 1.5 * max(spacing))
        self.necrosis = max(min(float(rng.uniform(0.5, 0.8)), 1.0 - self.rim_mm / self.radius), 0.05)
        self.reach = float(rng.uniform(1.4, 2.1))  # oedema extent, in core radii
        fov = np.asarray(BRATS_FOV_MM)
        candidates = anatomy.centre + (rng.uniform(-0.5, 0.5, size=(400, 3)) * (fov - 40.0)).astype(np.float32)
        cq = anatomy.points(candidates)
        wm, depth = sample_template(tpl.wm, tpl, cq.T), sample_template(tpl.depth, tpl, cq.T)
        supratentorial = cq[:, 2] > -5.0
        ok = (wm > 0.85) & (depth > self.radius + 6.0) & supratentorial
        if ok.any():
            pick = int(np.argmax(ok))
        else:  # small brains and big tumours: take the deepest white matter on offer
            pick = int(np.argmax(wm * np.minimum(depth / (self.radius + 6.0), 1.0) * supratentorial))
        self.centre = candidates[pick]
        self.side = np.float32(1.0 if cq[pick, 0] >= 0 else -1.0)  # hemisphere, by MNI x
        self.lobes = [(self.centre, self.radius)]
        for _ in range(int(rng.integers(0, 3))):
            direction = rng.standard_normal(3)
            offset = direction / np.linalg.norm(direction) * self.radius * rng.uniform(0.35, 0.7)
            self.lobes.append((self.centre + offset.astype(np.float32), self.radius * float(rng.uniform(0.45, 0.75))))
        self.core_lattice = Lattice(max(6.0, 0.7 * self.radius))
        self.core_coef = self.core_lattice.draw(rng, 2)  # core outline, necrosis outline
        self.oedema_lattice = Lattice(max(8.0, 0.7 * self.radius * self.reach))
        self.oedema_coef = self.oedema_lattice.draw(rng, 1)
        self.mass_effect = float(rng.uniform(0.4, 0.7))

    def box(self, axes, margin_mm: float) -> tuple[slice, slice, slice]:
        """Grid slices that hold every voxel the tumour can reach."""
        shrink = 1.0 - 0.18 * self.NOISE_CLIP
        extent = max(self.reach * 1.15, 1.0 + 4.0 / self.radius) / shrink
        half = max(np.linalg.norm(c - self.centre) + r * extent for c, r in self.lobes) + margin_mm
        out = []
        for a in range(3):
            inside = np.flatnonzero(np.abs(axes[a] - self.centre[a]) <= half)
            out.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        return tuple(out)

    def regions(self, axes, spacing, wm, csf, brain, own_side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Soft necrosis, core (necrosis + enhancing) and whole-tumour fractions on ``axes``."""
        grid = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        rho = None  # distance to the nearest lobe, in that lobe's radii
        for c, r in self.lobes:
            d = np.sqrt((grid[0] - c[0]) ** 2 + (grid[1] - c[1]) ** 2 + (grid[2] - c[2]) ** 2) / np.float32(r)
            rho = d if rho is None else np.minimum(rho, d)

        def outline(lattice, coef, amplitude):
            noise = np.clip(lattice.on_grid(coef, axes), -self.NOISE_CLIP, self.NOISE_CLIP)
            return rho * (1.0 + np.float32(amplitude) * noise)

        edge = np.float32(0.35 * float(np.mean(spacing)) / self.radius)  # soft edge, in radii
        rho_core = outline(self.core_lattice, self.core_coef[0], 0.18)
        rho_nec = outline(self.core_lattice, self.core_coef[1], 0.15) / np.float32(self.necrosis)
        rho_oed = outline(self.oedema_lattice, self.oedema_coef[0], 0.18) / np.float32(self.reach)
        core = sigmoid((1.0 - rho_core) / edge)
        rim_limit = np.float32(1.0 - self.rim_mm / self.radius)
        nec = np.minimum(
            sigmoid((1.0 - rho_nec) / (edge / np.float32(self.necrosis))), sigmoid((rim_limit - rho_core) / edge)
        )
        # Oedema spreads along white matter, fades across the midline, stays out of CSF, and
        # always rims the core by a few mm of infiltrated brain on the tumour's side.
        limit = (0.65 + 0.5 * wm) * (0.4 + 0.6 * own_side)
        whole = sigmoid((limit - rho_oed) / (edge / np.float32(self.reach)))
        rim = sigmoid((np.float32(1.0 + 4.0 / self.radius) - rho_core) / edge) * (own_side > 0.5)
        whole = np.maximum(whole, rim) * (csf < 0.5)
        whole = _attached(whole, core)
        return nec * brain, core * brain, np.maximum(whole, core) * brain

    def info(self) -> dict:
        return {
            "size": self.size,
            "core_radius_mm": round(self.radius, 2),
            "necrosis_fraction": round(self.necrosis, 3),
            "oedema_reach": round(self.reach, 3),
            "lobes": len(self.lobes),
            "centre_mm": [round(float(v), 1) for v in self.centre],
        }


def _attached(s_oed: np.ndarray, s_core: np.ndarray) -> np.ndarray:
    """Drop islands of oedema that do not touch the tumour core (and their soft fringe)."""
    hard = s_oed > 0.5
    parts, n = ndimage.label(hard)
    if n <= 1:
        return s_oed
    touching = np.unique(parts[(s_core > 0.5) & hard])
    keep = touching[touching > 0]
    if keep.size == 0:  # a core too small for the grid: keep the largest island
        keep = np.array([1 + int(np.argmax(ndimage.sum_labels(hard, parts, range(1, n + 1))))])
    kept = np.isin(parts, keep)
    dropped = ndimage.binary_dilation(hard & ~kept, iterations=2) & ~kept
    return np.where(dropped, np.float32(0.0), s_oed)
