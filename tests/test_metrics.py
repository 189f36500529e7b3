"""Tests for fedmodal.metrics against independent brute-force references (scipy only)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from fedmodal import metrics as M

# --------------------------------------------------------------------------- references


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask minus its erosion (face connectivity, outside the array counts as background)."""
    return mask & ~ndimage.binary_erosion(mask)


def _ref_hd95(pred: np.ndarray, true: np.ndarray, spacing) -> float:
    """BraTS HD95 by brute force: EDT of each surface's complement, pooled 95th percentile."""
    if not pred.any() and not true.any():
        return 0.0
    if pred.any() != true.any():
        return 373.13
    sp, st = _surface(pred), _surface(true)
    to_true = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(np.percentile(np.concatenate([to_true[sp], to_pred[st]]), 95))


def _ref_ssim(x: np.ndarray, y: np.ndarray, brain: np.ndarray, data_range=2.0, sigma=1.5, radius=5, bg=-1.0):
    """Gaussian SSIM map with scipy filters, images set to bg outside the brain, mean over brain."""
    x = np.where(brain, x, bg).astype(np.float64)
    y = np.where(brain, y, bg).astype(np.float64)

    def local_mean(a, pad):
        # Constant padding with the value the padded product takes (bg or bg*bg).
        return ndimage.gaussian_filter(a, sigma, mode="constant", cval=pad, truncate=radius / sigma)

    def mean(a):
        return local_mean(a, bg)

    def mean_prod(a, b):
        return local_mean(a * b, bg * bg)

    mx, my = mean(x), mean(y)
    vx = mean_prod(x, x) - mx**2
    vy = mean_prod(y, y) - my**2
    cxy = mean_prod(x, y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim[brain].mean())


def _blob(shape, seed, threshold=0.6, smooth=2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), smooth)
    return field > np.quantile(field, threshold)


# --------------------------------------------------------------------------- regions and overlap


def test_regions_et3_and_et4():
    lab = np.array([0, 1, 2, 3, 4])
    r3 = M.brats_regions(lab, et_label=3)
    assert r3["WT"].tolist() == [False, True, True, True, False]
    assert r3["TC"].tolist() == [False, True, False, True, False]
    assert r3["ET"].tolist() == [False, False, False, True, False]
    r4 = M.brats_regions(torch.from_numpy(lab), et_label=4)  # tensors accepted
    assert r4["WT"].tolist() == [False, True, True, False, True]
    assert r4["TC"].tolist() == [False, True, False, False, True]
    assert r4["ET"].tolist() == [False, False, False, False, True]


def test_overlap_hand_computed():
    true = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    pred = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    # TP 2, FP 1, FN 1, TN 4
    s = M.overlap_scores(pred, true)
    assert s["dice"] == pytest.approx(4 / 6)
    assert s["sensitivity"] == pytest.approx(2 / 3)
    assert s["specificity"] == pytest.approx(4 / 5)


def test_overlap_2d_hand_computed():
    true = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    # TP 2, FP 1, FN 1, TN 5
    s = M.overlap_scores(pred, true)
    assert (s["dice"], s["sensitivity"], s["specificity"]) == pytest.approx((2 / 3, 2 / 3, 5 / 6))


def test_empty_rules_overlap_and_hd95():
    z = np.zeros((6, 6, 4), bool)
    one = z.copy()
    one[2:4, 2:4, 1:3] = True
    both = M.overlap_scores(z, z)
    assert both == {"dice": 1.0, "sensitivity": 1.0, "specificity": 1.0}
    assert M.hd95(z, z) == 0.0
    fp_only = M.overlap_scores(one, z)  # hallucinated region
    assert fp_only["dice"] == 0.0 and fp_only["sensitivity"] == 0.0
    assert fp_only["specificity"] == pytest.approx((z.size - 8) / z.size)
    fn_only = M.overlap_scores(z, one)  # missed region
    assert fn_only == {"dice": 0.0, "sensitivity": 0.0, "specificity": 1.0}
    assert M.hd95(one, z) == M.hd95(z, one) == 373.13 == M.HD95_EMPTY_PENALTY
    assert math.isclose(M.HD95_EMPTY_PENALTY, math.sqrt(240**2 + 240**2 + 155**2), abs_tol=0.005)
    full = np.ones((3, 3), bool)
    assert M.overlap_scores(full, full)["specificity"] == 1.0  # no negatives at all


# --------------------------------------------------------------------------- HD95


@pytest.mark.parametrize(
    "shape,spacing,seed",
    [
        ((24, 22, 14), (1.0, 1.0, 1.0), 0),
        ((24, 22, 14), (0.8, 1.2, 3.0), 1),  # anisotropic
        ((20, 26, 12), (2.0, 0.5, 1.5), 2),  # anisotropic
        ((40, 36), (1.0, 1.0), 3),  # 2D
        ((40, 36), (0.7, 2.5), 4),  # 2D anisotropic
    ],
)
def test_hd95_matches_bruteforce(shape, spacing, seed):
    true = _blob(shape, seed)
    pred = _blob(shape, seed + 100)
    ref = _ref_hd95(pred, true, spacing)
    assert ref > 0
    assert M.hd95(pred, true, spacing) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert M.hd95(true, pred, spacing) == pytest.approx(ref, rel=1e-5, abs=1e-5)  # pooled: symmetric


