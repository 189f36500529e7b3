"""Loading cases, label mapping, normalisation, pipelines and SynthesisSlices."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from fedmodal.brats import MODALITIES
from fedmodal.data.datasets import SynthesisSlices, condition_map, normalise_for_synthesis, segmentation_dataset
from fedmodal.data.discovery import discover_cases
from fedmodal.data.loading import case_record, load_case, to_canonical_labels
from fedmodal.data.transforms import segmentation_transforms
from test_layouts import SHAPE, tiny_case_arrays, write_case, write_volume

torch.set_num_threads(1)


def test_label_mapping_to_canonical():
    seg = np.array([0, 1, 2, 4])
    assert to_canonical_labels(seg, "brats2021").tolist() == [0, 1, 2, 3]
    assert to_canonical_labels(seg, "brats2018").tolist() == [0, 1, 2, 3]
    seg23 = np.array([0, 1, 2, 3, 4])
    assert to_canonical_labels(seg23, "brats2023").tolist() == [0, 1, 2, 3, 0]
    assert to_canonical_labels(seg23, "brats2023", cavity_label=2).tolist() == [0, 1, 2, 3, 2]
    assert to_canonical_labels(seg23[:4], "brats2023", et_label=4).dtype == np.int64


@pytest.mark.parametrize("release", ["brats2021", "brats2023"])
def test_load_case_canonical_and_avail(tmp_path, release):
    write_case(tmp_path, release, 0, modalities=("t1", "t2", "flair"))  # no t1ce
    case = discover_cases(tmp_path)[0]
    loaded = load_case(case)
    assert loaded["image"].shape == (4, *SHAPE) and loaded["image"].dtype == np.float32
    assert loaded["avail"].tolist() == [True, False, True, True]
    assert not loaded["image"][1].any()  # missing channel is zero and masked
    assert loaded["label"].dtype == np.int64 and loaded["label"].shape == SHAPE
    assert set(np.unique(loaded["label"])) == {0, 1, 2, 3}
    assert loaded["brain"].dtype == bool and loaded["brain"].sum() == 6 * 6 * 4
    assert loaded["affine"].shape == (4, 4) and loaded["case_id"] == case.case_id
    # Asking for fewer modalities masks the others even if files exist.
    only_t1 = load_case(case, modalities=("t1",))
    assert only_t1["avail"].tolist() == [True, False, False, False]


def test_load_case_orients_to_ras(tmp_path):
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    write_case(tmp_path, "brats2021", 0, affine=las)
    images, seg = tiny_case_arrays("brats2021", 0)
    loaded = load_case(discover_cases(tmp_path)[0])
    np.testing.assert_allclose(loaded["image"][0], images["t1"][::-1])
    assert loaded["affine"][0, 0] > 0
    assert (loaded["label"] == to_canonical_labels(seg[::-1], "brats2021")).all()


def test_brain_mask_fills_holes(tmp_path):
    _, files = write_case(tmp_path, "brats2021", 0)
    for modality in MODALITIES:
        data = np.asanyarray(nib.load(str(files[modality])).dataobj).copy()
        data[3, 3, 3] = 0  # a dark voxel inside the brain in every modality
        write_volume(files[modality], data)
    loaded = load_case(discover_cases(tmp_path)[0])
    assert loaded["brain"][3, 3, 3] and loaded["brain"].sum() == 6 * 6 * 4


def test_load_case_without_seg(tmp_path):
    write_case(tmp_path, "brats2021", 0, with_seg=False)
    loaded = load_case(discover_cases(tmp_path)[0])
    assert loaded["has_label"] is False and not loaded["label"].any()


def test_normalise_for_synthesis_range_and_background():
    rng = np.random.default_rng(0)
    shape = (20, 20, 20)  # enough voxels for one outlier to sit above the 99.9th percentile
    image = np.zeros((4, *shape), np.float32)
    brain = np.zeros(shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    image[:, brain] = rng.uniform(10, 1000, (4, brain.sum()))
    image[0, 2, 2, 2] = 1e6  # an outlier is clipped, not allowed to squash the rest
    out = normalise_for_synthesis(image, brain, avail=[True, True, False, True])
    assert out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1
    assert (out[:, ~brain] == -1).all()
    assert (out[2] == -1).all()  # unavailable channel
    assert out[0][brain].max() == pytest.approx(1.0) and out[0][brain].min() == pytest.approx(-1.0)
    assert np.median(out[0][brain]) > -0.5


def test_condition_map_values():
    label = np.zeros((6, 6), np.int64)
    label[2:4, 2:4] = 3
    brain = np.zeros((6, 6), bool)
    brain[1:5, 1:5] = True
    cond = condition_map(label, brain)
    assert cond.shape == (2, 6, 6) and cond.dtype == np.float32
    assert cond[0, 0, 0] == -1 and cond[0, 2, 2] == 1
    edge = cond[1] == 1
    assert edge.sum() == 12 and not edge[2:4, 2:4].any() and not edge[0].any()
    as_torch = condition_map(torch.from_numpy(label), torch.from_numpy(brain))
    assert isinstance(as_torch, torch.Tensor) and torch.equal(as_torch, torch.from_numpy(cond))


def test_synthesis_slices_shapes_ranges_and_keys(tmp_path):
    write_case(tmp_path, "brats2021", 0)
    write_case(tmp_path, "brats2021", 1, modalities=("t1", "t1ce", "flair"))
    cases = discover_cases(tmp_path)
    data = SynthesisSlices(cases, size=16, slices="tumour")
    # Tumour spans z 2..3 in each case.
    assert len(data) == 4
    assert data.keys[0] == "BraTS2021_00000/z2"
    item = data[0]
    assert item["cond"].shape == (2, 16, 16) and item["cond"].dtype == torch.float32
    assert item["image"].shape == (4, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["brain"].shape == (1, 16, 16) and item["brain"].dtype == torch.bool
    assert item["label"].shape == (1, 16, 16) and item["label"].dtype == torch.int64
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3} and item["label"].max() > 0
    assert (item["image"][:, ~item["brain"][0]] == -1).all()
    assert item["cond"][0].min() >= -1 and item["cond"][0].max() <= 1
    assert set(item["cond"][1].unique().tolist()) == {-1.0, 1.0}
    assert item["avail"].tolist() == [True, True, True, True]
    missing = data.item_by_key("BraTS2021_00001/z3")
    assert missing["avail"].tolist() == [True, True, False, True]
    assert (missing["image"][2] == -1).all()
    with pytest.raises(KeyError, match="no slice"):
        data.item_by_key("BraTS2021_00009/z0")
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    assert batch["image"].shape == (4, 4, 16, 16)


def test_synthesis_slices_selection_options(tmp_path):
    write_case(tmp_path, "brats2021", 0)
    cases = discover_cases(tmp_path)
    brain_slices = SynthesisSlices(cases, size=8, slices="brain")
    assert len(brain_slices) == 4  # brain spans z 1..4
    assert len(SynthesisSlices(cases, size=8, slices="brain", max_slices_per_case=2)) == 2
    assert len(SynthesisSlices(cases, size=8, min_tumour_fraction=0.9)) == 0
    with pytest.raises(ValueError, match="slices"):
        SynthesisSlices(cases, slices="all")


def test_segmentation_pipelines(tmp_path):
    write_case(tmp_path, "brats2021", 0, modalities=("t1", "t1ce", "t2"))
    cases = discover_cases(tmp_path)
    record = case_record(cases[0])
    assert "flair" not in record and record["seg"].endswith("_seg.nii.gz")

    train3d = segmentation_dataset(cases, segmentation_transforms("train", 3, (4, 4, 4), num_samples=2))
    patches = train3d[0]
    assert len(patches) == 2
    assert patches[0]["image"].shape == (4, 4, 4, 4)
    assert patches[0]["label"].shape == (1, 4, 4, 4) and patches[0]["label"].dtype == torch.int64
    assert patches[0]["avail"].tolist() == [True, True, True, False]

    train2d = segmentation_dataset(cases, segmentation_transforms("train", 2, (6, 6), num_samples=3))
    slices = train2d[0]
    assert len(slices) == 3 and slices[0]["image"].shape == (4, 6, 6)

    full = segmentation_dataset(cases, segmentation_transforms("val"))[0]
    image, brain = full["image"], full["brain"][0]
    # Cropped to the brain (6x6x4) plus a 2-voxel margin clipped at the volume's border.
    assert image.shape == (4, *SHAPE)
    for c in range(3):
        values = image[c][brain]
        assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1) < 0.05
    assert not image[3].any()
    with pytest.raises(ValueError, match="patch_size"):
        segmentation_transforms("train", 2, (4, 4, 4))
