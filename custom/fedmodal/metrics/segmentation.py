"""BraTS-convention segmentation metrics: per region WT/TC/ET, Dice, sensitivity, specificity, HD95.

HD95 is computed the way the BraTS evaluation does it: the 95th percentile of the *pooled*
symmetric surface distances (prediction->truth and truth->prediction together), in mm.
MONAI's ``HausdorffDistanceMetric(percentile=95)`` instead takes the maximum of the two
directed 95th percentiles, which can differ a lot when the prediction has a small distant
false positive; we only borrow MONAI's edge extraction and surface distances
(``monai.metrics.utils.get_edge_surface_distance``) and pool them ourselves.

Labels are canonical inside fedmodal (ET = 3); pass ``et_label=4`` for raw BraTS 2018-2021
label maps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance

from fedmodal.brats import ENHANCING, REGIONS, region_labels
from fedmodal.metrics.arrays import ArrayLike, as_bool, check_pair, spacing_tuple, to_numpy

SEGMENTATION_METRICS = ("dice", "sensitivity", "specificity", "hd95")

# BraTS penalty when exactly one of prediction/truth is empty: the diagonal of the
# 240 x 240 x 155 (1 mm) volume, sqrt(240^2 + 240^2 + 155^2) = 373.129 mm.
HD95_EMPTY_PENALTY = 373.13


def brats_regions(label: ArrayLike, et_label: int = ENHANCING) -> dict[str, np.ndarray]:
    """Split a BraTS label map into the three evaluation regions.

    WT (whole tumour) = {1, 2, ET}, TC (tumour core) = {1, ET}, ET (enhancing tumour) = {ET}.
    Any other value (e.g. a resection cavity not mapped away) counts as background.

    Args:
        label: integer label map, any shape (numpy array or torch tensor).
        et_label: the value of enhancing tumour: 3 (canonical inside fedmodal, BraTS 2023+)
            or 4 (raw BraTS 2018-2021 files).

    Returns:
        dict "WT"/"TC"/"ET" -> boolean array of the label's shape.
    """
    lab = to_numpy(label)
    return {region: np.isin(lab, region_labels(region, et_label)) for region in REGIONS}


def overlap_scores(pred_mask: ArrayLike, true_mask: ArrayLike) -> dict[str, float]:
    """Dice, sensitivity and specificity of one binary region, over the whole array.

    Empty rules (coded explicitly so means over cases stay finite and comparable):

    - truth empty and prediction empty: Dice 1, sensitivity 1 (nothing to find, nothing missed).
    - truth empty, prediction not: Dice 0, sensitivity 0 (mirrors the Dice rule; a hallucinated
      region is penalised the same way in both overlap scores).
    - prediction empty, truth not: Dice 0, sensitivity 0 (follows from the formulas).
    - specificity TN / (TN + FP) is only undefined when the truth covers the whole array; then
      there are no negatives to get wrong and it is 1.

    Specificity is computed over every voxel of the array (BraTS convention), so it is close
    to 1 for whole volumes.

    Args:
        pred_mask: predicted binary mask (non-zero = foreground).
        true_mask: reference binary mask of the same shape.

    Returns:
        dict with "dice", "sensitivity", "specificity" as floats.
    """
    pred = as_bool(pred_mask)
    true = as_bool(true_mask)
    if pred.shape != true.shape:
        raise ValueError(f"prediction and truth must have the same shape, got {pred.shape} and {true.shape}.")
    # Counts in int64 to stay exact on whole volumes.
    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred & ~true))
    fn = int(np.count_nonzero(~pred & true))
    tn = int(pred.size) - tp - fp - fn
    n_true, n_pred = tp + fn, tp + fp
    if n_true == 0:
        dice = sens = 1.0 if n_pred == 0 else 0.0
    else:
        dice = 2.0 * tp / (n_true + n_pred)
        sens = tp / n_true
    spec = 1.0 if tn + fp == 0 else tn / (tn + fp)
    return {"dice": float(dice), "sensitivity": float(sens), "specificity": float(spec)}


def directed_surface_distances(
    pred_mask: ArrayLike, true_mask: ArrayLike, spacing: float | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances between two non-empty binary masks, in mm, one array per direction.

    The surface of a mask is the mask minus its erosion (face connectivity); each surface
    voxel of the prediction has its distance to the nearest truth surface voxel
    (prediction -> truth), and each truth surface voxel its distance to the prediction's.

    Args:
        pred_mask: predicted binary mask, 2D or 3D.
        true_mask: reference binary mask of the same shape.
        spacing: voxel size in mm: None (1 mm), a scalar, or one value per axis.

    Returns:
        (prediction -> truth, truth -> prediction) 1D float64 arrays.

    Raises:
        ValueError: if either mask is empty (the distances are undefined; see :func:`hd95`).
    """
    pred = as_bool(pred_mask)
    true = as_bool(true_mask)
    check_pair(pred, true)
    if not pred.any() or not true.any():
        raise ValueError("surface distances are undefined when a mask is empty; use hd95() for the BraTS rules.")
    sp = spacing_tuple(spacing, pred.ndim)
    # MONAI crops to the union bounding box, extracts edges by erosion and measures the
    # euclidean distance with the spacing; symmetric=True returns (pred->true, true->pred).
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated `always_return_as_numpy` to get_mask_edges
        # internally and warns about it on every call; nothing for our callers to act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        _, distances, _ = get_edge_surface_distance(
            torch.from_numpy(pred),
            torch.from_numpy(true),
            distance_metric="euclidean",
            spacing=sp,
            symmetric=True,
            warn_empty=False,
        )
    forward, backward = (to_numpy(d).astype(np.float64).ravel() for d in distances)
    return forward, backward


