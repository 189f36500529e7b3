"""The phantom federation: BraTS-named multi-modal brain MRI built from real anatomy.

Each case starts from the MNI152 grey- and white-matter probability maps that ship inside the
``nilearn`` wheel (CSF = brain minus GM minus WM), deformed by a small random affine and a smooth
random displacement, with a glioma pushed into the white matter: a necrotic core, an enhancing
rim around it and oedema around both (labels 1, 3 and 2 in fedmodal's canonical order). Each
modality renders the tissues with its own contrast, so the four are complementary:

| tissue      | T1     | T1c    | T2     | FLAIR  |
|-------------|--------|--------|--------|--------|
| white matter| bright | bright | dark   | dark   |
| grey matter | grey   | grey   | grey   | grey   |
| CSF         | dark   | dark   | bright | dark   |
| oedema      | dim    | dim    | bright | bright |
| necrosis    | dark   | dark   | bright | grey   |
| enhancing   | grey   | bright | grey   | grey+  |

Every site has a scanner profile (contrast curve, bias field, Rician noise level, blur,
intensity scale, tumour-size mix). Cases are skull-stripped ``int16`` NIfTI on a BraTS-like
grid (240 x 240 x 155 mm, voxel axes L-P-S like BraTS files, world coordinates in MNI mm),
named as a BraTS release names them; a modality a site lacks has no file. Everything is
derived from one seed: a case depends only on (seed, site, case index) and the shape.

The default ``(96, 96, 62)`` grid has 2.5 mm voxels; ``shape=(240, 240, 155)`` gives BraTS's
native 1 mm grid with the same anatomy and tumours (only voxel noise and partial volume differ;
on grids coarser than 2.67 mm the enhancing rim is kept 1.5 voxels thick so that it shows).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedmodal.brats import MODALITIES
from fedmodal.brats import ET_LABEL, RELEASES
from fedmodal.data.layouts import case_file_paths, make_case_id

try:  # POSIX advisory locks; elsewhere the atomic rename alone settles a race.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the same spec would give different voxels
DEFAULT_PRESET = "modalitybank-missing"
DEFAULT_SHAPE = (96, 96, 62)
DEFAULT_LAYOUT = "brats2021"
BRATS_FOV_MM = (240.0, 240.0, 155.0)
# MNI coordinate (mm) of the centre of the field of view: the brain, cerebellum included.
FOV_CENTRE_MNI = (0.0, -17.0, 8.0)
TEST_SITE = "test"
FEDERATION_FILE = "federation.json"

# Canonical labels inside fedmodal (on disk, 3 becomes the release's ET value).
NECROSIS, OEDEMA, ENHANCING = 1, 2, 3

# Relative intensity of each tissue per modality, before the scanner's contrast curve.
TISSUE_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"wm": 0.80, "gm": 0.58, "csf": 0.18, "oedema": 0.50, "necrosis": 0.26, "enhancing": 0.56},
    "t1ce": {"wm": 0.80, "gm": 0.60, "csf": 0.20, "oedema": 0.52, "necrosis": 0.28, "enhancing": 1.45},
    "t2": {"wm": 0.36, "gm": 0.55, "csf": 1.00, "oedema": 0.92, "necrosis": 1.00, "enhancing": 0.62},
    "flair": {"wm": 0.45, "gm": 0.62, "csf": 0.10, "oedema": 1.00, "necrosis": 0.50, "enhancing": 0.75},
}
# How much of the underlying tissue still shows through oedema (it infiltrates, it does not replace).
OEDEMA_TISSUE_SHARE = 0.2
# Core radius ranges (mm) of the three tumour sizes a site's mix draws from.
TUMOUR_SIZES_MM = {"small": (6.0, 10.0), "medium": (10.0, 14.0), "large": (14.0, 19.0)}


@dataclass(frozen=True)
class Preset:
    """A federation split: which sites hold which modalities, and how many cases by default.

    Args:
        name: the preset's name (``PRESETS`` key).
        description: one line for ``--help`` and ``federation.json``.
        sites: site name -> modalities it holds (canonical order).
        cases_per_site: site name -> default number of training cases.
        test_cases: default size of the held-out full-modal test set.
    """

    name: str
    description: str
    sites: dict[str, tuple[str, ...]]
    cases_per_site: dict[str, int]
    test_cases: int = 10


def _ordered(modalities) -> tuple[str, ...]:
    held = set(modalities)
    return tuple(m for m in MODALITIES if m in held)


def _fedmepd_sites() -> dict[str, tuple[str, ...]]:
    # FedMEPD's client masks, in the paper's order (flair, t1ce, t1, t2).
    order = ("flair", "t1ce", "t1", "t2")
    masks = ("1111", "1110", "1011", "1100", "0011", "0100", "0001", "1111")
    sites = {"server": MODALITIES}
    for k, mask in enumerate(masks, start=1):
        sites[f"site-{k}"] = _ordered(m for m, bit in zip(order, mask) if bit == "1")
    return sites


def _mixmfl_sites() -> dict[str, tuple[str, ...]]:
    pairs = [(a, b) for i, a in enumerate(MODALITIES) for b in MODALITIES[i + 1 :]]
    return {f"site-{k}": pair for k, pair in enumerate(pairs, start=1)}


def _make_presets() -> dict[str, Preset]:
    missing = {
        "site-1": ("t1", "t2", "flair"),  # lacks t1ce
        "site-2": ("t1", "t1ce", "flair"),  # lacks t2
        "site-3": ("t1", "t1ce", "t2"),  # lacks flair
    }
    full = {f"site-{k}": ("t1", "t2", "flair") for k in (1, 2, 3)}
    fedmepd = _fedmepd_sites()
    mixmfl = _mixmfl_sites()
    presets = [
        Preset(
            "modalitybank-missing",
            "ModalityBank completion: 3 sites, each lacking one of T1c/T2/FLAIR (all hold T1)",
            missing,
            {s: 16 for s in missing},
        ),
        Preset(
            "modalitybank-full",
            "ModalityBank heterogeneous centres: 3 sites with T1, T2 and FLAIR",
            full,
            {s: 16 for s in full},
        ),
        Preset(
            "fedmepd",
            "FedMEPD: full-modal server site + 8 clients with the paper's modality masks",
            fedmepd,
            {s: (16 if s == "server" else 8) for s in fedmepd},
        ),
        Preset(
            "mixmfl",
            "MDM-MixMFL: 6 clients, each holding a different pair of the 4 modalities",
            mixmfl,
            {s: 10 for s in mixmfl},
        ),
    ]
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _make_presets()


# --------------------------------------------------------------------------------------------
# Randomness: every stream is a pure function of (seed, purpose, site, index).


def _site_key(site: str) -> int:
    return zlib.crc32(site.encode("utf-8"))


def _rng(seed: int, purpose: int, site: str, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), purpose, _site_key(site), int(index)])


_PROFILE_STREAM, _CASE_STREAM = 1, 2


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanners render tissue.

    Args:
        gamma: modality -> exponent of the contrast curve applied to relative intensities.
        scale: modality -> stored value of relative intensity 1.
        bias: standard deviation of the log of the smooth multiplicative bias field.
        noise: Rician noise sigma, relative to intensity 1.
        blur_mm: Gaussian point-spread sigma in mm.
        tumour_mix: probabilities of small, medium and large tumours.
    """

    gamma: dict[str, float]
    scale: dict[str, float]
    bias: float
    noise: float
    blur_mm: float
    tumour_mix: tuple[float, float, float]

    def to_json(self) -> dict:
        out = asdict(self)
        out["tumour_mix"] = dict(zip(TUMOUR_SIZES_MM, self.tumour_mix))
        return json.loads(json.dumps(out))