def test_surface_distances_are_pooled_both_directions():
    true = _blob((20, 20, 10), 7)
    pred = _blob((20, 20, 10), 8)
    spacing = (1.0, 1.5, 2.0)
    d = M.surface_distances(pred, true, spacing)
    n_surf = _surface(pred).sum() + _surface(true).sum()
    assert d.shape == (n_surf,)
    sp, st = _surface(pred), _surface(true)
    ref = np.concatenate(
        [
            ndimage.distance_transform_edt(~st, sampling=spacing)[sp],
            ndimage.distance_transform_edt(~sp, sampling=spacing)[st],
        ]
    )
    np.testing.assert_allclose(np.sort(d), np.sort(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        M.surface_distances(pred, np.zeros_like(true))


def test_hd95_pooled_differs_from_monai_max_of_directed():
    """A small distant false positive: pooled BraTS HD95 ignores it, MONAI's max-of-directed does not."""
    true = np.zeros((40, 40, 40), bool)
    true[10:20, 10:20, 10:20] = True  # 488 surface voxels
    pred = true.copy()
    pred[30:34, 30:34, 30:33] = True  # 44 surface voxels: >5% of pred's surface, <5% of the pool
    spacing = (1.0, 1.0, 1.5)
    ours = M.hd95(pred, true, spacing)
    ref = _ref_hd95(pred, true, spacing)
    assert ours == pytest.approx(ref, abs=1e-5)
    from monai.metrics import HausdorffDistanceMetric

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_hd = HausdorffDistanceMetric(include_background=True, percentile=95)(
            torch.from_numpy(pred)[None, None].float(), torch.from_numpy(true)[None, None].float(), spacing=spacing
        )
    monai_hd = float(monai_hd.item())
    assert ours < 1.0
    assert monai_hd > 15.0  # roughly the distance to the false positive
    assert monai_hd - ours > 15.0


def test_hd95_accepts_tensors_and_label_values():
    true = _blob((16, 16, 8), 11)
    pred = _blob((16, 16, 8), 12)
    ref = _ref_hd95(pred, true, (1, 1, 2))
    got = M.hd95(torch.from_numpy(pred.astype(np.uint8) * 3), torch.from_numpy(true), spacing=[1, 1, 2])
    assert got == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError):
        M.hd95(pred, true, spacing=(1, 1))


# --------------------------------------------------------------------------- per-case scores


def test_segmentation_scores_regions_and_empty_et():
    true = np.zeros((12, 12, 6), np.int64)
    true[2:10, 2:10, 1:5] = 2
    true[4:8, 4:8, 2:4] = 1  # tumour core without enhancement: ET empty in truth
    pred = true.copy()
    pred[5, 5, 2] = 3  # predicted ET voxel inside the core
    s = M.segmentation_scores(pred, true, spacing=(1, 1, 2), et_label=3)
    assert set(s) == {"WT", "TC", "ET"}
    assert s["WT"]["dice"] == 1.0 and s["WT"]["hd95"] == 0.0
    assert s["TC"]["dice"] == 1.0
    assert s["ET"]["dice"] == 0.0 and s["ET"]["hd95"] == 373.13  # exactly one empty
    clean = M.segmentation_scores(true, true)
    assert clean["ET"] == {"dice": 1.0, "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0}  # both empty


def test_segmentation_scores_et4_matches_et3_after_mapping():
    true = np.zeros((10, 10, 6), np.int64)
    true[2:8, 2:8, 1:5] = 2
    true[3:7, 3:7, 2:4] = 1
    true[4:6, 4:6, 2:4] = 3
    pred = np.roll(true, 1, axis=0)
    s3 = M.segmentation_scores(pred, true, et_label=3)
    s4 = M.segmentation_scores(np.where(pred == 3, 4, pred), np.where(true == 3, 4, true), et_label=4)
    assert s3 == s4
    # With the wrong et_label the 3s are ignored and ET is empty on both sides.
    wrong = M.segmentation_scores(pred, true, et_label=4)
    assert wrong["ET"]["dice"] == 1.0 and wrong["TC"]["dice"] != s3["TC"]["dice"]


def test_segmentation_scores_2d():
    true = np.zeros((8, 8), np.int64)
    true[2:6, 2:6] = 2
    true[3:5, 3:5] = 3
    s = M.segmentation_scores(true, true, spacing=(1.0, 1.0))
    assert all(s[r]["dice"] == 1.0 and s[r]["hd95"] == 0.0 for r in M.REGIONS)


# --------------------------------------------------------------------------- synthesis


def _brain2d(shape=(32, 32)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (0.35 * min(shape)) ** 2


def test_synthesis_identical_images():
    rng = np.random.default_rng(0)
    brain = _brain2d()
    img = np.where(brain, rng.uniform(-1, 1, brain.shape), -1.0)
    s = M.synthesis_scores(img, img, brain)
    assert s["mae"] == 0.0
    assert s["psnr"] == math.inf
    assert s["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert M.synthesis_scores(img, img, brain, max_psnr=100.0)["psnr"] == 100.0


def test_synthesis_known_mse_gives_known_psnr():
    rng = np.random.default_rng(1)
    brain = _brain2d()
    real = np.where(brain, rng.uniform(-0.8, 0.8, brain.shape), -1.0)
    fake = real + np.where(brain, 0.1, 0.0)  # MSE inside the brain = 0.01
    s = M.synthesis_scores(fake, real, brain)
    assert s["mae"] == pytest.approx(0.1)
    assert s["psnr"] == pytest.approx(10 * math.log10(4 / 0.01))  # data range 2
    assert s["ssim"] < 1.0


def test_synthesis_mask_respected():
    rng = np.random.default_rng(2)
    brain = _brain2d()
    real = np.where(brain, rng.uniform(-1, 1, brain.shape), -1.0)
    fake = np.clip(real + rng.normal(0, 0.2, brain.shape), -1, 1)
    base = M.synthesis_scores(fake, real, brain)
    fake2, real2 = fake.copy(), real.copy()
    fake2[~brain] = rng.uniform(-1, 1, (~brain).sum())
    real2[~brain] = 0.7
    assert M.synthesis_scores(fake2, real2, brain) == pytest.approx(base)


def test_synthesis_ssim_matches_scipy_reference_2d_and_3d():
    rng = np.random.default_rng(3)
    brain2 = _brain2d((30, 28))
    real2 = ndimage.gaussian_filter(rng.uniform(-1, 1, brain2.shape), 1.0)
    fake2 = real2 + rng.normal(0, 0.1, brain2.shape)
    assert M.synthesis_scores(fake2, real2, brain2)["ssim"] == pytest.approx(_ref_ssim(fake2, real2, brain2), abs=1e-5)
    brain3 = np.zeros((18, 16, 12), bool)
    brain3[3:15, 2:14, 2:10] = True
    real3 = ndimage.gaussian_filter(rng.uniform(-1, 1, brain3.shape), 1.0)
    fake3 = real3 + rng.normal(0, 0.1, brain3.shape)
    s3 = M.synthesis_scores(torch.from_numpy(fake3), torch.from_numpy(real3), torch.from_numpy(brain3))
    assert s3["ssim"] == pytest.approx(_ref_ssim(fake3, real3, brain3), abs=1e-5)
    # A slice with a leading channel axis is treated as 2D.
    s_ch = M.synthesis_scores(fake2[None], real2[None], brain2[None])
    assert s_ch == pytest.approx(M.synthesis_scores(fake2, real2, brain2))


def test_synthesis_rejects_empty_brain():
    with pytest.raises(ValueError):
        M.synthesis_scores(np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8), bool))


# --------------------------------------------------------------------------- summaries and tables


def test_summarise_and_format_table():
    cases = [
        {r: {"dice": d, "sensitivity": 0.5, "specificity": 1.0, "hd95": h} for r in M.REGIONS}
        for d, h in [(0.8, 2.0), (0.9, 4.0), (float("nan"), 6.0)]
    ]
    summ = M.summarise(cases)
    assert summ["WT"]["dice"]["mean"] == pytest.approx(0.85)
    assert summ["WT"]["dice"]["std"] == pytest.approx(0.05)  # population std
    assert summ["WT"]["dice"]["n"] == 2  # NaN left out
    assert summ["ET"]["hd95"] == pytest.approx({"mean": 4.0, "std": math.sqrt(8 / 3), "n": 3})

    md = M.format_table(summ)
    lines = md.splitlines()
    assert len(lines) == 3
    assert "WT Dice(%)" in lines[0] and "ET HD95(mm)" in lines[0]
    assert "85.0±5.0" in lines[2] and "4.00±1.63" in lines[2]

    one_region = M.format_table({"A": summ, "B": summ}, regions=["WT"])
    head = one_region.splitlines()[0]
    assert head == "| Method | Dice(%) | Sens(%) | Spec(%) | HD95(mm) |"
    assert len(one_region.splitlines()) == 4
    assert "$\\pm$" in M.format_table(summ, fmt="latex")

    syn = M.summarise([{"mae": 0.1, "psnr": 20.0, "ssim": 0.8}, {"mae": 0.3, "psnr": 30.0, "ssim": 0.9}])
    syn_md = M.format_table(syn, name="ModalityBank")
    assert "| Method | MAE | PSNR(dB) | SSIM |" in syn_md
    assert "| ModalityBank | 0.200±0.100 | 25.00±5.00 | 0.850±0.050 |" in syn_md
    with pytest.raises(ValueError):
        M.format_table(summ, fmt="html")
