"""Checks that a BraTS case can be used, with errors that name the site, case and file.

``check_case`` reads every file of a case once and raises :class:`DataError` for the first
problem: an unreadable or truncated NIfTI, modalities (or seg) of different shapes or
affines, NaN/inf voxels, an all-zero image (empty brain), labels outside the release's set,
two files for one modality, or a missing seg when one is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmodal.brats import CAVITY_LABEL_ON_DISK, RELEASE_LABELS
from fedmodal.data.cases import iter_case_files
from fedmodal.data.errors import DataError
from fedmodal.data.layouts import CaseFiles


def check_case(
    case: CaseFiles,
    site: str,
    need_seg: bool,
    modalities: tuple[str, ...] | None = None,
) -> None:
    """Check one case's files; raise :class:`DataError` for the first problem found.

    Args:
        case: the case, from ``discovery.discover_cases``.
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

    for token, path, data, _affine in iter_case_files(case, site, modalities, verify_gzip=True):
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