def site_profile(seed: int, site: str) -> ScannerProfile:
    """The scanner profile of ``site`` under ``seed`` (the same in every preset)."""
    rng = _rng(seed, _PROFILE_STREAM, site)
    gamma = {m: round(float(rng.uniform(0.8, 1.25)), 4) for m in MODALITIES}
    scale = {m: round(float(rng.uniform(400.0, 2500.0)), 1) for m in MODALITIES}
    bias = round(float(rng.uniform(0.03, 0.15)), 4)
    noise = round(float(rng.uniform(0.015, 0.05)), 4)
    blur = round(float(rng.uniform(0.0, 1.4)), 3)
    mix = rng.dirichlet([1.5, 1.5, 1.5])
    return ScannerProfile(gamma, scale, bias, noise, blur, tuple(round(float(p), 4) for p in mix))


# --------------------------------------------------------------------------------------------
# Grid and anatomy.


def grid_affine(shape=DEFAULT_SHAPE, fov_mm=BRATS_FOV_MM) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Affine (voxel -> MNI mm) and spacing of a BraTS-like grid of ``shape`` over ``fov_mm``.

    Voxel axes run right-to-left, anterior-to-posterior, inferior-to-superior (L-P-S), as in
    BraTS files; the field of view is centred on the brain.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(f) / s for f, s in zip(fov_mm, shape))
    centre = np.asarray(FOV_CENTRE_MNI)
    half = np.asarray(fov_mm) / 2.0 - np.asarray(spacing) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine[:3, 3] = centre + np.array([half[0], half[1], -half[2]])
    return affine, spacing


