"""`fedmodal predict`: seg files on the input's own grid, orientation and label convention."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedmodal.baselines.config import SegConfig
from fedmodal.baselines.predict import draw_montage, find_cases, label_legend, predict_folder
from fedmodal.baselines.trainer import SegTrainer, save_checkpoint
from fedmodal.brats import RELEASE_LABELS
from fedmodal.data import phantoms
from fedmodal.data.cases import read_case
from fedmodal.data.loading import to_canonical_labels
from fedmodal.data.segfiles import seg_file_name, write_seg

torch.set_num_threads(1)
SHAPE = (40, 40, 24)


@pytest.fixture(scope="module", params=["brats2021", "brats2023"])
def fed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "fed"
    phantoms.build_federation(root, layout=request.param, shape=SHAPE, cases_per_site=1, test_cases=1, workers=1)
    return root, request.param


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = SegConfig(spatial_dims=2, regions=("WT", "TC", "ET"), patch_size=(16, 16), channels=(4, 8, 16))
    path = tmp_path_factory.mktemp("model") / "best.pt"
    return save_checkpoint(path, SegTrainer(cfg, seed=1), {"trained_modalities": ["t1", "t1ce", "t2", "flair"]})


def _first_image(case):
    return nib.load(str(case.images[case.modalities[0]]))


def _check_like_input(path, case, release):
    out, ref = nib.load(str(path)), _first_image(case)
    assert out.shape == ref.shape
    assert np.allclose(out.affine, ref.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
    assert out.get_data_dtype() == np.uint8
    values = set(np.unique(np.asanyarray(out.dataobj)).tolist())
    assert values <= set(RELEASE_LABELS[release]) - {4 if release == "brats2023" else 3}
    return np.asanyarray(out.dataobj)


def test_seg_round_trip_gives_back_the_file(fed, tmp_path):
    """The case's own seg, read in RAS with canonical labels and written back, is the file it came from."""
    root, release = fed
    case = find_cases(root / "test")[0]
    volumes = read_case(case)
    canonical = to_canonical_labels(volumes.seg, release)
    path = write_seg(
        canonical, case.images[case.modalities[0]], release, tmp_path / seg_file_name(case.case_id, release)
    )
    assert path.name == case.seg.name  # the release's seg name
    written = _check_like_input(path, case, release)
    assert np.array_equal(written, np.asanyarray(nib.load(str(case.seg)).dataobj).astype(np.uint8))


def test_predict_site_writes_each_case_in_its_release_convention(fed, model, tmp_path):
    root, release = fed
    report = predict_folder(model, root / "site-1", tmp_path / "out")
    cases = find_cases(root / "site-1")
    assert [r["case_id"] for r in report["cases"]] == [c.case_id for c in cases] and not report["problems"]
    for case, record in zip(cases, report["cases"]):
        written = _check_like_input(tmp_path / "out" / record["file"], case, release)
        assert record["file"] == seg_file_name(case.case_id, release)
        assert record["fed_modalities"] == list(case.modalities)  # the site lacks one: zero, availability 0
        assert written.any()
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    et = "4" if release == "brats2021" else "3"
    assert saved["labels"][release][et] == "enhancing tumour"


def test_prediction_follows_the_anatomy_not_the_storage_order(fed, model, tmp_path):
    """The same case stored in another orientation (PIR) gets the same prediction, in PIR."""
    root, release = fed
    case = find_cases(root / "test")[0]
    moved = tmp_path / "site" / case.case_id
    moved.mkdir(parents=True)
    target = nib.orientations.axcodes2ornt(("P", "I", "R"))
    for path in case.images.values():
        image = nib.load(str(path))
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine), target)
        nib.save(image.as_reoriented(ornt), str(moved / path.name))
    original = predict_folder(model, case.folder, tmp_path / "a")["cases"][0]
    reoriented = predict_folder(model, moved, tmp_path / "b")["cases"][0]
    a = nib.load(str(tmp_path / "a" / original["file"]))
    b = nib.load(str(tmp_path / "b" / reoriented["file"]))
    assert nib.aff2axcodes(b.affine) == ("P", "I", "R") and nib.aff2axcodes(a.affine) != ("P", "I", "R")
    _check_like_input(tmp_path / "b" / reoriented["file"], find_cases(moved)[0], release)
    assert np.array_equal(
        np.asanyarray(nib.as_closest_canonical(a).dataobj), np.asanyarray(nib.as_closest_canonical(b).dataobj)
    )


def test_missing_modalities_and_bad_cases(fed, model, tmp_path):
    root, release = fed
    case = find_cases(root / "site-1")[0]  # site-1 lacks one modality
    report = predict_folder(model, case.folder, tmp_path / "out", modalities=["t1", "t2"])
    assert report["modalities"] == ["t1", "t2"] and report["cases"][0]["fed_modalities"] == ["t1", "t2"]
    broken = tmp_path / "site"
    shutil.copytree(case.folder, broken / case.case_id)
    (broken / case.case_id / case.images["t1"].name).write_bytes(b"not a nifti")
    report = predict_folder(model, broken, tmp_path / "skip")
    assert not report["cases"] and report["problems"][0]["case"] == case.case_id
    with pytest.raises(Exception, match="unreadable"):
        predict_folder(model, broken, tmp_path / "stop", on_error="stop")


def test_nvflare_model_file_and_cli(fed, model, tmp_path, capsys):
    from fedmodal.cli import main

    root, release = fed
    payload = torch.load(model, weights_only=False)
    nvflare_file = tmp_path / "FL_global_model.pt"
    torch.save({"model": payload["state_dict"]}, nvflare_file)
    case_dir = find_cases(root / "test")[0].folder
    out = tmp_path / "out"
    argv = ["predict", str(nvflare_file), str(case_dir), "-o", str(out), "--device", "cpu"]
    with pytest.raises(ValueError, match="net-config"):
        main(argv)
    assert main([*argv, "--net-config", json.dumps(payload["net"])]) == 0
    assert str(out / seg_file_name(case_dir.name, release)) in capsys.readouterr().out
    # Same weights, same labels as the fedmodal checkpoint.
    predict_folder(model, case_dir, tmp_path / "ref")
    name = seg_file_name(case_dir.name, release)
    assert np.array_equal(nib.load(str(out / name)).get_fdata(), nib.load(str(tmp_path / "ref" / name)).get_fdata())


def test_montage_draws_a_predicted_seg(fed, model, tmp_path):
    root, release = fed
    case = find_cases(root / "test")[0]
    report = predict_folder(model, case.folder, tmp_path / "out", with_montage=True)
    assert (tmp_path / "out" / report["cases"][0]["montage"]).is_file()
    # A seg file given to draw_montage is what the seg panel shows (here the true one, so colours are sure).
    png = draw_montage(case, case.seg, tmp_path / "truth.png")
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    right = image[:, -image.shape[1] // 5 :]
    assert (np.abs(right[..., 0] - right[..., 1]) > 60).sum() > 20


def test_wt_only_legend():
    assert label_legend(("WT",), "brats2021") == {2: "whole tumour (the model predicts WT only)"}
    assert label_legend(("WT", "TC", "ET"), "brats2021")[4] == "enhancing tumour"
    assert label_legend(("WT", "TC", "ET"), "brats2023")[3] == "enhancing tumour"
