"""The two datasets: segmentation cases through a MONAI pipeline, and synthesis slices.

:class:`SynthesisSlices` holds preloaded axial slices in [-1, 1] with condition maps, for the
ModalityBank generator (indexed every step, so it holds everything in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, SpatialPad
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_tensor
from scipy import ndimage

from fedmodal.brats import MODALITIES, N_LABELS
from fedmodal.data.layouts import CaseFiles
from fedmodal.data.loading import case_record, load_case

logger = logging.getLogger(__name__)


def segmentation_dataset(
    cases: Sequence[CaseFiles], transform: Compose, modalities: Sequence[str] = MODALITIES, cache: bool = False
):
    """A MONAI dataset over cases (only ``modalities`` are read; others stay masked).

    Args:
        cases: cases, e.g. ``manifest.cases_in("train")``.
        transform: e.g. :func:`segmentation_transforms`.
        modalities: modalities the site uses (``manifest.modalities``).
        cache: cache the deterministic head of the pipeline in memory (``CacheDataset``).
    """
    from monai.data import CacheDataset, Dataset

    records = [case_record(case, modalities) for case in cases]
    if cache:
        return CacheDataset(records, transform=transform, num_workers=0, progress=False)
    return Dataset(records, transform=transform)


# ----------------------------------------------------------------------------- synthesis slices


def _percentile_scale(channel: np.ndarray, inside: np.ndarray, lower: float, upper: float) -> np.ndarray:
    values = channel[inside]
    out = np.full(channel.shape, -1.0, dtype=np.float32)
    if values.size == 0 or not np.any(values):
        return out
    lo, hi = np.percentile(values, [lower, upper])
    if hi <= lo:  # a constant brain: put it mid-range rather than dividing by zero
        out[inside] = 0.0
        return out
    scaled = (np.clip(channel, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    out[inside] = scaled[inside]
    return out


def normalise_for_synthesis(
    image: np.ndarray | torch.Tensor,
    brain: np.ndarray | torch.Tensor,
    avail: Sequence[bool] | np.ndarray | torch.Tensor | None = None,
    lower: float = 0.1,
    upper: float = 99.9,
) -> np.ndarray:
    """Per channel: clip to the brain's [lower, upper] percentiles and scale to [-1, 1].

    Args:
        image: (C, *spatial) intensities.
        brain: (*spatial) or (1, *spatial) brain mask; outside it the result is -1.
        avail: which channels are real; unavailable (or all-zero) channels become -1 everywhere.
        lower: lower percentile (0-100).
        upper: upper percentile (0-100).

    Returns:
        float32 array shaped like ``image``, in [-1, 1].
    """
    image = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    brain = np.asarray(brain.detach().cpu() if isinstance(brain, torch.Tensor) else brain).astype(bool)
    if brain.ndim == image.ndim:
        brain = brain[0]
    available = np.ones(image.shape[0], bool) if avail is None else np.asarray(avail, dtype=bool)
    out = np.full(image.shape, -1.0, dtype=np.float32)
    for c in range(image.shape[0]):
        if available[c]:
            out[c] = _percentile_scale(image[c], brain, lower, upper)
    return out


def _edge(brain: np.ndarray) -> np.ndarray:
    """Voxels of the mask that touch the outside (border of the array counts as outside)."""
    if not brain.any():
        return brain.copy()
    return brain & ~ndimage.binary_erosion(brain, border_value=0)


def condition_map(label: np.ndarray | torch.Tensor, brain: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The generator's condition: the label map and the brain's outline, both in [-1, 1].

    Args:
        label: canonical labels (*spatial), no channel dimension.
        brain: brain mask (*spatial), no channel dimension.

    Returns:
        float32 (2, *spatial), torch if ``label`` is a tensor: channel 0 ``label / 3 * 2 - 1``,
        channel 1 is 1 on the brain's edge and -1 elsewhere.
    """
    as_torch = isinstance(label, torch.Tensor)
    label_np = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
    brain_np = np.asarray(brain.detach().cpu() if isinstance(brain, torch.Tensor) else brain).astype(bool)
    out = np.empty((2, *label_np.shape), dtype=np.float32)
    out[0] = label_np.astype(np.float32) / (N_LABELS - 1) * 2.0 - 1.0
    out[1] = np.where(_edge(brain_np), 1.0, -1.0)
    return torch.from_numpy(out) if as_torch else out