def _grid_axes(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(
        (affine[a, 3] + affine[a, a] * np.arange(shape[a])).astype(np.float32) for a in range(3)
    )


@dataclass
class _Template:
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    depth: np.ndarray  # distance to the brain's edge, mm
    origin: np.ndarray  # MNI mm of voxel (0, 0, 0); 1 mm axis-aligned voxels


@functools.lru_cache(maxsize=1)
def _mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 GM, WM, brain mask and origin, from the files inside the nilearn wheel."""
    # Local import: nilearn.datasets is slow to import. These loaders read files shipped in the
    # wheel (nilearn/datasets/data/mni_icbm152_*); nothing is downloaded.
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_wm_template,
    )

    gm_img = load_mni152_gm_template()
    affine = gm_img.affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError(f"expected a 1 mm axis-aligned MNI152 template, got affine {affine.tolist()}")
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template().dataobj, dtype=np.float32)
    mask = np.asarray(load_mni152_brain_mask().dataobj) > 0
    gm /= max(float(gm.max()), 1e-6)
    wm /= max(float(wm.max()), 1e-6)
    inside = np.argwhere(mask)
    lo = np.maximum(inside.min(0) - 4, 0)
    hi = np.minimum(inside.max(0) + 5, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    return gm[crop], wm[crop], mask[crop], affine[:3, 3] + lo


@functools.lru_cache(maxsize=1)
def _depth() -> np.ndarray:
    return ndimage.distance_transform_edt(_mni152()[2]).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _template(blur_mm: float) -> _Template:
    """The MNI152 maps pre-blurred by ``blur_mm`` (anti-aliasing for coarse grids)."""
    gm, wm, mask, origin = _mni152()
    return _Template(
        gm=ndimage.gaussian_filter(gm, max(blur_mm, 0.4)),
        wm=ndimage.gaussian_filter(wm, max(blur_mm, 0.4)),
        brain=ndimage.gaussian_filter(mask.astype(np.float32), max(blur_mm, 0.8)),  # soften the staircase
        depth=_depth(),
        origin=origin,
    )


def _antialias_mm(spacing) -> float:
    # Gaussian sigma whose FWHM is about a voxel beyond the template's own 1 mm.
    return round(0.42 * float(np.sqrt(max(max(spacing) ** 2 - 1.0, 0.0))), 2)


def _sample(volume: np.ndarray, template: _Template, q: np.ndarray) -> np.ndarray:
    """Linear interpolation of a template map at MNI points ``q`` (3, ...)."""
    coords = q - template.origin.reshape((3,) + (1,) * (q.ndim - 1)).astype(np.float32)
    return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, prefilter=False)


# --------------------------------------------------------------------------------------------
# Smooth random fields: cubic B-splines on a lattice fixed in millimetres, so a case's fields do
# not depend on the grid's shape.

_BSPLINE_STD = 0.4794 ** 1.5  # std of a unit-coefficient cubic B-spline field in 3D


def _bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    out = np.where(t < 1.0, 2.0 / 3.0 - t**2 + t**3 / 2.0, 0.0)
    return np.where((t >= 1.0) & (t < 2.0), (2.0 - t) ** 3 / 6.0, out)


class _Lattice:
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


# --------------------------------------------------------------------------------------------
# One case.


@dataclass
class PhantomCase:
    """One generated case, every modality included (the writer drops what a site lacks).

    Attributes:
        images: modality -> int16 volume (0 outside the brain).
        label: uint8 canonical labels (1 necrosis, 2 oedema, 3 enhancing).
        tissues: "gm", "wm", "csf" -> float32 probability maps of the deformed anatomy.
        brain: bool brain mask.
        affine: voxel -> world (MNI mm), L-P-S voxel axes.
        spacing: voxel size in mm.
        info: tumour parameters (size class, radii, centre) for the record.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    tissues: dict[str, np.ndarray]
    brain: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    info: dict = field(default_factory=dict)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.normal(0.0, [2.0, 2.0, 4.0]))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


