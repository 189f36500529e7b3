"""Summaries over cases (mean, std, n) and the papers' results tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmodal.brats import REGIONS
from fedmodal.metrics.lesionwise import LESION_METRICS
from fedmodal.metrics.segmentation import SEGMENTATION_METRICS
from fedmodal.metrics.synthesis import SYNTHESIS_METRICS


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
    "lesion_dice": "LW Dice(%)",
    "lesion_hd95": "LW HD95(mm)",
    "mae": "MAE",
    "psnr": "PSNR(dB)",
    "ssim": "SSIM",
}
_PERCENT = {"dice", "sensitivity", "specificity", "lesion_dice"}
_DIGITS = {"dice": 1, "sensitivity": 1, "specificity": 1, "hd95": 2, "mae": 3, "psnr": 2, "ssim": 3}
_DIGITS.update(lesion_dice=1, lesion_hd95=2)
# Segmentation columns of a table, where the scores hold them: whole-volume, then lesion-wise.
TABLE_METRICS = SEGMENTATION_METRICS + LESION_METRICS


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
        columns = [(r, m) for r in shown for m in TABLE_METRICS if m in first[r]]
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
