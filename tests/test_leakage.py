"""The leakage audit is real (the attack recovers a slice without DP), DP stops it, the budget holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmodal import MODALITIES
from fedmodal.data.datasets import SynthesisSlices
from fedmodal.data.manifest import build_manifest
from fedmodal.data.phantoms import build_federation
from fedmodal.metrics import synthesis_scores
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.config import AdversaryConfig
from fedmodal.modalitybank.leakage import (
    BudgetedWorker,
    SignBisection,
    VisitBudget,
    VisitBudgetExceeded,
    dp_epsilon,
    fit_to_signs,
    probe,
)
from fedmodal.modalitybank.site_worker import SiteWorker

MODALITY = "t2"


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    root = build_federation(
        tmp_path_factory.mktemp("phantoms") / "fed", shape=(40, 40, 24), cases_per_site=1, test_cases=1
    )
    manifest = build_manifest(root / "site-1", site="site-1", split=(1.0, 0.0, 0.0))
    return SynthesisSlices(manifest.cases, size=32, slices="tumour"), manifest.modalities


def site(slices, tmp_path, **dp) -> SiteWorker:
    dataset, modalities = slices
    return SiteWorker("site-1", dataset, modalities, AdversaryConfig(**dp), 4, True, seed=3, out_dir=tmp_path)


def keys_and_truth(worker):
    keys = [worker.keys[0], worker.keys[-1]]  # the case's first and last tumour slices
    index = worker._lookup(keys)
    channel = MODALITIES.index(MODALITY)
    return keys, worker.images[index][:, channel : channel + 1], worker.brain[index]


def ssim(estimate, real, brain) -> float:
    return float(np.mean([synthesis_scores(estimate[i, 0], real[i, 0], brain[i, 0])["ssim"] for i in range(len(real))]))


def attack(worker, visits: int, smooth: float = 0.0, fit: bool = True):
    """Bisection and the random-probe fit on the same visits: (bisection SSIM, fit SSIM, chance SSIM)."""
    keys, real, brain = keys_and_truth(worker)
    bisection = SignBisection(real.shape)
    noise = torch.Generator().manual_seed(0)
    fakes, rows = [], []
    for visit in range(visits):
        probes = bisection.fakes()
        random = torch.rand(real.shape, generator=noise) * 2 - 1 if fit else probes[:0]
        answer = probe(worker, keys + keys[: len(random)], MODALITY, torch.cat([probes, random]), step=visit)
        bisection.update(probes, answer[: len(keys)])
        fakes.append(random)
        rows.append(answer[len(keys) :])
    fitted = ssim(fit_to_signs(torch.stack(fakes), torch.stack(rows), smooth=smooth), real, brain) if fit else None
    return ssim(bisection.estimate(), real, brain), fitted, ssim(torch.zeros_like(real), real, brain)


def test_without_dp_the_server_recovers_the_real_slice(slices, tmp_path):
    bisected, fitted, chance = attack(site(slices, tmp_path), visits=10)
    print(bisected, fitted, chance)
    assert chance < 0.5
    assert bisected > 0.98  # 10 halvings: every pixel to within 2 / 1024
    assert fitted > chance + 0.3


def test_strong_dp_brings_the_attacks_to_chance(slices, tmp_path):
    bisected, fitted, chance = attack(site(slices, tmp_path, dp_clip=1e-2, dp_noise=2.0), visits=10, smooth=1.5)
    print(bisected, fitted, chance)
    assert bisected < chance + 0.1
    assert fitted < chance + 0.1


def test_clipping_without_noise_protects_nothing(slices, tmp_path):
    bisected, _, _ = attack(site(slices, tmp_path, dp_clip=1e-3), visits=10, fit=False)
    assert bisected > 0.98  # clipping scales a row; its signs are all the attack reads


def test_the_visit_budget_refuses_the_101st_visit(slices, tmp_path):
    worker = BudgetedWorker(site(slices, tmp_path), VisitBudget(100, path=tmp_path / "visits.json"))
    keys, real, _ = keys_and_truth(worker)
    fakes = torch.zeros_like(real)
    payload = {
        P.STEP: 0,
        P.PHASE_STEPS: 0,
        P.KEYS: keys,
        P.AUGMENT: P.AugmentParams.identity(len(keys), 2).table,
        P.FAKE_PREFIX + MODALITY: fakes.numpy(),
    }
    budget = worker.budget
    for _ in range(99):
        budget.admit(keys, [MODALITY])  # as the worker's steps count them, without 99 steps' cost
    assert P.GRAD_PREFIX + MODALITY in worker.step(payload)  # the 100th visit is answered
    with pytest.raises(VisitBudgetExceeded, match="budget of 100"):
        worker.step(payload)
    with pytest.raises(VisitBudgetExceeded):
        probe(worker, [keys[0], worker.keys[1]], MODALITY, fakes)  # refused whole: one key is over
    assert budget.visits(worker.keys[1], MODALITY) == 0
    assert VisitBudget(100, path=tmp_path / "visits.json").visits(keys[0], MODALITY) == 100  # a new job sees them
    fresh = BudgetedWorker(worker.worker, VisitBudget(100))
    assert probe(fresh, keys, MODALITY, fakes).shape == fakes.shape  # under budget, the site answers


def test_epsilon_grows_with_visits_and_falls_with_noise():
    assert dp_epsilon(1, 0.0) == float("inf")
    assert dp_epsilon(100, 2.0) > dp_epsilon(10, 2.0) > dp_epsilon(10, 4.0)
