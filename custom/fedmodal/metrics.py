"""BraTS-convention segmentation metrics and masked synthesis metrics.

Segmentation (per case, per region WT/TC/ET): Dice, sensitivity, specificity and HD95, with
HD95 computed the way the BraTS evaluation does it: the 95th percentile of the *pooled*
symmetric surface distances (prediction->truth and truth->prediction together), in mm.
MONAI's ``HausdorffDistanceMetric(percentile=95)`` instead takes the maximum of the two
directed 95th percentiles, which can differ a lot when the prediction has a small distant
false positive; we only borrow MONAI's edge extraction and surface distances
(``monai.metrics.utils.get_edge_surface_distance``) and pool them ourselves.

Synthesis (paired 2D slices or 3D volumes in [-1, 1]): MAE, PSNR and SSIM inside the brain.

Labels are canonical inside fedmodal (ET = 3); pass ``et_label=4`` for raw BraTS 2018-2021
label maps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs
from monai.metrics.utils import get_edge_surface_distance

__all__ = [
    "REGIONS",
    "SEGMENTATION_METRICS",
    "SYNTHESIS_METRICS",
    "HD95_EMPTY_PENALTY",
    "brats_regions",
    "overlap_scores",
    "surface_distances",
    "hd95",
    "segmentation_scores",
    "synthesis_scores",
    "summarise",
    "format_table",
]

REGIONS = ("WT", "TC", "ET")
SEGMENTATION_METRICS = ("dice", "sensitivity", "specificity", "hd95")
SYNTHESIS_METRICS = ("mae", "psnr", "ssim")

# BraTS penalty when exactly one of prediction/truth is empty: the diagonal of the
# 240 x 240 x 155 (1 mm) volume, sqrt(240^2 + 240^2 + 155^2) = 373.129 mm.
HD95_EMPTY_PENALTY = 373.13

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_bool(x: Any) -> np.ndarray:
    arr = _to_numpy(x)
    return arr if arr.dtype == bool else arr != 0


def _check_pair(a: np.ndarray, b: np.ndarray, names: str = "prediction and truth") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}.")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D array, got shape {a.shape}.")


def _spacing_tuple(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Normalise ``spacing`` (None, a scalar or one value per axis) to ``ndim`` floats."""
    if spacing is None:
        return (1.0,) * ndim
    values = np.atleast_1d(_to_numpy(spacing)).astype(float).ravel()
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise ValueError(f"spacing must have one value per axis ({ndim}), got {tuple(values)}.")
    if np.any(values <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(values)}.")
    return tuple(float(v) for v in values)


# --------------------------------------------------------------------------- segmentation


def brats_regions(label: ArrayLike, et_label: int = 3) -> dict[str, np.ndarray]:
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
    lab = _to_numpy(label)
    et = lab == et_label
    tc = (lab == 1) | et
    wt = tc | (lab == 2)
    return {"WT": wt, "TC": tc, "ET": et}


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
    pred = _as_bool(pred_mask)
    true = _as_bool(true_mask)
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


def surface_distances(
    pred_mask: ArrayLike, true_mask: ArrayLike, spacing: float | Sequence[float] | None = None
) -> np.ndarray:
    """Pooled symmetric surface distances between two non-empty binary masks, in mm.

    The surface of a mask is the mask minus its erosion (face connectivity); each surface
    voxel of the prediction contributes its distance to the nearest truth surface voxel and
    vice versa. Both directions are returned concatenated, which is what BraTS' HD95 takes a
    percentile of.

    Args:
        pred_mask: predicted binary mask, 2D or 3D.
        true_mask: reference binary mask of the same shape.
        spacing: voxel size in mm: None (1 mm), a scalar, or one value per axis.

    Returns:
        1D float64 array of length (#pred surface voxels + #truth surface voxels).

    Raises:
        ValueError: if either mask is empty (the distances are undefined; see :func:`hd95`).
    """
    pred = _as_bool(pred_mask)
    true = _as_bool(true_mask)
    _check_pair(pred, true)
    if not pred.any() or not true.any():
        raise ValueError("surface distances are undefined when a mask is empty; use hd95() for the BraTS rules.")
    sp = _spacing_tuple(spacing, pred.ndim)
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
    return np.concatenate([_to_numpy(d).astype(np.float64).ravel() for d in distances])


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
    pred = _as_bool(pred_mask)
    true = _as_bool(true_mask)
    _check_pair(pred, true)
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
    et_label: int = 3,
    regions: Sequence[str] = REGIONS,
) -> dict[str, dict[str, float]]:
    """Per-region Dice, sensitivity, specificity and HD95 of one case.

    Args:
        pred_label: predicted label map (2D or 3D), values in the same convention as
            ``true_label``.
        true_label: reference label map of the same shape.
        spacing: voxel size in mm: None (1 mm), a scalar, or one value per axis.
        et_label: value of enhancing tumour (3 canonical, 4 for raw BraTS 2018-2021).
        regions: which of "WT", "TC", "ET" to score.

    Returns:
        dict region -> dict("dice", "sensitivity", "specificity", "hd95") of floats.
    """
    pred = _to_numpy(pred_label)
    true = _to_numpy(true_label)
    _check_pair(pred, true)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; expected a subset of {REGIONS}.")
    sp = _spacing_tuple(spacing, pred.ndim)
    pred_regions = brats_regions(pred, et_label)
    true_regions = brats_regions(true, et_label)
    scores: dict[str, dict[str, float]] = {}
    for region in regions:
        p, t = pred_regions[region], true_regions[region]
        scores[region] = {**overlap_scores(p, t), "hd95": hd95(p, t, sp)}
    return scores


