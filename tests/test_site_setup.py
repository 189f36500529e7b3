"""One site set-up (fedmodal.fl.site.prepare_site): a site file's policy applies wherever a site is built."""

from __future__ import annotations

import json

import pytest

from fedmodal.data.phantoms import build_federation
from fedmodal.fl.site import SiteConfig, prepare_site, site_seed
from fedmodal.modalitybank.central import build_workers
from fedmodal.modalitybank.config import AdversaryConfig, BankSiteConfig, GeneratorConfig


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    return build_federation(
        tmp_path_factory.mktemp("setup") / "fed", shape=(40, 40, 24), cases_per_site=2, test_cases=1
    )


def test_prepare_site_reads_policy_cases_seed(federation):
    (federation / "site-1" / "fedmodal_site.json").write_text(json.dumps({"dp_clip": 0.5, "share_masks": False}))
    try:
        site = prepare_site("site-1", SiteConfig(data_root=str(federation)), run_seed=3)
    finally:
        (federation / "site-1" / "fedmodal_site.json").unlink()
    assert site.root == federation / "site-1"  # <data_root>/<site name>
    assert site.seed == site_seed(3, "site-1")
    assert len(site.manifest.cases) == 2
    assert site.shares_masks(True) is False  # the site file wins over the job
    assert site.dp(0.1, 0.0) == (0.5, 0.0)  # the stricter clip wins
    assert site.dp(1.0, 2.0) == (1.0, 2.0)


def test_the_centralised_run_applies_the_site_file_like_the_executor(federation, tmp_path):
    """`fedmodal pretrain-generator` and the benchmark build sites through the same set-up, so a
    site's DP and mask policy hold there too (they were ignored before)."""
    import torch

    (federation / "site-2" / "fedmodal_site.json").write_text(
        json.dumps({"dp_clip": 0.01, "dp_noise": 1.0, "share_masks": False})
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers = build_workers(
            {s: federation / s for s in ("site-1", "site-2")},
            GeneratorConfig(image_size=32, ngf=8, n_blocks=2, batch_size=2),
            tmp_path,
            site=BankSiteConfig(split="all"),
            adversary=AdversaryConfig(ndf=8, n_layers=2),
        )
        # The sites share this process: their own one-thread setting must not cut the caller's.
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        (federation / "site-2" / "fedmodal_site.json").unlink()
    assert (workers["site-2"].adversary.config.dp_clip, workers["site-2"].adversary.config.dp_noise) == (0.01, 1.0)
    assert workers["site-2"].shares_masks is False
    assert (workers["site-1"].adversary.config.dp_clip, workers["site-1"].shares_masks) == (0.0, True)


def test_bad_site_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="on_error must be one of"):
        SiteConfig(on_error="ignore")
    with pytest.raises(ValueError, match=r"unknown SiteConfig settings \['dataroot'\]"):
        SiteConfig.from_dict({"dataroot": "/x"})
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        prepare_site("site-1", SiteConfig(data_root="/no/such/folder"), run_seed=0)


def test_a_site_file_bound_on_visits_per_key_refuses_the_step_over_it(federation, tmp_path):
    """`"max_visits_per_key"` in a site's file: the worker answers each (slice, modality) at most
    that often (benchmarks/bench_leakage.py: ten visits reconstruct a slice without DP)."""
    from fedmodal.modalitybank.central import build_workers
    from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
    from fedmodal.modalitybank.generator_trainer import GeneratorTrainer

    (federation / "site-1" / "fedmodal_site.json").write_text(json.dumps({"max_visits_per_key": 1}))
    try:
        generator = GeneratorConfig(image_size=32, ngf=8, n_blocks=2, batch_size=64, pretrain_steps=3, bank_steps=0)
        workers = build_workers(
            {"site-1": federation / "site-1"}, generator, tmp_path,
            site=BankSiteConfig(split="all"), adversary=AdversaryConfig(ndf=8, n_layers=2),
        )  # fmt: skip
    finally:
        (federation / "site-1" / "fedmodal_site.json").unlink()
    worker = workers["site-1"]
    sites = [SiteState.from_registration("site-1", worker.registration())]
    import numpy as np

    coordinator = StepCoordinator(GeneratorTrainer(resolve_config(generator, sites)), sites, np.random.default_rng(0))
    payload = coordinator.step_payloads()["site-1"]  # a batch larger than the site: keys repeat
    with pytest.raises(Exception, match="visit"):
        worker.step(payload)


def test_select_device_sets_the_threads_it_is_given_and_refuses_negative_ones():
    import torch

    from fedmodal.fl import site

    before = torch.get_num_threads()
    try:
        site.select_device("cpu", 1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        site.select_device("cpu", 0)  # 0 leaves the process's setting alone
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="num_threads"):
            site.select_device("cpu", -1)
    finally:
        torch.set_num_threads(before)
