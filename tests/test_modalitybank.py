"""ModalityBank without NVFlare: the coordinator and site workers exchange the real payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmodal import MODALITIES
from fedmodal.data.datasets import SynthesisSlices
from fedmodal.data.manifest import build_manifest
from fedmodal.data.phantoms import build_federation
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.config import AdversaryConfig, GeneratorConfig
from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
from fedmodal.modalitybank.generator_trainer import GeneratorTrainer, load_trained_generator
from fedmodal.modalitybank.site_trainer import SiteAdversary
from fedmodal.modalitybank.site_worker import SiteWorker
from fedmodal.nets import madafm

TINY = dict(image_size=32, ngf=8, n_blocks=2, batch_size=2, pretrain_steps=2, bank_steps=2, max_shift=2)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "fed"
    return build_federation(root, shape=(40, 40, 24), cases_per_site=2, test_cases=2)


@pytest.fixture(scope="module")
def site_slices(federation):
    out = {}
    for site in ("site-1", "site-2", "site-3"):
        manifest = build_manifest(federation / site, site=site, split=(1.0, 0.0, 0.0))
        out[site] = (SynthesisSlices(manifest.cases, size=32, slices="brain"), manifest.modalities)
    return out


def make_workers(site_slices, tmp_path, shares=None, adversary=None):
    shares = shares or {}
    workers = {}
    for seed, (site, (dataset, modalities)) in enumerate(sorted(site_slices.items())):
        workers[site] = SiteWorker(
            site,
            dataset,
            modalities,
            adversary or AdversaryConfig(ndf=8, n_layers=2),
            batch_size=TINY["batch_size"],
            shares_masks=shares.get(site, True),
            seed=seed,
            out_dir=tmp_path / site,
        )
    return workers


def start(workers, config_args=None):
    """Register every worker and set up the server's trainer and coordinator."""
    sites = [SiteState.from_registration(name, w.registration()) for name, w in sorted(workers.items())]
    trainer = GeneratorTrainer(resolve_config(GeneratorConfig.from_dict({**TINY, **(config_args or {})}), sites))
    return trainer, StepCoordinator(trainer, sites, np.random.default_rng(0)), sites


def run_federation(workers, config_args=None):
    trainer, coordinator, _ = start(workers, config_args)
    exchanged = []
    while not trainer.finished:
        payloads = coordinator.step_payloads()
        replies = {name: workers[name].step(payload) for name, payload in payloads.items()}
        exchanged.append((payloads, replies))
        coordinator.finish_step(replies)
    return trainer, coordinator, exchanged


def test_masks_survive_the_wire_format():
    label = torch.randint(0, 4, (3, 16, 16)).float() / 3 * 2 - 1
    contour = torch.where(torch.rand(3, 16, 16) > 0.7, 1.0, -1.0)
    cond = torch.stack([label, contour], dim=1)
    codes = P.encode_masks(cond)
    assert codes.dtype == np.uint8
    assert torch.equal(P.decode_masks(codes), cond)


def test_augmentation_is_the_same_on_both_sides_and_keeps_background():
    rng = np.random.default_rng(1)
    batch = torch.rand(4, 2, 12, 12) * 2 - 1
    params = P.AugmentParams.draw(rng, 4, 2, max_shift=3)
    once = P.apply_augment(batch, params, fill=-1.0)
    again = P.apply_augment(batch.clone(), P.AugmentParams(params.table.copy()), fill=-1.0)
    assert torch.equal(once, again)
    identity = P.apply_augment(batch, P.AugmentParams.identity(4, 2), fill=-1.0)
    assert torch.equal(identity, batch)
    shift = P.AugmentParams(np.array([[0, 2, 0]], dtype=np.int16))
    shifted = P.apply_augment(batch[:1], shift, fill=-1.0)
    assert torch.equal(shifted[0, :, 2:], batch[0, :, :-2])
    assert torch.all(shifted[0, :, :2] == -1.0)


