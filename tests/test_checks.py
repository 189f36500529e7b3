"""Bad input: each problem gives a DataError naming site, case and file."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from fedmodal.data.checks import check_case
from fedmodal.data.discovery import discover_cases
from fedmodal.data.errors import DataError
from test_layouts import SHAPE, write_case, write_volume

SITE = "site-7"


def one_case(tmp_path, release="brats2021", **kwargs):
    case_id, files = write_case(tmp_path, release, 0, **kwargs)
    return case_id, files


def checked_error(tmp_path, need_seg=True) -> DataError:
    case = discover_cases(tmp_path)[0]
    with pytest.raises(DataError) as info:
        check_case(case, SITE, need_seg=need_seg)
    return info.value


def assert_names(error: DataError, case_id: str, file_name: str | None) -> None:
    text = str(error)
    assert error.site == SITE and SITE in text
    assert error.case == case_id and case_id in text
    if file_name is not None:
        assert error.file is not None and error.file.endswith(file_name)
        assert file_name in text


def test_good_case_passes(tmp_path):
    one_case(tmp_path)
    check_case(discover_cases(tmp_path)[0], SITE, need_seg=True)


def test_truncated_gzip_is_unreadable(tmp_path):
    case_id, files = one_case(tmp_path)
    raw = files["t2"].read_bytes()
    files["t2"].write_bytes(raw[: len(raw) // 2])
    error = checked_error(tmp_path)
    assert "unreadable NIfTI" in error.problem
    assert_names(error, case_id, files["t2"].name)


def test_truncated_uncompressed_nifti_is_unreadable(tmp_path):
    case_id, files = one_case(tmp_path, ext=".nii")
    raw = files["flair"].read_bytes()
    files["flair"].write_bytes(raw[: 352 + 20])  # header and a few voxels
    error = checked_error(tmp_path)
    assert "unreadable" in error.problem
    assert_names(error, case_id, files["flair"].name)


def test_not_a_nifti_is_unreadable(tmp_path):
    case_id, files = one_case(tmp_path)
    files["t1"].write_bytes(gzip.compress(b"this is not an image"))
    error = checked_error(tmp_path)
    assert_names(error, case_id, files["t1"].name)


def test_shape_mismatch(tmp_path):
    case_id, files = one_case(tmp_path)
    write_volume(files["t1ce"], np.ones((8, 8, 5), np.float32))
    error = checked_error(tmp_path)
    assert "shape" in error.problem
    assert_names(error, case_id, files["t1ce"].name)


def test_affine_mismatch(tmp_path):
    case_id, files = one_case(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    write_volume(files["flair"], np.ones(SHAPE, np.float32), shifted)
    error = checked_error(tmp_path)
    assert "affine" in error.problem
    assert_names(error, case_id, files["flair"].name)


def test_seg_on_another_grid_is_a_mismatch(tmp_path):
    case_id, files = one_case(tmp_path)
    write_volume(files["seg"], np.zeros((8, 8, 7), np.uint8))
    error = checked_error(tmp_path)
    assert_names(error, case_id, files["seg"].name)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_voxels(tmp_path, bad):
    case_id, files = one_case(tmp_path)
    data = np.asanyarray(nib.load(str(files["t2"])).dataobj).copy()
    data[2, 2, 2] = bad
    write_volume(files["t2"], data)
    error = checked_error(tmp_path)
    assert "NaN/inf" in error.problem
    assert_names(error, case_id, files["t2"].name)


def test_empty_brain(tmp_path):
    case_id, files = one_case(tmp_path)
    write_volume(files["t1"], np.zeros(SHAPE, np.float32))
    error = checked_error(tmp_path)
    assert "empty brain" in error.problem
    assert_names(error, case_id, files["t1"].name)


def test_label_outside_release_set(tmp_path):
    case_id, files = one_case(tmp_path)  # brats2021: 0, 1, 2, 4
    seg = np.zeros(SHAPE, np.uint8)
    seg[2, 2, 2] = 3
    write_volume(files["seg"], seg)
    error = checked_error(tmp_path)
    assert "label values [3]" in error.problem and "brats2021" in error.problem
    assert_names(error, case_id, files["seg"].name)


def test_non_integer_labels(tmp_path):
    case_id, files = one_case(tmp_path)
    seg = np.zeros(SHAPE, np.float32)
    seg[2, 2, 2] = 1.5
    write_volume(files["seg"], seg)
    error = checked_error(tmp_path)
    assert "non-integer" in error.problem


def test_brats2023_cavity_label_is_allowed_and_noted(tmp_path):
    case_id, files = one_case(tmp_path, release="brats2023")
    seg = np.asanyarray(nib.load(str(files["seg"])).dataobj).copy()
    seg[5, 5, 3] = 4
    write_volume(files["seg"], seg)
    case = discover_cases(tmp_path)[0]
    check_case(case, SITE, need_seg=True)
    assert any("resection cavity" in note for note in case.notes)
    seg[5, 5, 4] = 5
    write_volume(files["seg"], seg)
    error = checked_error(tmp_path)
    assert "[5]" in error.problem


def test_missing_seg_only_matters_when_needed(tmp_path):
    case_id, _ = one_case(tmp_path, with_seg=False)
    error = checked_error(tmp_path, need_seg=True)
    assert "no segmentation" in error.problem
    assert error.case == case_id and SITE in str(error)
    check_case(discover_cases(tmp_path)[0], SITE, need_seg=False)


def test_conflicting_files_and_no_images(tmp_path):
    case_id, files = one_case(tmp_path)
    write_volume(files["t1"].with_name(f"{case_id}_t1.nii"), np.ones(SHAPE, np.float32))
    error = checked_error(tmp_path)
    assert "several files for t1" in error.problem

    other = tmp_path / "other"
    case_id, files = write_case(other, "brats2021", 0, modalities=())
    error = checked_error(other)
    assert "no image file" in error.problem


def test_error_pickles_and_records(tmp_path):
    import pickle

    error = DataError("site-1", "BraTS2021_00000", "/x/BraTS2021_00000_t1.nii.gz", "all voxels are zero")
    again = pickle.loads(pickle.dumps(error))
    assert (again.site, again.case, again.file, again.problem) == (error.site, error.case, error.file, error.problem)
    assert error.to_record() == {
        "site": "site-1",
        "case": "BraTS2021_00000",
        "file": "/x/BraTS2021_00000_t1.nii.gz",
        "problem": "all voxels are zero",
    }
    assert str(error) == "site 'site-1': case BraTS2021_00000: /x/BraTS2021_00000_t1.nii.gz: all voxels are zero"
