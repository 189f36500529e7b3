"""mixmfl/: prototype memory, k-means prototypes, settings, and the site trainer on a tiny phantom site."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmodal.baselines.data import load_site, load_volumes, train_loader
from fedmodal.mixmfl.config import MixMFLConfig
from fedmodal.mixmfl.memory import PrototypeMemory, cluster_prototypes
from fedmodal.mixmfl.trainer import MixMFLTrainer
from fedmodal.nets.mixmfl import SHARED_GROUPS, key_group

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- memory


def rows(values, channels: int = 3) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.float32)[:, None], channels, axis=1)


def test_memory_is_fifo_with_a_capacity_per_modality():
    memory = PrototypeMemory(capacity=5, modalities=("t1", "t2"))
    assert memory.prototypes("t1") is None and memory.size("t2") == 0
    memory.write("t1", rows([0, 1, 2]))
    memory.write("t1", rows([3, 4, 5, 6]))
    memory.write("t2", rows([9]))
    assert memory.prototypes("t1")[:, 0].tolist() == [2, 3, 4, 5, 6]  # oldest dropped, order kept
    assert memory.prototypes("t2").shape == (1, 3)
    memory.write("t1", rows(list(range(10, 18))))  # more than the capacity in one write
    assert memory.prototypes("t1")[:, 0].tolist() == [13, 14, 15, 16, 17]
    assert memory.nbytes() == (5 + 1) * 3 * 4
    with pytest.raises(ValueError, match="channels"):
        memory.write("t1", np.zeros((1, 4)))
    with pytest.raises(KeyError, match="flair"):
        memory.write("flair", rows([1]))


def test_memory_state_round_trips_as_numpy():
    memory = PrototypeMemory(capacity=4, modalities=("t1", "t2", "flair"))
    memory.update({"t1": rows([1, 2]), "flair": rows([3])})
    state = memory.state_dict()
    assert set(state) == {"t1", "flair"} and all(isinstance(v, np.ndarray) for v in state.values())
    again = PrototypeMemory(capacity=4, modalities=("t1", "t2", "flair"))
    again.write("t2", rows([7]))
    again.load_state_dict(state)
    assert again.size("t2") == 0 and np.array_equal(again.state_dict()["t1"], state["t1"])
    state["t1"][0, 0] = 99  # the state is a copy
    assert again.prototypes("t1")[0, 0] == 1


def test_small_clusters_are_dropped_and_centres_are_member_means():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (10, 4)) + [10, 0, 0, 0]
    b = rng.normal(0, 0.1, (10, 4)) + [0, 10, 0, 0]
    small = rng.normal(0, 0.1, (3, 4)) + [0, 0, 10, 0]
    centres, sizes = cluster_prototypes(np.concatenate([a, b, small]), k=3, min_cluster_size=5, seed=0)
    assert centres.shape == (2, 4) and sorted(sizes.tolist()) == [10, 10]
    expected = sorted([a.mean(axis=0).tolist(), b.mean(axis=0).tolist()])
    assert np.allclose(sorted(centres.tolist()), expected, atol=1e-5)
    # Fewer samples than the minimum: no centre at all.
    none, none_sizes = cluster_prototypes(a[:4], k=2, min_cluster_size=5)
    assert none.shape == (0, 4) and none_sizes.shape == (0,)
    # k larger than the samples allow: fewer, larger clusters.
    centres, sizes = cluster_prototypes(a, k=4, min_cluster_size=5)
    assert len(centres) <= 2 and (sizes >= 5).all()


# ----------------------------------------------------------------------------- settings


def test_config_defaults_switches_and_refusals():
    cfg = MixMFLConfig()
    assert cfg.spatial_dims == 2 and cfg.lr == 4e-4 and cfg.loss_weights == (0.5, 1e-4)
    assert cfg.memory_capacity == 200 and cfg.min_cluster_size == 5 and cfg.precision == "auto"
    assert MixMFLConfig(use_triplet=False, use_classification=False).loss_weights == (0.0, 0.0)
    assert MixMFLConfig.from_dict(cfg.to_dict()) == cfg
    loader = cfg.loader_config()
    assert (loader.patch_size, loader.batch_size, loader.samples_per_case) == (
        cfg.patch_size,
        cfg.batch_size,
        cfg.samples_per_case,
    )
    assert MixMFLConfig(spatial_dims=3).patch_size == (48, 48, 32)
    with pytest.raises(ValueError, match="unknown mixmfl settings"):
        MixMFLConfig.from_dict({"lambda1": 0.5})
    with pytest.raises(ValueError, match="more than one case"):
        MixMFLConfig(samples_per_case=5, min_cluster_size=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        MixMFLConfig(patch_size=(30, 30))


# ----------------------------------------------------------------------------- trainer on phantoms


def tiny_config(**overrides) -> MixMFLConfig:
    values = dict(
        features=(4, 8, 16),
        patch_size=(32, 32),
        batch_size=4,
        samples_per_case=2,
        kmeans_k=2,
        min_cluster_size=3,
        lr=1e-3,
    )
    return MixMFLConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    from fedmodal.data.phantoms import build_federation

    return build_federation(
        tmp_path_factory.mktemp("mixmfl") / "fed", preset="mixmfl", shape=(32, 32, 24), cases_per_site=3, test_cases=1
    )


@pytest.fixture(scope="module")
def site(federation):
    return load_site(federation / "site-1")  # t1 + t1ce


def trained(site, **overrides) -> tuple[MixMFLTrainer, dict]:
    cfg = tiny_config(**overrides)
    trainer = MixMFLTrainer(cfg, site.modalities, seed=3)
    stats = trainer.train_epoch(train_loader(site.cases("train"), cfg.loader_config(), seed=0))
    return trainer, stats


def test_train_epoch_and_prototypes_of_exactly_the_held_modalities(site):
    assert site.modalities == ("t1", "t1ce")
    trainer, stats = trained(site)
    assert math.isfinite(stats["loss"]) and stats["steps"] >= 1 and stats["retrieved"] == 0
    assert stats["cls"] > 0 and stats["triplet"] >= 0
    vectors = trainer.epoch_vectors()
    assert set(vectors) == {"t1", "t1ce"} and vectors["t1"].shape == (stats["samples"], 16)
    prototypes = trainer.prototypes()
    assert set(prototypes) == {"t1", "t1ce"}
    for centres in prototypes.values():
        assert centres.ndim == 2 and centres.shape[1] == 16 and 1 <= len(centres) <= 2
    # Fewer samples than the minimum cluster size: no prototype leaves the site.
    assert all(len(c) == 0 for c in trainer.prototypes(min_cluster_size=stats["samples"] + 1).values())


def test_memory_fills_missing_modalities_unless_switched_off(site):
    memory = PrototypeMemory(modalities=("t1", "t1ce", "t2", "flair"))
    memory.update(
        {
            "t2": np.ones((3, 16), np.float32),
            "flair": -np.ones((2, 16), np.float32),
            "t1": np.zeros((1, 16), np.float32),
        }
    )
    for use_memory, expected in ((True, 2), (False, 0)):
        cfg = tiny_config(use_memory=use_memory, use_classification=False)
        trainer = MixMFLTrainer(cfg, site.modalities)
        stats = trainer.train_epoch(train_loader(site.cases("train"), cfg.loader_config(), seed=0), memory)
        assert stats["retrieved"] == expected and stats["cls"] == 0 and math.isfinite(stats["loss"])


def test_a_sample_lacking_a_held_modality_is_refused(site):
    trainer = MixMFLTrainer(tiny_config(), ("t1", "t2"))  # site-1 has no t2
    with pytest.raises(ValueError, match=r"lacks \['t2'\]"):
        trainer.train_epoch(train_loader(site.cases("train"), trainer.cfg.loader_config(), seed=0))


def test_state_numpy_and_load_global_by_group(site):
    trainer, _ = trained(site)
    assert trainer.groups == (*SHARED_GROUPS, "enc.t1", "enc.t1ce")
    sent = trainer.state_numpy(trainer.groups)
    assert {key_group(k) for k in sent} == set(trainer.groups)
    assert {key_group(k) for k in trainer.state_numpy(["dec"])} == {"dec"}
    assert len(trainer.state_numpy()) == len(trainer.net.state_dict())
    with pytest.raises(ValueError, match="unknown key groups"):
        trainer.state_numpy(["enc.t3"])

    other = MixMFLTrainer(tiny_config(), ("t1", "flair"), seed=9)
    before = other.state_numpy()
    everything = trainer.state_numpy()
    report = other.load_global(everything)  # default: other's own groups
    after = other.state_numpy()
    assert {key_group(k) for k in report["skipped"]} == {"enc.t1ce", "enc.t2"}
    assert {key_group(k) for k in report["loaded"]} == {*SHARED_GROUPS, "enc.t1", "enc.flair"}
    for key, value in after.items():
        if key_group(key) in other.groups:
            assert np.array_equal(value, everything[key]), key
        else:
            assert np.array_equal(value, before[key]), key  # not allowed: kept local
    only_dec = MixMFLTrainer(tiny_config(), ("t1", "flair"), seed=9)
    only_dec.load_global(everything, allowed_groups=["dec"])
    assert all(np.array_equal(v, everything[k]) == (key_group(k) == "dec") for k, v in only_dec.state_numpy().items())
    key = next(iter(sent))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        other.load_global({key: np.zeros((1, 2, 3))})
    with pytest.raises(ValueError, match="does not have"):
        other.load_global({"enc.shared.extra": np.zeros(1)})


def test_score_save_and_load(site, federation, tmp_path):
    trainer, _ = trained(site)
    memory = PrototypeMemory()
    memory.update(trainer.prototypes())
    memory.write("t2", np.ones((2, 16), np.float32))
    volumes = load_volumes(load_site(federation / "test").cases("all"), site.modalities)
    results = trainer.score(volumes, memory)
    assert len(results) == len(volumes) == 1
    scores = results[0]["scores"]
    assert set(scores) == {"WT", "TC", "ET"}
    assert all(0.0 <= s["dice"] <= 1.0 and s["hd95"] >= 0.0 for s in scores.values())

    path = trainer.save(tmp_path / "site-1.pt", meta={"round": 3})
    again = MixMFLTrainer.from_checkpoint(path)
    assert again.held == ("t1", "t1ce") and again.cfg == trainer.cfg
    assert all(np.array_equal(v, again.state_numpy()[k]) for k, v in trainer.state_numpy().items())
    image = volumes[0]["image"]
    assert np.array_equal(trainer.predict(image, memory=memory), again.predict(image, memory=memory))
    with pytest.raises(ValueError, match="for \\['t1', 't1ce'\\]"):
        MixMFLTrainer(tiny_config(), ("t2", "flair")).load(path)
    missing = dict(volumes[0], avail=torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError, match="lacks"):
        trainer.score([missing])
