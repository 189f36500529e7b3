"""Mixed precision (`fedmodal.amp`), exercised for real on the CPU: fp16 autocast and its
gradient scaler run here too, only slower than on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from fedmodal.amp import MixedPrecision, resolve_precision
from fedmodal.baselines.config import SegConfig
from fedmodal.baselines.data import loader_workers
from fedmodal.fl.site import select_device
from fedmodal.modalitybank.config import AdversaryConfig, ControllerConfig
from fedmodal.modalitybank.site_trainer import SiteAdversary


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))


def test_auto_means_fp32_on_a_cpu_and_unknown_precisions_are_refused_by_name(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"
    assert MixedPrecision("auto", "cpu").scaler is None
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"precision must be one of .*'fp8'"):
        SegConfig(precision="fp8")
    with pytest.raises(ValueError, match="server precision must be one of"):
        ControllerConfig(precision="half")
    with pytest.raises(ValueError, match="adversary precision must be one of"):
        AdversaryConfig(precision="float16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here, also on a GPU host
    with pytest.raises(ValueError, match="does not have"):
        select_device("cuda")


def test_fp16_training_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    amp = MixedPrecision("fp16", "cpu")
    assert amp.scaler is not None
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(4, 2, 8, 8), torch.randn(4, 1, 8, 8)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        with amp.autocast():
            out = net(x)
        assert out.dtype == torch.float16
        loss = torch.nn.functional.mse_loss(out.float(), y)
        amp.step(loss, optimizer)
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    before = copy.deepcopy(net.state_dict())
    scale = amp.scaler.get_scale()
    optimizer.zero_grad()
    with amp.autocast():
        out = net(x)
    amp.step(out.float().sum() * torch.tensor(float("inf")), optimizer)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in a step with inf gradients"
    assert amp.scaler.get_scale() < scale


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_stepping_from_output_gradients_equals_stepping_from_the_loss(precision):
    """ModalityBank's server steps G from the sites' d(loss)/d(fake): the same update as the loss."""
    x, y = torch.randn(3, 2, 8, 8), torch.randn(3, 1, 8, 8)
    from_loss, from_grads = tiny_net(), tiny_net()
    results = []
    for net, use_grads in ((from_loss, False), (from_grads, True)):
        amp = MixedPrecision(precision, "cpu")
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        with amp.autocast():
            out = net(x).float()
        if use_grads:
            leaf = out.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(torch.nn.functional.mse_loss(leaf, y), leaf)
            amp.step_from([out], [grad], optimizer)
        else:
            amp.step(torch.nn.functional.mse_loss(out, y), optimizer)
        results.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    start = torch.cat([p.detach().flatten() for p in tiny_net().parameters()])
    assert not torch.allclose(results[0], start)
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-5)


def test_an_fp16_input_gradient_keeps_the_small_values_fp32_gives():
    """The gradient a ModalityBank site returns: under fp16 it must not underflow to zero."""
    net = tiny_net()
    x = torch.randn(2, 2, 8, 8)
    reference_input = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(net(reference_input).sum() * 1e-7, reference_input)
    amp = MixedPrecision("fp16", "cpu")
    leaf = x.clone().requires_grad_(True)
    with amp.autocast():
        loss = net(leaf).float().sum() * 1e-7
    grad = amp.grad(loss, leaf)
    assert grad.dtype == torch.float32

    def agreement(g):
        return torch.nn.functional.cosine_similarity(g.flatten(), reference.flatten(), dim=0).item()

    assert agreement(grad) > 0.995
    assert abs(grad.norm() / reference.norm() - 1) < 0.01
    with amp.autocast():
        unscaled_loss = net(leaf).float().sum() * 1e-7
    (unscaled,) = torch.autograd.grad(unscaled_loss, leaf)
    assert agreement(unscaled) < 0.99  # what the scaling saves


def test_a_bf16_discriminator_returns_fp32_gradients_close_to_fp32_ones():
    cond = torch.rand(2, 2, 32, 32) * 2 - 1
    real = {"t2": torch.rand(2, 1, 32, 32) * 2 - 1}
    fake = {"t2": torch.rand(2, 1, 32, 32) * 2 - 1}
    grads = {}
    for precision in ("fp32", "bf16"):
        adversary = SiteAdversary(("t2",), 2, AdversaryConfig(ndf=8, n_layers=2, precision=precision), seed=3)
        grads[precision], losses = adversary.step(cond, real, fake)
        assert all(isinstance(v, float) for v in losses.values())
    assert grads["bf16"]["t2"].dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"]["t2"].flatten(), grads["fp32"]["t2"].flatten(), dim=0)
    assert cosine > 0.99


def test_loader_workers_follow_the_sites_device_and_refuse_nonsense(monkeypatch):
    assert SegConfig().loader_workers == -1
    assert loader_workers(-1, cuda=False) == 0  # a CPU site's cores train
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(-1, cuda=True) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(-1, cuda=True) == 1
    assert loader_workers(3, cuda=False) == 3
    with pytest.raises(ValueError, match="loader_workers must be -1"):
        loader_workers(-2, cuda=False)


def test_an_fp16_input_gradient_that_overflows_the_scale_is_taken_again_at_a_smaller_one():
    net = tiny_net()
    x = torch.randn(2, 2, 8, 8)
    reference_input = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(net(reference_input).sum() * 50.0, reference_input)
    amp = MixedPrecision("fp16", "cpu")
    leaf = x.clone().requires_grad_(True)
    with amp.autocast():
        loss = net(leaf).float().sum() * 50.0  # x 65536 is past fp16's largest value
    grad = amp.grad(loss, leaf)
    assert torch.isfinite(grad).all()
    assert amp.input_scale < 2.0**16
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.995


def test_auto_takes_bf16_on_a_cpu_only_for_trainers_that_allow_it_and_only_with_native_bf16(monkeypatch):
    import fedmodal.amp as amp

    monkeypatch.setattr(amp, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu", bf16_on_cpu=True) == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"  # segmentation trainers keep fp32 on CPUs
    monkeypatch.setattr(amp, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu", bf16_on_cpu=True) == "fp32"
    assert resolve_precision("fp32", "cpu", bf16_on_cpu=True) == "fp32"  # a named precision wins
