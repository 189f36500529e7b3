"""BraTS-convention segmentation metrics, masked synthesis metrics, and their summaries.

- :mod:`.segmentation`: per-region (WT/TC/ET) Dice, sensitivity, specificity, BraTS HD95.
- :mod:`.lesionwise`: the BraTS 2023+ lesion-wise Dice and HD95.
- :mod:`.synthesis`: MAE, PSNR and SSIM inside the brain.
- :mod:`.report`: mean/std over cases and the results table.
"""

from fedmodal.brats import REGIONS
from fedmodal.metrics.lesionwise import LESION_METRICS, TUMOUR_RULES, lesion_scores, tumour_rules
from fedmodal.metrics.report import TABLE_METRICS, format_table, summarise
from fedmodal.metrics.segmentation import (
    HD95_EMPTY_PENALTY,
    SEGMENTATION_METRICS,
    brats_regions,
    hd95,
    overlap_scores,
    segmentation_scores,
    surface_distances,
)
from fedmodal.metrics.synthesis import SYNTHESIS_METRICS, synthesis_scores

__all__ = [
    "REGIONS",
    "SEGMENTATION_METRICS",
    "LESION_METRICS",
    "TABLE_METRICS",
    "TUMOUR_RULES",
    "lesion_scores",
    "tumour_rules",
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
