"""FedMEPD network: key groups, gradients of absent encoders, anchor cross-attention, 2D and 3D."""

import pytest
import torch

from fedmodal.brats import MODALITIES
from fedmodal.nets.fedmepd import FedMEPDNet
from fedmodal.nets.fedmepd_blocks import AnchorAttention

CHANNELS = (8, 8, 16, 16)
HEADS = (4, 4, 4, 2)


def tiny_net(spatial_dims=3, **kwargs):
    torch.manual_seed(0)
    return FedMEPDNet(spatial_dims, channels=CHANNELS, heads=HEADS, **kwargs)


def images(spatial_dims=3, batch=2, size=16):
    torch.manual_seed(1)
    return torch.randn(batch, 4, *([size] * spatial_dims))


def anchors_for(net, count=6, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(count, c, generator=generator) for c in net.channels]


def test_parameter_keys_fall_in_the_named_groups():
    keys = tiny_net().state_dict().keys()
    prefixes = [f"enc.{m}." for m in MODALITIES] + ["dec.", "aux.", "attn."]
    stray = [k for k in keys if not k.startswith(tuple(prefixes))]
    assert not stray
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    # each modality's encoder has one input channel and four stages
    assert tiny_net().state_dict()["enc.t1.stages.0.0.conv.weight"].shape[1] == 1
    assert {k.split(".")[3] for k in keys if k.startswith("enc.t2.stages.")} == {"0", "1", "2", "3"}


def test_without_attention_there_is_no_attn_group():
    assert not any(k.startswith("attn.") for k in tiny_net(use_attention=False).state_dict())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_output_shapes(spatial_dims):
    net = tiny_net(spatial_dims)
    x = images(spatial_dims)
    out = net(x, ("t1", "flair"), anchors_for(net))
    assert out.logits.shape == (2, 4, *x.shape[2:])
    assert sorted(out.aux) == ["flair", "t1"]
    assert all(a.shape == out.logits.shape for a in out.aux.values())
    for s, (feature, channels) in enumerate(zip(out.features, CHANNELS)):
        assert feature.shape == (2, channels, *[n // 2**s for n in x.shape[2:]])


def test_missing_modality_encoder_gets_no_gradient():
    net = tiny_net()
    out = net(images(), ("t1ce", "t2"), anchors_for(net))
    (out.logits.sum() + sum(a.sum() for a in out.aux.values())).backward()
    for modality in MODALITIES:
        grads = [p.grad for p in net.enc[modality].parameters()]
        if modality in ("t1ce", "t2"):
            assert all(g is not None and g.abs().sum() > 0 for g in grads[:1])
        else:
            assert all(g is None or not g.any() for g in grads)


def test_absent_in_one_sample_gives_that_sample_no_gradient_through_the_encoder():
    net = tiny_net()
    x = images(batch=2).requires_grad_(True)
    present = torch.tensor([[True, True, False, False], [True, False, False, False]])
    out = net(x, present)
    out.logits.sum().backward()
    assert x.grad[1, 1].abs().sum() == 0  # sample 1 lacks t1ce
    assert x.grad[0, 1].abs().sum() > 0


def test_missing_modality_values_do_not_change_the_output():
    net = tiny_net().eval()
    x = images()
    y = x.clone()
    y[:, 3] = 100.0  # flair is absent: its channel is ignored
    with torch.no_grad():
        a = net(x, ("t1", "t2")).logits
        b = net(y, ("t1", "t2")).logits
    assert torch.equal(a, b)


def test_attention_output_has_the_fused_shape_and_depends_on_the_anchors():
    attention = AnchorAttention(16, 4)
    features = torch.randn(2, 16, 4, 4, 4)
    anchors = torch.randn(5, 16)
    out = attention(features, anchors)
    assert out.shape == features.shape
    changed = attention(features, anchors + 1.0)
    assert not torch.allclose(out, changed)
    # keys and values are the anchors: the output is the output projection of a convex mix of
    # the anchors' value projections, so with one anchor every voxel gets the same vector
    single = attention(features, anchors[:1])
    flat = single.reshape(2, 16, -1)
    assert torch.allclose(flat, flat[:, :, :1].expand_as(flat), atol=1e-6)


def test_anchors_change_the_network_output_and_none_skips_calibration():
    net = tiny_net().eval()
    x = images()
    with torch.no_grad():
        plain = net(x, ("t1",)).logits
        calibrated = net(x, ("t1",), anchors_for(net)).logits
        other = net(x, ("t1",), anchors_for(net, seed=9)).logits
        skipped = net(x, ("t1",), [None] * 4).logits
        no_attention = tiny_net(use_attention=False).eval()
        no_attention.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("attn.")})
        ignored = no_attention(x, ("t1",), anchors_for(net)).logits
    assert not torch.allclose(plain, calibrated)
    assert not torch.allclose(calibrated, other)
    assert torch.equal(plain, skipped)
    assert torch.equal(plain, ignored)


def test_fused_features_are_those_before_calibration():
    net = tiny_net().eval()
    with torch.no_grad():
        a = net(images(), ("t1", "t2")).features
        b = net(images(), ("t1", "t2"), anchors_for(net)).features
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_inputs_are_refused():
    net = tiny_net()
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.randn(1, 4, 12, 16, 16), ("t1",))
    with pytest.raises(ValueError, match="unknown modalities"):
        net(images(), ("t1w",))
    with pytest.raises(ValueError, match="at least one present"):
        net(images(), torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match="channels"):
        net(images(), ("t1",), [torch.randn(3, 5)] * 4)
    with pytest.raises(ValueError, match="divide"):
        FedMEPDNet(3, channels=(8, 8, 16, 16), heads=(3, 4, 4, 4))
