"""Segmentation baselines: input assembly, targets, trainer, checkpoints, tables (tiny arrays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmodal.baselines.config import SegConfig, parse_regions
from fedmodal.baselines.cse import cross_site_markdown
from fedmodal.baselines.data import drop_modalities, load_site, network_input, region_targets, regions_to_label
from fedmodal.baselines.evaluate import empty_scores, markdown_tables, parse_model_args, write_results
from fedmodal.baselines.trainer import (
    SegTrainer,
    flat_metrics,
    load_checkpoint,
    save_checkpoint,
    trainer_from_checkpoint,
)
from fedmodal.nets.segmentation import SegmentationNet

torch.set_num_threads(1)


def tiny_config(**overrides) -> SegConfig:
    values = dict(
        spatial_dims=2,
        regions=("WT", "TC", "ET"),
        patch_size=(16, 16),
        channels=(4, 8, 16),
        batch_size=4,
        samples_per_case=2,
        lr=1e-2,
    )
    values.update(overrides)
    return SegConfig(**values)


def toy_batch(n: int = 4, size: int = 16, seed: int = 0) -> dict:
    """Squares of tumour: ET ring bright in T1c (channel 1), oedema bright in FLAIR (channel 3)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 4, size, size, generator=g) * 0.1
    label = torch.zeros(n, 1, size, size, dtype=torch.long)
    for b in range(n):
        x, y = torch.randint(2, size - 8, (2,), generator=g).tolist()
        label[b, 0, x : x + 6, y : y + 6] = 2
        label[b, 0, x + 1 : x + 5, y + 1 : y + 5] = 3
        label[b, 0, x + 2 : x + 4, y + 2 : y + 4] = 1
    image[:, 3] += (label[:, 0] > 0).float() * 2
    image[:, 1] += (label[:, 0] == 3).float() * 2
    image[:, 2] += (label[:, 0] == 1).float() * 2
    return {"image": image, "avail": torch.ones(n, 4, dtype=torch.bool), "label": label}


# ----------------------------------------------------------------------------- tensors


def test_network_input_zeroes_missing_channels_and_appends_mask():
    image = torch.ones(2, 4, 3, 3)
    avail = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    x = network_input(image, avail)
    assert x.shape == (2, 8, 3, 3)
    assert x[0, 1].abs().sum() == 0 and x[1, 3].abs().sum() == 0  # missing image channels zeroed
    assert torch.equal(x[:, 4:, 0, 0], avail.float())  # mask planes
    assert network_input(image, avail, mask_channels=False).shape == (2, 4, 3, 3)


