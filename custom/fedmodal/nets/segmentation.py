"""The baseline segmentation network: a MONAI U-Net that remembers how it was built.

The U-Net itself is MONAI's (`UNet` or `BasicUNet`); this wrapper only records the
arguments it was built with (`config()`), so a checkpoint or an NVFlare persistor spec can
rebuild the same network, and names what the output channels mean (`regions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from fedmodal.brats import REGIONS
from fedmodal.nets.output_prior import apply_output_prior

ARCHITECTURES = ("unet", "basicunet")

# Networks a job names by one word, so the server's persistor and every site build the same one.
SEGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    # The 2D whole-tumour U-Net of ModalityBank's downstream task.
    "unet2d-wt": {
        "spatial_dims": 2,
        "regions": ["WT"],
        "n_modalities": 4,
        "mask_channels": True,
        "arch": "unet",
        "channels": [16, 32, 64, 128, 256],
        "num_res_units": 0,
        "dropout": 0.0,
        "roi_size": [96, 96],
    },
    # The 2D WT/TC/ET U-Net of the MixMFL / FedMEPD comparisons (about MixMFLNet's size and patch,
    # and its output prior, so the few-case sites do not spend the budget unlearning p = 0.5).
    "unet2d-brats": {
        "spatial_dims": 2,
        "regions": ["WT", "TC", "ET"],
        "n_modalities": 4,
        "mask_channels": True,
        "arch": "unet",
        "channels": [16, 32, 64, 128, 256],
        "num_res_units": 0,
        "dropout": 0.0,
        "roi_size": [64, 64],
        "output_prior": 0.05,
    },
    # A tiny 2D U-Net for smoke tests and CI on 32x32 slices (not for results).
    "unet2d-wt-tiny": {
        "spatial_dims": 2,
        "regions": ["WT"],
        "n_modalities": 4,
        "mask_channels": True,
        "arch": "unet",
        "channels": [4, 8, 16],
        "num_res_units": 0,
        "dropout": 0.0,
        "roi_size": [32, 32],
    },
    # A small 3D WT/TC/ET U-Net that fits a CPU laptop (raise channels and patch on a GPU site).
    "unet3d-brats": {
        "spatial_dims": 3,
        "regions": ["WT", "TC", "ET"],
        "n_modalities": 4,
        "mask_channels": True,
        "arch": "unet",
        "channels": [8, 16, 32, 64, 128],
        "num_res_units": 1,
        "dropout": 0.0,
        "roi_size": [64, 64, 48],
    },
}


def preset_net_args(name: str) -> dict[str, Any]:
    """The `SegmentationNet` arguments of a named preset."""
    if name not in SEGMENTATION_PRESETS:
        raise ValueError(f"unknown segmentation network preset {name!r}; known: {sorted(SEGMENTATION_PRESETS)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in SEGMENTATION_PRESETS[name].items()}


class SegmentationNet(nn.Module):
    """A MONAI U-Net with one sigmoid output channel per BraTS region (logits out).

    Input: the four canonical modality channels plus, when `mask_channels`, four constant
    channels saying which modality is real (1) or missing (0, image channel zeroed).

    Args:
        spatial_dims: 2 (axial slices) or 3 (volumes/patches).
        regions: output channels, a subset of ("WT", "TC", "ET") in that order.
        n_modalities: image channels (the four canonical modalities).
        mask_channels: add one availability channel per modality to the input.
        arch: "unet" (MONAI `UNet`) or "basicunet" (MONAI `BasicUNet`).
        channels: feature channels per level (`UNet`: any length >= 2; `BasicUNet`: 6 values).
        num_res_units: residual units per level (`UNet` only; 0 gives plain conv blocks).
        dropout: dropout probability.
        roi_size: the patch or slice size the network is trained on, used as the sliding
            window at inference (None: whole input). Recorded here so it travels with the weights.
        output_prior: start every region's sigmoid at this foreground probability
            (`fedmodal.nets.output_prior`); 0 keeps MONAI's initialisation.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        regions: Sequence[str] = ("WT",),
        n_modalities: int = 4,
        mask_channels: bool = True,
        arch: str = "unet",
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        num_res_units: int = 0,
        dropout: float = 0.0,
        roi_size: Sequence[int] | None = None,
        output_prior: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        regions = tuple(regions)
        if (
            not regions
            or any(r not in REGIONS for r in regions)
            or list(regions) != [r for r in REGIONS if r in regions]
        ):
            raise ValueError(f"regions must be a non-empty subset of {REGIONS} in that order, got {regions}")
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
        if roi_size is not None and len(roi_size) != spatial_dims:
            raise ValueError(f"roi_size {tuple(roi_size)} does not have {spatial_dims} dimensions")
        self.regions = regions
        in_channels = n_modalities * (2 if mask_channels else 1)
        self._config: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "regions": list(regions),
            "n_modalities": n_modalities,
            "mask_channels": bool(mask_channels),
            "arch": arch,
            "channels": [int(c) for c in channels],
            "num_res_units": int(num_res_units),
            "dropout": float(dropout),
            "roi_size": [int(s) for s in roi_size] if roi_size is not None else None,
            "output_prior": float(output_prior),
        }
        if arch == "unet":
            self.net = UNet(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=len(regions),
                channels=tuple(channels),
                strides=(2,) * (len(channels) - 1),
                num_res_units=num_res_units,
                norm="instance",
                dropout=dropout,
            )
        else:
            if len(channels) != 6:
                raise ValueError(f"basicunet needs 6 feature sizes, got {tuple(channels)}")
            self.net = BasicUNet(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=len(regions),
                features=tuple(channels),
                dropout=dropout,
            )
        if output_prior:
            apply_output_prior(self.net, len(regions), output_prior)

    @property
    def divisor(self) -> int:
        """Spatial sizes the network accepts are multiples of this."""
        levels = len(self._config["channels"]) - 1 if self._config["arch"] == "unet" else 4
        return 2**levels

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able): `SegmentationNet(**net.config())` rebuilds it."""
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NamedSegmentationNet(SegmentationNet):
    """A `SegmentationNet` built from a preset name (`SEGMENTATION_PRESETS`); same weights layout.

    Args:
        preset: the preset's name, e.g. "unet2d-wt".
    """

    DEFAULT_PRESET = "unet2d-wt"
    _always_serialize_args = ("preset",)  # NVFlare's job export writes it even at its default

    def __init__(self, preset: str = DEFAULT_PRESET) -> None:
        super().__init__(**preset_net_args(preset))
        self.preset = preset
