"""The BraTS vocabulary: modalities, releases, labels and evaluation regions.

One definition for every room: ``data/`` reads and writes files with it, ``nets/`` sizes its
outputs with it, ``metrics`` scores with it and the methods wire them together.

Labels inside fedmodal are canonical: 0 background, 1 necrosis (NCR), 2 oedema (ED),
3 enhancing tumour (ET). On disk, BraTS 2018-2021 write ET as 4; from 2023 ET is 3 and 4 is a
resection cavity.
"""

from __future__ import annotations

# Canonical modality order, used everywhere in the project.
MODALITIES = ("t1", "t1ce", "t2", "flair")
MODALITY_TITLES = {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "FLAIR"}

# Any on-disk modality token (lower case, without "-" or "_") -> canonical name.
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

RELEASES = ("brats2018", "brats2020", "brats2021", "brats2023")

# Canonical labels.
BACKGROUND, NECROSIS, OEDEMA, ENHANCING = 0, 1, 2, 3
N_LABELS = 4
LABEL_NAMES = {NECROSIS: "necrosis", OEDEMA: "oedema", ENHANCING: "enhancing"}

# Enhancing-tumour label as written on disk; fedmodal maps it to ENHANCING on load.
ET_LABEL = {"brats2018": 4, "brats2020": 4, "brats2021": 4, "brats2023": 3}
# brats2023+: on-disk 4 is a resection cavity (2024 GLI post-treatment), not tumour.
CAVITY_LABEL_ON_DISK = 4

# Label values each release may hold on disk.
RELEASE_LABELS = {
    "brats2018": (0, 1, 2, 4),
    "brats2020": (0, 1, 2, 4),
    "brats2021": (0, 1, 2, 4),
    "brats2023": (0, 1, 2, 3, 4),
}

# Evaluation regions, in the order the papers report them, and the labels each one holds:
# whole tumour, tumour core, enhancing tumour.
REGIONS = ("WT", "TC", "ET")
REGION_LABELS = {"WT": (NECROSIS, OEDEMA, ENHANCING), "TC": (NECROSIS, ENHANCING), "ET": (ENHANCING,)}


def region_labels(region: str, et_label: int = ENHANCING) -> tuple[int, ...]:
    """The label values of one region, with ET written as ``et_label`` (3 canonical, 4 raw 2018-2021).

    Args:
        region: "WT", "TC" or "ET".
        et_label: the value enhancing tumour takes in the label map.
    """
    return tuple(et_label if value == ENHANCING else value for value in REGION_LABELS[region])


def canonical_modality(name: str) -> str:
    """Return the canonical name of a modality alias (case-insensitive; "-" and "_" ignored).

    Args:
        name: e.g. "T1c", "t2-flair", "t1n".

    Raises:
        KeyError: naming the alias and the known ones.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODALITY_ALIASES:
        raise KeyError(f"unknown modality {name!r}; known: {sorted(MODALITY_ALIASES)}")
    return MODALITY_ALIASES[key]


def ordered_modalities(modalities) -> tuple[str, ...]:
    """The given canonical modalities in canonical order (duplicates dropped).

    Args:
        modalities: any iterable of canonical names.
    """
    held = set(modalities)
    return tuple(m for m in MODALITIES if m in held)
