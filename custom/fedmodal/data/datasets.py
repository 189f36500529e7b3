"""Reading BraTS cases into arrays, MONAI transform pipelines, and the synthesis slice dataset.

Every case loads into one fixed shape whatever the site holds: ``image`` has the four
canonical channels (``fedmodal.MODALITIES``) with zeros where a modality is missing, and
``avail`` says which channels are real. Labels are canonical (0 background, 1 NCR, 2 ED,
3 ET): on-disk ET 4 maps to 3; the 2023+ resection cavity (4) maps to ``cavity_label``.

Pipelines are MONAI ``Compose`` lists of dict transforms, readable top to bottom:

- ``load_transforms``: load, orient to RAS, optional resample, crop to the brain.
- ``segmentation_transforms``: z-score over the brain, then 2D tumour-biased slices or 3D
  random patches (train), or brain-cropped full volumes for sliding-window inference (val).
- :class:`SynthesisSlices`: preloaded axial slices in [-1, 1] with condition maps, for the
  ModalityBank generator (indexed every step, so it holds everything in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    Randomizable,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)
from scipy import ndimage

from fedmodal.brats import ET_LABEL, MODALITIES, N_LABELS, canonical_modality
from fedmodal.data.layouts import CaseFiles

logger = logging.getLogger(__name__)

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
SEG_KEYS = ("image", "label", "brain")


# ----------------------------------------------------------------------------- labels, records


def to_canonical_labels(
    seg: np.ndarray, release: str, et_label: int | None = None, cavity_label: int = 0
) -> np.ndarray:
    """Map an on-disk BraTS label map to canonical labels (int64).

    Args:
        seg: the label map as read from disk.
        release: the case's release (decides what 4 means when ``et_label`` is None).
        et_label: the enhancing-tumour label on disk (default ``layouts.ET_LABEL[release]``).
        cavity_label: canonical value for the resection cavity (on-disk 4 where ET is 3).
    """
    et_label = ET_LABEL[release] if et_label is None else et_label
    seg = np.rint(np.asarray(seg)).astype(np.int64)
    out = seg.copy()
    if et_label == 4:
        out[seg == 4] = 3
    else:
        out[seg == 4] = cavity_label
    return out


def case_record(case: CaseFiles, modalities: Sequence[str] = MODALITIES) -> dict[str, Any]:
    """A MONAI data dict for one case: paths of the held modalities among ``modalities``.

    Keys: "case_id", "release", one per held modality (canonical name -> path string), and
    "seg" when the case has one. Missing modalities are absent keys, never empty paths.
    """
    wanted = {canonical_modality(m) for m in modalities}
    record: dict[str, Any] = {"case_id": case.case_id, "release": case.release}
    for modality in case.modalities:
        if modality in wanted:
            record[modality] = str(case.images[modality])
    if case.seg is not None:
        record["seg"] = str(case.seg)
    return record


# ----------------------------------------------------------------------------- transforms


class LoadBraTSCased(MapTransform):
    """Load a :func:`case_record` into the fixed four-channel form, oriented to RAS.

    Writes "image" (4, X, Y, Z) float32 with zeros in missing channels, "avail" bool (4,),
    "label" (1, X, Y, Z) canonical labels (float32 for MONAI's spatial transforms; zeros and
    "has_label" False when there is no seg), and "brain" (1, X, Y, Z): voxels non-zero in
    any held modality, holes filled.

    Args:
        et_label: the on-disk ET label (default: from the record's release).
        cavity_label: canonical value for the 2023+ resection cavity.
        axcodes: orientation to resample the axes into.
    """

    def __init__(self, et_label: int | None = None, cavity_label: int = 0, axcodes: str = "RAS") -> None:
        super().__init__(keys=[*MODALITIES, "seg"], allow_missing_keys=True)
        self.et_label = et_label
        self.cavity_label = cavity_label
        file_keys = [*MODALITIES, "seg"]
        self.reader = Compose(
            [
                LoadImaged(keys=file_keys, image_only=True, allow_missing_keys=True),
                EnsureChannelFirstd(keys=file_keys, allow_missing_keys=True),
                Orientationd(keys=file_keys, axcodes=axcodes, labels=_RAS_LABELS, allow_missing_keys=True),
            ]
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        loaded = self.reader(dict(data))
        held = [m for m in MODALITIES if m in loaded]
        if not held:
            raise ValueError(f"case {data.get('case_id')}: no modality to load")
        reference = loaded[held[0]]
        spatial = tuple(reference.shape[1:])
        image = torch.zeros((len(MODALITIES), *spatial), dtype=torch.float32)
        avail = torch.zeros(len(MODALITIES), dtype=torch.bool)
        for index, modality in enumerate(MODALITIES):
            if modality in loaded:
                channel = loaded[modality]
                if tuple(channel.shape[1:]) != spatial:
                    raise ValueError(
                        f"case {data.get('case_id')}: {modality} shape {tuple(channel.shape[1:])} != {held[0]}'s {spatial}"
                    )
                image[index] = torch.as_tensor(channel[0], dtype=torch.float32)
                avail[index] = True
        # Brain: non-zero in any held modality, holes filled (dark voxels inside are brain).
        nonzero = (image[avail] != 0).any(dim=0).numpy()
        brain = torch.from_numpy(ndimage.binary_fill_holes(nonzero))[None]
        if "seg" in loaded:
            release = data.get("release", "brats2021")
            label_np = to_canonical_labels(loaded["seg"][0].numpy(), release, self.et_label, self.cavity_label)
            label = torch.from_numpy(label_np).float()[None]
            has_label = True
        else:
            label = torch.zeros((1, *spatial), dtype=torch.float32)
            has_label = False
        out = {k: v for k, v in data.items() if k not in self.keys}
        out["image"] = _like(reference, image)
        out["label"] = _like(reference, label)
        out["brain"] = _like(reference, brain.float())
        out["avail"] = avail
        out["has_label"] = has_label
        return out


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


class ZScoreOverBraind(MapTransform):
    """Z-score each available channel over the brain mask; zero outside the brain and in missing channels.

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


# ----------------------------------------------------------------------------- whole cases


def load_case(
    case: CaseFiles,
    modalities: Sequence[str] = MODALITIES,
    et_label: int | None = None,
    cavity_label: int = 0,
) -> dict[str, Any]:
    """Load one case in RAS with canonical labels.

    Args:
        case: the case.
        modalities: modalities to read; others are zero with ``avail`` False.
        et_label: on-disk ET label override (default: the release's).
        cavity_label: canonical value of the 2023+ resection cavity.

    Returns:
        dict: "image" float32 (4, X, Y, Z), "avail" bool (4,), "label" int64 (X, Y, Z) (zeros
        when there is no seg; see "has_label"), "brain" bool (X, Y, Z), "affine" (4, 4),
        "case_id".
    """
    loaded = LoadBraTSCased(et_label=et_label, cavity_label=cavity_label)(case_record(case, modalities))
    return {
        "image": loaded["image"].numpy().astype(np.float32, copy=False),
        "avail": loaded["avail"].numpy(),
        "label": loaded["label"][0].numpy().astype(np.int64),
        "brain": loaded["brain"][0].numpy().astype(bool),
        "affine": np.asarray(loaded["image"].affine, dtype=np.float64),
        "has_label": loaded["has_label"],
        "case_id": case.case_id,
    }


# ----------------------------------------------------------------------------- synthesis slices


def brain_crop_box(brain: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """In-plane bounding box of the brain over all slices, with a margin, clipped to the array."""
    xs = np.nonzero(brain.any(axis=(1, 2)))[0]
    ys = np.nonzero(brain.any(axis=(0, 2)))[0]
    x0, x1 = max(xs[0] - margin, 0), min(xs[-1] + margin + 1, brain.shape[0])
    y0, y1 = max(ys[0] - margin, 0), min(ys[-1] + margin + 1, brain.shape[1])
    return slice(int(x0), int(x1)), slice(int(y0), int(y1))


def _pad_square(t: torch.Tensor, value: float) -> torch.Tensor:
    """Pad (N, C, H, W) to square, centred."""
    h, w = t.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(t, (left, side - w - left, top, side - h - top), value=value)


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
                case, slices, min_tumour_fraction, min_brain_fraction, et_label, modalities, margin,
                max_slices_per_case, cavity_label,
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
        self, case, slices, min_tumour_fraction, min_brain_fraction, et_label, modalities, margin, max_slices, cavity_label
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
        image_t = _pad_square(image_t, -1.0)
        label_t = _pad_square(label_t.float(), 0.0)
        brain_t = _pad_square(brain_t.float(), 0.0)
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