class _Anatomy:
    """A random deformation of the template: subject point p -> MNI q = c + t + A (p - c) + u(p)."""

    def __init__(self, rng: np.random.Generator):
        self.centre = np.asarray(FOV_CENTRE_MNI, dtype=np.float32)
        scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3)
        self.linear = (_rotation(rng) * scale[None, :]).astype(np.float32)
        self.shift = rng.normal(0.0, 2.5, size=3).astype(np.float32)
        self.warp = _Lattice(36.0)
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


class _Tumour:
    """A glioma: lobes around a centre deep in supratentorial white matter, with noisy outlines."""

    NOISE_CLIP = 2.0  # outline noise is clipped to +-2 std, so the tumour's extent is bounded

    def __init__(self, rng: np.random.Generator, profile: ScannerProfile, spacing, anatomy: _Anatomy,
                 tpl: _Template):
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
        wm, depth = _sample(tpl.wm, tpl, cq.T), _sample(tpl.depth, tpl, cq.T)
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
        self.core_lattice = _Lattice(max(6.0, 0.7 * self.radius))
        self.core_coef = self.core_lattice.draw(rng, 2)  # core outline, necrosis outline
        self.oedema_lattice = _Lattice(max(8.0, 0.7 * self.radius * self.reach))
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
        core = _sigmoid((1.0 - rho_core) / edge)
        rim_limit = np.float32(1.0 - self.rim_mm / self.radius)
        nec = np.minimum(_sigmoid((1.0 - rho_nec) / (edge / np.float32(self.necrosis))),
                         _sigmoid((rim_limit - rho_core) / edge))
        # Oedema spreads along white matter, fades across the midline, stays out of CSF, and
        # always rims the core by a few mm of infiltrated brain on the tumour's side.
        limit = (0.65 + 0.5 * wm) * (0.4 + 0.6 * own_side)
        whole = _sigmoid((limit - rho_oed) / (edge / np.float32(self.reach)))
        rim = _sigmoid((np.float32(1.0 + 4.0 / self.radius) - rho_core) / edge) * (own_side > 0.5)
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


