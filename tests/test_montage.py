"""`fedmodal montage`: one PNG per case, n/a panels for missing modalities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fedmodal.data import montage, phantoms
from fedmodal.data.discovery import read_case_folder
from fedmodal.data.layouts import case_file_paths


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("montage") / "fed"
    phantoms.build_federation(root, layout="brats2023", shape=(48, 48, 32), cases_per_site=1, test_cases=1, workers=1)
    return root, json.loads((root / phantoms.FEDERATION_FILE).read_text())


def _case_dir(root, info, site):
    case_id = (info["test"] if site == "test" else info["sites"][site])["case_ids"][0]
    return (root / site / case_file_paths(info["layout"], case_id, ())["seg"]).parent


def test_case_files_reads_aliases(fed):
    # montage reads a case folder through layouts.read_case_folder.
    root, info = fed
    case = read_case_folder(_case_dir(root, info, "site-1"), info["layout"])  # 2023 names: t1n, t2w, t2f
    images, seg = case.images, case.seg
    assert sorted(images) == ["flair", "t1", "t2"]
    assert seg is not None and seg.name.endswith("-seg.nii.gz")


def test_montage_writes_png_with_missing_panel(fed, tmp_path):
    root, info = fed
    out = montage.montage(_case_dir(root, info, "site-2"), tmp_path / "m.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[1] > 4 * image.shape[0] / 2  # one row of five panels
    assert image.std() > 10  # not blank
    # The seg panel carries colour (the overlay), the grey modality panels do not.
    right = image[:, -image.shape[1] // 5 :].astype(int)
    assert (np.abs(right[..., 0] - right[..., 1]) > 60).sum() > 20


def test_cli_and_explicit_slice(fed, tmp_path, capsys):
    from fedmodal.cli import main

    root, info = fed
    out = tmp_path / "case.png"
    assert main(["montage", str(_case_dir(root, info, "test")), "-o", str(out), "--slice", "10"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    with pytest.raises(ValueError, match="slice"):
        montage.montage(_case_dir(root, info, "test"), tmp_path / "bad.png", slice_index=99)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no BraTS"):
        montage.montage(tmp_path, tmp_path / "x.png")


def _orange(panel: np.ndarray) -> int:
    r, g, b = (panel[..., k].astype(int) for k in range(3))
    return int(((r > 200) & (g > 90) & (g < 190) & (b < 80)).sum())


def test_a_completed_case_draws_its_synthetic_modality_marked(fed, tmp_path):
    import shutil

    from fedmodal.brats import MODALITIES
    from fedmodal.data.layouts import synthetic_file

    root, info = fed
    case_dir = tmp_path / "case"
    shutil.copytree(_case_dir(root, info, "site-1"), case_dir)  # holds t1, t2, flair: no t1ce
    case = read_case_folder(case_dir, info["layout"])
    assert "t1ce" not in case.images
    column = MODALITIES.index("t1ce")
    before = np.asarray(Image.open(montage.montage(case_dir, tmp_path / "before.png")).convert("RGB"))
    shutil.copy(case.images["t1"], synthetic_file(case, "t1ce"))  # what `fedmodal complete` writes
    after = np.asarray(Image.open(montage.montage(case_dir, tmp_path / "after.png")).convert("RGB"))
    width = after.shape[1] // 5
    panel_before, panel_after = (im[:, column * width : (column + 1) * width] for im in (before, after))
    assert panel_after.std() > panel_before.std() + 10  # an image where the n/a panel was
    assert _orange(panel_after) > 50 and _orange(panel_before) == 0  # marked as synthetic
    real_panel = after[:, 0:width]  # T1 is real: not marked
    assert _orange(real_panel) == 0
