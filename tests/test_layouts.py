"""BraTS release layouts: naming, detection, discovery, institutions.

The tree-writing helpers here (``write_case``, ``write_volume``) are imported by the other
data tests.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmodal.brats import ET_LABEL, MODALITIES, MODALITY_ALIASES, RELEASES, canonical_modality
from fedmodal.data.discovery import detect_release, discover_cases
from fedmodal.data.errors import DataError
from fedmodal.data.layouts import case_file_paths, make_case_id

SHAPE = (8, 8, 6)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def tiny_case_arrays(release: str, seed: int = 0, shape=SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four modality volumes (brain = central block, background 0) and an on-disk seg."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    images = {}
    for i, modality in enumerate(MODALITIES):
        volume = np.zeros(shape, np.float32)
        volume[brain] = rng.uniform(50, 100, brain.sum()) + 10 * i
        images[modality] = volume
    seg = np.zeros(shape, np.uint8)
    seg[2:5, 2:5, 2:4] = 2  # oedema
    seg[3:5, 3:5, 2:4] = 1  # necrosis
    seg[3, 3, 2] = ET_LABEL[release]  # enhancing tumour, on-disk value
    return images, seg


def write_case(
    root: Path,
    release: str,
    index: int,
    modalities=MODALITIES,
    with_seg: bool = True,
    ext: str = ".nii.gz",
    institution: str | None = None,
    grade: str = "HGG",
    challenge: str = "GLI",
    seed: int = 0,
    affine: np.ndarray = AFFINE,
) -> tuple[str, dict[str, Path]]:
    """Write one tiny case in a release's naming; returns its id and files."""
    case_id = make_case_id(release, index, institution=institution, grade=grade, challenge=challenge)
    relative = case_file_paths(release, case_id, modalities, with_seg=with_seg, ext=ext, grade=grade)
    images, seg = tiny_case_arrays(release, seed + index)
    files = {}
    for key, rel in relative.items():
        data = seg if key == "seg" else images[key]
        files[key] = write_volume(root / rel, data, affine)
    return case_id, files


# ----------------------------------------------------------------------------- naming


def test_make_case_id_examples():
    assert make_case_id("brats2018", 1) == "Brats18_CBICA_AAB_1"
    assert make_case_id("brats2018", 131, institution="TCIA01") == "Brats18_TCIA01_131_1"
    assert make_case_id("brats2020", 1) == "BraTS20_Training_001"
    assert make_case_id("brats2021", 1) == "BraTS2021_00001"
    assert make_case_id("brats2023", 1) == "BraTS-GLI-00001-000"
    assert make_case_id("brats2023", 7, challenge="MEN") == "BraTS-MEN-00007-000"
    with pytest.raises(ValueError, match="unknown release"):
        make_case_id("brats1999", 0)


def test_case_file_paths_names_each_release():
    paths = case_file_paths("brats2018", "Brats18_CBICA_AAB_1", grade="LGG")
    assert paths["t1ce"] == "LGG/Brats18_CBICA_AAB_1/Brats18_CBICA_AAB_1_t1ce.nii.gz"
    paths = case_file_paths("brats2023", "BraTS-GLI-00001-000", ("t1", "t1ce", "t2", "flair"), ext=".nii")
    assert paths["flair"] == "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii"
    assert paths["t1ce"] == "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii"
    assert paths["seg"] == "BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii"
    assert "seg" not in case_file_paths("brats2021", "BraTS2021_00001", ("t2w",), with_seg=False)
    assert case_file_paths("brats2021", "BraTS2021_00001", ("t2w",))["t2"].endswith("_t2.nii.gz")


def test_aliases_map_to_canonical():
    for alias, canonical in {"t1n": "t1", "t1c": "t1ce", "t1gd": "t1ce", "t2w": "t2", "t2f": "flair"}.items():
        assert MODALITY_ALIASES[alias] == canonical
        assert canonical_modality(alias.upper()) == canonical
    for modality in MODALITIES:
        assert MODALITY_ALIASES[modality] == modality
    with pytest.raises(KeyError, match="unknown modality"):
        canonical_modality("dwi")


# ----------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("release", RELEASES)
def test_round_trip_every_release(tmp_path, release):
    written = [write_case(tmp_path, release, i)[0] for i in range(3)]
    assert detect_release(tmp_path) == release
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == sorted(written)
    for case in cases:
        assert case.release == release
        assert case.modalities == MODALITIES
        assert case.seg is not None and case.seg.exists()
        assert not case.conflicts