def generate_case(
    seed: int,
    site: str,
    index: int,
    shape=DEFAULT_SHAPE,
    profile: ScannerProfile | None = None,
) -> PhantomCase:
    """Generate case ``index`` of ``site``: a pure function of its arguments.

    Args:
        seed: the federation's seed.
        site: site name (anatomy and tumour streams are keyed by it).
        index: the case's index within its site.
        shape: grid shape over the 240 x 240 x 155 mm field of view.
        profile: scanner profile; default ``site_profile(seed, site)``.
    """
    shape = tuple(int(s) for s in shape)
    profile = profile or site_profile(seed, site)
    affine, spacing = grid_affine(shape)
    axes = _grid_axes(affine, shape)
    tpl = _template(_antialias_mm(spacing))

    # Every draw that does not depend on the grid comes first, in a fixed order.
    rng = _rng(seed, _CASE_STREAM, site, index)
    anatomy = _Anatomy(rng)
    tumour = _Tumour(rng, profile, spacing, anatomy, tpl)
    texture = _Lattice(8.0)
    texture_coef = texture.draw(rng, 2)  # normal tissue, tumour
    bias = _Lattice(80.0)
    bias_coef = bias.draw(rng, len(MODALITIES))
    jitter = {m: {t: float(rng.normal(1.0, 0.03)) for t in TISSUE_CONTRAST[m]} for m in MODALITIES}

    # Deformed anatomy.
    q = anatomy.grid(axes, tumour.centre, tumour.radius, tumour.mass_effect)
    gm, wm, brain_p = (_sample(v, tpl, q) for v in (tpl.gm, tpl.wm, tpl.brain))
    own_side = _sigmoid(tumour.side * q[0] / np.float32(2.0))  # the tumour's hemisphere, soft
    del q
    brain = brain_p > 0.5
    csf = np.clip(brain_p - gm - wm, 0.0, 1.0) * brain
    gm *= brain
    wm *= brain

    # Tumour regions, computed where the tumour can reach.
    box = tumour.box(axes, margin_mm=3.0 * max(spacing))
    box_axes = tuple(a[b] for a, b in zip(axes, box))
    nec, core, whole = tumour.regions(box_axes, spacing, wm[box], csf[box], brain[box], own_side[box])
    label = np.zeros(shape, dtype=np.uint8)
    label[box][whole > 0.5] = OEDEMA
    label[box][core > 0.5] = ENHANCING
    label[box][nec > 0.5] = NECROSIS

    # Render each modality through the site's scanner.
    tex_tissue = np.float32(1.0) + np.float32(0.04) * texture.on_grid(texture_coef[0], axes)
    tex_tumour = np.float32(1.0) + np.float32(0.1) * texture.on_grid(texture_coef[1], box_axes)
    tissue_sum = np.maximum(gm + wm + csf, np.float32(1e-3))
    noise_rng = _rng(seed, _CASE_STREAM + 100, site, index)  # the only stream sized by the grid
    images = {}
    for k, m in enumerate(MODALITIES):
        mu = {t: np.float32(v * jitter[m][t]) for t, v in TISSUE_CONTRAST[m].items()}
        img = (gm * mu["gm"] + wm * mu["wm"] + csf * mu["csf"]) / tissue_sum * tex_tissue
        base = img[box]
        oedema = OEDEMA_TISSUE_SHARE * base + (1.0 - OEDEMA_TISSUE_SHARE) * mu["oedema"]
        img[box] = (
            (1.0 - whole) * base
            + (whole - core) * (oedema * tex_tumour)
            + (core - nec) * (mu["enhancing"] * tex_tumour)
            + nec * (mu["necrosis"] * tex_tumour)
        )
        images[m] = _scan(img, brain, profile, m, spacing, bias.on_grid(bias_coef[k], axes), noise_rng)

    info = {**tumour.info(),
            "voxels": {name: int((label == v).sum()) for name, v in (("necrosis", 1), ("oedema", 2), ("enhancing", 3))}}
    return PhantomCase(images, label, {"gm": gm, "wm": wm, "csf": csf}, brain, affine, spacing, info)


