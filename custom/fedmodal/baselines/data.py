"""What a segmentation baseline reads: a site's cases (optionally completed with synthetic
modalities), training loaders, whole volumes for scoring, and the tensors the network sees.

Missing modalities are explicit: the image channel is zero and, in the input, an availability
channel says so (`network_input`). Training can drop available modalities at random
(`drop_modalities`) so a model learns to cope with any subset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, list_data_collate
from monai.transforms import Compose

from fedmodal.baselines.config import SegConfig
from fedmodal.brats import ENHANCING, MODALITIES, NECROSIS, OEDEMA, REGION_LABELS, ordered_modalities
from fedmodal.data.datasets import segmentation_dataset
from fedmodal.data.layouts import CaseFiles
from fedmodal.data.loading import LoadBraTSCased, case_record
from fedmodal.data.manifest import build_manifest
from fedmodal.data.transforms import ZScoreOverBraind, segmentation_transforms

logger = logging.getLogger(__name__)


@dataclass
class SiteData:
    """The cases a baseline trains and scores on at one site (or one pooled set of sites).

    Args:
        name: site name (pooled: names joined by "+").
        modalities: modalities every used case holds (real, or synthetic when included).
        splits: "train"/"val"/"test" -> cases.
        synthetic: case id -> modalities filled from synthetic files.
        problems: skipped cases (site, case, file, problem records).
    """

    name: str
    modalities: tuple[str, ...]
    splits: dict[str, list[CaseFiles]]
    synthetic: dict[str, tuple[str, ...]] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)

    def cases(self, split: str) -> list[CaseFiles]:
        if split == "all":
            return [c for name in ("train", "val", "test") for c in self.splits.get(name, [])]
        return list(self.splits.get(split, []))

    def validation_cases(self) -> list[CaseFiles]:
        """The val split, else the first two training cases (a site without one still selects models)."""
        return self.cases("val") or self.cases("train")[:2]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modalities": list(self.modalities),
            "cases": {k: len(v) for k, v in self.splits.items()},
            "synthetic_cases": len(self.synthetic),
            "problems": len(self.problems),
        }


def load_site(
    root: str | Path,
    site: str | None = None,
    include_synthetic: bool = False,
    exclude_modalities: Sequence[str] = (),
    on_error: str | None = None,
    split: tuple[float, float, float] | None = None,
) -> SiteData:
    """Read a site folder into a `SiteData` (the manifest decides cases, split and modalities).

    Args:
        root: the site's BraTS folder (any release naming).
        site: its name (default: the manifest's).
        include_synthetic: let `<case>_<modality>_synthetic.nii.gz` files (written by
            `fedmodal complete`) stand in for missing modalities; real files always win.
        exclude_modalities: held modalities the site will not use.
        on_error: "skip" or "stop" for bad cases (default: the site file's, else skip).
        split: (train, val, test) fractions (default: the site file's, else 0.7/0.1/0.2).
    """
    manifest = build_manifest(
        root,
        site=site,
        exclude_modalities=tuple(exclude_modalities),
        on_error=on_error,
        split=split,
        include_synthetic=include_synthetic,
    )
    return site_data(manifest, include_synthetic)


def site_data(manifest, include_synthetic: bool = False) -> SiteData:
    """A `SiteData` from a site's manifest (`fedmodal.fl.site.prepare_site` builds one)."""
    root = manifest.root
    if not manifest.modalities:
        raise ValueError(f"site {manifest.site}: no modality is held by every usable case under {root}")
    synthetic = {}
    for case in manifest.cases:
        filled = tuple(m for m in MODALITIES if m in case.synthetic and case.images.get(m) == case.synthetic[m])
        if filled:
            synthetic[case.case_id] = filled
    if include_synthetic and not synthetic:
        logger.warning(
            "site %s: synthetic files were asked for but none fills a missing modality under %s", manifest.site, root
        )
    # Each case carries exactly the modalities the site uses, so pooled sites keep their own.
    used = set(manifest.modalities)
    splits = {name: [_restrict(case, used) for case in manifest.cases_in(name)] for name in ("train", "val", "test")}
    return SiteData(
        name=manifest.site,
        modalities=manifest.modalities,
        splits=splits,
        synthetic=synthetic,
        problems=list(manifest.problems),
    )


def _restrict(case: CaseFiles, modalities: set[str]) -> CaseFiles:
    images = {m: p for m, p in case.images.items() if m in modalities}
    return case if images == case.images else dataclasses.replace(case, images=images)


def pool_sites(sites: Sequence[SiteData]) -> SiteData:
    """Several sites' cases as one data set (centralised training on pooled data).

    Each case keeps its own site's modalities: a modality missing at one site stays missing
    (zero channel, mask 0) in that site's cases. `modalities` is the union.
    """
    if not sites:
        raise ValueError("no site to pool")
    if len(sites) == 1:
        return sites[0]
    splits = {name: [c for s in sites for c in s.cases(name)] for name in ("train", "val", "test")}
    union = {m for s in sites for m in s.modalities}
    return SiteData(
        name="+".join(s.name for s in sites),
        modalities=ordered_modalities(union),
        splits=splits,
        synthetic={k: v for s in sites for k, v in s.synthetic.items()},
        problems=[p for s in sites for p in s.problems],
    )


# ----------------------------------------------------------------------------- loaders


def train_loader(
    cases: Sequence[CaseFiles], cfg: SegConfig, seed: int, device: torch.device | str = "cpu"
) -> DataLoader:
    """Random slices (2D) or patches (3D) of the cases, `cfg.batch_size` samples a step.

    A step takes `ceil(batch_size / samples_per_case)` cases and `samples_per_case` samples
    from each (the data layer's MONAI pipeline: z-score over the brain, tumour-biased
    sampling, flips and intensity jitter). One epoch visits every case once. Each case
    contributes the modalities its `images` hold (see `load_site`).

    Args:
        cases: training cases.
        cfg: the baseline configuration.
        seed: seeds the case order and every random transform (a run repeats at the same
            worker count: each worker draws its own random stream).
        device: where the batches go; on CUDA, `cfg.loader_workers` -1 means worker processes
            and the batches come in pinned memory.
    """
    if not cases:
        raise ValueError("no training case: the train split is empty")
    transform = segmentation_transforms(
        mode="train",
        spatial_dims=cfg.spatial_dims,
        patch_size=cfg.patch_size,
        num_samples=cfg.samples_per_case,
        tumour_probability=cfg.tumour_probability,
        augment=cfg.augment,
    )
    transform.set_random_state(seed=seed % (2**32))
    dataset = segmentation_dataset(list(cases), transform, MODALITIES, cache=cfg.cache)
    cases_per_step = max(1, math.ceil(cfg.batch_size / cfg.samples_per_case))
    cuda = torch.device(device).type == "cuda"
    workers = loader_workers(cfg.loader_workers, cuda)
    return DataLoader(
        dataset,
        batch_size=cases_per_step,
        shuffle=True,
        collate_fn=list_data_collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=cuda,
        # MONAI's loader seeds each worker's random transforms from this generator.
        generator=torch.Generator().manual_seed(seed),
    )


def loader_workers(requested: int, cuda: bool) -> int:
    """Worker processes for `requested` (-1: none when the site trains on a CPU, whose cores
    train; on CUDA up to 4, half the cores)."""
    if requested < -1:
        raise ValueError(f"loader_workers must be -1 (auto), 0 or more, got {requested}")
    if requested >= 0:
        return requested
    if not cuda:
        return 0
    return min(4, max(1, (os.cpu_count() or 2) // 2))


def volume_transform() -> Compose:
    """Whole volumes for scoring: load in RAS, canonical labels, z-score over the brain. No crop,
    so specificity counts every voxel as BraTS does."""
    return Compose([LoadBraTSCased(), ZScoreOverBraind(keys="image")])


def load_volumes(cases: Sequence[CaseFiles], modalities: Sequence[str] = MODALITIES) -> list[dict[str, Any]]:
    """Load cases whole for scoring: image (4, X, Y, Z) float32, avail (4,), label (X, Y, Z)
    int64, brain (X, Y, Z) bool, spacing (mm), case_id. Only `modalities` are read (of those
    each case holds); the brain mask and z-scores come from what is read."""
    transform = volume_transform()
    volumes = []
    for case in cases:
        item = transform(case_record(case, tuple(modalities)))
        affine = np.asarray(item["image"].affine, dtype=np.float64)
        volumes.append(
            {
                "case_id": case.case_id,
                "image": torch.as_tensor(item["image"]).float().clone(),
                "avail": torch.as_tensor(item["avail"]).bool().clone(),
                "label": torch.as_tensor(item["label"])[0].round().long().clone(),
                "brain": torch.as_tensor(item["brain"])[0].bool().clone(),
                "has_label": bool(item.get("has_label", True)),
                "spacing": tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))),
            }
        )
    return volumes


# ----------------------------------------------------------------------------- tensors


def network_input(image: torch.Tensor, avail: torch.Tensor, mask_channels: bool = True) -> torch.Tensor:
    """(B, 4, *S) images and (B, 4) availability -> the network input (B, 8, *S).

    Missing channels are zeroed whatever they held, then the availability is appended as
    constant planes (1 real, 0 missing). Without `mask_channels` the zeroed images alone.
    """
    avail = avail.to(image.device).bool()
    shape = (avail.shape[0], avail.shape[1]) + (1,) * (image.ndim - 2)
    planes = avail.reshape(shape).to(image.dtype)
    image = image * planes
    if not mask_channels:
        return image
    return torch.cat([image, planes.expand_as(image)], dim=1)


def region_targets(label: torch.Tensor, regions: Sequence[str]) -> torch.Tensor:
    """Canonical labels (B, 1, *S) -> one binary float channel per region (B, R, *S).

    Regions hold the labels of ``fedmodal.brats.REGION_LABELS``: WT = {1, 2, 3}, TC = {1, 3}, ET = {3}.
    """
    label = label.long()
    if label.ndim >= 2 and label.shape[1] == 1:
        label = label[:, 0]
    masks = [torch.isin(label, torch.tensor(REGION_LABELS[r], device=label.device)) for r in regions]
    return torch.stack(masks, dim=1).float()


def regions_to_label(masks: torch.Tensor | np.ndarray, regions: Sequence[str]) -> np.ndarray:
    """Binary region masks (R, *S) -> a canonical label map (*S), BraTS overwrite order:
    WT -> 2 (oedema), then TC -> 1 (necrosis), then ET -> 3 (enhancing)."""
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    masks = masks.astype(bool)
    label = np.zeros(masks.shape[1:], dtype=np.int64)
    for value, region in ((OEDEMA, "WT"), (NECROSIS, "TC"), (ENHANCING, "ET")):
        if region in regions:
            label[masks[list(regions).index(region)]] = value
    return label


def drop_modalities(avail: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly drop available modalities per sample (each with `probability`), keeping at least one.

    Args:
        avail: (B, 4) bool availability.
        probability: chance an available modality is dropped.
        generator: torch RNG for repeatable runs.

    Returns:
        the new (B, 4) availability (a subset of the input's).
    """
    if probability <= 0:
        return avail
    avail = avail.bool()
    keep = torch.rand(avail.shape, generator=generator) >= probability
    out = avail & keep.to(avail.device)
    for b in range(avail.shape[0]):
        if not out[b].any() and avail[b].any():
            held = torch.nonzero(avail[b]).flatten()
            pick = held[torch.randint(len(held), (1,), generator=generator)]
            out[b, pick] = True
    return out


def site_training_data(name: str, site_config, run_seed: int, sampling: SegConfig):
    """A site's data for a federated method: (prepared site, SiteData, training loader).

    The one set-up of `fedmodal.fl.site.prepare_site` (data root, site file, manifest, seed,
    device), then the training split's loader with `sampling`'s settings.

    Raises:
        ValueError: the site has no training case.
    """
    from fedmodal.fl.site import prepare_site

    site = prepare_site(name, site_config, run_seed)
    data = site_data(site.manifest)
    train = data.cases("train")
    if not train:
        raise ValueError(f"site {name}: no training case under {site.root}")
    return site, data, train_loader(train, sampling, site.seed, site.device)
