"""Masked synthesis metrics: MAE, PSNR and SSIM inside the brain, for images in [-1, 1]."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

from fedmodal.metrics.arrays import ArrayLike, as_bool, check_pair, to_numpy

SYNTHESIS_METRICS = ("mae", "psnr", "ssim")


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
    f = _squeeze_leading(to_numpy(fake).astype(np.float64))
    r = _squeeze_leading(to_numpy(real).astype(np.float64))
    m = _squeeze_leading(as_bool(brain))
    check_pair(f, r, "fake and real")
    check_pair(f, m, "images and brain mask")
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
