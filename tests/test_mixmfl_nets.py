"""nets/mixmfl: key groups, gradient flow, gradient reversal, decoupler losses, retrieval (tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from fedmodal import MODALITIES
from fedmodal.nets.mixmfl import (
    SHARED_GROUPS,
    SHARED_PREFIXES,
    GradientReversal,
    MixMFLLoss,
    MixMFLNet,
    entropy_triplet_loss,
    gaussian_entropy,
    key_group,
    modality_classification_loss,
    pseudo_features,
    retrieve,
    site_groups,
    tailored_group,
)

torch.set_num_threads(1)

FEATURES = (4, 8, 16)


def tiny_net(spatial_dims: int = 2, seed: int = 0) -> MixMFLNet:
    torch.manual_seed(seed)
    return MixMFLNet(spatial_dims, FEATURES)


def images(spatial_dims: int = 2, n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, *(size,) * spatial_dims, generator=g)


# ----------------------------------------------------------------------------- key groups


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_key_has_a_prefix_and_a_group(spatial_dims: int):
    net = tiny_net(spatial_dims)
    tailored = tuple(f"enc.{m}." for m in MODALITIES)
    groups = {}
    for name in net.state_dict():
        assert name.startswith(tailored + SHARED_PREFIXES), name
        group = key_group(name)
        assert name.startswith(group + ".")
        groups.setdefault(group, []).append(name)
    assert set(groups) == {*SHARED_GROUPS, *(tailored_group(m) for m in MODALITIES)}
    # Every tailored encoder has the shared encoder's layout, so one aggregation serves both.
    layout = sorted(k.removeprefix("enc.shared.") for k in groups["enc.shared"])
    for m in MODALITIES:
        assert sorted(k.removeprefix(f"enc.{m}.") for k in groups[f"enc.{m}"]) == layout
    assert site_groups(("t1", "t2")) == (*SHARED_GROUPS, "enc.t1", "enc.t2")
    for bad in ("head.weight", "enc.weight", "decoder.x"):
        with pytest.raises(ValueError, match="no MixMFL group"):
            key_group(bad)


def test_config_rebuilds_the_same_network():
    net = tiny_net(3)
    again = MixMFLNet(**net.config())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="shared"):
        MixMFLNet(2, FEATURES, modalities=("t1", "shared"))


# ----------------------------------------------------------------------------- forward and gradients


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_shapes(spatial_dims: int):
    net = tiny_net(spatial_dims)
    out = net(images(spatial_dims), ("t2", "t1"))
    bottleneck = (2, FEATURES[-1]) + (16 // net.divisor,) * spatial_dims
    assert out.logits.shape == (2, 3) + (16,) * spatial_dims
    assert list(out.tailored) == ["t1", "t2"]  # canonical order whatever the caller's
    assert all(out.tailored[m].shape == bottleneck and out.shared[m].shape == bottleneck for m in ("t1", "t2"))
    assert all(out.tailored_vec[m].shape == (2, FEATURES[-1]) for m in ("t1", "t2"))
    assert all(out.cls_tailored[m].shape == (2, 4) and out.cls_shared[m].shape == (2, 4) for m in ("t1", "t2"))
    assert len(out.fused_ss) == 1 and len(out.fused_st) == 4
    assert all(f.shape == bottleneck for f in out.fused_ss + out.fused_st)
    single = net(images(spatial_dims), ("flair",))
    assert single.fused_ss == [] and len(single.fused_st) == 1


def test_missing_channels_are_never_read():
    net = tiny_net().eval()
    x = images()
    y = x.clone()
    y[:, 1] = 100.0  # t1ce, not present
    with torch.no_grad():
        assert torch.equal(net(x, ("t1", "t2")).logits, net(y, ("t1", "t2")).logits)


def test_absent_tailored_encoder_gets_no_gradient_and_does_not_change():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = MixMFLLoss(torch.nn.BCEWithLogitsLoss())
    target = (torch.rand(2, 3, 16, 16) > 0.5).float()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = net(images(), ("t1", "t2"), pseudo={"flair": torch.randn(2, FEATURES[-1])})
        loss_fn(out, target)["loss"].backward()
        for name, p in net.named_parameters():
            absent = key_group(name) in ("enc.t1ce", "enc.flair")
            assert (p.grad is None) == absent, name
        optimizer.step()
    after = net.state_dict()
    for name in after:
        changed = not torch.equal(before[name], after[name])
        assert changed == (key_group(name) not in ("enc.t1ce", "enc.flair")), name


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(3, 5, requires_grad=True)
    y = GradientReversal.apply(x, 0.7)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.7))


def test_shared_classification_gradient_is_reversed_at_the_encoder():
    """The classifier descends on the shared logits' loss; the shared encoder ascends it."""
    net = tiny_net()
    x = images()
    with torch.no_grad():
        encoded = net.encode(x, ("t1",))
    vec = encoded.shared["t1"][-1].mean(dim=(2, 3)).detach().requires_grad_(True)
    labels = torch.zeros(2, dtype=torch.long)
    torch.nn.functional.cross_entropy(net.cls(vec), labels).backward()
    plain = vec.grad.clone()
    vec.grad = None
    torch.nn.functional.cross_entropy(net.cls(GradientReversal.apply(vec, net.grl_lambda)), labels).backward()
    assert torch.allclose(vec.grad, -plain)


