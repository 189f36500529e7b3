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

from fedmodal.amp import check_precision
from fedmodal.config import Settings
from fedmodal.fl.timing import TASK_POLL_SECONDS, WAIT_AFTER_MIN_SECONDS

LOSSES = ("dicece", "dicefocal")
# The fields `fedmodal.baselines.data.train_loader` reads to draw training samples.
SAMPLING_FIELDS = (
    "spatial_dims",
    "patch_size",
    "batch_size",
    "samples_per_case",
    "tumour_probability",
    "augment",
    "cache",
    "loader_workers",
)
# The fields that fix the network (a net preset sets them all); the rest is training and inference.
NET_FIELDS = (
    "spatial_dims",
    "regions",
    "arch",
    "channels",
    "num_res_units",
    "dropout",
    "mask_channels",
    "patch_size",
    "output_prior",
)

# Defaults per dimensionality: the network is the dimension's preset (fedmodal.nets.segmentation),
# batch and samples per case fit a CPU laptop (larger on a GPU site).
DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"net": "unet2d-wt", "batch_size": 16, "samples_per_case": 4},
    3: {"net": "unet3d-brats", "batch_size": 2, "samples_per_case": 2},
}


@dataclass
class SegConfig(Settings):
    """Training and inference settings of a segmentation baseline.

    Args:
        net: a named network (`fedmodal.nets.segmentation.SEGMENTATION_PRESETS`, e.g.
            "unet2d-wt"); it fixes the network fields below (spatial_dims, regions, arch,
            channels, num_res_units, dropout, mask_channels, patch_size). Empty: those fields
            as given, defaulting per dimensionality.
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
        output_prior: initial foreground probability of each region's sigmoid (0: MONAI's
            initialisation; see `fedmodal.nets.output_prior`).
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
        precision: "auto" (bf16/fp16 autocast on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16"
            (`fedmodal.amp`).
        cache: keep loaded, normalised cases in memory (fast epochs; needs RAM for real BraTS).
        loader_workers: training-data worker processes; -1: none on a CPU host (its cores
            train), up to 4 on a CUDA host, with pinned memory (`fedmodal.baselines.data`).
    """

    settings_name = "segmentation"

    net: str = ""
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
    output_prior: float = 0.0
    loss: str = "dicece"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    modality_dropout: float = 0.0
    augment: bool = True
    threshold: float = 0.5
    sw_overlap: float = 0.25
    sw_batch_size: int = 8
    include_synthetic: bool = False
    precision: str = "auto"
    cache: bool = True
    loader_workers: int = -1

    def __post_init__(self) -> None:
        if self.net:
            self._apply_preset()
        if self.spatial_dims not in DEFAULTS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        from fedmodal.nets.segmentation import preset_net_args

        defaults = DEFAULTS[self.spatial_dims]
        net = preset_net_args(defaults["net"])
        # Empty / sentinel values take the dimension's default.
        if not self.regions:
            self.regions = tuple(net["regions"])
        if not self.patch_size:
            self.patch_size = tuple(net["roi_size"])
        if not self.batch_size:
            self.batch_size = defaults["batch_size"]
        if not self.samples_per_case:
            self.samples_per_case = defaults["samples_per_case"]
        if not self.channels:
            self.channels = tuple(net["channels"])
        if self.num_res_units < 0:
            self.num_res_units = net["num_res_units"]
        self.regions = tuple(str(r).upper() for r in self.regions)
        self.patch_size = tuple(int(s) for s in self.patch_size)
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size {self.patch_size} does not have {self.spatial_dims} dimensions")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        check_precision(self.precision)
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")

    def _apply_preset(self) -> None:
        from fedmodal.nets.segmentation import preset_net_args

        preset = SegConfig.from_net_args(preset_net_args(self.net))
        # A net field left at its default takes the preset's value; another value is a clash.
        unset = {f.name: f.default for f in dataclasses.fields(SegConfig)}
        clashing = [f for f in NET_FIELDS if getattr(self, f) not in (unset[f], getattr(preset, f))]
        if clashing:
            raise ValueError(f"net preset {self.net!r} fixes {clashing}; drop them or the preset")
        for f in NET_FIELDS:
            setattr(self, f, getattr(preset, f))

    def training_dict(self) -> dict[str, Any]:
        """`to_dict()` without the network fields: what a job config gives beside a net preset."""
        return {k: v for k, v in self.to_dict().items() if k not in NET_FIELDS}

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
            "output_prior": self.output_prior,
        }

    @classmethod
    def from_net_args(cls, net_args: Mapping[str, Any], **overrides: Any) -> SegConfig:
        """The configuration implied by a `SegmentationNet` spec (for scoring a bare checkpoint)."""
        values: dict[str, Any] = {
            "spatial_dims": int(net_args.get("spatial_dims", 2)),
            "regions": tuple(net_args.get("regions", ("WT",))),
            "arch": net_args.get("arch", "unet"),
            "channels": tuple(net_args.get("channels", ())),
            "num_res_units": int(net_args.get("num_res_units", -1)),
            "dropout": float(net_args.get("dropout", 0.0)),
            "mask_channels": bool(net_args.get("mask_channels", True)),
            "output_prior": float(net_args.get("output_prior", 0.0)),
        }
        if net_args.get("roi_size"):
            values["patch_size"] = tuple(net_args["roi_size"])
        values.update(overrides)
        return cls(**values)