def test_region_targets_and_label_decoding_round_trip():
    label = torch.tensor([[[0, 1, 2, 3]]]).reshape(1, 1, 4)
    targets = region_targets(label, ("WT", "TC", "ET"))
    assert targets.shape == (1, 3, 4)
    assert targets[0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert regions_to_label(targets[0] > 0.5, ("WT", "TC", "ET")).tolist() == [0, 1, 2, 3]
    # WT only: every tumour voxel becomes oedema (2), which still scores as WT.
    assert regions_to_label(region_targets(label, ("WT",))[0] > 0.5, ("WT",)).tolist() == [0, 2, 2, 2]


def test_modality_dropout_keeps_a_subset_and_at_least_one():
    avail = torch.tensor([[1, 0, 1, 1]] * 64, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    dropped = drop_modalities(avail, 0.9, g)
    assert (dropped & ~avail).sum() == 0
    assert dropped.any(dim=1).all()
    assert dropped.sum() < avail.sum()
    assert torch.equal(drop_modalities(avail, 0.0, g), avail)


# ----------------------------------------------------------------------------- configuration and network


def test_config_defaults_and_validation():
    assert SegConfig(spatial_dims=2).regions == ("WT",)
    assert SegConfig(spatial_dims=3).regions == ("WT", "TC", "ET")
    assert parse_regions("et,wt") == ("WT", "ET")
    with pytest.raises(ValueError, match="unknown segmentation settings"):
        SegConfig.from_dict({"spatial_dims": 2, "lr_typo": 1})
    cfg = tiny_config()
    assert SegConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    net = SegmentationNet(**cfg.net_args())
    assert SegmentationNet(**net.config()).config() == net.config()
    assert net(torch.zeros(1, 8, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="regions"):
        SegmentationNet(regions=("ET", "WT"))


@pytest.mark.parametrize("dims", [2, 3])
def test_network_shapes_both_dimensions(dims):
    size = (16,) * dims
    cfg = tiny_config(spatial_dims=dims, patch_size=size)
    trainer = SegTrainer(cfg)
    image = torch.randn(4, 20, 20, 12)  # a whole volume in both cases: 2D nets score it slice by slice
    pred = trainer.predict(image, torch.tensor([True, False, True, True]))
    assert pred.shape == (20, 20, 12) and pred.dtype == np.int64


# ----------------------------------------------------------------------------- training


def test_trainer_learns_a_toy_task_and_fedprox_holds_weights_back():
    batch = toy_batch()
    losses = []
    trainer = SegTrainer(tiny_config(), seed=0)
    start = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    stats = trainer.train_epochs([batch] * 10, 3, on_epoch=lambda e, m: losses.append(m["loss"]))
    assert stats["steps"] == 30 and losses[-1] < losses[0]

    def drift(mu: float) -> float:
        t = SegTrainer(tiny_config(), seed=0)
        t.net.load_state_dict(start)
        t.train_epochs([batch] * 10, 1, fedprox_mu=mu)
        return sum(float(((t.net.state_dict()[k] - start[k]) ** 2).sum()) for k, _ in t.net.named_parameters())

    assert drift(1000.0) < drift(0.0)


def test_trainer_stops_on_abort():
    trainer = SegTrainer(tiny_config())
    stats = trainer.train_epochs([toy_batch()] * 5, 2, should_stop=lambda: True)
    assert stats["stopped"] and stats["steps"] == 0


def test_scores_and_flat_metrics_on_a_perfect_volume():
    trainer = SegTrainer(tiny_config())
    label = torch.zeros(16, 16, 8, dtype=torch.long)
    label[4:10, 4:10, 2:6] = 2
    volume = {
        "case_id": "c1",
        "image": torch.zeros(4, 16, 16, 8),
        "avail": torch.ones(4, dtype=torch.bool),
        "label": label,
        "brain": torch.ones(16, 16, 8, dtype=torch.bool),
        "spacing": (1.0, 1.0, 1.0),
    }
    results = trainer.score([volume])
    assert set(results[0]["scores"]) == {"WT", "TC", "ET"}
    floor = empty_scores([volume], ("WT", "TC", "ET"))
    assert floor[0]["scores"]["WT"]["dice"] == 0.0 and floor[0]["scores"]["ET"]["dice"] == 1.0  # ET absent in truth
    metrics = flat_metrics(floor)
    assert metrics["dice_WT"] == 0.0 and metrics["n_cases"] == 1.0 and "hd95_ET" in metrics


def test_load_weights_rejects_another_network():
    small = SegTrainer(tiny_config(channels=(4, 8)))
    other = SegTrainer(tiny_config())
    with pytest.raises(ValueError, match="does not fit"):
        small.load_weights(other.state_numpy())
    small.load_weights(small.state_numpy())


# ----------------------------------------------------------------------------- checkpoints and tables


def test_checkpoint_round_trip_and_nvflare_model_file(tmp_path: Path):
    trainer = SegTrainer(tiny_config(), seed=3)
    image, avail = torch.randn(4, 16, 16, 6), torch.tensor([True, True, False, True])
    expected = trainer.predict(image, avail)
    path = save_checkpoint(tmp_path / "best.pt", trainer, {"trained_modalities": ["t1", "t1ce", "flair"]})
    again, meta = trainer_from_checkpoint(path)
    assert meta["trained_modalities"] == ["t1", "t1ce", "flair"]
    assert np.array_equal(again.predict(image, avail), expected)

    # An NVFlare server persistor file: weights under "model"; the spec comes from the app config.
    app = tmp_path / "app_server"
    (app / "config").mkdir(parents=True)
    torch.save({"model": trainer.net.state_dict(), "train_conf": {}}, app / "FL_global_model.pt")
    with pytest.raises(ValueError, match="network spec"):
        load_checkpoint(app / "FL_global_model.pt")
    persistor = {
        "id": "persistor",
        "path": "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
        "args": {"model": {"path": "fedmodal.nets.segmentation.SegmentationNet", "args": trainer.net.config()}},
    }
    (app / "config" / "config_fed_server.json").write_text(json.dumps({"components": [persistor]}))
    from_server, _ = trainer_from_checkpoint(app / "FL_global_model.pt")
    assert np.array_equal(from_server.predict(image, avail), expected)


def test_results_are_written_in_the_papers_layout(tmp_path: Path):
    summary_case = {"WT": {"dice": 0.8, "sensitivity": 0.9, "specificity": 0.99, "hd95": 4.0}}
    rows = {
        "FedAvg": {
            "path": "x",
            "modalities": ["t1"],
            "regions": ["WT"],
            "meta": {},
            "cases": [{"case_id": "a", "scores": summary_case, "seconds": 0.0}],
            "summary": {"WT": {m: {"mean": v, "std": 0.0, "n": 1} for m, v in summary_case["WT"].items()}},
        },
    }
    paths = write_results(rows, tmp_path, "t")
    text = paths["md"].read_text()
    assert "| FedAvg | 80.0±0.0 | 90.0±0.0 | 99.0±0.0 | 4.00±0.00 |" in text
    assert paths["csv"].read_text().splitlines()[1].startswith("FedAvg,WT,dice,0.8,0")
    assert json.loads(paths["json"].read_text())["models"]["FedAvg"]["cases"][0]["case_id"] == "a"
    assert "Dice" in markdown_tables(rows)
    assert list(parse_model_args(["A=x/best.pt", "y/best.pt"])) == ["A", "y/best"]


def test_cross_site_table_lists_models_by_site():
    results = {
        "site-1": {
            "SRV_best_FL_global_model.pt": {"dice_WT": 0.9, "hd95_WT": 3.0},
            "site-2": {"dice_WT": 0.5, "hd95_WT": 9.0},
        },
        "site-2": {"SRV_best_FL_global_model.pt": {"dice_WT": 0.7, "hd95_WT": 5.0}},
    }
    table = cross_site_markdown(results)
    assert "| SRV_best_FL_global_model.pt | 90.0 | 70.0 | 80.0 |" in table
    assert "| site-2 | 50.0 | - | 50.0 |" in table
    assert "hd95_WT (mm)" in table


# ----------------------------------------------------------------------------- the command line, on a tiny federation


@pytest.fixture(scope="module")
def tiny_federation(tmp_path_factory) -> Path:
    from fedmodal.data.phantoms import build_federation

    return build_federation(
        tmp_path_factory.mktemp("fed") / "phantoms", shape=(32, 32, 24), cases_per_site=4, test_cases=2
    )


def test_train_seg_pools_sites_and_scores_the_held_out_set(tiny_federation: Path, tmp_path: Path):
    import argparse

    from fedmodal.baselines import local

    parser = argparse.ArgumentParser()
    local.add_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(
        [
            "--data-root",
            str(tiny_federation),
            "--sites",
            "site-1",
            "site-2",
            "--epochs",
            "2",
            "--val-every",
            "1",
            "--channels",
            "4",
            "8",
            "16",
            "--patch-size",
            "32",
            "32",
            "--batch-size",
            "4",
            "--samples-per-case",
            "2",
            "--modality-dropout",
            "0.3",
            "--out",
            str(out),
            "--num-threads",
            "1",
        ]
    )
    assert local.run(args) == 0
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["site"] == "site-1+site-2"
    _, meta = trainer_from_checkpoint(out / "best.pt")
    assert meta["sites"] == ["site-1", "site-2"]
    assert meta["trained_modalities"] == ["t1", "t1ce", "t2", "flair"]  # site-1 lacks t1ce, site-2 lacks t2: the union
    heldout = (out / "evaluation" / "heldout" / "results.md").read_text()
    assert "site-1+site-2 (best)" in heldout and "Empty prediction" in heldout
    assert "heldout" in json.loads((out / "results.json").read_text())


def test_train_seg_3d_patches_and_sliding_window(tiny_federation: Path, tmp_path: Path):
    import argparse

    from fedmodal.baselines import local

    parser = argparse.ArgumentParser()
    local.add_arguments(parser)
    out = tmp_path / "run3d"
    args = parser.parse_args(
        [
            "--data-root",
            str(tiny_federation),
            "--sites",
            "site-3",
            "--dims",
            "3",
            "--epochs",
            "1",
            "--channels",
            "4",
            "8",
            "16",
            "--num-res-units",
            "0",
            "--patch-size",
            "32",
            "32",
            "16",
            "--loss",
            "dicefocal",
            "--test",
            "none",
            "--out",
            str(out),
            "--num-threads",
            "1",
        ]
    )
    assert local.run(args) == 0
    trainer, meta = trainer_from_checkpoint(out / "last.pt")
    assert trainer.cfg.spatial_dims == 3 and trainer.cfg.regions == ("WT", "TC", "ET")
    assert meta["trained_modalities"] == ["t1", "t1ce", "t2"]


def test_completed_site_uses_synthetic_files_only_with_the_flag(tiny_federation: Path, tmp_path: Path):
    import shutil

    site = tmp_path / "site-1"
    shutil.copytree(tiny_federation / "site-1", site)  # lacks t1ce
    for case in sorted(p for p in site.iterdir() if p.is_dir()):
        shutil.copy(case / f"{case.name}_t1.nii.gz", case / f"{case.name}_t1ce_synthetic.nii.gz")
    plain = load_site(site)
    completed = load_site(site, include_synthetic=True)
    assert plain.modalities == ("t1", "t2", "flair") and not plain.synthetic
    assert completed.modalities == ("t1", "t1ce", "t2", "flair")
    assert set(completed.synthetic.values()) == {("t1ce",)}
    case = completed.cases("all")[0]
    assert case.images["t1ce"].name.endswith("_t1ce_synthetic.nii.gz") and case.images["t1"].name.endswith("_t1.nii.gz")