def brain_crop_box(brain: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """In-plane bounding box of the brain over all slices, with a margin, clipped to the array.

    Args:
        brain: (X, Y, Z) brain mask with at least one voxel set.
        margin: voxels kept around the box in x and y.
    """
    # MONAI's foreground box of the brain's axial projection (the box CropForeground uses).
    start, end = generate_spatial_bounding_box(brain.any(axis=2)[None], margin=margin, allow_smaller=True)
    return slice(int(start[0]), int(end[0])), slice(int(start[1]), int(end[1]))


def pad_square(t: torch.Tensor, value: float) -> torch.Tensor:
    """Pad (N, C, H, W) to a centred square with ``value`` (MONAI's symmetric ``SpatialPad``).

    Args:
        t: a batch of 2D images.
        value: the padding value.
    """
    side = max(t.shape[-2:])
    pad = SpatialPad((side, side), method="symmetric", mode="constant", value=value)
    padded = pad(t.reshape(-1, *t.shape[-2:]))
    return convert_to_tensor(padded, track_meta=False).reshape(*t.shape[:-2], side, side)


class SynthesisSlices(torch.utils.data.Dataset):
    """Axial slices of cases, preloaded in memory, for mask-conditioned synthesis.

    Each case is loaded (RAS), scaled to [-1, 1] from brain percentiles, cropped in-plane to
    the brain's bounding box (the same box for all slices of a case, so scale is kept) with a
    margin, padded square and resized to ``size`` (images bilinear, labels and brain nearest).

    Items: "cond" float32 (2, S, S) (:func:`condition_map`), "image" float32 (4, S, S) in
    [-1, 1] (-1 in missing channels), "avail" bool (4,), "brain" bool (1, S, S), "label" int64
    (1, S, S), "key" "<case_id>/z<index>". Items share memory with the dataset: copy before
    writing in place.

    Args:
        cases: cases to read.
        size: output side in pixels.
        slices: "tumour" (slices with tumour) or "brain" (slices with enough brain).
        min_tumour_fraction: "tumour" only: minimum tumour share of the slice's brain pixels
            (any tumour pixel at 0).
        min_brain_fraction: minimum brain area of a slice relative to the case's largest.
        et_label: on-disk ET label override.
        modalities: modalities to read (the site's usable ones); others are masked.
        margin: pixels kept around the brain's in-plane bounding box.
        max_slices_per_case: keep at most this many slices per case, evenly spaced.
        cavity_label: canonical value of the 2023+ resection cavity.
    """

    def __init__(
        self,
        cases: Sequence[CaseFiles],
        size: int = 64,
        slices: str = "tumour",
        min_tumour_fraction: float = 0.0,
        min_brain_fraction: float = 0.1,
        et_label: int | None = None,
        modalities: Sequence[str] = MODALITIES,
        margin: int = 4,
        max_slices_per_case: int | None = None,
        cavity_label: int = 0,
    ) -> None:
        if slices not in ("tumour", "brain"):
            raise ValueError(f"slices must be 'tumour' or 'brain', got {slices!r}")
        self.size = int(size)
        self.slices = slices
        conds, images, avails, brains, labels, keys = [], [], [], [], [], []
        for case in cases:
            part = self._case_slices(
                case,
                slices,
                min_tumour_fraction,
                min_brain_fraction,
                et_label,
                modalities,
                margin,
                max_slices_per_case,
                cavity_label,
            )
            if part is None:
                continue
            cond, image, avail, brain, label, case_keys = part
            conds.append(cond)
            images.append(image)
            avails.append(avail)
            brains.append(brain)
            labels.append(label)
            keys.extend(case_keys)
        s = self.size
        self._cond = torch.cat(conds) if conds else torch.zeros((0, 2, s, s))
        self._image = torch.cat(images) if images else torch.zeros((0, len(MODALITIES), s, s))
        self._avail = torch.cat(avails) if avails else torch.zeros((0, len(MODALITIES)), dtype=torch.bool)
        self._brain = torch.cat(brains) if brains else torch.zeros((0, 1, s, s), dtype=torch.bool)
        self._label = torch.cat(labels) if labels else torch.zeros((0, 1, s, s), dtype=torch.uint8)
        self.keys: list[str] = keys
        self._index = {key: i for i, key in enumerate(keys)}
        logger.info("SynthesisSlices: %d slices of %d cases at %dx%d", len(keys), len(cases), s, s)

    def _case_slices(
        self,
        case,
        slices,
        min_tumour_fraction,
        min_brain_fraction,
        et_label,
        modalities,
        margin,
        max_slices,
        cavity_label,
    ):
        loaded = load_case(case, modalities, et_label=et_label, cavity_label=cavity_label)
        brain, label = loaded["brain"], loaded["label"]
        if not brain.any():
            logger.warning("SynthesisSlices: %s has no brain voxel; skipped", case.case_id)
            return None
        image = normalise_for_synthesis(loaded["image"], brain, loaded["avail"])
        brain_area = brain.sum(axis=(0, 1))
        tumour_area = (label > 0).sum(axis=(0, 1))
        chosen = brain_area >= max(1, min_brain_fraction * brain_area.max())
        if slices == "tumour":
            chosen &= (tumour_area > 0) & (tumour_area >= min_tumour_fraction * brain_area)
        z_list = np.nonzero(chosen)[0]
        if max_slices is not None and len(z_list) > max_slices:
            z_list = z_list[np.linspace(0, len(z_list) - 1, max_slices).round().astype(int)]
        if len(z_list) == 0:
            logger.info("SynthesisSlices: %s has no %s slice", case.case_id, slices)
            return None
        xs, ys = brain_crop_box(brain, margin)
        # (Z, C, X, Y) stacks of the chosen slices, cropped in-plane.
        image_t = torch.from_numpy(np.ascontiguousarray(image[:, xs, ys][..., z_list].transpose(3, 0, 1, 2)))
        label_t = torch.from_numpy(np.ascontiguousarray(label[xs, ys][..., z_list].transpose(2, 0, 1)))[:, None]
        brain_t = torch.from_numpy(np.ascontiguousarray(brain[xs, ys][..., z_list].transpose(2, 0, 1)))[:, None]
        image_t = pad_square(image_t, -1.0)
        label_t = pad_square(label_t.float(), 0.0)
        brain_t = pad_square(brain_t.float(), 0.0)
        out = (self.size, self.size)
        antialias = image_t.shape[-1] > self.size  # smooth only when shrinking
        image_t = F.interpolate(image_t, size=out, mode="bilinear", align_corners=False, antialias=antialias)
        image_t = image_t.clamp_(-1.0, 1.0)
        label_t = F.interpolate(label_t, size=out, mode="nearest-exact").to(torch.uint8)
        brain_t = F.interpolate(brain_t, size=out, mode="nearest-exact") > 0.5
        image_t[~brain_t.expand_as(image_t)] = -1.0  # background exactly -1 after resizing
        cond_t = torch.stack([condition_map(label_t[i, 0], brain_t[i, 0]) for i in range(len(z_list))])
        avail_t = torch.from_numpy(loaded["avail"]).expand(len(z_list), -1).clone()
        keys = [f"{case.case_id}/z{int(z)}" for z in z_list]
        return cond_t, image_t, avail_t, brain_t, label_t, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "cond": self._cond[index],
            "image": self._image[index],
            "avail": self._avail[index],
            "brain": self._brain[index],
            "label": self._label[index].long(),
            "key": self.keys[index],
        }

    def item_by_key(self, key: str) -> dict[str, Any]:
        """The item of a "<case_id>/z<index>" key (KeyError naming it if absent)."""
        if key not in self._index:
            raise KeyError(f"no slice {key!r} in this SynthesisSlices ({len(self.keys)} slices)")
        return self[self._index[key]]