def parse_regions(regions: Sequence[str] | str | None) -> tuple[str, ...]:
    """ "WT,TC,ET", ["wt", "tc"] or None (the default) -> canonical ordered region names."""
    if regions is None:
        return ()
    if isinstance(regions, str):
        regions = [r for r in regions.replace(",", " ").split() if r]
    wanted = {str(r).upper() for r in regions}
    unknown = wanted - {"WT", "TC", "ET"}
    if unknown:
        raise ValueError(f"unknown regions {sorted(unknown)}; choose from WT, TC, ET")
    return tuple(r for r in ("WT", "TC", "ET") if r in wanted)


@dataclass
class FederatedSegConfig(Settings):
    """How the FedAvg / FedProx segmentation job runs (the network and training are `SegConfig`).

    Args:
        num_rounds: FedAvg rounds.
        local_epochs: passes over each site's training cases per round.
        fedprox_mu: FedProx proximal weight (0 is FedAvg).
        seed: run seed; each site derives its own from it and its name.
        key_metric: the validation metric that picks the best global model.
        min_responses: sites whose results complete a round (0: every site): with fewer than
            all, the federation goes on while a hospital is offline.
        wait_after_min: seconds the remaining sites get once `min_responses` have answered.
        round_timeout: seconds a round may last at most (0: no limit).
        task_poll: seconds between the workflow's checks for results, and between an idle
            site's task requests (NVFlare's defaults 0.5 s and 2 s cost a short round a sixth).
        resume_from: the server's `FL_global_model.pt` of an earlier run (NVFlare's persistor
            writes it after every round): training starts from it, at round `start_round`.
        start_round: rounds that earlier run completed; the run trains the rest up to `num_rounds`.
        submit_model_timeout, validation_timeout: cross-site evaluation timeouts (seconds).
    """

    num_rounds: int = 20
    local_epochs: int = 5
    fedprox_mu: float = 0.0
    seed: int = 0
    key_metric: str = "val_dice"
    min_responses: int = 0
    wait_after_min: int = WAIT_AFTER_MIN_SECONDS
    round_timeout: int = 0
    task_poll: float = TASK_POLL_SECONDS
    resume_from: str = ""
    start_round: int = 0
    submit_model_timeout: int = 600
    validation_timeout: int = 6000

    def __post_init__(self) -> None:
        if not 0 <= self.start_round < self.num_rounds:
            raise ValueError(f"start_round must be in [0, num_rounds={self.num_rounds}), got {self.start_round}")
        if self.start_round and not self.resume_from:
            raise ValueError(f"start_round {self.start_round} needs resume_from (the earlier run's FL_global_model.pt)")


def sampling_config(settings: Any, regions: Sequence[str]) -> SegConfig:
    """A `SegConfig` carrying another method's sampling settings (`SAMPLING_FIELDS`), for
    `fedmodal.baselines.data.train_loader`."""
    return SegConfig(regions=tuple(regions), **{f: getattr(settings, f) for f in SAMPLING_FIELDS})
