"""One place for every segmentation-baseline setting, shared by the CLI runs and the NVFlare site.

`SegConfig` holds what a site needs to train and score a segmentation network; `net_args()`
gives the `SegmentationNet` arguments, which are the only part the server must agree on
(the FedAvg job names them in both the server persistor and the client executor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LOSSES = ("dicece", "dicefocal")
PRECISIONS = ("fp32", "bf16")

# Defaults per dimensionality: the 2D whole-tumour U-Net of the ModalityBank downstream task,
# and a small 3D WT/TC/ET U-Net that fits a CPU laptop (larger on a GPU site: raise channels,
# patch size and batch).
DEFAULTS: dict[int, dict[str, Any]] = {
    2: {
        "regions": ("WT",),
        "patch_size": (96, 96),
        "batch_size": 16,
        "samples_per_case": 4,
        "channels": (16, 32, 64, 128, 256),
        "num_res_units": 0,
    },
    3: {
        "regions": ("WT", "TC", "ET"),
        "patch_size": (64, 64, 48),
        "batch_size": 2,
        "samples_per_case": 2,
        "channels": (8, 16, 32, 64, 128),
        "num_res_units": 1,
    },
}


@dataclass
class SegConfig:
    """Training and inference settings of a segmentation baseline.

    Args:
        spatial_dims: 2 (axial slices, scored slice by slice on whole volumes) or 3 (patches,
            sliding-window inference).
        regions: BraTS regions predicted, one sigmoid channel each ("WT"; or "WT", "TC", "ET").
        patch_size: training slice (2D) or patch (3D) size; also the inference window.
        batch_size: slices or patches per step.
        samples_per_case: slices or patches drawn from each case per epoch.
        tumour_probability: share of samples drawn through / centred on tumour.
        arch: "unet" or "basicunet" (MONAI).
        channels: U-Net feature channels per level.
        num_res_units: residual units per level ("unet").
        dropout: network dropout.
        mask_channels: feed the availability mask as four extra input channels.
        loss: "dicece" (Dice + BCE) or "dicefocal" (Dice + focal).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        modality_dropout: per available modality, the chance it is dropped (zeroed, mask 0)
            from a training sample; at least one modality is always kept. 0 disables.
        augment: random flips and intensity scale/shift.
        threshold: sigmoid threshold of a region.
        sw_overlap: sliding-window overlap at inference.
        sw_batch_size: windows per forward pass at inference.
        include_synthetic: use `<case>_<modality>_synthetic.nii.gz` files to fill missing modalities.
        precision: "fp32" or "bf16" (autocast; CPU and recent GPUs).
        cache: keep loaded, normalised cases in memory (fast epochs; needs RAM for real BraTS).
    """

    spatial_dims: int = 2
    regions: tuple[str, ...] = ()
    patch_size: tuple[int, ...] = ()
    batch_size: int = 0
    samples_per_case: int = 0
    tumour_probability: float = 0.67
    arch: str = "unet"
    channels: tuple[int, ...] = ()
    num_res_units: int = -1
    dropout: float = 0.0
    mask_channels: bool = True
    loss: str = "dicece"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    modality_dropout: float = 0.0
    augment: bool = True
    threshold: float = 0.5
    sw_overlap: float = 0.25
    sw_batch_size: int = 8
    include_synthetic: bool = False
    precision: str = "fp32"
    cache: bool = True

    def __post_init__(self) -> None:
        if self.spatial_dims not in DEFAULTS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        defaults = DEFAULTS[self.spatial_dims]
        # Empty / sentinel values take the dimension's default.
        if not self.regions:
            self.regions = defaults["regions"]
        if not self.patch_size:
            self.patch_size = defaults["patch_size"]
        if not self.batch_size:
            self.batch_size = defaults["batch_size"]
        if not self.samples_per_case:
            self.samples_per_case = defaults["samples_per_case"]
        if not self.channels:
            self.channels = defaults["channels"]
        if self.num_res_units < 0:
            self.num_res_units = defaults["num_res_units"]
        self.regions = tuple(str(r).upper() for r in self.regions)
        self.patch_size = tuple(int(s) for s in self.patch_size)
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size {self.patch_size} does not have {self.spatial_dims} dimensions")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")

    def net_args(self) -> dict[str, Any]:
        """Arguments of `fedmodal.nets.segmentation.SegmentationNet` for this configuration."""
        return {
            "spatial_dims": self.spatial_dims,
            "regions": list(self.regions),
            "n_modalities": 4,
            "mask_channels": self.mask_channels,
            "arch": self.arch,
            "channels": list(self.channels),
            "num_res_units": self.num_res_units,
            "dropout": self.dropout,
            "roi_size": list(self.patch_size),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SegConfig":
        """Build from a dict, refusing unknown keys (a typo in a job config should not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown segmentation settings {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def from_net_args(cls, net_args: Mapping[str, Any], **overrides: Any) -> "SegConfig":
        """The configuration implied by a `SegmentationNet` spec (for scoring a bare checkpoint)."""
        values: dict[str, Any] = {
            "spatial_dims": int(net_args.get("spatial_dims", 2)),
            "regions": tuple(net_args.get("regions", ("WT",))),
            "arch": net_args.get("arch", "unet"),
            "channels": tuple(net_args.get("channels", ())),
            "num_res_units": int(net_args.get("num_res_units", -1)),
            "dropout": float(net_args.get("dropout", 0.0)),
            "mask_channels": bool(net_args.get("mask_channels", True)),
        }
        if net_args.get("roi_size"):
            values["patch_size"] = tuple(net_args["roi_size"])
        values.update(overrides)
        return cls(**values)


def parse_regions(regions: Sequence[str] | str | None) -> tuple[str, ...]:
    """"WT,TC,ET", ["wt", "tc"] or None (the default) -> canonical ordered region names."""
    if regions is None:
        return ()
    if isinstance(regions, str):
        regions = [r for r in regions.replace(",", " ").split() if r]
    wanted = {str(r).upper() for r in regions}
    unknown = wanted - {"WT", "TC", "ET"}
    if unknown:
        raise ValueError(f"unknown regions {sorted(unknown)}; choose from WT, TC, ET")
    return tuple(r for r in ("WT", "TC", "ET") if r in wanted)
