"""Building blocks of the FedMEPD network: modality encoder, region-aware fusion, U-Net decoder,
anchor cross-attention. Dimension-agnostic (spatial_dims 2 or 3), on MONAI's `Convolution`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

ACT = ("leakyrelu", {"negative_slope": 0.2, "inplace": True})
NORM = "instance"


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, strides: int = 1, kernel_size: int = 3):
    """conv (3x3 by default) + instance norm + LeakyReLU 0.2."""
    return Convolution(
        spatial_dims, in_channels, out_channels, strides=strides, kernel_size=kernel_size, act=ACT, norm=NORM
    )


class ModalityEncoder(nn.Module):
    """One modality's encoder: 1 input channel, one stage per channel count, stride 2 from stage 2.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels per stage, e.g. (16, 32, 64, 128).
    """

    def __init__(self, spatial_dims: int, channels: Sequence[int]) -> None:
        super().__init__()
        stages = []
        in_channels = 1
        for i, out_channels in enumerate(channels):
            stages.append(
                nn.Sequential(
                    conv_block(spatial_dims, in_channels, out_channels, strides=1 if i == 0 else 2),
                    conv_block(spatial_dims, out_channels, out_channels),
                )
            )
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class RegionAwareFusion(nn.Module):
    """Fuses the modality features of one scale region by region (after RFNet's region-aware fusion).

    A 1x1 convolution over the stacked modality features gives soft region maps P (softmax over
    regions). For each region, every present modality's features are pooled inside the region
    and scored; a softmax over the present modalities gives that region's modality weights.
    Each voxel mixes the modalities with the region weights blended by P, then a 3x3 convolution.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels of this scale (each modality's).
        n_modalities: modality feature maps fused.
        n_regions: soft regions (the output classes).
    """

    def __init__(self, spatial_dims: int, channels: int, n_modalities: int, n_regions: int) -> None:
        super().__init__()
        self.region_map = Convolution(spatial_dims, n_modalities * channels, n_regions, kernel_size=1, conv_only=True)
        self.score = nn.Linear(channels, n_regions)  # row k scores the modalities for region k
        self.out = conv_block(spatial_dims, channels, channels)

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """features (N, M, C, *S) with absent modalities zeroed; present (N, M) bool -> (N, C, *S)."""
        n, m, c = features.shape[:3]
        spatial = features.shape[3:]
        regions = torch.softmax(self.region_map(features.reshape(n, m * c, *spatial)), dim=1)  # (N, K, *S)
        flat_r = regions.reshape(n, regions.shape[1], -1)
        flat_f = features.reshape(n, m, c, -1)
        pooled = torch.einsum("nkx,nmcx->nmkc", flat_r, flat_f) / (flat_r.sum(-1)[:, None, :, None] + 1e-6)
        logits = torch.einsum("nmkc,kc->nmk", pooled, self.score.weight) + self.score.bias
        logits = logits.masked_fill(~present[:, :, None], float("-inf"))
        weights = torch.softmax(logits, dim=1)  # (N, M, K) over the present modalities
        voxel_weights = torch.einsum("nkx,nmk->nmx", flat_r, weights)
        fused = torch.einsum("nmx,nmcx->ncx", voxel_weights, flat_f).reshape(n, c, *spatial)
        return self.out(fused)


class UpStage(nn.Module):
    """U-Net decoder step: upsample, 3x3 conv to the skip's channels, concatenate the skip, 3x3 conv.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels coming from the coarser scale.
        out_channels: channels of the skip and of the output.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.reduce = conv_block(spatial_dims, in_channels, out_channels)
        self.merge = conv_block(spatial_dims, 2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        return self.merge(torch.cat([self.reduce(x), skip], dim=1))


class UNetDecoder(nn.Module):
    """Multi-scale features (finest first) -> logits at the finest scale, U-Net style.

    Args:
        spatial_dims: 2 or 3.
        channels: channels per scale, finest first.
        out_channels: output logits.
    """

    def __init__(self, spatial_dims: int, channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.up = nn.ModuleList(
            UpStage(spatial_dims, channels[i + 1], channels[i]) for i in reversed(range(len(channels) - 1))
        )
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for stage, skip in zip(self.up, reversed(features[:-1])):
            x = stage(x, skip)
        return self.head(x)


class AnchorAttention(nn.Module):
    """Calibration of one scale: every voxel feature is a query, the anchors are keys and values.

    Multi-head scaled dot-product cross-attention (`torch.nn.MultiheadAttention`); its output
    replaces the fused feature (no residual), as in FedMEMA/FedMEPD.

    Args:
        channels: feature channels of the scale (the anchors' length).
        heads: attention heads (must divide `channels`).
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{heads} attention heads do not divide {channels} channels")
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """features (N, C, *S), anchors (A, C) -> calibrated features (N, C, *S)."""
        n, c = features.shape[:2]
        if anchors.ndim != 2 or anchors.shape[1] != c:
            raise ValueError(f"anchors of shape {tuple(anchors.shape)} do not fit features with {c} channels")
        queries = features.reshape(n, c, -1).transpose(1, 2)  # (N, L, C)
        keys = anchors.to(features.dtype)[None].expand(n, -1, -1)
        out, _ = self.attention(queries, keys, keys, need_weights=False)
        return out.transpose(1, 2).reshape(features.shape)
