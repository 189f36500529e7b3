"""BraTS release layouts: how each release names its case folders and files.

Every release since 2018 is read into one shape, :class:`CaseFiles`, with canonical modality
names (``fedmodal.MODALITIES``). The naming side (``make_case_id``, ``case_file_paths``) lets
other code (the phantom builder, tests) write trees that this module then discovers.

| release     | case folder / files                                                          |
|-------------|------------------------------------------------------------------------------|
| brats2018   | ``{HGG,LGG}/Brats18_<SRC>_<id>_1/Brats18_<SRC>_<id>_1_{t1,t1ce,t2,flair,seg}`` |
| brats2020   | ``BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}``          |
| brats2021   | ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}``                    |
| brats2023   | ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}``             |

2017 and 2019 trees (``Brats17_`` / ``BraTS19_`` prefixes) read as ``brats2018``.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmodal import MODALITIES

logger = logging.getLogger(__name__)

RELEASES = ("brats2018", "brats2020", "brats2021", "brats2023")

# Enhancing-tumour label as written on disk; fedmodal maps it to 3 on load.
ET_LABEL = {"brats2018": 4, "brats2020": 4, "brats2021": 4, "brats2023": 3}

# Label values each release may hold on disk (2024 GLI adds 4 = resection cavity).
RELEASE_LABELS = {
    "brats2018": (0, 1, 2, 4),
    "brats2020": (0, 1, 2, 4),
    "brats2021": (0, 1, 2, 4),
    "brats2023": (0, 1, 2, 3, 4),
}

# Any on-disk modality token (lower case) -> canonical name.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1",
    "t1n": "t1",
    "t1native": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t1post": "t1ce",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2f": "flair",
    "t2flair": "flair",
}

# Canonical modality -> token the release writes in file names.
_FILE_TOKENS = {
    "brats2018": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
    "brats2020": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
    "brats2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
}
# Separator between case id and modality token in file names.
_FILE_SEPARATOR = {"brats2018": "_", "brats2020": "_", "brats2021": "_", "brats2023": "-"}

BRATS2023_CHALLENGES = ("GLI", "MEN", "MET", "PED", "SSA", "MEN-RT", "GoAT")
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
        return tuple(m for m in MODALITIES if m in self.images)

    def files(self) -> dict[str, Path]:
        """Every file of the case: modalities then "seg" when present."""
        out = {m: self.images[m] for m in self.modalities}
        if self.seg is not None:
            out["seg"] = self.seg
        return out


def canonical_modality(name: str) -> str:
    """Return the canonical name of a modality alias (case-insensitive).

    Raises:
        KeyError: naming the alias and the known ones.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODALITY_ALIASES:
        raise KeyError(f"unknown modality {name!r}; known: {sorted(MODALITY_ALIASES)}")
    return MODALITY_ALIASES[key]


def _check_release(release: str) -> None:
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
    _check_release(release)
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
    _check_release(release)
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
    _check_release(release)
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


# ----------------------------------------------------------------------------- discovery

SITE_FILE = "fedmodal_site.json"
_SEG_TOKENS = ("seg", "segmentation", "label", "labels")


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


def release_of_folder(name: str) -> str | None:
    for release, pattern in CASE_ID_PATTERNS.items():
        if pattern.match(name):
            return release
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
    from fedmodal.data.checks import DataError  # checks imports this module

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
            site=root.name, case=None, file=root, problem=f"case folders of several releases mixed ({listed}); keep one per site"
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


def _institution_from_brats18_id(subject_id: str) -> str | None:
    match = CASE_ID_PATTERNS["brats2018"].match(subject_id.strip())
    return match.group("institution") if match else None


def read_name_mapping(csv_path: Path) -> dict[str, dict[str, str | None]]:
    """Read BraTS 2020 ``name_mapping.csv``: 2020 id -> {"institution", "grade"}.

    The institution is the SRC part of the 2019 id, else the 2018, else the 2017 one; cases new
    in 2020 have none ("NA").
    """
    out: dict[str, dict[str, str | None]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            case_id = row.get("BraTS_2020_subject_ID")
            if not case_id:
                continue
            institution = None
            for column in ("BraTS_2019_subject_ID", "BraTS_2018_subject_ID", "BraTS_2017_subject_ID"):
                institution = _institution_from_brats18_id(row.get(column, ""))
                if institution:
                    break
            out[case_id] = {"institution": institution, "grade": row.get("Grade") or None}
    return out


def read_partitioning(csv_path: Path) -> dict[str, str]:
    """Read a FeTS ``partitioning_*.csv`` (``Subject_ID,Partition_ID``): subject -> partition."""
    out: dict[str, str] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if row.get("Subject_ID") and row.get("Partition_ID"):
                out[row["Subject_ID"]] = row["Partition_ID"]
    return out


def _find_partitioning(root: Path, parents: list[Path]) -> Path | None:
    # partitioning_1 is the split by contributing institution; partitioning_2 splits the
    # largest institutions further, so it is only the fallback.
    for name in ("partitioning_1.csv", "partitioning_2.csv"):
        for folder in [*parents, root, root.parent]:
            if (folder / name).is_file():
                return folder / name
    return None


def _trailing_number(case_id: str) -> str | None:
    match = re.search(r"(\d{5})$", case_id)
    return match.group(1) if match else None


def _assign_institutions(root: Path, release: str, cases: list[CaseFiles], parents: list[Path]) -> None:
    if release == "brats2018":
        for case in cases:
            case.institution = _institution_from_brats18_id(case.case_id)
    elif release == "brats2020":
        mapping: dict[str, dict[str, str | None]] = {}
        for folder in [*parents, root]:
            if (folder / "name_mapping.csv").is_file():
                mapping = read_name_mapping(folder / "name_mapping.csv")
                break
        for case in cases:
            entry = mapping.get(case.case_id, {})
            case.institution = entry.get("institution")
            case.grade = case.grade or entry.get("grade")
    elif release == "brats2021":
        csv_path = _find_partitioning(root, parents)
        if csv_path is None:
            return
        partitions = read_partitioning(csv_path)
        # FeTS subject ids may carry another prefix (FeTS2022_01234) than the folders: fall back
        # to the 5-digit number when it is unambiguous.
        by_number: dict[str, list[str]] = {}
        for subject, partition in partitions.items():
            number = _trailing_number(subject)
            if number:
                by_number.setdefault(number, []).append(partition)
        for case in cases:
            if case.case_id in partitions:
                case.institution = partitions[case.case_id]
            else:
                candidates = by_number.get(_trailing_number(case.case_id) or "", [])
                if len(candidates) == 1:
                    case.institution = candidates[0]


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
    _check_release(release)
    parents = _case_parents(root)
    cases = []
    for parent, grade in parents:
        for folder in sorted(parent.iterdir()):
            if folder.is_dir() and release_of_folder(folder.name) == release:
                cases.append(read_case_folder(folder, release, grade))
    _assign_institutions(root, release, cases, [p for p, _ in parents])
    return sorted(cases, key=lambda c: c.case_id)