# --------------------------------------------------------------------------- synthesis


def _squeeze_leading(x: np.ndarray) -> np.ndarray:
    # Slice datasets carry a singleton channel, e.g. (1, S, S); treat it as a 2D slice.
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    return x


def synthesis_scores(
    fake: ArrayLike,
    real: ArrayLike,
    brain: ArrayLike,
    data_range: float = 2.0,
    win_size: int = 11,
    kernel_sigma: float = 1.5,
    background: float = -1.0,
    max_psnr: float | None = None,
) -> dict[str, float]:
    """MAE, PSNR and SSIM of a synthetic image against the real one, inside the brain mask.

    - MAE: mean |fake - real| over brain voxels, in image units (images in [-1, 1]; halve it
      for the [0, 1] convention).
    - PSNR: ``10 log10(data_range^2 / MSE)`` with the MSE over brain voxels. Identical images
      give MSE 0 and PSNR ``inf`` unless ``max_psnr`` caps it.
    - SSIM: Gaussian-window SSIM map (MONAI's ``compute_ssim_and_cs``, window ``win_size``,
      sigma ``kernel_sigma``, k1 0.01, k2 0.03) averaged over brain voxels. Before the map is
      computed both images are set to ``background`` outside the brain and padded with it,
      so every brain voxel has a full window and nothing outside the brain can change any
      score.

    Args:
        fake: synthetic image, 2D (H, W) or 3D (X, Y, Z); leading singleton axes are dropped.
        real: real image of the same shape.
        brain: brain mask of the same shape (non-zero = brain).
        data_range: value range of the images (2 for [-1, 1]).
        win_size: SSIM window size per axis (odd).
        kernel_sigma: standard deviation of the SSIM Gaussian window.
        background: value the images take outside the brain (-1 after
            ``normalise_for_synthesis``).
        max_psnr: optional cap for PSNR (e.g. 100 dB) to keep means finite; None keeps inf.

    Returns:
        dict with "mae", "psnr", "ssim" as floats.
    """
    f = _squeeze_leading(_to_numpy(fake).astype(np.float64))
    r = _squeeze_leading(_to_numpy(real).astype(np.float64))
    m = _squeeze_leading(_as_bool(brain))
    _check_pair(f, r, "fake and real")
    _check_pair(f, m, "images and brain mask")
    if not m.any():
        raise ValueError("the brain mask is empty: there is nothing to score.")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}.")

    diff = f[m] - r[m]
    mae = float(np.mean(np.abs(diff)))
    mse = float(np.mean(diff**2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
    if max_psnr is not None:
        psnr = min(psnr, float(max_psnr))

    # Outside the brain both images become the same constant, so the window statistics at
    # the brain edge cannot depend on what lies outside it.
    f_in = np.where(m, f, background)
    r_in = np.where(m, r, background)
    half = win_size // 2
    f_pad = np.pad(f_in, half, mode="constant", constant_values=background)
    r_pad = np.pad(r_in, half, mode="constant", constant_values=background)
    ndim = f.ndim
    ssim_map, _ = compute_ssim_and_cs(
        torch.from_numpy(f_pad)[None, None],
        torch.from_numpy(r_pad)[None, None],
        spatial_dims=ndim,
        kernel_size=(win_size,) * ndim,
        kernel_sigma=(kernel_sigma,) * ndim,
        data_range=data_range,
    )
    # Valid convolution on the padded input: map voxel i is the window centred on voxel i.
    ssim = float(ssim_map[0, 0].numpy()[m].mean())
    return {"mae": mae, "psnr": float(psnr), "ssim": ssim}


# --------------------------------------------------------------------------- summaries


def summarise(scores: Sequence[Mapping[str, Any]], ddof: int = 0) -> dict[str, Any]:
    """Mean and standard deviation over cases of per-case score dicts.

    Works for the nested output of :func:`segmentation_scores` (region -> metric -> value)
    and the flat output of :func:`synthesis_scores` (metric -> value). NaN values are left
    out (``n`` says how many cases count); ``inf`` (e.g. PSNR of identical images) is kept.

    Args:
        scores: one score dict per case, all with the same keys.
        ddof: delta degrees of freedom of the std (0 = population std, as ``np.std``).

    Returns:
        the same nesting with each value replaced by dict("mean", "std", "n").
    """
    if len(scores) == 0:
        raise ValueError("summarise() needs at least one case.")

    def _leaves(items: Sequence[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if isinstance(values[0], Mapping):
                out[key] = _leaves(values)
                continue
            arr = np.asarray(values, dtype=float)
            arr = arr[~np.isnan(arr)]
            if arr.size == 0:
                out[key] = {"mean": math.nan, "std": math.nan, "n": 0}
            else:
                with np.errstate(invalid="ignore"):  # std of values holding inf is nan
                    std = float(np.std(arr, ddof=ddof)) if arr.size > ddof else math.nan
                out[key] = {"mean": float(np.mean(arr)), "std": std, "n": int(arr.size)}
        return out

    return _leaves(scores)


_LABELS = {
    "dice": "Dice(%)",
    "sensitivity": "Sens(%)",
    "specificity": "Spec(%)",
    "hd95": "HD95(mm)",
    "mae": "MAE",
    "psnr": "PSNR(dB)",
    "ssim": "SSIM",
}
_PERCENT = {"dice", "sensitivity", "specificity"}
_DIGITS = {"dice": 1, "sensitivity": 1, "specificity": 1, "hd95": 2, "mae": 3, "psnr": 2, "ssim": 3}


def _is_leaf(x: Any) -> bool:
    return isinstance(x, Mapping) and "mean" in x


def _is_summary(x: Any) -> bool:
    """True for one :func:`summarise` output, False for a mapping name -> summary."""
    if not isinstance(x, Mapping) or not x:
        return False
    first = next(iter(x.values()))
    return _is_leaf(first) or (isinstance(first, Mapping) and bool(first) and _is_leaf(next(iter(first.values()))))


def format_table(
    summary: Mapping[str, Any],
    fmt: str = "markdown",
    regions: Sequence[str] | None = None,
    percent: bool = True,
    digits: Mapping[str, int] | None = None,
    name: str = "fedmodal",
) -> str:
    """Format summaries as the papers' results table ("mean±std" cells).

    Rows are methods, columns Dice/Sens/Spec/HD95 per region (region prefixes are shown when
    more than one region is listed), or MAE/PSNR/SSIM for synthesis summaries.

    Args:
        summary: one :func:`summarise` output (one row, labelled ``name``) or a mapping
            method name -> summary (one row each, in order).
        fmt: "markdown", "latex" (tabular body rows) or "tsv".
        regions: regions to show, default every region present (WT, TC, ET order).
        percent: show Dice, sensitivity and specificity in percent, as the papers do.
        digits: decimals per metric, overriding the defaults (1 for percentages, 2 for
            HD95 and PSNR, 3 for MAE and SSIM).
        name: row label when ``summary`` is a single summary.

    Returns:
        the table as a string (no trailing newline).
    """
    rows: Mapping[str, Any] = {name: summary} if _is_summary(summary) else summary
    if not rows:
        raise ValueError("nothing to format.")
    dig = {**_DIGITS, **(digits or {})}
    first = next(iter(rows.values()))
    segmentation = not _is_leaf(next(iter(first.values())))

    columns: list[tuple[str | None, str]] = []  # (region or None, metric)
    if segmentation:
        if regions is not None:
            shown = list(regions)
        else:
            shown = [r for r in REGIONS if r in first] + [r for r in first if r not in REGIONS]
        columns = [(r, m) for r in shown for m in SEGMENTATION_METRICS if m in first[r]]
    else:
        columns = [(None, m) for m in SYNTHESIS_METRICS if m in first]
        columns += [(None, m) for m in first if m not in SYNTHESIS_METRICS]
    multi_region = len({r for r, _ in columns}) > 1

    def header(region: str | None, metric: str) -> str:
        label = _LABELS.get(metric, metric)
        if not percent:
            label = label.replace("(%)", "")
        elif fmt == "latex":
            label = label.replace("%", "\\%")
        return f"{region} {label}" if multi_region and region else label

    pm = "$\\pm$" if fmt == "latex" else "±"

    def cell(stats: Mapping[str, Any], metric: str) -> str:
        scale = 100.0 if percent and metric in _PERCENT else 1.0
        d = dig.get(metric, 3)
        return f"{stats['mean'] * scale:.{d}f}{pm}{stats['std'] * scale:.{d}f}"

    head = ["Method"] + [header(r, m) for r, m in columns]
    body = []
    for method, summ in rows.items():
        cells = [cell(summ[r][m] if r is not None else summ[m], m) for r, m in columns]
        body.append([str(method)] + cells)

    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    elif fmt == "latex":
        lines = [" & ".join(head) + r" \\", r"\hline"] + [" & ".join(row) + r" \\" for row in body]
    elif fmt == "tsv":
        lines = ["\t".join(head)] + ["\t".join(row) for row in body]
    else:
        raise ValueError(f"fmt must be 'markdown', 'latex' or 'tsv', got {fmt!r}.")
    return "\n".join(lines)
