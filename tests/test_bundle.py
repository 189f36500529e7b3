"""`fedmodal export-bundle`: a MONAI bundle whose inference gives `fedmodal predict`'s labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmodal.baselines.bundle import export_bundle
from fedmodal.baselines.config import SegConfig
from fedmodal.baselines.data import train_loader
from fedmodal.baselines.predict import find_cases, predict_folder
from fedmodal.baselines.trainer import SegTrainer, save_checkpoint
from fedmodal.data import phantoms

torch.set_num_threads(1)
SHAPE = (40, 40, 24)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle") / "fed"
    return phantoms.build_federation(root, layout="brats2023", shape=SHAPE, cases_per_site=2, test_cases=1, workers=1)


def _trained(cfg, cases, path, steps_seed=0):
    trainer = SegTrainer(cfg, seed=steps_seed)
    trainer.train_epochs(train_loader(cases, cfg, seed=steps_seed), epochs=2)
    return save_checkpoint(path, trainer, {"trained_modalities": ["t1", "t1ce", "flair"]})


def _same_labels(a_dir, b_dir, name):
    a, b = nib.load(str(a_dir / name)), nib.load(str(b_dir / name))
    assert np.allclose(a.affine, b.affine) and a.shape == b.shape
    assert np.asanyarray(a.dataobj).any()  # a prediction with tumour, so equality means something
    return np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_bundle_layout_and_monai_cli_run_match_predict(fed, tmp_path):
    cases = find_cases(fed / "site-2")
    cfg = SegConfig(spatial_dims=2, regions=("WT", "TC", "ET"), patch_size=(16, 16), channels=(4, 8, 16))
    model = _trained(cfg, cases, tmp_path / "best.pt")
    bundle = export_bundle(model, tmp_path / "bundle")
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / name).is_file(), name
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["network_def"]["_target_"] == "fedmodal.nets.segmentation.SegmentationNet"
    assert config["inferer"]["_target_"] == "SliceInferer" and config["modalities"] == ["t1", "t1ce", "flair"]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "WT", "1": "TC", "2": "ET"}
    assert "fedmodal package must be installed" in (bundle / "docs" / "README.md").read_text()

    case = find_cases(fed / "test")[0]
    predict_folder(model, case.folder, tmp_path / "predict")
    pytest.importorskip("fire")  # MONAI's command line runs on fire
    out = tmp_path / "bundle-out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--dataset_dir",
        str(case.folder),
        "--output_dir",
        str(out),
        "--device",
        "$torch.device('cpu')",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    name = case.seg.name  # the release's seg name
    assert _same_labels(tmp_path / "predict", out, name)


@pytest.mark.filterwarnings("ignore:parsing config_file")
def test_bundle_3d_wt_only_on_a_site_through_the_python_api(fed, tmp_path):
    from monai.bundle import run

    cases = find_cases(fed / "site-1")
    cfg = SegConfig(
        spatial_dims=3, regions=("WT",), patch_size=(16, 16, 16), channels=(4, 8, 16), batch_size=2, samples_per_case=1
    )
    model = _trained(cfg, cases, tmp_path / "best.pt")
    bundle = export_bundle(model, tmp_path / "bundle", modalities=["t1", "t2", "flair"])
    assert (
        json.loads((bundle / "configs" / "inference.json").read_text())["inferer"]["_target_"] == "SlidingWindowInferer"
    )
    predict_folder(model, fed / "site-1", tmp_path / "predict", modalities=["t1", "t2", "flair"])
    run(
        config_file=str(bundle / "configs" / "inference.json"),
        dataset_dir=str(fed / "site-1"),
        output_dir=str(tmp_path / "bundle-out"),
        device="$torch.device('cpu')",
    )
    for case in cases:
        assert _same_labels(tmp_path / "predict", tmp_path / "bundle-out", case.seg.name)
        values = set(np.unique(nib.load(str(tmp_path / "predict" / case.seg.name)).get_fdata()).tolist())
        assert values <= {0, 2}  # WT only: every tumour voxel is 2
