"""ModalityBank's float16 wire: half the bytes, the same training within rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmodal.data.phantoms import build_federation
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.central import build_workers, train
from fedmodal.modalitybank.config import AdversaryConfig, BankSiteConfig, ControllerConfig, GeneratorConfig
from fedmodal.modalitybank.coordinator import SiteState, resolve_config
from fedmodal.modalitybank.generator_trainer import GeneratorTrainer


def test_float16_keeps_the_digits_of_gradients_below_its_normal_range():
    grad = torch.randn(2, 1, 8, 8) * 1e-6  # small gradients: float16's subnormal range
    packed = P.pack("grad/t1", grad, "float16")
    assert packed["grad/t1"].dtype == np.float16 and packed["grad/t1"].nbytes == grad.numel() * 2
    restored = P.unpack(packed, "grad/t1")
    assert torch.allclose(restored, grad, rtol=0, atol=1e-3 * grad.abs().max().item())
    # Unscaled, float16 rounds them 10x worse: what the scale is for.
    unscaled = torch.as_tensor(grad.numpy().astype(np.float16).astype(np.float32))
    assert (unscaled - grad).abs().max() > 0.005 * grad.abs().max()
    assert set(P.pack("fake/t1", grad, "float32")) == {"fake/t1"}  # float32 adds no key


def test_unpack_refuses_other_dtypes_and_pack_unknown_precisions():
    with pytest.raises(ValueError, match="grad/t1 arrived as int64"):
        P.unpack({"grad/t1": np.zeros(3, dtype=np.int64)}, "grad/t1")
    with pytest.raises(ValueError, match="wire precision"):
        P.pack("x", torch.zeros(1), "bfloat16")
    with pytest.raises(ValueError, match="wire_precision"):
        ControllerConfig(wire_precision="float8")


def test_training_over_a_float16_wire_follows_float32(tmp_path):
    data = build_federation(tmp_path / "data", shape=(40, 40, 24), cases_per_site=2, test_cases=1)
    generator = GeneratorConfig(image_size=32, ngf=8, n_blocks=2, batch_size=2, pretrain_steps=6, bank_steps=0)
    start = None
    weights, payload_dtypes = {}, {}
    for precision in ("float32", "float16"):
        workers = build_workers(
            {s: data / s for s in ("site-1", "site-2", "site-3")},
            generator,
            tmp_path / precision,
            site=BankSiteConfig(split="all"),
            adversary=AdversaryConfig(ndf=8, n_layers=2),
        )
        if start is None:  # the generator as train() builds it, before any step
            sites = [SiteState.from_registration(n, w.registration()) for n, w in sorted(workers.items())]
            untrained = GeneratorTrainer(resolve_config(generator, sites)).generator
            start = {k: p.detach().clone() for k, p in untrained.named_parameters()}
        trainer, coordinator, _ = train(workers, generator, server=ControllerConfig(wire_precision=precision))
        payload = coordinator.step_payloads()["site-1"]
        payload_dtypes[precision] = {k: np.asarray(v).dtype for k, v in payload.items() if k.startswith("fake/")}
        weights[precision] = dict(trainer.generator.named_parameters())
    assert set(payload_dtypes["float16"].values()) == {np.dtype(np.float16)}
    assert set(payload_dtypes["float32"].values()) == {np.dtype(np.float32)}
    # Pretraining only (bank_steps=0): G keeps its parameter names, and every step crosses the wire.
    flat = {p: torch.cat([weights[p][k].detach().flatten() for k in sorted(start)]) for p in weights}
    moved = (flat["float32"] - torch.cat([start[k].flatten() for k in sorted(start)])).norm()
    assert moved > 0
    # Measured 0.077 of the distance moved: Adam rescales tiny rounding in early gradients, yet a
    # wrong scale or a lost gradient moves the weights elsewhere entirely (ratio near 1 or more).
    assert (flat["float16"] - flat["float32"]).norm() < 0.2 * moved
