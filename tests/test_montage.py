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
