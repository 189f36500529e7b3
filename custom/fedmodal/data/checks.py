"""Checks that a BraTS case can be used, with errors that name the site, case and file.

``check_case`` reads every file of a case once and raises :class:`DataError` for the first
problem: an unreadable or truncated NIfTI, modalities (or seg) of different shapes or
affines, NaN/inf voxels, an all-zero image (empty brain), labels outside the release's set,
two files for one modality, or a missing seg when one is needed.
"""

from __future__ import annotations

from pathlib import Path
import nibabel as nib
import numpy as np

from fedmodal.brats import CAVITY_LABEL_ON_DISK, RELEASE_LABELS
from fedmodal.data.errors import DataError
from fedmodal.data.layouts import CaseFiles

# Affines of co-registered BraTS volumes are identical; allow float noise from resaving.
AFFINE_TOLERANCE = 1e-3


def _read_volume(path: Path, site: str, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI fully (a truncated .gz fails only when the data are read)."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types (EOFError, zlib.error, ImageFileError...)
        raise DataError(site, case_id, path, f"unreadable NIfTI ({type(error).__name__}: {error})") from error
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(site, case_id, path, f"expected a 3D volume, got shape {tuple(data.shape)}")
    return data, np.asarray(image.affine, dtype=np.float64)


def check_case(
    case: CaseFiles,
    site: str,
    need_seg: bool,
    modalities: tuple[str, ...] | None = None,
) -> None:
    """Check one case's files; raise :class:`DataError` for the first problem found.

    Args:
        case: the case, from ``layouts.discover_cases``.
        site: the site's name, for the error message.
        need_seg: whether a case without a segmentation is an error.
        modalities: only check these modalities (default: every one the case holds).

    Raises:
        DataError: naming site, case and file.

    A resection-cavity label (4) in a brats2023 seg is allowed and noted in ``case.notes``.
    """
    case_id = case.case_id
    for token, paths in case.conflicts.items():
        names = ", ".join(p.name for p in paths)
        raise DataError(site, case_id, case.folder, f"several files for {token}: {names}; keep one")
    if not case.images:
        raise DataError(site, case_id, case.folder, "no image file named after a modality (t1, t1ce, t2, flair)")
    if need_seg and case.seg is None:
        raise DataError(site, case_id, case.folder, "no segmentation file (*_seg.nii[.gz]) but one is needed")

    names = [m for m in case.modalities if modalities is None or m in modalities]
    files = [(m, case.images[m]) for m in names]
    if case.seg is not None:
        files.append(("seg", case.seg))

    reference: tuple[str, tuple[int, ...], np.ndarray] | None = None
    for token, path in files:
        data, affine = _read_volume(path, site, case_id)
        if reference is None:
            reference = (token, data.shape, affine)
        else:
            ref_token, ref_shape, ref_affine = reference
            if data.shape != ref_shape:
                raise DataError(
                    site, case_id, path, f"shape {data.shape} differs from {ref_token}'s {ref_shape}"
                )
            if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE):
                raise DataError(
                    site,
                    case_id,
                    path,
                    f"affine differs from {ref_token}'s (not co-registered?):\n{affine}\nvs\n{ref_affine}",
                )
        if np.issubdtype(data.dtype, np.floating):
            finite = np.isfinite(data)
            if not finite.all():
                n_bad = int(data.size - finite.sum())
                raise DataError(site, case_id, path, f"{n_bad} NaN/inf voxels")
        if token == "seg":
            _check_labels(case, site, path, data)
        elif not np.any(data):
            raise DataError(site, case_id, path, "all voxels are zero (empty brain)")


def _check_labels(case: CaseFiles, site: str, path: Path, data: np.ndarray) -> None:
    values = np.unique(data)
    if np.issubdtype(values.dtype, np.floating) and not np.all(values == np.round(values)):
        odd = values[values != np.round(values)][:5].tolist()
        raise DataError(site, case.case_id, path, f"non-integer label values {odd}")
    allowed = RELEASE_LABELS[case.release]
    unexpected = sorted(int(v) for v in values if int(v) not in allowed)
    if unexpected:
        raise DataError(
            site, case.case_id, path, f"label values {unexpected} outside the {case.release} set {list(allowed)}"
        )
    if case.release == "brats2023" and CAVITY_LABEL_ON_DISK in values:
        note = f"{case.case_id}: seg holds label 4 (resection cavity), mapped on load"
        if note not in case.notes:
            case.notes.append(note)
