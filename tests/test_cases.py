"""The case reader: every modality and the seg on one grid, in RAS, with errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

from fedmodal.data.cases import read_case
from fedmodal.data.discovery import discover_cases
from fedmodal.data.errors import DataError
from fedmodal.data.phantoms import build_federation
from test_layouts import SHAPE, write_case, write_volume


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory):
    root = build_federation(
        tmp_path_factory.mktemp("cases") / "fed", shape=(24, 24, 16), cases_per_site=1, test_cases=1, layout="brats2023"
    )
    return discover_cases(root / "site-2") + discover_cases(root / "test")


def test_read_case_matches_monai_load_and_orient(phantom_cases):
    # Phantom files are L-P-S like BraTS, so reorientation to RAS flips two axes.
    monai_read = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ]
    )
    for case in phantom_cases:
        volumes = read_case(case)
        assert list(volumes.images) == list(case.modalities) and volumes.seg is not None
        for name, path in case.files().items():
            expected = monai_read(str(path))
            got = volumes.seg if name == "seg" else volumes.images[name]
            assert np.array_equal(got.astype(np.float32), expected[0].numpy())
            assert np.allclose(volumes.affine, expected.affine.numpy())
        assert volumes.affine[0, 0] > 0 and volumes.affine[1, 1] > 0  # R and A increase with the index
        assert volumes.zooms == pytest.approx((10.0, 10.0, 9.6875))
        assert volumes.shape == (24, 24, 16)


def test_read_case_reads_only_what_is_asked(phantom_cases):
    volumes = read_case(phantom_cases[-1], modalities=("t2",), with_seg=False)
    assert list(volumes.images) == ["t2"] and volumes.seg is None


def test_read_case_errors_name_site_case_and_file(tmp_path):
    write_case(tmp_path, "brats2021", 1)
    case = discover_cases(tmp_path)[0]
    write_volume(case.images["t2"], np.ones((SHAPE[0] + 1, *SHAPE[1:]), np.int16))
    with pytest.raises(DataError, match="differs from") as info:
        read_case(case, site="site-7")
    assert (info.value.site, info.value.case, info.value.file) == ("site-7", case.case_id, str(case.images["t2"]))
    case.images["t2"].write_bytes(case.images["t2"].read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match="unreadable NIfTI"):
        read_case(case, modalities=("t2",))