def test_brats2018_grades_and_institutions(tmp_path):
    write_case(tmp_path, "brats2018", 0, institution="CBICA", grade="HGG")
    write_case(tmp_path, "brats2018", 2, institution="TCIA01", grade="LGG")
    write_case(tmp_path, "brats2018", 3, institution="2013", grade="LGG")
    # 2019 prefix with the TMC institution reads as the same layout.
    write_volume(
        tmp_path / "HGG/BraTS19_TMC_06290_1/BraTS19_TMC_06290_1_t1.nii.gz", tiny_case_arrays("brats2018")[0]["t1"]
    )
    cases = {c.case_id: c for c in discover_cases(tmp_path)}
    assert cases["Brats18_CBICA_AAA_1"].institution == "CBICA"
    assert cases["Brats18_CBICA_AAA_1"].grade == "HGG"
    assert cases["Brats18_TCIA01_2_1"].institution == "TCIA01"
    assert cases["Brats18_TCIA01_2_1"].grade == "LGG"
    assert cases["Brats18_2013_3_1"].institution == "2013"
    assert cases["BraTS19_TMC_06290_1"].institution == "TMC"
    assert cases["BraTS19_TMC_06290_1"].modalities == ("t1",)


def test_brats2020_nii_name_mapping_and_misnamed_seg(tmp_path):
    wrapper = tmp_path / "MICCAI_BraTS2020_TrainingData"  # as shipped; the site may point above it
    write_case(wrapper, "brats2020", 1, ext=".nii")
    write_case(wrapper, "brats2020", 2, ext=".nii")
    case_id, files = write_case(wrapper, "brats2020", 355, ext=".nii")
    files["seg"].rename(files["seg"].with_name("W39_1998.09.19_Segm.nii"))
    (wrapper / "name_mapping.csv").write_text(
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,BraTS_2020_subject_ID\n"
        "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_001\n"
        "LGG,Brats17_TCIA_101_1,Brats18_TCIA10_101_1,TCGA-XX,BraTS19_TCIA10_101_1,BraTS20_Training_002\n"
        "HGG,NA,NA,NA,NA,BraTS20_Training_355\n"
    )
    assert detect_release(tmp_path) == "brats2020"
    cases = {c.case_id: c for c in discover_cases(tmp_path)}
    assert cases["BraTS20_Training_001"].institution == "CBICA"
    assert cases["BraTS20_Training_002"].institution == "TCIA10"
    assert cases["BraTS20_Training_002"].grade == "LGG"
    assert cases["BraTS20_Training_355"].institution is None
    seg_case = cases["BraTS20_Training_355"]
    assert seg_case.seg is not None and seg_case.seg.name == "W39_1998.09.19_Segm.nii"
    assert any("Segm" in note for note in seg_case.notes)
    assert seg_case.modalities == MODALITIES


def test_brats2021_institutions_from_fets_partitioning(tmp_path):
    root = tmp_path / "site"
    for i in range(3):
        write_case(root, "brats2021", i)
    # partitioning_1 in the root's parent; subject ids may carry the FeTS prefix.
    (tmp_path / "partitioning_1.csv").write_text(
        "Subject_ID,Partition_ID\nBraTS2021_00000,1\nFeTS2022_00001,1\nBraTS2021_00002,17\n"
    )
    (tmp_path / "partitioning_2.csv").write_text("Subject_ID,Partition_ID\nBraTS2021_00000,5\n")
    cases = discover_cases(root)
    assert [c.institution for c in cases] == ["1", "1", "17"]


def test_brats2021_without_partitioning_has_no_institution(tmp_path):
    write_case(tmp_path, "brats2021", 0)
    assert discover_cases(tmp_path)[0].institution is None


def test_brats2023_hyphen_aliases_and_missing_modality(tmp_path):
    write_case(tmp_path, "brats2023", 0, modalities=("t1", "t1ce", "flair"))
    write_case(tmp_path, "brats2023", 1, challenge="PED")  # other challenge, same release
    cases = discover_cases(tmp_path)
    assert cases[0].case_id == "BraTS-GLI-00000-000"
    assert cases[0].modalities == ("t1", "t1ce", "flair")
    assert cases[0].images["flair"].name == "BraTS-GLI-00000-000-t2f.nii.gz"
    assert cases[1].case_id == "BraTS-PED-00001-000"


def test_two_files_for_one_modality_are_a_conflict(tmp_path):
    case_id, files = write_case(tmp_path, "brats2021", 0)
    write_volume(files["t1"].with_name(f"{case_id}_t1.nii"), np.ones(SHAPE, np.float32))
    case = discover_cases(tmp_path)[0]
    assert "t1" in case.conflicts and len(case.conflicts["t1"]) == 2


def test_no_cases_or_mixed_releases_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no BraTS case folder"):
        detect_release(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        detect_release(tmp_path / "nowhere")
    write_case(tmp_path / "mixed", "brats2021", 0)
    write_case(tmp_path / "mixed", "brats2023", 0)
    with pytest.raises(DataError, match="several releases"):
        detect_release(tmp_path / "mixed")