def _scan(img: np.ndarray, brain: np.ndarray, profile: ScannerProfile, modality: str, spacing,
          bias_field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast curve, blur, bias field, Rician noise, scale, skull-strip: int16 like BraTS."""
    img = np.maximum(img, 0.0) ** np.float32(profile.gamma[modality]) * brain
    if profile.blur_mm > 0:
        img = ndimage.gaussian_filter(img, [profile.blur_mm / s for s in spacing])
    img *= np.exp(np.float32(profile.bias) * bias_field)
    sigma = np.float32(profile.noise)
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt(real**2 + imag**2) * np.float32(profile.scale[modality])
    stored = np.clip(np.rint(img), 1, np.iinfo(np.int16).max).astype(np.int16)
    stored[~brain] = 0
    return stored


# --------------------------------------------------------------------------------------------
# Federation plan and writer.


def _resolve_counts(preset: Preset, cases_per_site, test_cases) -> tuple[dict[str, int], int]:
    if cases_per_site is None:
        counts = dict(preset.cases_per_site)
    elif isinstance(cases_per_site, dict):
        unknown = set(cases_per_site) - set(preset.sites)
        if unknown:
            raise ValueError(f"preset {preset.name!r} has no site(s) {sorted(unknown)}; sites: {list(preset.sites)}")
        counts = {s: int(cases_per_site.get(s, preset.cases_per_site[s])) for s in preset.sites}
    else:
        counts = {s: int(cases_per_site) for s in preset.sites}
    n_test = preset.test_cases if test_cases is None else int(test_cases)
    if any(n < 1 for n in counts.values()) or n_test < 0:
        raise ValueError(f"every site needs at least 1 case and the test set 0 or more, got {counts}, test={n_test}")
    return counts, n_test


def _spec(
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
    shape=DEFAULT_SHAPE,
    layout: str = DEFAULT_LAYOUT,
    cases_per_site: int | dict[str, int] | None = None,
    test_cases: int | None = None,
) -> dict:
    """The validated spec of a federation: the one definition of its parameters and defaults."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    if layout not in RELEASES:
        raise ValueError(f"unknown layout {layout!r}; expected one of {RELEASES}")
    shape = [int(s) for s in shape]
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes of at least 8 voxels, got {shape}")
    counts, n_test = _resolve_counts(PRESETS[preset], cases_per_site, test_cases)
    return {
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": int(seed),
        "shape": shape,
        "layout": layout,
        "cases_per_site": counts,
        "test_cases": n_test,
    }


def _institution(site: str) -> str:
    return "".join(ch for ch in site.upper() if ch.isalnum())


def _plan(spec: dict) -> list[dict]:
    """Every case to write: site folder (also the generator's site key), index, case id, modalities."""
    preset = PRESETS[spec["preset"]]
    sites = list(preset.sites)
    jobs, number = [], 1
    for site in sites:
        for i in range(spec["cases_per_site"][site]):
            jobs.append({"folder": site, "index": i, "profile": site, "number": number,
                         "modalities": preset.sites[site]})
            number += 1
    for i in range(spec["test_cases"]):
        # Test cases are new patients scanned at the training sites, in turn.
        jobs.append({"folder": TEST_SITE, "index": i, "profile": sites[i % len(sites)],
                     "number": number, "modalities": MODALITIES})
        number += 1
    for job in jobs:
        job["case_id"] = make_case_id(spec["layout"], job["number"], institution=_institution(job["folder"]))
    return jobs


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"fedmodal phantom"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write_case(job: dict, spec: dict, site_root: Path) -> dict:
    """Generate one planned case and write the files of the modalities its site holds."""
    profile = site_profile(spec["seed"], job["profile"])
    case = generate_case(spec["seed"], job["folder"], job["index"], spec["shape"], profile)
    paths = case_file_paths(spec["layout"], job["case_id"], job["modalities"], with_seg=True)
    for m in job["modalities"]:
        _save_nifti(case.images[m], case.affine, site_root / paths[m])
    seg = case.label.copy()
    seg[case.label == ENHANCING] = ET_LABEL[spec["layout"]]
    _save_nifti(seg, case.affine, site_root / paths["seg"])
    return {"case_id": job["case_id"], **case.info}


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def read_federation(root) -> dict | None:
    """The ``federation.json`` of a complete federation at ``root``, or None."""
    path = Path(root) / FEDERATION_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _write_case_in(args: tuple[dict, dict, str]) -> dict:
    job, spec, folder = args
    return write_case(job, spec, Path(folder) / job["folder"])


def _build_into(folder: Path, spec: dict, workers: int) -> dict:
    preset = PRESETS[spec["preset"]]
    affine, spacing = grid_affine(spec["shape"])
    jobs = _plan(spec)
    start = time.perf_counter()
    records: dict[str, list] = {}
    tasks = [(job, spec, str(folder)) for job in jobs]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) >= 4 * workers:
            # Fresh interpreters, not fork: the caller may be a threaded FLARE client.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            results = pool.map(_write_case_in, tasks)
        else:
            results = map(_write_case_in, tasks)
        for n, (job, record) in enumerate(zip(jobs, results), start=1):
            records.setdefault(job["folder"], []).append(record)
            if n == len(jobs) or n % 10 == 0:
                logger.info("phantoms: %d/%d cases (%.1f s)", n, len(jobs), time.perf_counter() - start)
    sites = {}
    for site, modalities in preset.sites.items():
        sites[site] = {
            "modalities": list(modalities),
            "missing": [m for m in MODALITIES if m not in modalities],
            "cases": spec["cases_per_site"][site],
            "case_ids": [r["case_id"] for r in records[site]],
            "scanner": site_profile(spec["seed"], site).to_json(),
        }
    test = None
    if spec["test_cases"]:
        test = {
            "path": TEST_SITE,
            "modalities": list(MODALITIES),
            "cases": spec["test_cases"],
            "case_ids": [r["case_id"] for r in records[TEST_SITE]],
            "scanned_at": [j["profile"] for j in jobs if j["folder"] == TEST_SITE],
        }
    info = {
        "format": "fedmodal-phantoms",
        "spec": spec,
        "preset": spec["preset"],
        "description": preset.description,
        "seed": spec["seed"],
        "shape": spec["shape"],
        "spacing": list(spacing),
        "fov_mm": list(BRATS_FOV_MM),
        "affine": affine.tolist(),
        "layout": spec["layout"],
        "et_label": ET_LABEL[spec["layout"]],
        "labels": {"necrosis": 1, "oedema": 2, "enhancing": ET_LABEL[spec["layout"]]},
        "sites": sites,
        "test": test,
        "tumours": records,
        "build": {"seconds": round(time.perf_counter() - start, 2), "bytes": _folder_bytes(folder),
                  "id": uuid.uuid4().hex},
    }
    # federation.json last: its presence marks a complete build.
    (folder / FEDERATION_FILE).write_text(json.dumps(info, indent=1))
    return info


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive advisory lock on ``lock_path`` (waiting, with a log line, if taken)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("phantoms: another process is building %s; waiting for it", lock_path.name[1:-5])
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _differences(found: dict, spec: dict) -> str:
    return ", ".join(f"{k}: {found.get(k)!r} here, {v!r} asked" for k, v in spec.items() if found.get(k) != v)


