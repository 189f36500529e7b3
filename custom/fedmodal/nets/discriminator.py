"""Conditional PatchGAN discriminator (pix2pix 70x70 at n_layers=3), 2D or 3D, on MONAI's PatchGAN."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Act
from monai.networks.nets import PatchDiscriminator as _MonaiPatchDiscriminator


class ConditionalPatchDiscriminator(_MonaiPatchDiscriminator):
    """PatchGAN scoring (condition, image) pairs: one real/fake logit per receptive-field patch.

    4-wide convolutions ndf, 2ndf, 4ndf, 8ndf (stride 2 except the last), then one to a single
    channel, LeakyReLU 0.2; no norm on the first layer. The input is concat(cond, image) on the
    channel axis, so `in_channels` = condition channels + image channels.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str | tuple = "instance",
        bias: bool | None = None,
    ) -> None:
        """
        Args:
            spatial_dims: 2 or 3.
            in_channels: condition channels + image channels (ModalityBank: 2 + 1).
            ndf: channels of the first convolution; doubled at each further layer.
            n_layers: normalised layers after the first; 3 gives the 70x70 PatchGAN.
            norm: "instance" (default: batch statistics differ across sites) or "batch", or a MONAI norm tuple.
            bias: bias in the normalised convolutions; default as pix2pix: True unless batch norm.
        """
        if bias is None:
            norm_name = norm[0] if isinstance(norm, tuple) else norm
            bias = str(norm_name).lower() != "batch"
        super().__init__(
            spatial_dims=spatial_dims,
            channels=ndf,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=n_layers,
            kernel_size=4,
            activation=(Act.LEAKYRELU, {"negative_slope": 0.2}),
            norm=norm,
            bias=bias,
            padding=1,
            last_conv_kernel_size=4,
        )
        self.in_channels = in_channels

    def features(self, image: torch.Tensor, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every layer's output (the last is the logits map), e.g. for a feature-matching loss."""
        x = self._input(image, cond)
        out = []
        for layer in self.children():
            x = layer(x)
            out.append(x)
        return out

    def forward(self, image: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits map (N, 1, *patches) for `image` under condition `cond` (None: `image` is the concat)."""
        x = self._input(image, cond)
        for layer in self.children():
            x = layer(x)
        return x

    def _input(self, image: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x = image if cond is None else torch.cat([cond, image], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"discriminator expects {self.in_channels} input channels (condition + image), got {x.shape[1]}"
            )
        return x
