"""FedMEPD core: anchors, filter personalisation, and the trainer on a tiny phantom federation."""

import math

import numpy as np
import pytest
import torch

from fedmodal.brats import REGIONS
from fedmodal.fedmepd import (
    AnchorBank,
    CaseFeatures,
    FedMEPDConfig,
    FedMEPDTrainer,
    FilterCounters,
    aggregate_decoder,
    blend_shared,
    expand_payload,
    filter_similarity,
    filter_weights,
    merge_received,
    pool_case,
    split_payload,
)

# ----------------------------------------------------------------------------- anchors


def test_pool_case_averages_features_inside_each_class_at_every_scale():
    label = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]])  # (1, 4, 4)
    fine = torch.zeros(1, 2, 4, 4)
    fine[0, 0] = label[0].float() * 10  # channel 0 = 10 * class
    fine[0, 1] = 1.0
    coarse = torch.arange(4.0).reshape(1, 1, 2, 2)  # one channel, voxels 0..3
    pooled = pool_case([fine, coarse], label, num_classes=4)
    assert pooled.present.tolist() == [True, True, True, False]
    np.testing.assert_allclose(pooled.features[0][:3], [[0, 1], [10, 1], [20, 1]])
    np.testing.assert_allclose(pooled.features[0][3], [0, 0])  # absent class: zero row
    # at the coarse scale, class 0 fills the top-left voxel, class 1 the top-right, class 2 the bottom two
    np.testing.assert_allclose(pooled.features[1][:3, 0], [0.0, 1.0, 2.5])


def test_pool_case_ignores_negative_labels():
    label = torch.tensor([[[0, -1], [1, -1]]])
    features = torch.tensor([[[[1.0, 100.0], [3.0, 100.0]]]])
    pooled = pool_case([features], label, num_classes=2)
    np.testing.assert_allclose(pooled.features[0][:, 0], [1.0, 3.0])


def case_features(value, channels=(2, 3), present=(True, True)):
    """Every class and scale of one case filled with `value` (+ the class index in channel 0)."""
    features = []
    for c in channels:
        rows = np.full((len(present), c), float(value))
        rows[:, 0] += np.arange(len(present))
        features.append(rows)
    return CaseFeatures(features=features, present=np.array(present))


def two_groups():
    # Two clear groups per class: values near 0 and near 100 (relative direction differs after L2 norm).
    cases = {}
    for i in range(3):
        cases[f"low-{i}"] = case_features(0.1 * i + 1.0)
        cases[f"high-{i}"] = case_features(0.1 * i + 1.0)
        for f in cases[f"high-{i}"].features:
            f[:, -1] = -50.0  # another direction
    return cases


def test_anchor_shapes_per_scale():
    bank = AnchorBank(num_classes=2, k=2, min_cluster_size=2)
    bank.update(two_groups())
    anchors = bank.anchors()
    assert [a.shape for a in anchors] == [(4, 2), (4, 3)]
    assert bank.anchor_classes().tolist() == [0, 0, 1, 1]
    assert bank.sizes().tolist() == [[3, 3], [3, 3]]
    # the clusters separate the two groups
    assert len({int(bank.members[f"low-{i}"][0]) for i in range(3)}) == 1
    assert bank.members["low-0"][0] != bank.members["high-0"][0]


def test_membership_is_frozen_after_the_first_collection():
    bank = AnchorBank(num_classes=2, k=2, min_cluster_size=1)
    bank.update(two_groups())
    before = {case: clusters.copy() for case, clusters in bank.members.items()}
    swapped = two_groups()  # the "low" cases now look like the "high" ones: a re-clustering would move them
    for i in range(3):
        swapped[f"low-{i}"], swapped[f"high-{i}"] = swapped[f"high-{i}"], swapped[f"low-{i}"]
    bank.update(swapped)
    assert all(np.array_equal(bank.members[c], before[c]) for c in before)
    assert bank.collections == 2


def test_ema_follows_the_member_mean():
    cases = {"a": case_features(1.0), "b": case_features(3.0)}
    bank = AnchorBank(num_classes=2, k=1, momentum=0.999, min_cluster_size=2)
    bank.update(cases)
    first = bank.anchors()[0].copy()
    np.testing.assert_allclose(first[:, 1], [2.0, 2.0])  # the mean of 1 and 3
    bank.update({"a": case_features(11.0), "b": case_features(13.0)})  # new member mean 12
    np.testing.assert_allclose(bank.anchors()[0][:, 1], 0.999 * 2.0 + 0.001 * 12.0, rtol=1e-6)
    bank.update({"a": case_features(11.0)})  # only member a this time: its value is the member mean
    expected = 0.999 * (0.999 * 2.0 + 0.001 * 12.0) + 0.001 * 11.0
    np.testing.assert_allclose(bank.anchors()[0][:, 1], expected, rtol=1e-6)