def _build(out_dir, spec: dict, overwrite: bool, workers: int = 1) -> tuple[Path, bool]:
    out = Path(out_dir).expanduser().absolute()
    existing = read_federation(out)
    if existing is not None and existing.get("spec") == spec and not overwrite:
        return out, False
    with _exclusive(out.parent / f".{out.name}.lock"):
        existing = read_federation(out)
        if existing is not None and existing.get("spec") == spec and not overwrite:
            return out, False  # another process finished it while we waited
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            found = (existing or {}).get("spec")
            what = f"a different phantom federation ({_differences(found, spec)})" if found else "other files"
            raise FileExistsError(f"{out} already holds {what}; choose another folder or overwrite it (--force)")
        for stale in out.parent.glob(f".{out.name}.building-*"):  # left by a crashed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            _build_into(tmp, spec, max(1, int(workers)))
            # Without a working lock (no fcntl, some network file systems) another builder of
            # the same spec may have finished first: keep its tree, readers may be using it.
            winner = read_federation(out)
            if winner is not None and winner.get("spec") == spec and not overwrite:
                shutil.rmtree(tmp, ignore_errors=True)
                return out, False
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
            os.replace(tmp, out)
            if old is not None:
                _remove(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out, True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def build_federation(out_dir, preset: str = DEFAULT_PRESET, overwrite: bool = False, workers: int = 1,
                     **spec_args) -> Path:
    """Build a phantom federation at ``out_dir`` and return its path.

    Writes ``<out_dir>/<site>/...`` BraTS-named cases (a modality a site lacks has no file), a
    full-modal held-out ``<out_dir>/test/`` and ``<out_dir>/federation.json``. The tree is
    built in a temporary sibling folder and renamed into place; concurrent builders of the same
    folder wait for one another, and a complete federation of the same spec is reused.

    Args:
        out_dir: the federation's root folder.
        preset: a :data:`PRESETS` name.
        overwrite: replace a different federation (or other files) found at ``out_dir``.
        workers: processes generating cases; the data do not depend on it. More than 1 starts
            fresh interpreters (multiprocessing "spawn"), so a calling script needs the usual
            ``if __name__ == "__main__":`` guard.
        **spec_args: the rest of the spec, by keyword (one definition, in ``_spec``):

            - seed: the seed every case derives from (default 0).
            - shape: grid over 240 x 240 x 155 mm (default ``DEFAULT_SHAPE``); (240, 240, 155)
              is BraTS's 1 mm grid.
            - layout: BraTS release naming and ET label (:data:`fedmodal.data.layouts.RELEASES`,
              default ``DEFAULT_LAYOUT``).
            - cases_per_site: training cases per site (an int for all, or site -> count);
              default: the preset's.
            - test_cases: size of the held-out test set; default: the preset's.

    Raises:
        FileExistsError: ``out_dir`` holds something else and ``overwrite`` is False.
    """
    return _build(out_dir, _spec(preset, **spec_args), overwrite, workers)[0]


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDMODAL_CACHE") or Path.home() / ".cache" / "fedmodal").expanduser()


def _root_of(spec: dict) -> Path:
    if os.environ.get("FEDMODAL_PHANTOM_ROOT"):
        return Path(os.environ["FEDMODAL_PHANTOM_ROOT"]).expanduser()
    preset = PRESETS[spec["preset"]]
    name = f"{spec['preset']}-seed{spec['seed']}-{'x'.join(map(str, spec['shape']))}-{spec['layout']}"
    counts = [spec["cases_per_site"], spec["test_cases"]]
    if counts != [preset.cases_per_site, preset.test_cases]:
        name += f"-n{zlib.crc32(json.dumps(counts, sort_keys=True).encode()):08x}"
    return _cache_dir() / "phantoms" / f"{name}-v{GENERATOR_VERSION}"


def default_root(preset: str = DEFAULT_PRESET, **spec_args) -> Path:
    """Where a federation lives by default (``spec_args`` as :func:`build_federation`).

    ``$FEDMODAL_PHANTOM_ROOT`` if set; else ``$FEDMODAL_CACHE/phantoms/<name>`` (the cache
    defaults to ``~/.cache/fedmodal``), the name spelling out the spec so that different
    federations never share a folder (and one spec always maps to one folder).
    """
    return _root_of(_spec(preset, **spec_args))


def ensure_federation(preset: str = DEFAULT_PRESET, root=None, **spec_args) -> Path:
    """Return the root of the federation of this spec, building it on first use.

    Safe to call from several processes at once (the FLARE simulator starts every site
    together): one builds, the others wait and reuse its result.

    Args:
        preset, spec_args (seed, shape, layout, cases_per_site, test_cases): as
            :func:`build_federation`.
        root: where it lives; default :func:`default_root`.
    """
    spec = _spec(preset, **spec_args)
    path, built = _build(_root_of(spec) if root is None else root, spec, overwrite=False)
    if built:
        logger.info("phantoms: built %s federation at %s", preset, path)
    return path


# --------------------------------------------------------------------------------------------
# Command line: fedmodal phantoms.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fedmodal phantoms``."""
    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help=presets)
    parser.add_argument("--out", default=None, help="root folder (default: $FEDMODAL_PHANTOM_ROOT or the cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed every case derives from (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=list(DEFAULT_SHAPE),
                        help="grid over 240x240x155 mm (default 96 96 62, 2.5 mm; 240 240 155 is 1 mm)")
    parser.add_argument("--layout", default=DEFAULT_LAYOUT, choices=list(RELEASES),
                        help="BraTS release naming and ET label (default brats2021)")
    parser.add_argument("--cases-per-site", type=int, default=None, help="training cases per site (default: preset's)")
    parser.add_argument("--test-cases", type=int, default=None, help="held-out full-modal test cases (default: 10)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes generating cases (default 1; each extra one costs ~3 s to start)")
    parser.add_argument("--force", action="store_true", help="replace whatever is at --out")


