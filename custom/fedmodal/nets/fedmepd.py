"""The FedMEPD segmentation network: per-modality encoders, a region-aware fusion decoder, a
shared auxiliary decoder, and anchor cross-attention that calibrates the fused features.

Parameter keys carry the groups the federation aggregates by prefix:

- ``enc.<modality>.``: one encoder per modality (federated over the sites holding it);
- ``dec.``: the fusion decoder (partially personalised per output filter);
- ``aux.``: the auxiliary decoder, shared across modalities;
- ``attn.``: the anchor cross-attention at each scale (stays at the site).

Outputs are softmax logits over the canonical labels (0 background, 1 necrosis, 2 oedema,
3 enhancing): the paper's weighted cross-entropy + Dice is over these classes, and the anchors
are per class, which needs disjoint classes (nested WT/TC/ET regions would pool the same voxels
into several anchors). The argmax label map is scored as WT/TC/ET.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedmodal.brats import MODALITIES, N_LABELS
from fedmodal.nets.fedmepd_blocks import AnchorAttention, ModalityEncoder, RegionAwareFusion, UNetDecoder
from fedmodal.nets.output_prior import apply_softmax_prior


@dataclass
class FedMEPDOutput:
    """What `FedMEPDNet.forward` returns.

    Args:
        logits: fused segmentation logits (N, num_classes, *S).
        aux: modality -> auxiliary logits (N, num_classes, *S), for each modality present in
            at least one sample (a sample without it has zero features there).
        features: the fused features per scale, finest first, (N, C_s, *S_s), before calibration.
    """

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    features: list[torch.Tensor] = field(default_factory=list)


class FedMEPDNet(nn.Module):
    """Modality-specific encoders, region-aware fusion decoder, shared auxiliary decoder, anchors.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels per scale; the paper's (16, 32, 64, 128). Inputs must be a
            multiple of ``divisor`` = 2 ** (len(channels) - 1) in each spatial size.
        num_classes: softmax output classes (4: background, necrosis, oedema, enhancing).
        heads: attention heads per scale (each must divide that scale's channels).
        modalities: the modalities, in the order of the input channels.
        use_attention: build the anchor cross-attention (False: anchors are ignored).
        output_prior: initial total foreground probability of the fused and auxiliary softmax
            heads (`fedmodal.nets.output_prior.apply_softmax_prior`); 0 keeps a zero bias.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128),
        num_classes: int = N_LABELS,
        heads: Sequence[int] = (8, 8, 8, 4),
        modalities: Sequence[str] = MODALITIES,
        use_attention: bool = True,
        output_prior: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if use_attention and len(heads) != len(channels):
            raise ValueError(f"heads {tuple(heads)} must give one count per scale of channels {tuple(channels)}")
        self.spatial_dims = spatial_dims
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = int(num_classes)
        self.heads = tuple(int(h) for h in heads)
        self.modalities = tuple(modalities)
        self.use_attention = bool(use_attention)
        self.divisor = 2 ** (len(self.channels) - 1)
        self.enc = nn.ModuleDict({m: ModalityEncoder(spatial_dims, self.channels) for m in self.modalities})
        self.dec = FusionDecoder(spatial_dims, self.channels, len(self.modalities), self.num_classes)
        self.aux = UNetDecoder(spatial_dims, self.channels, self.num_classes)
        if self.use_attention:
            self.attn = nn.ModuleList(AnchorAttention(c, h) for c, h in zip(self.channels, self.heads))
        self.output_prior = float(output_prior)
        if self.output_prior:
            for head in (self.dec.unet.head.conv, self.aux.head.conv):
                apply_softmax_prior(head, self.output_prior)

    def config(self) -> dict[str, Any]:
        """The constructor arguments (to rebuild the same network)."""
        return {
            "spatial_dims": self.spatial_dims,
            "channels": list(self.channels),
            "num_classes": self.num_classes,
            "heads": list(self.heads),
            "modalities": list(self.modalities),
            "use_attention": self.use_attention,
            "output_prior": self.output_prior,
        }

    def present_mask(self, present: torch.Tensor | Sequence[str], batch: int, device: torch.device) -> torch.Tensor:
        """(N, M) bool availability from a mask or from modality names (the same for every sample)."""
        if isinstance(present, torch.Tensor):
            mask = present.to(device=device, dtype=torch.bool)
            if mask.ndim == 1:
                mask = mask[None].expand(batch, -1)
        else:
            unknown = sorted(set(present) - set(self.modalities))
            if unknown:
                raise ValueError(f"unknown modalities {unknown}; this network has {list(self.modalities)}")
            mask = torch.tensor([m in present for m in self.modalities], device=device)[None].expand(batch, -1)
        if mask.shape != (batch, len(self.modalities)):
            raise ValueError(f"present mask of shape {tuple(mask.shape)}; expected ({batch}, {len(self.modalities)})")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every sample needs at least one present modality")
        return mask

    def encode(self, images: torch.Tensor, present: torch.Tensor) -> list[torch.Tensor]:
        """Per scale, the stacked modality features (N, M, C_s, *S_s), absent ones zero.

        An encoder whose modality no sample holds is not run (it gets no gradient)."""
        scales: list[list[torch.Tensor | None]] = [[None] * len(self.modalities) for _ in self.channels]
        for i, modality in enumerate(self.modalities):
            held = present[:, i]
            if not bool(held.any()):
                continue
            features = self.enc[modality](images[:, i : i + 1])
            keep = held.to(images.dtype).reshape(-1, *([1] * (images.ndim - 1)))
            for s, f in enumerate(features):
                scales[s][i] = f * keep
        stacked = []
        for per_modality in scales:
            template = next(f for f in per_modality if f is not None)
            stacked.append(torch.stack([torch.zeros_like(template) if f is None else f for f in per_modality], dim=1))
        return stacked

    def forward(
        self,
        images: torch.Tensor,
        present: torch.Tensor | Sequence[str],
        anchors: Sequence[torch.Tensor | None] | None = None,
        with_aux: bool = True,
    ) -> FedMEPDOutput:
        """Segment.

        Args:
            images: (N, M, *S) modalities in canonical order (absent channels are ignored).
            present: (N, M) bool availability, or the present modality names for every sample.
            anchors: per scale (A_s, C_s) anchors; None (or attention off) skips calibration,
                a None entry skips that scale.
            with_aux: also decode each present modality alone (training; skip at inference).
        """
        if images.shape[1] != len(self.modalities):
            raise ValueError(f"images have {images.shape[1]} channels; expected {len(self.modalities)} modalities")
        bad = [s for s in images.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(f"spatial size {tuple(images.shape[2:])} is not a multiple of {self.divisor}")
        mask = self.present_mask(present, images.shape[0], images.device)
        stacked = self.encode(images, mask)
        fused = [fuse(f, mask) for fuse, f in zip(self.dec.fuse, stacked)]
        calibrated = fused
        if anchors is not None and self.use_attention:
            if len(anchors) != len(fused):
                raise ValueError(f"anchors for {len(anchors)} scales; the network has {len(fused)}")
            calibrated = [f if a is None else attn(f, a) for attn, f, a in zip(self.attn, fused, anchors)]
        out = FedMEPDOutput(logits=self.dec.unet(calibrated), features=fused)
        if with_aux:
            for i, modality in enumerate(self.modalities):
                if bool(mask[:, i].any()):
                    out.aux[modality] = self.aux([f[:, i] for f in stacked])
        return out


class FusionDecoder(nn.Module):
    """The fusion decoder: region-aware fusion at each scale, then U-Net upsampling to logits.

    Args:
        spatial_dims: 2 or 3.
        channels: channels per scale, finest first.
        n_modalities: modality encoders fused.
        num_classes: output classes (also the fusion's soft regions).
    """

    def __init__(self, spatial_dims: int, channels: Sequence[int], n_modalities: int, num_classes: int) -> None:
        super().__init__()
        self.fuse = nn.ModuleList(RegionAwareFusion(spatial_dims, c, n_modalities, num_classes) for c in channels)
        self.unet = UNetDecoder(spatial_dims, channels, num_classes)