def test_small_clusters_are_not_published():
    cases = {f"c{i}": case_features(1.0 + 0.01 * i) for i in range(3)}
    cases["odd"] = case_features(1.0)
    for f in cases["odd"].features:
        f[:, -1] = -80.0
    bank = AnchorBank(num_classes=2, k=2, min_cluster_size=2)
    bank.update(cases)
    assert sorted(bank.sizes()[0].tolist()) == [1, 3]
    assert [a.shape[0] for a in bank.anchors()] == [2, 2]  # one published cluster per class
    odd_anchor = bank.centres[0][bank.members["odd"][0]]
    assert not any(np.allclose(row, odd_anchor) for row in bank.anchors()[0])
    # a class that only one case holds publishes nothing
    single = {"a": case_features(1.0, present=(True, False)), "b": case_features(2.0, present=(True, True))}
    bank = AnchorBank(num_classes=2, k=1, min_cluster_size=2)
    bank.update(single)
    assert bank.anchor_classes().tolist() == [0]


def test_anchor_bank_state_round_trip():
    bank = AnchorBank(num_classes=2, k=2, min_cluster_size=1, momentum=0.9)
    bank.update(two_groups())
    state = bank.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = AnchorBank(num_classes=2, k=2)
    other.load_state_dict(state)
    assert other.momentum == 0.9 and other.min_cluster_size == 1
    assert all(np.array_equal(a, b) for a, b in zip(bank.anchors(), other.anchors()))
    with pytest.raises(ValueError, match="does not fit"):
        AnchorBank(num_classes=3, k=2).load_state_dict(state)


def test_no_anchors_before_a_collection():
    with pytest.raises(ValueError, match="no anchors yet"):
        AnchorBank(2).anchors()


# ----------------------------------------------------------------------------- personalisation


def test_similarity_on_hand_made_updates():
    server = {"l.weight": np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]), "l.bias": np.zeros(4)}
    client = {"l.weight": np.array([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), "l.bias": np.zeros(4)}
    s = filter_similarity(server, client)["l"]
    np.testing.assert_allclose(s, [1.0, 0.0, 0.5, 0.5])  # same, opposite, orthogonal, zero server update
    # the bias entry is part of the filter
    client["l.bias"] = np.array([0.0, 0.0, 0.0, 0.0])
    server["l.bias"] = np.array([0.0, 0.0, 3.0, 0.0])
    client["l.weight"][2] = [0.0, 0.0]
    client["l.bias"][2] = -1.0
    assert filter_similarity(server, client)["l"][2] == pytest.approx((-3 / math.sqrt(10) + 1) / 2)


def test_counters_drop_reset_and_become_permanent():
    counters = FilterCounters({"l": 3}, start=2, warmup_rounds=0)
    counters.update({"l": np.array([0.2, 0.2, 0.9])}, round_num=0)
    assert counters.counters["l"].tolist() == [1, 1, 2]
    newly = counters.update({"l": np.array([0.2, 0.8, 0.5])}, round_num=1)  # drop to 0, reset, unchanged at 0.5
    assert counters.counters["l"].tolist() == [0, 2, 2]
    assert newly["l"].tolist() == [True, False, False]
    counters.update({"l": np.array([0.9, 0.1, 0.1])}, round_num=2)  # personal stays personal
    assert counters.mask()["l"].tolist() == [True, False, False]
    assert counters.counters["l"].tolist() == [0, 1, 1]
    assert counters.summary()["personal"] == {"l": 1}


def test_no_counting_during_warmup():
    counters = FilterCounters({"l": 2}, start=1, warmup_rounds=30)
    for round_num in range(30):
        counters.update({"l": np.array([0.0, 0.0])}, round_num)
    assert counters.counters["l"].tolist() == [1, 1] and not counters.mask()["l"].any()
    counters.update({"l": np.array([0.0, 1.0])}, 30)
    assert counters.mask()["l"].tolist() == [True, False]


def test_counters_state_round_trip():
    counters = FilterCounters({"a": 2, "b": 1}, start=3, warmup_rounds=0)
    counters.update({"a": np.array([0.1, 0.9]), "b": np.array([0.1])}, 0)
    other = FilterCounters({"a": 2, "b": 1})
    other.load_state_dict(counters.state_dict())
    assert other.counters["a"].tolist() == [2, 3] and other.start == 3


def test_blend_is_seven_tenths_clients_three_tenths_server():
    np.testing.assert_allclose(blend_shared(np.array([10.0]), np.array([0.0])), [7.0])
    np.testing.assert_allclose(blend_shared(np.array([0.0]), np.array([10.0])), [3.0])
    np.testing.assert_allclose(blend_shared(np.array([1.0, 2.0]), np.array([0.0, 1.0]), client_weight=0.5), [0.5, 1.5])


def test_filter_weights_sum_to_one_over_sharing_sites():
    norms = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0], [5.0, 7.0, 0.0]])
    samples = np.array([10, 30, 60])
    sharing = np.array([[True, True, True], [True, True, False], [False, False, False]])
    w = filter_weights(norms, samples, sharing)
    np.testing.assert_allclose(w.sum(axis=0), [1.0, 1.0, 1.0])
    assert not w[~sharing].any()
    np.testing.assert_allclose(w[:2, 0], [10 * 1 / (10 + 90), 30 * 3 / (10 + 90)])
    np.testing.assert_allclose(w[:2, 1], [0.25, 0.75])  # zero updates: data shares
    np.testing.assert_allclose(w[:, 2], [1.0, 0.0, 0.0])
    assert not filter_weights(norms, samples, np.zeros_like(sharing)).any()  # nobody shares: all zero