def surfel_distances(
    pred_mask: ArrayLike, true_mask: ArrayLike, spacing: float | Sequence[float] | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Surface distances with each surface element's area, per direction, in mm and mm^2 (3D).

    DeepMind's `surface_distance`, which the BraTS 2023 lesion-wise code uses: the surface lies
    between voxels, on the grid of voxel corners; each corner's 2x2x2 neighbourhood code gives
    its surface element's area (MONAI's port of DeepMind's table) and the distances are taken
    on that grid. (MONAI's own `use_subvoxels` distances differ from it by up to 2 mm on the
    reference cases.)

    Returns:
        ((prediction -> truth distances, prediction's element areas), (truth -> prediction, truth's)).
    """
    from monai.metrics.utils import ENCODING_KERNEL, create_table_neighbour_code_to_surface_area
    from scipy import ndimage

    pred, true = as_bool(pred_mask), as_bool(true_mask)
    check_pair(pred, true)
    if pred.ndim != 3:
        raise ValueError(f"surface elements are defined for 3D masks, got {pred.ndim}D")
    if not pred.any() or not true.any():
        raise ValueError("surface distances are undefined when a mask is empty; use hd95() for the BraTS rules.")
    sp = spacing_tuple(spacing, 3)
    areas_of_code = create_table_neighbour_code_to_surface_area(sp)[0].numpy().astype(np.float64)
    kernel = np.asarray(ENCODING_KERNEL[3])
    found = np.argwhere(pred | true)
    low, high = found.min(0), found.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(low, high))

    def corners(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        padded = np.zeros(tuple(high - low + 1), np.uint8)  # one zero layer past the high side
        padded[:-1, :-1, :-1] = mask[box]
        code = ndimage.correlate(padded, kernel, mode="constant", cval=0)
        return (code != 0) & (code != len(areas_of_code) - 1), code

    border_pred, code_pred = corners(pred)
    border_true, code_true = corners(true)
    to_true = ndimage.distance_transform_edt(~border_true, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~border_pred, sampling=sp)
    return (
        (to_true[border_pred], areas_of_code[code_pred[border_pred]]),
        (to_pred[border_true], areas_of_code[code_true[border_true]]),
    )


def surface_distances(
    pred_mask: ArrayLike, true_mask: ArrayLike, spacing: float | Sequence[float] | None = None
) -> np.ndarray:
    """Pooled symmetric surface distances between two non-empty binary masks, in mm: both
    directions of :func:`directed_surface_distances` concatenated, which is what BraTS' HD95
    takes a percentile of (length #pred surface voxels + #truth surface voxels)."""
    return np.concatenate(directed_surface_distances(pred_mask, true_mask, spacing))


def hd95(
    pred_mask: ArrayLike,
    true_mask: ArrayLike,
    spacing: float | Sequence[float] | None = None,
    empty_penalty: float = HD95_EMPTY_PENALTY,
) -> float:
    """95th percentile Hausdorff distance, the BraTS way (pooled symmetric surface distances).

    Rules: both masks empty -> 0; exactly one empty -> ``empty_penalty`` (373.13 mm, the
    diagonal of a 240x240x155 1 mm volume); otherwise ``np.percentile(d, 95)`` (linear
    interpolation) over the pooled distances of :func:`surface_distances`.

    Args:
        pred_mask: predicted binary mask, 2D or 3D (numpy array or torch tensor).
        true_mask: reference binary mask of the same shape.
        spacing: voxel size in mm: None (1 mm), a scalar, or one value per axis (anisotropic
            spacing is supported).
        empty_penalty: value returned when exactly one mask is empty.

    Returns:
        HD95 in mm as a float.
    """
    pred = as_bool(pred_mask)
    true = as_bool(true_mask)
    check_pair(pred, true)
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not has_pred and not has_true:
        return 0.0
    if has_pred != has_true:
        return float(empty_penalty)
    return float(np.percentile(surface_distances(pred, true, spacing), 95))


def segmentation_scores(
    pred_label: ArrayLike,
    true_label: ArrayLike,
    spacing: float | Sequence[float] | None = None,
    et_label: int = ENHANCING,
    regions: Sequence[str] = REGIONS,
    lesion_wise=None,
) -> dict[str, dict[str, float]]:
    """Per-region Dice, sensitivity, specificity and HD95 of one case (and, with `lesion_wise`,
    the BraTS 2023+ lesion-wise scores beside them).

    Args:
        pred_label: predicted label map (2D or 3D), values in the same convention as
            ``true_label``.
        true_label: reference label map of the same shape.
        spacing: voxel size in mm: None (1 mm), a scalar, or one value per axis.
        et_label: value of enhancing tumour (3 canonical, 4 for raw BraTS 2018-2021).
        regions: which of "WT", "TC", "ET" to score.
        lesion_wise: a tumour type's `fedmodal.metrics.lesionwise.LesionRules` (e.g.
            `TUMOUR_RULES["GLI"]`) to add "lesion_dice", "lesion_hd95" and the lesion counts.

    Returns:
        dict region -> dict("dice", "sensitivity", "specificity", "hd95"[, lesion-wise]) of floats.
    """
    pred = to_numpy(pred_label)
    true = to_numpy(true_label)
    check_pair(pred, true)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; expected a subset of {REGIONS}.")
    sp = spacing_tuple(spacing, pred.ndim)
    pred_regions = brats_regions(pred, et_label)
    true_regions = brats_regions(true, et_label)
    scores: dict[str, dict[str, float]] = {}
    for region in regions:
        p, t = pred_regions[region], true_regions[region]
        scores[region] = {**overlap_scores(p, t), "hd95": hd95(p, t, sp)}
        if lesion_wise is not None:
            from fedmodal.metrics.lesionwise import lesion_scores  # it builds on this module

            scores[region].update(lesion_scores(p, t, sp, lesion_wise))
    return scores
