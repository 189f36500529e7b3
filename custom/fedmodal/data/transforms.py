"""MONAI transform pipelines for segmentation, readable top to bottom.

- ``load_transforms``: load (RAS), optional resample, crop to the brain.
- ``segmentation_transforms``: z-score over the brain, then 2D tumour-biased slices or 3D
  random patches (train), or brain-cropped full volumes for sliding-window inference (val).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    MapTransform,
    RandCropByPosNegLabeld,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)

from fedmodal.data.loading import LoadBraTSCased

SEG_KEYS = ("image", "label", "brain")


class ZScoreOverBraind(MapTransform):
    """Z-score each available channel over the brain mask; zero outside the brain and in missing channels.

    Kept rather than MONAI's ``NormalizeIntensityd(nonzero=True, channel_wise=True)``, which
    differs in two ways (``tests/test_monai_equivalence.py`` shows both): it takes statistics
    over each channel's non-zero voxels, not over the brain (holes filled), so a zero voxel
    inside the brain is left at 0 and out of the mean; and it divides by the population std
    (ddof 0) where this uses the sample std (ddof 1), a relative change of 1/(2N) that would
    shift every trained model's inputs slightly.

    Args:
        keys: image key(s).
        brain_key: the brain mask key.
        avail_key: the availability mask key.
    """

    def __init__(self, keys: KeysCollection = "image", brain_key: str = "brain", avail_key: str = "avail") -> None:
        super().__init__(keys)
        self.brain_key, self.avail_key = brain_key, avail_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        brain = torch.as_tensor(d[self.brain_key]).bool()
        brain = brain[0] if brain.ndim == torch.as_tensor(d[next(iter(self.keys))]).ndim else brain
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float()
            avail = torch.as_tensor(d.get(self.avail_key, torch.ones(image.shape[0], dtype=torch.bool)))
            out = torch.zeros_like(image)
            for c in range(image.shape[0]):
                values = image[c][brain]
                if not bool(avail[c]) or values.numel() < 2:
                    continue
                std = values.std()
                out[c][brain] = (values - values.mean()) / (std if std > 0 else 1.0)
            d[key] = _like(d[key], out)
        return d


def _like(template: Any, values: np.ndarray | torch.Tensor) -> Any:
    """Put new values in the container type of ``template`` (MetaTensor keeps its meta)."""
    tensor = torch.as_tensor(values)
    if isinstance(template, MetaTensor):
        # The affine travels inside meta (passing it separately as well makes MONAI warn).
        return MetaTensor(tensor, meta={**template.meta, "affine": template.affine.clone()})
    if isinstance(template, torch.Tensor):
        return tensor
    return tensor.numpy()


class SampleAxialSlicesd(Randomizable, MapTransform):
    """Draw axial slices from (C, X, Y, Z) volumes, preferring slices through the tumour.

    Returns a list of ``num_samples`` dicts holding (C, X, Y) slices and "slice_index".

    Args:
        keys: volume keys to slice (e.g. image, label, brain).
        label_key: canonical label key, to find tumour slices.
        brain_key: brain mask key, to find brain slices.
        num_samples: slices per volume.
        tumour_probability: chance that a slice is drawn from those with tumour (if any);
            otherwise it is drawn from all slices with brain.
    """

    def __init__(
        self,
        keys: KeysCollection = SEG_KEYS,
        label_key: str = "label",
        brain_key: str = "brain",
        num_samples: int = 4,
        tumour_probability: float = 0.67,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.label_key, self.brain_key = label_key, brain_key
        self.num_samples, self.tumour_probability = num_samples, tumour_probability

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        label = torch.as_tensor(d[self.label_key])
        brain = torch.as_tensor(d[self.brain_key])
        tumour_slices = torch.nonzero((label > 0).flatten(0, -2).any(0)).flatten().tolist()
        brain_slices = torch.nonzero((brain > 0).flatten(0, -2).any(0)).flatten().tolist()
        if not brain_slices:
            brain_slices = list(range(label.shape[-1]))
        samples = []
        for _ in range(self.num_samples):
            pool = tumour_slices if tumour_slices and self.R.rand() < self.tumour_probability else brain_slices
            z = int(pool[self.R.randint(len(pool))])
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = torch.as_tensor(d[key])[..., z].clone()
            sample["slice_index"] = z
            samples.append(sample)
        return samples


def load_transforms(
    et_label: int | None = None,
    cavity_label: int = 0,
    pixdim: Sequence[float] | None = None,
    crop_margin: int = 2,
) -> list:
    """Load, orient to RAS, optionally resample, crop to the brain's bounding box.

    Args:
        et_label: on-disk ET label override (default: the release's).
        cavity_label: canonical value of the 2023+ resection cavity.
        pixdim: voxel spacing in mm to resample to (None keeps the files' grid; BraTS is 1 mm).
        crop_margin: voxels kept around the brain.
    """
    transforms: list = [LoadBraTSCased(et_label=et_label, cavity_label=cavity_label)]
    if pixdim is not None:
        transforms.append(Spacingd(keys=list(SEG_KEYS), pixdim=pixdim, mode=("bilinear", "nearest", "nearest")))
    transforms.append(CropForegroundd(keys=list(SEG_KEYS), source_key="brain", margin=crop_margin, allow_smaller=True))
    return transforms


def segmentation_transforms(
    mode: str = "train",
    spatial_dims: int = 3,
    patch_size: Sequence[int] = (96, 96, 96),
    num_samples: int = 2,
    tumour_probability: float = 0.67,
    pixdim: Sequence[float] | None = None,
    et_label: int | None = None,
    cavity_label: int = 0,
    augment: bool = True,
) -> Compose:
    """MONAI pipeline for segmentation: items hold image (4, ...), avail (4,), label (1, ...) int64.

    Args:
        mode: "train" (random 3D patches or 2D slices) or "val" (full brain-cropped volumes,
            ready for sliding-window inference).
        spatial_dims: 3 for patches, 2 for axial slices (train only).
        patch_size: 3D patch or 2D slice crop size (padded if the brain is smaller).
        num_samples: patches or slices drawn per case per pass.
        tumour_probability: share of patches centred on / slices through tumour.
        pixdim: optional resampling spacing (mm).
        et_label: on-disk ET label override.
        cavity_label: canonical value of the 2023+ resection cavity.
        augment: random flips and intensity scale/shift (train only).

    Input items are :func:`case_record` dicts.
    """
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    keys = list(SEG_KEYS)
    transforms = load_transforms(et_label, cavity_label, pixdim)
    transforms.append(ZScoreOverBraind(keys="image"))
    if mode == "train":
        size = tuple(patch_size)
        if len(size) != spatial_dims:
            raise ValueError(f"patch_size {size} does not have {spatial_dims} dimensions")
        if spatial_dims == 3:
            transforms += [
                SpatialPadd(keys=keys, spatial_size=size),
                RandCropByPosNegLabeld(
                    keys=keys,
                    label_key="label",
                    spatial_size=size,
                    pos=tumour_probability,
                    neg=1.0 - tumour_probability,
                    num_samples=num_samples,
                    image_key="brain",  # negative patches centre on brain, not on air
                    image_threshold=0.5,
                ),
            ]
        else:
            transforms += [
                SampleAxialSlicesd(keys=keys, num_samples=num_samples, tumour_probability=tumour_probability),
                SpatialPadd(keys=keys, spatial_size=size),
                RandSpatialCropd(keys=keys, roi_size=size, random_size=False),
            ]
        if augment:
            transforms += [
                RandFlipd(keys=keys, prob=0.5, spatial_axis=0),  # left-right: brains are near symmetric
                RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            ]
    transforms.append(CastToTyped(keys=["label", "brain"], dtype=(torch.int64, torch.bool)))
    return Compose(transforms)