def decoder_state():
    return {
        "dec.a.weight": np.arange(24, dtype=np.float32).reshape(4, 3, 2) + 1000,
        "dec.a.bias": np.arange(4, dtype=np.float32) + 2000,
        "dec.b.weight": np.arange(6, dtype=np.float32).reshape(2, 3) + 3000,
    }


def test_split_payload_never_contains_personal_values():
    state = decoder_state()
    personal = {"dec.a": np.array([False, True, False, True])}
    shared, present = split_payload(state, personal)
    sent = np.concatenate([v.ravel() for v in shared.values()])
    secret = np.concatenate([state["dec.a.weight"][[1, 3]].ravel(), state["dec.a.bias"][[1, 3]]])
    assert not np.isin(secret, sent).any()
    assert shared["dec.a.weight"].shape == (2, 3, 2) and shared["dec.b.weight"].shape == (2, 3)
    assert present["dec.a"].tolist() == [True, False, True, False] and present["dec.b"].all()
    full = expand_payload(shared, present, state)
    assert np.isnan(full["dec.a.weight"][[1, 3]]).all()
    np.testing.assert_array_equal(full["dec.a.weight"][[0, 2]], state["dec.a.weight"][[0, 2]])


def test_merge_received_keeps_personal_rows_local():
    local = decoder_state()
    received = {k: np.zeros_like(v) for k, v in local.items()}
    personal = {"dec.a": np.array([False, True, False, False])}
    for incoming in (received, split_payload(received, personal)[0]):  # full arrays or shared rows only
        merged = merge_received(local, incoming, personal)
        np.testing.assert_array_equal(merged["dec.a.weight"][1], local["dec.a.weight"][1])
        assert merged["dec.a.bias"][1] == local["dec.a.bias"][1]
        assert not merged["dec.a.weight"][[0, 2, 3]].any() and not merged["dec.b.weight"].any()
    with pytest.raises(ValueError, match="dec.a.weight"):
        merge_received(local, {**received, "dec.a.weight": np.zeros((1, 3, 2))}, personal)


def test_aggregate_decoder_blends_the_weighted_site_average_with_the_server():
    before = {"dec.l.weight": np.zeros((2, 1)), "dec.l.bias": np.zeros(2)}
    server = {"dec.l.weight": np.array([[1.0], [1.0]]), "dec.l.bias": np.zeros(2)}
    site_a = {"dec.l.weight": np.array([[2.0], [np.nan]]), "dec.l.bias": np.array([0.0, np.nan])}  # row 1 personal
    site_b = {"dec.l.weight": np.array([[-1.0], [4.0]]), "dec.l.bias": np.zeros(2)}
    new, s = aggregate_decoder(before, server, {"a": site_a, "b": site_b}, {"a": 1, "b": 3})
    # row 0: weights n*|u| = 1*2 and 3*1 -> 0.4, 0.6; client average 0.4*2 + 0.6*(-1) = 0.2
    assert new["dec.l.weight"][0, 0] == pytest.approx(0.7 * 0.2 + 0.3 * 1.0)
    # row 1: only b shares it
    assert new["dec.l.weight"][1, 0] == pytest.approx(0.7 * 4.0 + 0.3 * 1.0)
    np.testing.assert_allclose(s["a"]["dec.l"], [1.0, np.nan])
    np.testing.assert_allclose(s["b"]["dec.l"], [0.0, 1.0])


