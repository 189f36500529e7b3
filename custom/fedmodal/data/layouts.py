"""BraTS release layouts: how each release names its case folders and files.

Every release since 2018 is read into one shape, :class:`CaseFiles`, with canonical modality
names (``fedmodal.brats.MODALITIES``). The naming here (``make_case_id``, ``case_file_paths``)
lets other code (the phantom builder, tests) write trees that ``discovery`` then finds.

| release     | case folder / files                                                          |
|-------------|------------------------------------------------------------------------------|
| brats2018   | ``{HGG,LGG}/Brats18_<SRC>_<id>_1/Brats18_<SRC>_<id>_1_{t1,t1ce,t2,flair,seg}`` |
| brats2020   | ``BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}``          |
| brats2021   | ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}``                    |
| brats2023   | ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}``             |

2017 and 2019 trees (``Brats17_`` / ``BraTS19_`` prefixes) read as ``brats2018``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmodal.brats import MODALITIES, RELEASES, canonical_modality, ordered_modalities

# Canonical modality -> token the release writes in file names.
_FILE_TOKENS = {
    "brats2018": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
    "brats2020": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
    "brats2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
}
# Separator between case id and modality token in file names.
_FILE_SEPARATOR = {"brats2018": "_", "brats2020": "_", "brats2021": "_", "brats2023": "-"}

GRADES = ("HGG", "LGG")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")

# Case-folder name patterns, one per release.
CASE_ID_PATTERNS = {
    # Brats17_/Brats18_/BraTS19_ <SRC>_<id>_1; SRC may itself hold digits (2013, TCIA01).
    "brats2018": re.compile(r"^Bra[Tt][Ss]1[789]_(?P<institution>[A-Za-z0-9]+)_(?P<local>[A-Za-z0-9]+)_(?P<n>\d+)$"),
    "brats2020": re.compile(r"^BraTS20_(?P<part>Training|Validation|Testing)_(?P<index>\d+)$"),
    # BraTS2021_00000; FeTS 2022 ships the same cases as FeTS2022_00000.
    "brats2021": re.compile(r"^(?:BraTS|FeTS)(?:20)?2[12]_(?P<index>\d{5})$"),
    "brats2023": re.compile(r"^BraTS-(?P<challenge>[A-Za-z]+(?:-RT)?)-(?P<index>\d{5})-(?P<timepoint>\d{3})$"),
}


@dataclass
class CaseFiles:
    """The files of one BraTS case, with canonical modality names.

    Args:
        case_id: the release's case id (the case folder's name).
        folder: the case folder.
        release: one of :data:`RELEASES`.
        images: canonical modality -> image file, only for the modalities present.
        seg: the segmentation file, or None if the case has none.
        institution: the contributing institution when the release records it.
        grade: "HGG"/"LGG" for brats2018 trees, else None.
        notes: warnings raised while reading the folder (e.g. a misnamed seg).
        conflicts: modality (or "seg") -> several files naming it; ``check_case`` rejects these.
        synthetic: canonical modality -> a synthetic image written by ``fedmodal complete``
            (``<case_id>_<modality>_synthetic.nii.gz``); never used unless asked for.
    """

    case_id: str
    folder: Path
    release: str
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    institution: str | None = None
    grade: str | None = None
    notes: list[str] = field(default_factory=list)
    conflicts: dict[str, list[Path]] = field(default_factory=dict)
    synthetic: dict[str, Path] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities present, in canonical order."""
        return ordered_modalities(self.images)

    def files(self) -> dict[str, Path]:
        """Every file of the case: modalities then "seg" when present."""
        out = {m: self.images[m] for m in self.modalities}
        if self.seg is not None:
            out["seg"] = self.seg
        return out


def check_release(release: str) -> None:
    """Raise ValueError unless ``release`` is one of :data:`fedmodal.brats.RELEASES`."""
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}; expected one of {RELEASES}")