def test_missing_modality_federation_trains_every_target(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path)
    # Each phantom site lacks one of t1ce/t2/flair; every target is still held by two sites.
    held = {name: set(w.modalities) for name, w in workers.items()}
    assert all("t1" in h for h in held.values())
    assert sorted(len(h) for h in held.values()) == [3, 3, 3]

    trainer, coordinator, exchanged = run_federation(workers)
    assert trainer.finished
    assert madafm.modalities(trainer.generator) == MODALITIES
    for payloads, replies in exchanged:
        for name, payload in payloads.items():
            sent = {k[len(P.FAKE_PREFIX) :] for k in payload if k.startswith(P.FAKE_PREFIX)}
            assert sent <= held[name], "a site received fakes of a modality it does not hold"
            returned = {k[len(P.GRAD_PREFIX) :] for k in replies[name] if k.startswith(P.GRAD_PREFIX)}
            assert returned == sent
            for modality in sent:
                assert replies[name][P.GRAD_PREFIX + modality].shape == payload[P.FAKE_PREFIX + modality].shape
    fakes = trainer.synthesize(coordinator.sample_masks())
    assert set(fakes) == set(MODALITIES)
    for image in fakes.values():
        assert image.shape[1:] == (1, 32, 32) and image.abs().max() <= 1.0


def test_bank_starts_as_the_pretrained_generator_and_leaves_it_frozen(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path)
    trainer, coordinator, sites = start(workers)
    masks = coordinator.sample_masks()
    while trainer.phase == "pretrain":
        payloads = coordinator.step_payloads()
        coordinator.finish_step({n: workers[n].step(p) for n, p in payloads.items()})
    assert trainer.modulated
    frozen_before = {k: v.clone() for k, v in madafm.frozen_state_dict(trainer.generator).items()}
    pretrained_output = None
    with torch.no_grad():
        # A new bank entry reproduces the pretrained generator exactly.
        madafm.set_modality(trainer.generator, "t2")
        trainer.generator.eval()
        pretrained_output = trainer.generator(masks)
        for modality in MODALITIES:
            madafm.set_modality(trainer.generator, modality)
            assert torch.allclose(trainer.generator(masks), pretrained_output, atol=1e-6)
    banks_before = {m: madafm.bank_state_dict(trainer.generator, m) for m in MODALITIES}
    while not trainer.finished:
        payloads = coordinator.step_payloads()
        coordinator.finish_step({n: workers[n].step(p) for n, p in payloads.items()})
    frozen_after = madafm.frozen_state_dict(trainer.generator)
    assert frozen_after.keys() == frozen_before.keys()
    for key, value in frozen_before.items():
        assert torch.equal(frozen_after[key], value), f"frozen tensor {key} changed during bank training"
    for modality in MODALITIES:
        after = madafm.bank_state_dict(trainer.generator, modality)
        changed = any(not torch.equal(after[k], banks_before[modality][k]) for k in after)
        # The source modality's entry is not trained by default: it stays the pretrained G.
        assert changed == (modality != "t1"), f"bank {modality} trained: {changed}"
    with torch.no_grad():
        trainer.generator.eval()
        madafm.set_modality(trainer.generator, "t1")
        assert torch.equal(trainer.generator(masks), pretrained_output)


def test_checkpoint_round_trip_and_resume(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path)
    trainer, coordinator, _ = run_federation(workers)
    saved = trainer.save(tmp_path / "ckpt")
    bank_files = sorted(p.name for p in (saved / "bank").iterdir())
    assert bank_files == sorted(f"{m}.pt" for m in MODALITIES)
    generator_bytes = (saved / "generator.pt").stat().st_size
    assert all((saved / "bank" / f).stat().st_size < generator_bytes for f in bank_files)
    masks = coordinator.sample_masks()
    reloaded = load_trained_generator(saved)
    expected, got = trainer.synthesize(masks), reloaded.synthesize(masks)
    for modality in MODALITIES:
        assert torch.equal(expected[modality], got[modality])

    # Resume mid-way: stop after the pretraining phase, rebuild from disk, finish.
    workers = make_workers(site_slices, tmp_path)
    sites = [SiteState.from_registration(n, w.registration()) for n, w in sorted(workers.items())]
    config = resolve_config(GeneratorConfig.from_dict(TINY), sites)
    first = GeneratorTrainer(config)
    coordinator = StepCoordinator(first, sites, np.random.default_rng(0))
    while first.phase == "pretrain":
        payloads = coordinator.step_payloads()
        coordinator.finish_step({n: workers[n].step(p) for n, p in payloads.items()})
    first.save(tmp_path / "mid")
    resumed = GeneratorTrainer.resume(tmp_path / "mid", config)
    assert resumed.phase == "bank" and resumed.progress.step == 0 and resumed.modulated
    for key, value in madafm.frozen_state_dict(first.generator).items():
        assert torch.equal(madafm.frozen_state_dict(resumed.generator)[key], value)
    with pytest.raises(ValueError, match="differs in"):
        GeneratorTrainer.resume(tmp_path / "mid", resolve_config(GeneratorConfig.from_dict({**TINY, "ngf": 16}), sites))


