"""Which institution contributed each case, where the release records it.

brats2018 ids name it (``Brats18_<SRC>_...``); BraTS 2020 ships ``name_mapping.csv``; FeTS
(BraTS 2021 cases) ships ``partitioning_{1,2}.csv``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from fedmodal.data.layouts import CASE_ID_PATTERNS, CaseFiles


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


def assign_institutions(root: Path, release: str, cases: list[CaseFiles], parents: list[Path]) -> None:
    """Set ``case.institution`` (and a brats2020 case's grade) in place, where recorded.

    Args:
        root: the site's data folder.
        release: the cases' release.
        cases: the cases found under ``root``.
        parents: the folders holding case folders (the CSV files may sit beside them).
    """
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
