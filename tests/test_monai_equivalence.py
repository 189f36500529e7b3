"""Hand-written transforms against MONAI's, on phantom data: replaced where equal, kept where not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Compose, NormalizeIntensityd

from fedmodal.data.datasets import brain_crop_box, pad_square
from fedmodal.data.discovery import discover_cases
from fedmodal.data.loading import case_record
from fedmodal.data.phantoms import build_federation
from fedmodal.data.transforms import ZScoreOverBraind, load_transforms


@pytest.fixture(scope="module")
def loaded_cases(tmp_path_factory):
    root = build_federation(tmp_path_factory.mktemp("eq") / "fed", shape=(48, 48, 31), cases_per_site=2, test_cases=0)
    load = Compose(load_transforms())
    return [load(case_record(case)) for case in discover_cases(root / "site-1")]


def _fresh(item: dict) -> dict:
    # MONAI's NormalizeIntensityd works in place: give every transform its own tensors.
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}


def _old_brain_crop_box(brain: np.ndarray, margin: int) -> tuple[slice, slice]:
    # The hand-written box brain_crop_box replaced.
    xs = np.nonzero(brain.any(axis=(1, 2)))[0]
    ys = np.nonzero(brain.any(axis=(0, 2)))[0]
    x0, x1 = max(xs[0] - margin, 0), min(xs[-1] + margin + 1, brain.shape[0])
    y0, y1 = max(ys[0] - margin, 0), min(ys[-1] + margin + 1, brain.shape[1])
    return slice(int(x0), int(x1)), slice(int(y0), int(y1))


def _old_pad_square(t: torch.Tensor, value: float) -> torch.Tensor:
    # The hand-written padding pad_square replaced.
    h, w = t.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(t, (left, side - w - left, top, side - h - top), value=value)


def test_brain_crop_box_matches_the_hand_written_box(loaded_cases):
    for item in loaded_cases:
        brain = item["brain"][0].numpy().astype(bool)
        for margin in (0, 4, 40):  # 40: clipped at the array's edges
            assert brain_crop_box(brain, margin) == _old_brain_crop_box(brain, margin)
        shifted = np.zeros_like(brain)
        shifted[3:, 5:] = brain[:-3, :-5]
        assert brain_crop_box(shifted, 2) == _old_brain_crop_box(shifted, 2)


@pytest.mark.parametrize("shape", [(2, 4, 20, 13), (1, 1, 9, 14), (3, 2, 8, 8), (1, 4, 11, 10)])
def test_pad_square_matches_the_hand_written_padding(loaded_cases, shape):
    t = torch.randn(shape)
    assert torch.equal(pad_square(t, -1.0), _old_pad_square(t, -1.0))
    image = torch.as_tensor(loaded_cases[0]["image"])[..., 10].unsqueeze(0)  # (1, 4, X, Y) phantom slice
    assert torch.equal(pad_square(image, -1.0), _old_pad_square(image, -1.0))
    assert type(pad_square(image, -1.0)) is torch.Tensor  # no MetaTensor leaks into the slice stacks


def test_zscore_over_brain_differs_from_monai_normalize_intensity(loaded_cases):
    # On phantoms each channel's non-zero voxels are the brain, so the masks agree; the outputs
    # still differ by the std's degrees of freedom (ZScoreOverBraind: sample std).
    for item in loaded_cases:
        ours = torch.as_tensor(ZScoreOverBraind(keys="image")(_fresh(item))["image"])
        monai = torch.as_tensor(
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)(_fresh(item))["image"]
        )
        brain = item["brain"][0].bool()
        n = int(brain.sum())
        for c in np.flatnonzero(item["avail"].numpy()):
            assert torch.equal(item["image"][c] != 0, brain)
            assert torch.allclose(ours[c], monai[c] * ((n - 1) / n) ** 0.5, atol=1e-5)
        assert not torch.allclose(ours, monai, atol=1e-5)


def test_zscore_over_brain_scores_dark_voxels_inside_the_brain(loaded_cases):
    item = _fresh(loaded_cases[0])
    brain = item["brain"][0].bool()
    inside = tuple(int(i) for i in torch.nonzero(brain)[len(torch.nonzero(brain)) // 2])
    image = item["image"].clone()
    image[(0, *inside)] = 0.0  # a dark voxel inside the brain (real T1 has a few)
    item["image"] = image
    ours = ZScoreOverBraind(keys="image")(_fresh(item))["image"]
    monai = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)(_fresh(item))["image"]
    assert float(ours[(0, *inside)]) < -1.0  # far below the brain's mean
    assert float(monai[(0, *inside)]) == 0.0  # MONAI leaves it out