def test_zero_pseudo_feature_equals_an_empty_slot_and_a_real_one_changes_the_output():
    net = tiny_net().eval()
    x = images()
    with torch.no_grad():
        empty = net(x, ("t1", "t2")).logits
        zeros = net(x, ("t1", "t2"), pseudo={"flair": torch.zeros(2, FEATURES[-1])}).logits
        filled = net(x, ("t1", "t2"), pseudo={"flair": torch.ones(2, FEATURES[-1])}).logits
    assert torch.allclose(empty, zeros)
    assert not torch.allclose(empty, filled)
    with pytest.raises(ValueError, match="missing modalities only"):
        net(x, ("t1", "t2"), pseudo={"t1": torch.zeros(2, FEATURES[-1])})


# ----------------------------------------------------------------------------- losses


def test_classification_loss_labels_follow_the_modality_order():
    big = 20.0
    right = {
        m: torch.nn.functional.one_hot(torch.tensor([k, k]), 4).float() * big
        for k, m in enumerate(MODALITIES)
        if m in ("t1", "t2")
    }
    wrong = {m: torch.roll(v, 1, dims=1) for m, v in right.items()}
    assert modality_classification_loss(right, right, MODALITIES) < 1e-6
    assert modality_classification_loss(wrong, right, MODALITIES) > 5.0


def _with_std(std: float, channels: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, channels, 8, 8, generator=g)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return x * std  # every channel's variance is exactly std^2


def test_gaussian_entropy_matches_the_closed_form():
    for std in (0.5, 1.0, 3.0):
        expected = 0.5 * 4 * math.log(2 * math.pi * math.e * std**2)
        assert gaussian_entropy(_with_std(std)).item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_triplet_loss_zero_when_the_margin_holds_positive_otherwise():
    h = {s: gaussian_entropy(_with_std(s)).item() for s in (1.0, 1.1, 5.0)}
    shared, close, far = [_with_std(1.0, seed=1)], [_with_std(1.1, seed=2)], [_with_std(5.0, seed=3)]
    margin = 1.0
    gap = abs(h[5.0] - h[1.0]) - abs(h[1.1] - h[1.0])
    assert gap > margin  # the construction: fusions of shared pairs far closer than shared-tailored ones
    assert entropy_triplet_loss(shared, close, far, margin).item() == 0.0
    # Swapped roles violate the margin: loss = max d(shared, ss) - min d(shared, st) + margin.
    swapped = entropy_triplet_loss(shared, far, close, margin).item()
    assert swapped == pytest.approx(gap + margin, rel=1e-4)
    # max over the positive pairs, min over the negative ones.
    both = entropy_triplet_loss(shared, close + far, far + close, margin).item()
    assert both == pytest.approx(abs(h[5.0] - h[1.0]) - abs(h[1.1] - h[1.0]) + margin, rel=1e-4)
    assert entropy_triplet_loss(shared, [], far, margin).item() == 0.0


def test_loss_switches_skip_terms():
    net = tiny_net()
    out = net(images(), ("t1", "t2"))
    target = torch.zeros(2, 3, 16, 16)
    full = MixMFLLoss(torch.nn.BCEWithLogitsLoss())(out, target)
    off = MixMFLLoss(torch.nn.BCEWithLogitsLoss(), lambda_cls=0.0, lambda_triplet=0.0)(out, target)
    assert full["cls"] > 0 and off["cls"] == 0 and off["triplet"] == 0
    assert torch.allclose(off["loss"], off["seg"])
    assert torch.allclose(full["loss"], full["seg"] + 0.5 * full["cls"] + 1e-4 * full["triplet"])


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_shapes_and_a_query_equal_to_a_prototype():
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(7, 16, generator=g)
    query = torch.randn(5, 16, generator=g)
    assert retrieve(query, prototypes).shape == (5, 16)
    picked = retrieve(prototypes[[2, 4]], prototypes, temperature=1e-3)
    assert torch.allclose(picked, prototypes[[2, 4]], atol=1e-4)


def test_retrieval_weights_by_hand():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    query = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cos: query 0 -> (1, 0); query 1 -> (1/sqrt2, 1/sqrt2). Temperature 0.5 doubles them.
    w0 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    expected0 = w0[0] * prototypes[0] + w0[1] * prototypes[1]
    expected1 = 0.5 * prototypes[0] + 0.5 * prototypes[1]
    out = retrieve(query, prototypes, temperature=0.5)
    assert torch.allclose(out[0], expected0) and torch.allclose(out[1], expected1)
    assert torch.allclose(out[0], torch.tensor([0.8808, 2 * 0.1192]), atol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        retrieve(query, prototypes, temperature=0.0)


def test_pseudo_features_average_queries_and_skip_present_or_empty_modalities():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vec = {"t1": torch.tensor([[1.0, 0.0]]), "t2": torch.tensor([[0.0, 1.0]])}
    out = pseudo_features(vec, {"t1": bank, "t1ce": bank, "flair": None}, temperature=1e-3)
    assert set(out) == {"t1ce"}  # t1 is present, flair has no prototypes
    assert torch.allclose(out["t1ce"], torch.tensor([[0.5, 0.5]]), atol=1e-4)
