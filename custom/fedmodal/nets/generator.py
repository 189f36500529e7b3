"""The pix2pix ResNet generator family (ModalityBank / AsynDGAN's G), for 2D or 3D images."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Pad
from monai.networks.utils import normal_init
from torch import nn

PADDING_MODES = ("reflect", "replicate", "zeros")


UPSAMPLING = ("transpose", "resize")


def spatial_pad(spatial_dims: int, mode: str, width: int) -> nn.Module:
    """A layer padding every spatial side by `width` voxels with `mode` (reflect, replicate or zeros)."""
    if mode == "reflect":
        # MONAI's Pad factory has no reflection entry; torch has one per dimension (1d, 2d, 3d).
        return getattr(nn, f"ReflectionPad{spatial_dims}d")(width)
    if mode == "replicate":
        return Pad["replicationpad", spatial_dims](width)
    if mode == "zeros":
        return Pad["constantpad", spatial_dims](width, 0.0)
    raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {mode!r}")


class PaddedConvolution(nn.Sequential):
    """An explicit spatial pad followed by a MONAI `Convolution` block (conv, norm, dropout, act)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding_mode: str = "reflect",
        norm: str | tuple | None = "instance",
        act: str | tuple | None = "relu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        """
        Args:
            spatial_dims: 2 or 3.
            in_channels: input channels.
            out_channels: output channels.
            kernel_size: odd kernel width; the output keeps the input's spatial size.
            padding_mode: "reflect", "replicate" or "zeros".
            norm: MONAI norm name/tuple, or None for a bare convolution.
            act: MONAI activation name/tuple, or None.
            dropout: dropout probability after the norm (0 for none).
            bias: whether the convolution has a bias.
        """
        super().__init__()
        self.add_module("pad", spatial_pad(spatial_dims, padding_mode, kernel_size // 2))
        self.add_module(
            "block",
            Convolution(
                spatial_dims,
                in_channels,
                out_channels,
                kernel_size=kernel_size,
                padding=0,
                norm=norm,
                act=act,
                dropout=dropout if dropout > 0 else None,
                bias=bias,
                conv_only=norm is None and act is None,
            ),
        )


class ResnetBlock(nn.Module):
    """Residual block x + F(x), F = two padded 3-wide convolutions with norm (ReLU between them)."""

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        norm: str | tuple = "instance",
        padding_mode: str = "reflect",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        """
        Args:
            spatial_dims: 2 or 3.
            channels: input = output channels.
            norm: MONAI norm name/tuple.
            padding_mode: "reflect", "replicate" or "zeros".
            dropout: dropout probability after the first convolution.
            bias: whether the convolutions have a bias.
        """
        super().__init__()
        self.conv_block = nn.Sequential(
            PaddedConvolution(spatial_dims, channels, channels, 3, padding_mode, norm, "relu", dropout, bias),
            PaddedConvolution(spatial_dims, channels, channels, 3, padding_mode, norm, None, 0.0, bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """pix2pix ResNet generator: 7-wide stem, stride-2 downsamplings, residual blocks,
    upsamplings (transposed convolutions, or nearest-neighbour resizes each followed by a
    convolution), 7-wide head, tanh output in [-1, 1].

    Spatial sizes divisible by 2**n_downsampling come back unchanged.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        n_downsampling: int = 2,
        norm: str | tuple = "instance",
        padding_mode: str = "reflect",
        dropout: float = 0.0,
        upsample: str = "transpose",
    ) -> None:
        """
        Args:
            spatial_dims: 2 or 3.
            in_channels: conditioning channels (ModalityBank: label map + brain contour = 2).
            out_channels: image channels produced.
            ngf: channels after the stem; doubled at each downsampling.
            n_blocks: residual blocks at the bottleneck.
            n_downsampling: stride-2 downsamplings (and as many upsamplings).
            norm: MONAI norm name/tuple; instance norm without affine parameters as in pix2pix,
                so convolutions hold every learnable parameter.
            padding_mode: padding of the 7-wide and residual convolutions: "reflect" (pix2pix),
                "replicate" or "zeros". Reflection needs each side larger than the pad (3).
            dropout: dropout probability inside the residual blocks (0 for none).
            upsample: "transpose" (pix2pix's stride-2 transposed convolutions) or "resize"
                (nearest-neighbour x2, then a 3-wide convolution), which avoids the
                checkerboard stripes transposed convolutions leave when training is short.
        """
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
        self.spatial_dims = spatial_dims
        self.n_downsampling = n_downsampling
        # pix2pix: convolutions followed by batch norm carry no bias, otherwise they do.
        norm_name = norm[0] if isinstance(norm, tuple) else norm
        bias = str(norm_name).lower() != "batch"

        self.stem = PaddedConvolution(spatial_dims, in_channels, ngf, 7, padding_mode, norm, "relu", 0.0, bias)
        down = []
        for i in range(n_downsampling):
            c = ngf * 2**i
            down.append(
                Convolution(
                    spatial_dims, c, 2 * c, strides=2, kernel_size=3, padding=1, norm=norm, act="relu", bias=bias
                )
            )
        self.down = nn.Sequential(*down)
        width = ngf * 2**n_downsampling
        self.blocks = nn.Sequential(
            *(ResnetBlock(spatial_dims, width, norm, padding_mode, dropout, bias) for _ in range(n_blocks))
        )
        up = []
        for i in range(n_downsampling):
            c = width // 2**i
            if upsample == "resize":
                resize = nn.Upsample(scale_factor=2, mode="nearest")
                conv = PaddedConvolution(spatial_dims, c, c // 2, 3, padding_mode, norm, "relu", 0.0, bias)
                up.append(nn.Sequential(resize, conv))
                continue
            up.append(
                Convolution(
                    spatial_dims,
                    c,
                    c // 2,
                    strides=2,
                    kernel_size=3,
                    padding=1,
                    output_padding=1,
                    is_transposed=True,
                    norm=norm,
                    act="relu",
                    bias=bias,
                )
            )
        self.up = nn.Sequential(*up)
        self.head = PaddedConvolution(spatial_dims, ngf, out_channels, 7, padding_mode, None, None, 0.0, True)
        self.out_act = Act["tanh"]()
        self.apply(normal_init)  # pix2pix initialisation: N(0, 0.02) kernels, zero biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.down(x)
        x = self.blocks(x)
        x = self.up(x)
        return self.out_act(self.head(x))
