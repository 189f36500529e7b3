"""Finding a site's BraTS cases on disk: which release its folders follow, and each case's files.

Nothing here opens a NIfTI; ``checks.check_case`` does.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fedmodal.brats import MODALITY_ALIASES
from fedmodal.data.errors import DataError
from fedmodal.data.institutions import assign_institutions
from fedmodal.data.layouts import (
    GRADES,
    NIFTI_EXTENSIONS,
    SYNTHETIC_TAG,
    CaseFiles,
    check_release,
    release_of_folder,
)

logger = logging.getLogger(__name__)

_SEG_TOKENS = ("seg", "segmentation", "label", "labels")


def _synthetic_token(stem: str, case_id: str) -> str | None:
    """Canonical modality of a ``<case_id>_<modality>_synthetic`` stem, else None."""
    lowered = stem.lower()
    if not lowered.startswith(case_id.lower()):
        return None
    parts = re.split(r"[_\-]", lowered[len(case_id) :].strip("_-"))
    if len(parts) == 2 and parts[1] == SYNTHETIC_TAG:
        return MODALITY_ALIASES.get(parts[0])
    return None


def _nifti_stem(path: Path) -> str | None:
    """File name without its NIfTI extension, or None if it is not a NIfTI file."""
    name = path.name
    for ext in NIFTI_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def _case_parents(root: Path) -> list[tuple[Path, str | None]]:
    """Folders that hold case folders, with the grade they imply (brats2018 HGG/LGG trees).

    Looks at the root, its HGG/LGG folders, and one wrapper level below (the releases ship as
    e.g. ``MICCAI_BraTS2020_TrainingData/``), so a site may point at either.
    """

    def holds_cases(folder: Path) -> bool:
        return any(p.is_dir() and release_of_folder(p.name) for p in folder.iterdir())

    def with_grades(folder: Path) -> list[tuple[Path, str | None]]:
        found = [(folder, None)] if holds_cases(folder) else []
        for grade in GRADES:
            sub = folder / grade
            if sub.is_dir() and holds_cases(sub):
                found.append((sub, grade))
        return found

    found = with_grades(root)
    if found:
        return found
    for wrapper in sorted(p for p in root.iterdir() if p.is_dir()):
        found.extend(with_grades(wrapper))
    return found


def detect_release(root: str | Path) -> str:
    """Return the release whose naming the case folders under ``root`` follow.

    Args:
        root: the site's data folder.

    Raises:
        DataError: when no case folder is found, or folders of several releases are mixed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(site=root.name, case=None, file=root, problem="data folder does not exist")
    counts: dict[str, int] = {}
    for parent, _grade in _case_parents(root):
        for folder in parent.iterdir():
            release = release_of_folder(folder.name) if folder.is_dir() else None
            if release:
                counts[release] = counts.get(release, 0) + 1
    if not counts:
        raise DataError(
            site=root.name,
            case=None,
            file=root,
            problem="no BraTS case folder found (expected e.g. BraTS2021_00000/, BraTS-GLI-00000-000/, "
            "BraTS20_Training_001/ or HGG/Brats18_CBICA_AAB_1/)",
        )
    if len(counts) > 1:
        listed = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))
        raise DataError(
            site=root.name,
            case=None,
            file=root,
            problem=f"case folders of several releases mixed ({listed}); keep one per site",
        )
    return next(iter(counts))


def _file_token(stem: str, case_id: str) -> str | None:
    """Canonical modality or "seg" named by a file stem, else None."""
    lowered = stem.lower()
    if lowered.startswith(case_id.lower()):
        rest = lowered[len(case_id) :].lstrip("_-.")
    else:
        # Tolerate files not prefixed with the folder name: take the last token.
        rest = re.split(r"[_\-.]", lowered)[-1]
    if rest in _SEG_TOKENS:
        return "seg"
    key = rest.replace("-", "").replace("_", "")
    return MODALITY_ALIASES.get(key)


def read_case_folder(folder: Path, release: str, grade: str | None = None) -> CaseFiles:
    """Read one case folder into :class:`CaseFiles` (no voxel is read).

    A single NIfTI that names no modality is taken as the seg when the folder has none (the
    real BraTS 2020 case 355 ships ``W39_1998.09.19_Segm.nii``); this is noted, not silent.
    Two files for one modality (e.g. ``.nii`` and ``.nii.gz``) are kept in ``conflicts``.
    """
    case_id = folder.name
    case = CaseFiles(case_id=case_id, folder=folder, release=release, grade=grade)
    unknown: list[Path] = []
    for path in sorted(folder.iterdir()):
        stem = _nifti_stem(path)
        if stem is None or not path.is_file():
            continue
        synthetic = _synthetic_token(stem, case_id)
        if synthetic is not None:
            case.synthetic[synthetic] = path
            continue
        token = _file_token(stem, case_id)
        if token is None:
            unknown.append(path)
            continue
        current = case.seg if token == "seg" else case.images.get(token)
        if current is not None:
            case.conflicts.setdefault(token, [current]).append(path)
            continue
        if token == "seg":
            case.seg = path
        else:
            case.images[token] = path
    if case.seg is None and len(unknown) == 1:
        case.seg = unknown.pop()
        note = f"{case_id}: took {case.seg.name} as the segmentation (no file named *_seg)"
        case.notes.append(note)
        logger.warning(note)
    for path in unknown:
        case.notes.append(f"{case_id}: ignored {path.name} (names no modality)")
    return case


def discover_cases(root: str | Path, release: str | None = None) -> list[CaseFiles]:
    """Find every case under a site's data folder, with institutions where recorded.

    Args:
        root: the site's data folder (case folders, HGG/LGG folders, or one wrapper folder
            holding either).
        release: skip detection and read folders of this release only.

    Returns:
        the cases sorted by case id. Files are not opened; see ``checks.check_case``.
    """
    root = Path(root)
    release = release or detect_release(root)
    check_release(release)
    parents = _case_parents(root)
    cases = []
    for parent, grade in parents:
        for folder in sorted(parent.iterdir()):
            if folder.is_dir() and release_of_folder(folder.name) == release:
                cases.append(read_case_folder(folder, release, grade))
    assign_institutions(root, release, cases, [p for p, _ in parents])
    return sorted(cases, key=lambda c: c.case_id)