def make_case_id(
    release: str, index: int, institution: str | None = None, grade: str = "HGG", challenge: str = "GLI"
) -> str:
    """Return a valid case id of ``release`` for the ``index``-th case.

    Args:
        release: one of :data:`RELEASES`.
        index: non-negative case number.
        institution: brats2018 only: the SRC part (default "CBICA"); CBICA ids are three
            letters (index 1 -> "AAB"), others numbers.
        grade: brats2018 only: accepted for symmetry with :func:`case_folder`; the id itself
            does not hold the grade.
        challenge: brats2023 only: GLI, MEN, MET, PED or SSA.

    Examples: "Brats18_CBICA_AAB_1", "BraTS20_Training_001", "BraTS2021_00001",
    "BraTS-GLI-00001-000".
    """
    check_release(release)
    if index < 0:
        raise ValueError(f"case index must be >= 0, got {index}")
    if release == "brats2018":
        src = institution or "CBICA"
        if not re.fullmatch(r"[A-Za-z0-9]+", src):
            raise ValueError(f"brats2018 institution must be alphanumeric, got {src!r}")
        if src.upper() == "CBICA":
            letters = ""
            n = index
            for _ in range(3):
                letters = chr(ord("A") + n % 26) + letters
                n //= 26
            if n:
                raise ValueError(f"CBICA ids hold 3 letters; index {index} is too large")
            local = letters
        else:
            local = str(index)
        return f"Brats18_{src}_{local}_1"
    if release == "brats2020":
        return f"BraTS20_Training_{index:03d}"
    if release == "brats2021":
        return f"BraTS2021_{index:05d}"
    return f"BraTS-{challenge}-{index:05d}-000"


def case_folder(release: str, case_id: str, grade: str = "HGG") -> str:
    """Relative path (from the site root) of a case's folder.

    Args:
        release: one of :data:`RELEASES`.
        case_id: the case id (folder name).
        grade: brats2018 only: "HGG" or "LGG", the folder the case sits in.
    """
    check_release(release)
    if release == "brats2018":
        if grade not in GRADES:
            raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
        return f"{grade}/{case_id}"
    return case_id


def case_file_paths(
    release: str,
    case_id: str,
    modalities: tuple[str, ...] | list[str] = MODALITIES,
    with_seg: bool = True,
    ext: str = ".nii.gz",
    grade: str = "HGG",
) -> dict[str, str]:
    """Relative paths (from the site root) of a case's files in a release's naming.

    Args:
        release: one of :data:`RELEASES`.
        case_id: the case id, e.g. from :func:`make_case_id`.
        modalities: canonical names (or aliases) of the modalities to name.
        with_seg: also name the segmentation, under key "seg".
        ext: ".nii.gz" or ".nii".
        grade: brats2018 only: "HGG" or "LGG" folder.

    Returns:
        canonical modality (and "seg") -> POSIX relative path.
    """
    check_release(release)
    if ext not in NIFTI_EXTENSIONS:
        raise ValueError(f"ext must be one of {NIFTI_EXTENSIONS}, got {ext!r}")
    folder = case_folder(release, case_id, grade)
    sep = _FILE_SEPARATOR[release]
    tokens = _FILE_TOKENS[release]
    paths = {}
    for name in modalities:
        modality = canonical_modality(name)
        paths[modality] = f"{folder}/{case_id}{sep}{tokens[modality]}{ext}"
    if with_seg:
        paths["seg"] = f"{folder}/{case_id}{sep}seg{ext}"
    return paths


def release_of_folder(name: str) -> str | None:
    """The release whose case-folder naming ``name`` follows, or None."""
    for release, pattern in CASE_ID_PATTERNS.items():
        if pattern.match(name):
            return release
    return None


# ----------------------------------------------------------------------------- synthetic files

SYNTHETIC_TAG = "synthetic"


def synthetic_file(case: CaseFiles, modality: str) -> Path:
    """Where ``fedmodal complete`` writes a case's synthetic `modality`, beside the real files."""
    sep = _FILE_SEPARATOR[case.release]
    return case.folder / f"{case.case_id}{sep}{canonical_modality(modality)}{sep}{SYNTHETIC_TAG}.nii.gz"


def with_synthetic(case: CaseFiles) -> CaseFiles:
    """A copy of `case` whose missing modalities are filled by its synthetic files (noted)."""
    filled = {m: p for m, p in case.synthetic.items() if m not in case.images}
    if not filled:
        return case
    notes = [*case.notes, f"{case.case_id}: synthetic {sorted(filled)} stand in for missing modalities"]
    return replace(case, images={**case.images, **filled}, notes=notes)