def test_resume_a_finished_run_to_train_its_last_phase_longer(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path)
    trainer, _, _ = run_federation(workers)
    sites = [SiteState.from_registration(n, w.registration()) for n, w in sorted(workers.items())]
    assert trainer.finished
    trainer.save(tmp_path / "done")
    config = trainer.config

    same = GeneratorTrainer.resume(tmp_path / "done", config)
    assert same.finished  # nothing more to train

    longer = GeneratorTrainer.resume(
        tmp_path / "done",
        resolve_config(GeneratorConfig.from_dict({**TINY, "bank_steps": TINY["bank_steps"] + 2}), sites),
    )
    assert not longer.finished and longer.phase == "bank" and longer.progress.step == TINY["bank_steps"]
    saved_state = torch.load(tmp_path / "done" / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert longer.optimizer.state_dict()["state"].keys() == saved_state.keys()  # Adam's moments carried over
    for modality in MODALITIES:
        for key, value in madafm.bank_state_dict(trainer.generator, modality).items():
            assert torch.equal(madafm.bank_state_dict(longer.generator, modality)[key], value)


def test_site_that_keeps_its_masks_sends_one_batch_at_a_time(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path, shares={"site-2": False})
    registration = workers["site-2"].registration()
    assert P.SAMPLE_KEYS not in registration
    assert registration[P.MASK_CODES].shape[0] == TINY["batch_size"]
    trainer, _, exchanged = run_federation(workers)
    assert trainer.finished
    for payloads, replies in exchanged:
        if "site-2" in payloads:
            assert replies["site-2"][P.MASK_CODES].shape[0] == TINY["batch_size"]
        for name in ("site-1", "site-3"):
            assert P.MASK_CODES not in replies.get(name, {})


def test_differential_privacy_clips_each_sample():
    torch.manual_seed(0)
    config = AdversaryConfig(ndf=8, n_layers=2, dp_clip=0.01, dp_noise=0.0)
    adversary = SiteAdversary(("t2",), spatial_dims=2, config=config)
    cond = torch.rand(3, 2, 32, 32) * 2 - 1
    real = {"t2": torch.rand(3, 1, 32, 32) * 2 - 1}
    fake = {"t2": torch.rand(3, 1, 32, 32) * 2 - 1}
    grads, _ = adversary.step(cond, real, fake)
    per_sample = grads["t2"].flatten(1).norm(dim=1) * 3  # returned gradients are of the batch mean
    assert torch.all(per_sample <= 0.01 + 1e-6)
    with pytest.raises(ValueError, match="does not hold"):
        adversary.step(cond, real, {"flair": fake["t2"]})

    noisy = SiteAdversary(
        ("t2",), spatial_dims=2, config=AdversaryConfig(ndf=8, n_layers=2, dp_clip=0.01, dp_noise=1.0)
    )
    grads_noisy, _ = noisy.step(cond, real, fake)
    assert grads_noisy["t2"].flatten(1).norm(dim=1).mean() * 3 > 0.1  # noise of scale sigma*C per voxel


def test_bad_site_replies_are_refused(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path)
    trainer, coordinator, sites = start(workers)
    payloads = coordinator.step_payloads()
    replies = {n: workers[n].step(p) for n, p in payloads.items()}
    broken = dict(replies["site-1"])
    broken[P.GRAD_PREFIX + "t1"] = np.zeros((1, 1, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="site-1 returned a t1 gradient of shape"):
        coordinator.finish_step({**replies, "site-1": broken})
    with pytest.raises(ValueError, match="no step result from sites"):
        coordinator.finish_step({"site-1": replies["site-1"]})
    with pytest.raises(KeyError, match="unknown sample keys"):
        workers["site-1"].step({**payloads["site-1"], P.KEYS: ["nope/z1"] * TINY["batch_size"]})
    with pytest.raises(ValueError, match="held by no site"):
        resolve_config(
            GeneratorConfig.from_dict({**TINY, "target_modalities": ("t1", "t1ce")}),
            [s for s in sites if s.name == "site-1"],
        )


def test_asyndgan_mode_has_no_bank(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path)
    trainer, coordinator, _ = run_federation(workers, {"mode": "asyndgan"})
    assert not trainer.modulated
    assert trainer.config.phases == [("asyndgan", TINY["pretrain_steps"] + TINY["bank_steps"])]
    assert set(trainer.synthesize(coordinator.sample_masks())) == set(MODALITIES)


def test_pretraining_elsewhere_then_bank_only(site_slices, tmp_path):
    """A plain generator pretrained without the bank (bank_steps=0) seeds a bank-only run."""
    workers = make_workers(site_slices, tmp_path)
    pretrained, _, _ = run_federation(workers, {"bank_steps": 0})
    assert pretrained.finished and not pretrained.modulated
    pretrained.save(tmp_path / "pretrained")

    sites = [SiteState.from_registration(n, w.registration()) for n, w in sorted(workers.items())]
    trainer = GeneratorTrainer(resolve_config(GeneratorConfig.from_dict({**TINY, "pretrain_steps": 0}), sites))
    trainer.load_pretrained(tmp_path / "pretrained")
    assert trainer.phase == "bank" and trainer.modulated
    masks = StepCoordinator(trainer, sites, np.random.default_rng(0)).sample_masks()
    # Every fresh bank entry is the pretrained generator.
    expected = pretrained.synthesize(masks)["t1"]
    for modality, image in trainer.synthesize(masks).items():
        assert torch.allclose(image, expected, atol=1e-6), modality
    with pytest.raises(ValueError, match="differs in"):
        GeneratorTrainer(resolve_config(GeneratorConfig.from_dict({**TINY, "ngf": 16}), sites)).load_pretrained(
            tmp_path / "pretrained"
        )


def test_sites_keep_their_discriminators_at_checkpoints_for_a_resumed_run(site_slices, tmp_path):
    """A checkpoint step makes every site save its discriminators; a resumed run loads them only
    when they are from the step the server resumes at."""
    dataset, modalities = site_slices["site-1"]

    def worker(state_dir, seed):
        config = AdversaryConfig(ndf=8, n_layers=2)
        return SiteWorker("site-1", dataset, modalities, config, 2, True, seed, tmp_path / "out", state_dir=state_dir)

    first = worker(tmp_path / "state", seed=0)
    trainer, coordinator, _ = start({"site-1": first})
    first.step(coordinator.step_payloads(checkpoint_step=None)["site-1"])
    assert not (tmp_path / "state").exists()  # no checkpoint, nothing kept
    coordinator._plan = None
    first.step(coordinator.step_payloads(checkpoint_step=7)["site-1"])
    saved = first.adversary.state_dict()

    resumed = worker(tmp_path / "state", seed=1)  # another seed: it would build other weights
    assert "start afresh" in resumed.load_state(8)  # the server resumes elsewhere: not these
    assert resumed.adversary.discriminators == {}  # nothing loaded
    assert "resumed from" in resumed.load_state(7)
    for modality, entry in saved.items():
        for key, value in entry["net"].items():
            assert torch.equal(resumed.adversary.state_dict()[modality]["net"][key], value), (modality, key)
        assert resumed.adversary.state_dict()[modality]["opt"]["state"].keys() == entry["opt"]["state"].keys()

    assert "start afresh" in worker(tmp_path / "elsewhere", seed=0).load_state(7)

    # A later checkpoint's save does not lose this one: a server killed before its own save of
    # step 9 resumes at 7, and the sites still hold step 7; only the last KEPT_STATES are kept.
    for step in (9, 11, 13):
        coordinator._plan = None
        first.step(coordinator.step_payloads(checkpoint_step=step)["site-1"])
    assert "resumed from" in worker(tmp_path / "state", seed=1).load_state(9)
    assert "start afresh" in worker(tmp_path / "state", seed=1).load_state(7)  # dropped: three are kept


def test_a_dropped_site_gets_no_gradient_and_the_others_are_renormalised(site_slices, tmp_path):
    """A site that did not answer a step: its fakes get zero gradient, the answering holders'
    shares are renormalised over themselves; it can rejoin for the next step."""
    workers = make_workers(site_slices, tmp_path)
    trainer, coordinator, sites = start(workers)
    payloads = coordinator.step_payloads()
    replies = {n: workers[n].step(p) for n, p in payloads.items() if n != "site-3"}
    captured = {}
    trainer.apply_gradients = lambda fakes, grads: captured.update(grads)
    coordinator.drop("site-3")
    coordinator.finish_step(replies, dropped={"site-3"})
    source = trainer.active_modalities()[0]  # t1, held by every site
    sizes = {n: coordinator.state(n).num_samples for n in ("site-1", "site-2")}
    rows = TINY["batch_size"]
    grad = captured[source]
    expected = torch.cat(
        [
            torch.as_tensor(replies["site-1"][P.GRAD_PREFIX + source]) * sizes["site-1"] / sum(sizes.values()),
            torch.as_tensor(replies["site-2"][P.GRAD_PREFIX + source]) * sizes["site-2"] / sum(sizes.values()),
            torch.zeros((rows, *grad.shape[1:])),
        ]
    )
    torch.testing.assert_close(grad, expected)
    assert sorted(coordinator.sites) == ["site-1", "site-2"] and coordinator.cannot_continue(min_sites=2) is None
    assert "fewer than min_sites 3" in coordinator.cannot_continue(min_sites=3)
    coordinator.rejoin(sites[2])
    assert sorted(coordinator.step_payloads()) == ["site-1", "site-2", "site-3"]


def test_the_run_cannot_go_on_when_no_live_site_holds_a_trained_modality(site_slices, tmp_path):
    workers = make_workers(site_slices, tmp_path)
    _, coordinator, sites = start(workers, {"pretrain_steps": 0})  # the bank phase trains t1ce, t2, flair
    lacking_t2 = [s.name for s in sites if "t2" not in s.modalities]
    for s in sites:
        if s.name not in lacking_t2:
            coordinator.drop(s.name)
    assert "no live site holds ['t2']" in coordinator.cannot_continue(min_sites=1)


def test_a_bf16_generator_and_discriminators_train_and_exchange_fp32_arrays(site_slices, tmp_path):
    """`precision` bf16 (what "auto" picks on a recent GPU), run on the CPU: the wire stays fp32."""
    workers = make_workers(site_slices, tmp_path, adversary=AdversaryConfig(ndf=8, n_layers=2, precision="bf16"))
    sites = [SiteState.from_registration(name, w.registration()) for name, w in sorted(workers.items())]
    trainer = GeneratorTrainer(resolve_config(GeneratorConfig.from_dict(TINY), sites), precision="bf16")
    before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    coordinator = StepCoordinator(trainer, sites, np.random.default_rng(0))
    while not trainer.finished:
        payloads = coordinator.step_payloads()
        replies = {name: workers[name].step(payload) for name, payload in payloads.items()}
        for message in [*payloads.values(), *replies.values()]:
            for key, value in message.items():
                if key.startswith((P.FAKE_PREFIX, P.GRAD_PREFIX)):
                    assert value.dtype == np.float32, key
        coordinator.finish_step(replies)
    changed = [k for k, v in trainer.generator.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed
    fakes = trainer.synthesize(torch.zeros(1, 2, 32, 32))
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in fakes.values())
