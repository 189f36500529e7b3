"""One phantom case: deformed anatomy, a tumour, and every modality through the site's scanner."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmodal.brats import ENHANCING, LABEL_NAMES, MODALITIES, NECROSIS, OEDEMA
from fedmodal.data.phantoms.anatomy import Anatomy
from fedmodal.data.phantoms.fields import Lattice, sigmoid
from fedmodal.data.phantoms.grid import (
    DEFAULT_SHAPE,
    antialias_mm,
    grid_affine,
    grid_axes,
    sample_template,
    template_maps,
)
from fedmodal.data.phantoms.scanner import ScannerProfile, scan, site_profile
from fedmodal.data.phantoms.streams import CASE_STREAM, stream
from fedmodal.data.phantoms.tumour import Tumour

# Relative intensity of each tissue per modality, before the scanner's contrast curve.
TISSUE_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"wm": 0.80, "gm": 0.58, "csf": 0.18, "oedema": 0.50, "necrosis": 0.26, "enhancing": 0.56},
    "t1ce": {"wm": 0.80, "gm": 0.60, "csf": 0.20, "oedema": 0.52, "necrosis": 0.28, "enhancing": 1.45},
    "t2": {"wm": 0.36, "gm": 0.55, "csf": 1.00, "oedema": 0.92, "necrosis": 1.00, "enhancing": 0.62},
    "flair": {"wm": 0.45, "gm": 0.62, "csf": 0.10, "oedema": 1.00, "necrosis": 0.50, "enhancing": 0.75},
}
# How much of the underlying tissue still shows through oedema (it infiltrates, it does not replace).
OEDEMA_TISSUE_SHARE = 0.2


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
    axes = grid_axes(affine, shape)
    tpl = template_maps(antialias_mm(spacing))

    # Every draw that does not depend on the grid comes first, in a fixed order.
    rng = stream(seed, CASE_STREAM, site, index)
    anatomy = Anatomy(rng)
    tumour = Tumour(rng, profile, spacing, anatomy, tpl)
    texture = Lattice(8.0)
    texture_coef = texture.draw(rng, 2)  # normal tissue, tumour
    bias = Lattice(80.0)
    bias_coef = bias.draw(rng, len(MODALITIES))
    jitter = {m: {t: float(rng.normal(1.0, 0.03)) for t in TISSUE_CONTRAST[m]} for m in MODALITIES}

    # Deformed anatomy.
    q = anatomy.grid(axes, tumour.centre, tumour.radius, tumour.mass_effect)
    gm, wm, brain_p = (sample_template(v, tpl, q) for v in (tpl.gm, tpl.wm, tpl.brain))
    own_side = sigmoid(tumour.side * q[0] / np.float32(2.0))  # the tumour's hemisphere, soft
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
    noise_rng = stream(seed, CASE_STREAM + 100, site, index)  # the only stream sized by the grid
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
        images[m] = scan(img, brain, profile, m, spacing, bias.on_grid(bias_coef[k], axes), noise_rng)

    info = {**tumour.info(), "voxels": {name: int((label == v).sum()) for v, name in LABEL_NAMES.items()}}
    return PhantomCase(images, label, {"gm": gm, "wm": wm, "csf": csf}, brain, affine, spacing, info)
