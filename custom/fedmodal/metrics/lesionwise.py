"""BraTS 2023+ lesion-wise Dice and HD95: each tumour lesion scored on its own, missed and
spurious lesions penalised, as the challenges have ranked since 2023.

The rules, per region (WT, TC, ET) of one case, as the challenge published them:

1. Lesions are the 26-connected components of the truth and of the prediction.
2. Truth components whose masks, dilated `dilation` times with the 18-connected cross, touch
   are one lesion (its undilated voxels): a lesion split by a thin gap stays one lesion.
3. Each truth lesion, dilated the same way, matches every predicted component that touches
   it (a component can match several lesions); the lesion is scored against the union of its
   matched components: Dice, and HD95 (the larger of the two directed 95th percentiles of the
   surface distances, each surface element weighted by its area, in mm). A lesion nothing
   matches scores Dice 0 and HD95 374 mm.
4. Predicted components matching no truth lesion are false positives: Dice 0, HD95 374 each.
5. Truth lesions of at most `min_volume` mm^3 are then dropped (too small to rank on); what
   they matched is not counted as a false positive.
6. Lesion-wise Dice = sum of the kept lesions' Dice / (kept lesions + false positives), HD95
   the same with the penalties; no kept lesion and no false positive scores Dice 1, HD95 0.

Dilation and volume threshold depend on the tumour type (`TUMOUR_RULES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fedmodal.metrics.arrays import ArrayLike, as_bool, check_pair, spacing_tuple
from fedmodal.metrics.segmentation import surfel_distances

LESION_METRICS = ("lesion_dice", "lesion_hd95")
LESION_COUNTS = ("lesion_tp", "lesion_fn", "lesion_fp")
# What a missed or spurious lesion costs in HD95 (mm), as the 2023+ challenges score it.
LESION_HD95_PENALTY = 374.0


@dataclass(frozen=True)
class LesionRules:
    """How one tumour type's lesions are told apart and which are too small to count.

    Args:
        dilation: iterations of the 18-connected dilation that joins and matches lesions.
        min_volume: truth lesions of at most this volume (mm^3) are not scored.
    """

    dilation: int
    min_volume: float


# Per BraTS 2023 challenge: adult glioma, sub-Saharan Africa, paediatric, meningioma, metastases.
TUMOUR_RULES = {
    "GLI": LesionRules(dilation=3, min_volume=50.0),
    "SSA": LesionRules(dilation=3, min_volume=50.0),
    "PED": LesionRules(dilation=3, min_volume=50.0),
    "MEN": LesionRules(dilation=1, min_volume=50.0),
    "MET": LesionRules(dilation=1, min_volume=2.0),
}


def tumour_rules(tumour: str) -> LesionRules:
    """The rules of a tumour type ("GLI", "MET", ...), refusing an unknown one by name."""
    key = tumour.upper()
    if key not in TUMOUR_RULES:
        raise ValueError(f"unknown tumour type {tumour!r} for lesion-wise scores; known: {sorted(TUMOUR_RULES)}")
    return TUMOUR_RULES[key]


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    full = ndimage.generate_binary_structure(mask.ndim, mask.ndim)  # 26-connected in 3D
    return ndimage.label(mask, structure=full)


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    if iterations <= 0:
        return mask
    cross = ndimage.generate_binary_structure(mask.ndim, mask.ndim - 1)  # 18-connected in 3D
    return ndimage.binary_dilation(mask, structure=cross, iterations=iterations)


def _widen(box: tuple[slice, ...], by: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(0, b.start - by), min(n, b.stop + by)) for b, n in zip(box, shape))


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0])))


def area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """The distance below which `percent` % of the surface area lies (no interpolation)."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / np.sum(areas)
    index = min(int(np.searchsorted(cumulative, percent / 100.0)), len(order) - 1)
    return float(distances[order][index])


def lesion_hd95(pred: np.ndarray, true: np.ndarray, spacing: Sequence[float]) -> float:
    """The larger of the two directed 95th percentiles of the surface distances (mm), each
    surface element weighted by its area, as the challenge's code measures."""
    forward, backward = surfel_distances(pred, true, spacing)
    return max(area_percentile(*forward, 95), area_percentile(*backward, 95))


def lesion_scores(
    pred_mask: ArrayLike,
    true_mask: ArrayLike,
    spacing: float | Sequence[float] | None = None,
    rules: LesionRules = TUMOUR_RULES["GLI"],
) -> dict[str, float]:
    """Lesion-wise Dice and HD95 of one binary region, with the lesion counts.

    Returns:
        {"lesion_dice", "lesion_hd95", "lesion_tp" (kept lesions matched), "lesion_fn" (kept
        lesions missed), "lesion_fp" (spurious predicted components)}.
    """
    pred, true = as_bool(pred_mask), as_bool(true_mask)
    check_pair(pred, true)
    if pred.ndim != 3:
        raise ValueError(f"lesion-wise scores are defined on 3D label maps, got {pred.ndim}D")
    sp = spacing_tuple(spacing, pred.ndim)
    voxel_volume = float(np.prod(sp))
    pred_components, n_pred = _components(pred)
    pred_boxes = ndimage.find_objects(pred_components)
    # Truth components joined where their dilations touch: label the dilated mask, keep the truth voxels.
    joined, n_lesions = _components(_dilate(true, rules.dilation))
    lesions = np.where(true, joined, 0)
    matched: set[int] = set()
    dice_sum, hd_sum, tp, fn = 0.0, 0.0, 0, 0
    # Each lesion is handled inside its own box (the joined component, which holds the lesion's
    # dilation, widened by one more dilation for the matching): cost grows with lesion size,
    # not with the volume times the number of lesions.
    for lesion_id, box in enumerate(ndimage.find_objects(joined), start=1):
        near = _widen(box, rules.dilation, pred.shape)
        lesion = lesions[near] == lesion_id
        if not lesion.any():
            continue
        touching = np.unique(pred_components[near][_dilate(lesion, rules.dilation) & pred[near]])
        touching = touching[touching > 0]
        matched.update(int(t) for t in touching)
        if lesion.sum() * voxel_volume <= rules.min_volume:
            continue  # too small to score; what it matched is not spurious either
        if touching.size == 0:
            fn += 1
            hd_sum += LESION_HD95_PENALTY
            continue
        # The matched components may reach past the box: score in the box holding them all.
        whole = _union_box([near, *(pred_boxes[t - 1] for t in touching)])
        lesion = lesions[whole] == lesion_id
        union = np.isin(pred_components[whole], touching)
        dice_sum += 2.0 * np.logical_and(lesion, union).sum() / (lesion.sum() + union.sum())
        hd_sum += lesion_hd95(union, lesion, sp)
        tp += 1
    fp = n_pred - len(matched)
    scored = tp + fn + fp
    if scored == 0:
        dice, hd = 1.0, 0.0
    else:
        dice, hd = dice_sum / scored, (hd_sum + LESION_HD95_PENALTY * fp) / scored
    return {"lesion_dice": float(dice), "lesion_hd95": float(hd), "lesion_tp": tp, "lesion_fn": fn, "lesion_fp": fp}
