"""Writing a label map back as a BraTS seg file: the inverse of reading a case.

`fedmodal.data.cases.read_case` turns files into RAS arrays and `loading.to_canonical_labels`
turns on-disk labels into canonical ones; here a canonical RAS label map goes back to the
grid, affine, orientation and label convention of the case it came from, under the release's
seg name, written atomically.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fedmodal.atomic import save_atomically
from fedmodal.brats import ENHANCING, ET_LABEL
from fedmodal.data.cases import _RAS
from fedmodal.data.layouts import case_file_paths


def to_release_labels(label: np.ndarray, release: str) -> np.ndarray:
    """Canonical labels (0, 1 NCR, 2 ED, 3 ET) -> the release's on-disk values (uint8).

    BraTS 2018-2021 write ET as 4, 2023+ as 3 (`fedmodal.brats.ET_LABEL`).
    """
    label = np.asarray(label)
    unexpected = sorted(set(np.unique(label).tolist()) - {0, 1, 2, ENHANCING})
    if unexpected:
        raise ValueError(f"canonical label map holds values {unexpected} outside 0..3")
    out = label.astype(np.uint8)
    out[label == ENHANCING] = ET_LABEL[release]
    return out


def from_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A RAS array back to the axis order and directions of a file whose affine is `affine`
    (the inverse of `fedmodal.data.cases.to_ras`: flips and permutations only)."""
    transform = nib.orientations.ornt_transform(_RAS, nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, transform))


def seg_file_name(case_id: str, release: str) -> str:
    """The release's seg file name for a case: `BraTS2021_00000_seg.nii.gz`, `BraTS-GLI-00000-000-seg.nii.gz`."""
    return Path(case_file_paths(release, case_id, (), with_seg=True)["seg"]).name


def write_seg(
    label_ras: np.ndarray, reference: str | Path, release: str, path: str | Path, description: str = ""
) -> Path:
    """Write a canonical RAS label map as a seg on the grid of `reference` (one of the case's images).

    The array is put back in the reference's orientation, its labels in the release's
    convention, and saved as uint8 with the reference's header (affine, qform/sform, zooms).

    Args:
        label_ras: (X, Y, Z) canonical labels in RAS, as the data layer reads the case.
        reference: a NIfTI of the case (all share one grid, `cases.iter_case_files` checks).
        release: the case's release (decides the ET value).
        path: the file to write.
        description: up to 80 characters for the header's `descrip` field.
    """
    ref = nib.load(str(reference))
    shape = tuple(int(n) for n in ref.shape[:3])
    data = from_ras(to_release_labels(label_ras, release), ref.affine)
    if data.shape != shape:
        raise ValueError(f"label map of shape {data.shape} does not fit {reference} of shape {shape}")
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("label")
    header["descrip"] = description[:79].encode()
    header["dim"][0] = 3
    header["dim"][4:] = 1
    image = nib.Nifti1Image(data, ref.affine, header=header)
    return save_atomically(path, lambda temp: nib.save(image, str(temp)))
