"""The BraTS-like grid and the MNI152 template anatomy sampled on it."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFAULT_SHAPE = (96, 96, 62)
BRATS_FOV_MM = (240.0, 240.0, 155.0)
# MNI coordinate (mm) of the centre of the field of view: the brain, cerebellum included.
FOV_CENTRE_MNI = (0.0, -17.0, 8.0)


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


def grid_axes(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple((affine[a, 3] + affine[a, a] * np.arange(shape[a])).astype(np.float32) for a in range(3))


@dataclass
class Template:
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
def template_maps(blur_mm: float) -> Template:
    """The MNI152 maps pre-blurred by ``blur_mm`` (anti-aliasing for coarse grids)."""
    gm, wm, mask, origin = _mni152()
    return Template(
        gm=ndimage.gaussian_filter(gm, max(blur_mm, 0.4)),
        wm=ndimage.gaussian_filter(wm, max(blur_mm, 0.4)),
        brain=ndimage.gaussian_filter(mask.astype(np.float32), max(blur_mm, 0.8)),  # soften the staircase
        depth=_depth(),
        origin=origin,
    )


def antialias_mm(spacing) -> float:
    # Gaussian sigma whose FWHM is about a voxel beyond the template's own 1 mm.
    return round(0.42 * float(np.sqrt(max(max(spacing) ** 2 - 1.0, 0.0))), 2)


def sample_template(volume: np.ndarray, template: Template, q: np.ndarray) -> np.ndarray:
    """Linear interpolation of a template map at MNI points ``q`` (3, ...)."""
    coords = q - template.origin.reshape((3,) + (1,) * (q.ndim - 1)).astype(np.float32)
    return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, prefilter=False)
