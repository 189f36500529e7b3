"""nets/: generator, mAdaFM bank, conditional PatchGAN (tiny sizes, 2D and 3D)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmodal.nets.discriminator import ConditionalPatchDiscriminator
from fedmodal.nets.generator import ResnetGenerator
from fedmodal.nets.madafm import (
    MAdaFMConv,
    add_modality,
    bank_parameters,
    bank_state_dict,
    count_parameters,
    frozen_state_dict,
    load_bank_state_dict,
    modalities,
    modulate,
    modulated_convs,
    set_modality,
)

torch.set_num_threads(1)


def tiny_generator(spatial_dims: int = 2, seed: int = 0) -> ResnetGenerator:
    torch.manual_seed(seed)
    g = ResnetGenerator(spatial_dims, in_channels=2, out_channels=1, ngf=4, n_blocks=2, n_downsampling=2)
    # Pretend it was pretrained: move every parameter away from the N(0, 0.02) / zero-bias init.
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return g.eval()


def cond_input(spatial_dims: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(2, 2, *([size] * spatial_dims)) * 2 - 1


# ---------------------------------------------------------------- generator


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_generator_shape_and_range(spatial_dims):
    g = tiny_generator(spatial_dims)
    x = cond_input(spatial_dims)
    y = g(x)
    assert y.shape == (2, 1, *x.shape[2:])
    assert y.min() >= -1 and y.max() <= 1


@pytest.mark.parametrize("padding_mode", ["replicate", "zeros"])
def test_generator_padding_modes_3d(padding_mode):
    g = ResnetGenerator(3, 2, 4, ngf=2, n_blocks=1, padding_mode=padding_mode)
    assert g(cond_input(3, size=8)).shape == (2, 4, 8, 8, 8)


def test_generator_paper_size():
    g = ResnetGenerator(2, in_channels=2, out_channels=1, ngf=64, n_blocks=9)
    n = sum(p.numel() for p in g.parameters())
    assert 11.2e6 < n < 11.5e6  # 11,368,769: the pix2pix ResNet-9 generator
    # instance norm without affine terms: only convolutions hold parameters
    convs = [m for m in g.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    conv_params = sum(p.numel() for m in convs for p in m.parameters())
    assert conv_params == n


# ---------------------------------------------------------------- mAdaFM bank


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("target", ["resblocks", "all"])
def test_bank_init_reproduces_pretrained(spatial_dims, target):
    g = tiny_generator(spatial_dims)
    x = cond_input(spatial_dims)
    with torch.no_grad():
        before = g(x)
    modulate(g, target=target, modalities=("t1ce", "t2"))
    n_convs = sum(1 for m in g.modules() if isinstance(m, nn.modules.conv._ConvNd))
    expected = 2 * 2 if target == "resblocks" else n_convs
    assert len(modulated_convs(g)) == expected
    for name in ("t1ce", "t2"):
        set_modality(g, name)
        with torch.no_grad():
            after = g(x)
        assert (after - before).abs().max() < 1e-5


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_bank_init_reproduces_transposed_and_grouped_convs(spatial_dims):
    torch.manual_seed(0)
    convs = [
        nn.modules.conv.__dict__[f"ConvTranspose{spatial_dims}d"](
            6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1, bias=False
        ),
        nn.modules.conv.__dict__[f"ConvTranspose{spatial_dims}d"](3, 5, 4, stride=2, padding=1),
        nn.modules.conv.__dict__[f"Conv{spatial_dims}d"](4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
    ]
    for conv in convs:
        layer = MAdaFMConv(conv)
        layer.add_modality("t2")
        layer.active = "t2"
        # bank layout follows the weight: (C_in, C_out/groups, 1..) for transposed, bias has C_out
        assert layer.bank_gamma["t2"].shape == conv.weight.shape[:2] + (1,) * spatial_dims
        assert layer.bank_bias["t2"].shape == (conv.out_channels,)
        x = torch.randn(2, conv.in_channels, *([7] * spatial_dims))
        with torch.no_grad():
            assert (layer(x) - conv(x)).abs().max() < 1e-5


def test_constant_kernel_is_guarded():
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight[0, 1] = 0.7  # one constant (out, in) slice: sigma = 0
    layer = MAdaFMConv(conv)
    assert torch.isfinite(layer.weight_norm).all()
    layer.add_modality("t1")
    layer.active = "t1"
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        assert (layer(x) - conv(x)).abs().max() < 1e-5


def test_modulated_kernel_is_the_papers_formula():
    torch.manual_seed(0)
    conv = nn.ConvTranspose3d(3, 2, 3, stride=2)
    layer = MAdaFMConv(conv)
    layer.add_modality("t2")
    with torch.no_grad():
        for p in layer.entry("t2").values():
            p.add_(0.3 * torch.randn_like(p))
    w, b = conv.weight, conv.bias
    mu = w.mean(dim=(2, 3, 4), keepdim=True)
    sigma = w.std(dim=(2, 3, 4), keepdim=True, correction=0)
    entry = layer.entry("t2")
    w_hat, b_hat = layer.modulated_weight("t2")
    assert torch.allclose(w_hat, entry["gamma"] * (w - mu) / sigma + entry["beta"], atol=1e-6)
    assert torch.allclose(b_hat, b + entry["bias"])


@pytest.mark.parametrize("target", ["resblocks", "all"])
def test_training_one_entry_leaves_everything_else_bit_identical(target):
    g = tiny_generator(2)
    modulate(g, target=target, modalities=("t1ce", "t2", "flair"))
    frozen_before = {k: v.clone() for k, v in frozen_state_dict(g).items()}
    banks_before = {m: bank_state_dict(g, m) for m in modalities(g)}
    set_modality(g, "t2")
    g.train()
    opt = torch.optim.Adam(bank_parameters(g, "t2"), lr=1e-2)
    x, target = cond_input(2), torch.rand(2, 1, 16, 16) * 2 - 1
    for _ in range(3):
        opt.zero_grad()
        nn.functional.l1_loss(g(x), target).backward()
        opt.step()
    frozen_after = frozen_state_dict(g)
    assert frozen_after.keys() == frozen_before.keys()
    assert all(torch.equal(frozen_after[k], frozen_before[k]) for k in frozen_before)
    for name, p in g.named_parameters():
        if ".bank_" not in name:
            assert not p.requires_grad and p.grad is None, name
    for m in ("t1ce", "flair"):
        now = bank_state_dict(g, m)
        assert all(torch.equal(now[k], banks_before[m][k]) for k in now)
    trained = bank_state_dict(g, "t2")
    assert any(not torch.equal(trained[k], banks_before["t2"][k]) for k in trained)


def test_add_modality_adds_only_bank_parameters():
    g = tiny_generator(2)
    modulate(g, target="all")
    names_before = {n for n, _ in g.named_parameters()}
    frozen_keys = set(frozen_state_dict(g))
    counts = count_parameters(g)
    new = add_modality(g, "flair")
    added = {n for n, _ in g.named_parameters()} - names_before
    assert added and all(".bank_" in n and n.endswith(".flair") for n in added)
    assert sum(p.numel() for p in new) == counts["bank"]
    assert all(p.requires_grad for p in new)
    assert set(frozen_state_dict(g)) == frozen_keys
    assert count_parameters(g, "flair")["frozen"] == counts["frozen"]
    assert modalities(g) == ("flair",)
    with pytest.raises(ValueError, match="already"):
        add_modality(g, "flair")
    copied = add_modality(g, "t2", copy_from="flair")
    assert all(torch.equal(a, b) for a, b in zip(copied, bank_parameters(g, "flair")))


def test_bank_state_dict_round_trip():
    g = tiny_generator(2)
    modulate(g, modalities=("t2",))
    with torch.no_grad():
        for p in bank_parameters(g, "t2"):
            p.add_(torch.randn_like(p))
    state = bank_state_dict(g, "t2")
    assert all("t2" not in k for k in state)
    assert sum(v.numel() for v in state.values()) == count_parameters(g)["bank"]

    other = tiny_generator(2)  # same seed: same frozen weights
    modulate(other)
    load_bank_state_dict(other, "t2", state)  # adds the modality
    x = cond_input(2)
    set_modality(g, "t2")
    set_modality(other, "t2")
    with torch.no_grad():
        assert torch.equal(g(x), other(x))
    # the same bank under another name, and a full state dict onto a freshly modulated model
    load_bank_state_dict(other, "flair", state)
    assert all(torch.equal(a, b) for a, b in zip(bank_parameters(other, "flair"), bank_parameters(g, "t2")))
    fresh = modulate(tiny_generator(2, seed=5))
    fresh.load_state_dict(other.state_dict())
    assert modalities(fresh) == ("t2", "flair")
    with pytest.raises(KeyError, match="missing"):
        load_bank_state_dict(other, "t2", {k: v for k, v in list(state.items())[1:]})
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = bad[key][:1]
    with pytest.raises(ValueError, match="shape"):
        load_bank_state_dict(other, "t2", bad)


def test_set_modality_errors():
    g = tiny_generator(2)
    with pytest.raises(ValueError, match="modulate"):
        set_modality(g, "t2")
    modulate(g)
    x = cond_input(2)
    with pytest.raises(RuntimeError, match="no modality selected"):
        g(x)
    with pytest.raises(KeyError, match="unknown modality"):
        set_modality(g, "t2")
    add_modality(g, "t2")
    with pytest.raises(RuntimeError, match="no modality selected"):
        g(x)
    set_modality(g, "t2")
    g(x)
    modulated_convs(g)[0][1].active = "pd"  # set behind the API's back
    with pytest.raises(KeyError, match="unknown modality 'pd'"):
        g(x)
    set_modality(g, None)
    with pytest.raises(RuntimeError):
        g(x)
    with pytest.raises(ValueError, match="already modulated"):
        modulate(g)
    with pytest.raises(ValueError, match="without '.'"):
        add_modality(g, "t1.ce")
    with pytest.raises(ValueError, match="target"):
        modulate(tiny_generator(2), target="convs")


def test_bank_follows_device_and_dtype_and_deepcopy():
    g = modulate(tiny_generator(2), modalities=("t2",))
    g64 = copy.deepcopy(g).double()
    assert all(p.dtype == torch.float64 for p in bank_parameters(g64, "t2"))
    assert modulated_convs(g64)[0][1].weight_norm.dtype == torch.float64
    set_modality(g64, "t2")
    assert g64(cond_input(2).double()).dtype == torch.float64


def test_bank_sizes_at_paper_scale():
    g = ResnetGenerator(2, 2, 1, ngf=64, n_blocks=9)
    counts = count_parameters(modulate(g, target="resblocks"))
    # 18 convs 256 -> 256: 2 * 256 * 256 + 256 each
    assert counts["bank"] == 18 * (2 * 256 * 256 + 256)
    assert counts["frozen"] == 11_368_769
    assert 0.19 < counts["ratio"] < 0.23


# ---------------------------------------------------------------- discriminator


@pytest.mark.parametrize("spatial_dims,size,patches", [(2, 64, 6), (2, 256, 30), (3, 32, 2)])
def test_discriminator_output_shape(spatial_dims, size, patches):
    d = ConditionalPatchDiscriminator(spatial_dims, in_channels=3, ndf=4)
    image = torch.randn(2, 1, *([size] * spatial_dims))
    cond = torch.randn(2, 2, *([size] * spatial_dims))
    logits = d(image, cond)
    assert logits.shape == (2, 1, *([patches] * spatial_dims))
    assert torch.equal(logits, d(torch.cat([cond, image], 1)))
    feats = d.features(image, cond)
    assert len(feats) == 5 and torch.equal(feats[-1], logits)
    with pytest.raises(ValueError, match="input channels"):
        d(image)


def test_discriminator_paper_size_and_batch_norm():
    d = ConditionalPatchDiscriminator(2, in_channels=3, ndf=64, n_layers=3)
    assert sum(p.numel() for p in d.parameters()) == 2_764_737  # pix2pix 70x70 PatchGAN, instance norm
    db = ConditionalPatchDiscriminator(2, in_channels=3, ndf=8, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in db.modules())
    assert db(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_resize_upsampling_generator_keeps_the_size_and_has_no_transposed_convolution(spatial_dims):
    g = ResnetGenerator(spatial_dims, 2, 1, ngf=4, n_blocks=1, upsample="resize")
    assert not any(isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)) for m in g.modules())
    x = torch.randn(1, 2, *([16] * spatial_dims))
    assert g(x).shape == (1, 1, *([16] * spatial_dims))
    with pytest.raises(ValueError, match="upsample must be one of"):
        ResnetGenerator(spatial_dims, 2, 1, ngf=4, n_blocks=1, upsample="pixelshuffle")