def run(args: argparse.Namespace) -> int:
    """Build (or reuse) a federation and say where it is, how long it took and its size."""
    spec = _spec(args.preset, args.seed, args.shape, args.layout, args.cases_per_site, args.test_cases)
    out = Path(args.out) if args.out else _root_of(spec)
    start = time.perf_counter()
    try:
        root, built = _build(out, spec, overwrite=args.force, workers=args.workers)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    info = read_federation(root)
    size = info["build"]["bytes"]
    n_cases = sum(s["cases"] for s in info["sites"].values()) + (info["test"] or {}).get("cases", 0)
    verb = "built" if built else "reused (already complete)"
    print(f"{verb} {args.preset} phantom federation at {root}")
    print(f"  {seconds:.1f} s, {size / 1e6:.1f} MB, {n_cases} cases ({size / max(n_cases, 1) / 1e6:.2f} MB per case), "
          f"shape {info['shape']} at {info['spacing'][0]:g}x{info['spacing'][1]:g}x{info['spacing'][2]:g} mm, "
          f"layout {info['layout']} (ET={info['et_label']})")
    for site, s in info["sites"].items():
        missing = f", missing {','.join(s['missing'])}" if s["missing"] else ""
        print(f"  {site:<8} {s['cases']:>3} cases  {','.join(s['modalities'])}{missing}")
    if info["test"]:
        print(f"  {TEST_SITE:<8} {info['test']['cases']:>3} cases  {','.join(info['test']['modalities'])} (held out)")
    return 0