# ----------------------------------------------------------------------------- trainer on phantoms

TINY = {"patch_size": (16, 16, 16), "channels": (8, 8, 16, 16), "heads": (4, 4, 4, 4), "min_cluster_size": 1}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from fedmodal.data.phantoms import build_federation

    root = tmp_path_factory.mktemp("fedmepd") / "phantoms"
    return build_federation(root, preset="fedmepd", shape=(32, 32, 24), cases_per_site=3, test_cases=1)


def test_server_and_client_epochs_then_scores(federation, tmp_path):
    from fedmodal.baselines.data import load_site, load_volumes, train_loader

    config = FedMEPDConfig.from_dict(TINY)
    server_site, client_site = load_site(federation / "server"), load_site(federation / "site-4")
    assert client_site.modalities == ("t1ce", "flair")
    server = FedMEPDTrainer(config, server_site.modalities, seed=0)
    loader = train_loader(server_site.cases("train"), config.seg_config(), seed=0)
    result = server.train_epoch(loader)
    assert result["steps"] > 0 and math.isfinite(result["loss"]) and math.isfinite(result["loss_aux"])

    bank = AnchorBank(4, k=config.anchors_k, min_cluster_size=config.min_cluster_size)
    features = server.fused_features(load_volumes(server_site.cases("train")))
    assert set(features) == {c.case_id for c in server_site.cases("train")}
    bank.update(features)
    anchors = bank.anchors()
    assert [a.shape[1] for a in anchors] == list(config.channels)

    client = FedMEPDTrainer(config, client_site.modalities, seed=1)
    shared = ("enc.t1ce.", "enc.flair.", "dec.", "aux.")
    client.load_groups(server.state_numpy(shared), shared)
    t1_before = client.state_numpy(["enc.t1."])
    result = client.train_epoch(train_loader(client_site.cases("train"), config.seg_config(), seed=1), anchors)
    assert math.isfinite(result["loss"])
    assert all(np.array_equal(v, client.state_numpy(["enc.t1."])[k]) for k, v in t1_before.items())

    results = client.score(load_volumes(client_site.cases("test")), anchors)
    assert len(results) == len(client_site.cases("test"))
    for record in results:
        assert set(record["scores"]) == set(REGIONS)
        assert all(0.0 <= record["scores"][r]["dice"] <= 1.0 and record["scores"][r]["hd95"] >= 0 for r in REGIONS)

    path = client.save(tmp_path / "site-4.pt", extras={"anchors.0": anchors[0]}, meta={"round": 1})
    again = FedMEPDTrainer(config, client_site.modalities, seed=5)
    extras, meta = again.load(path)
    assert meta == {"round": 1} and np.array_equal(extras["anchors.0"], anchors[0])
    assert all(np.array_equal(v, again.state_numpy()[k]) for k, v in client.state_numpy().items())


def test_load_groups_names_the_bad_key():
    trainer = FedMEPDTrainer(FedMEPDConfig.from_dict(TINY), ("t1",))
    params = trainer.state_numpy(["dec."])
    key = sorted(params)[0]
    params[key] = np.zeros((1, 2))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        trainer.load_groups(params, ["dec."])
    with pytest.raises(ValueError, match="missing"):
        trainer.load_groups({key: trainer.state_numpy()[key]}, ["dec."])
    with pytest.raises(ValueError, match="outside groups"):
        trainer.load_groups(trainer.state_numpy(["aux."]), ["dec."])


def test_config_refuses_unknown_keys_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown fedmepd settings"):
        FedMEPDConfig.from_dict({"anchor_k": 3})
    with pytest.raises(ValueError, match="multiple of 8"):
        FedMEPDConfig.from_dict({"patch_size": (20, 20, 20)})
    assert FedMEPDConfig.from_dict({"spatial_dims": 2}).patch_size == (96, 96)
    assert FedMEPDConfig.from_dict(FedMEPDConfig().to_dict()) == FedMEPDConfig()
