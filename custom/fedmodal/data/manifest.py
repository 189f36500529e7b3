"""The site manifest: what one site's data folder holds and contributes.

``build_manifest`` detects the release, reads every case (``checks.check_case``), applies the
error policy, reads which modalities the site holds from its files, and assigns each case to
train/val/test by a seeded hash of its id (so adding cases never moves existing ones).

A site may put ``fedmodal_site.json`` in its data folder::

    {"site": "site-1",                      # name (default: the folder's name)
     "exclude_modalities": ["t2"],          # held but not to be used
     "split": [0.7, 0.1, 0.2],              # or {"train": [...ids], "val": [...], "test": [...]}
     "seed": 0,
     "on_error": "skip"}
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmodal.atomic import write_json_atomically
from fedmodal.brats import ET_LABEL, MODALITIES, canonical_modality, ordered_modalities
from fedmodal.data.checks import check_case
from fedmodal.data.discovery import detect_release, discover_cases
from fedmodal.data.errors import DataError
from fedmodal.data.layouts import CaseFiles, with_synthetic

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ON_ERROR = ("skip", "stop")
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
SITE_FILE = "fedmodal_site.json"  # a site's declaration, in its data folder

LABEL_CONVENTIONS = {
    4: "on disk 0 background, 1 NCR, 2 ED, 4 ET (ET mapped 4->3 on load)",
    3: "on disk 0 background, 1 NCR, 2 ED, 3 ET (4 = resection cavity, mapped to background by default)",
}


def split_of(case_id: str, fractions: tuple[float, float, float], seed: int = 0) -> str:
    """Split ("train"/"val"/"test") of one case: a seeded hash of its id against the fractions.

    Depends only on the case id, the seed and the fractions, so a case keeps its split when
    others are added or removed.
    """
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def _check_fractions(split: Any) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in split)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions (train, val, test) summing to 1, got {split}")
    return fractions  # type: ignore[return-value]


@dataclass
class SiteManifest:
    """What a site holds: usable cases, modalities, split, problems found.

    Args:
        site: the site's name.
        root: the site's data folder.
        release: one of ``layouts.RELEASES``.
        et_label: the enhancing-tumour label on disk (4 or 3).
        cases: usable cases, sorted by id.
        modalities: held by every usable case, minus ``excluded``, in canonical order.
        excluded: modalities the site declared held but not used.
        problems: records (site, case, file, problem) of skipped cases.
        split: "train"/"val"/"test" -> case ids.
        notes: warnings that did not stop a case (misnamed seg, resection cavity...).
        seed: the split seed.
        fractions: the split fractions, or None when the site listed the split explicitly.
    """

    site: str
    root: Path
    release: str
    et_label: int
    cases: list[CaseFiles]
    modalities: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    problems: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    fractions: tuple[float, float, float] | None = DEFAULT_SPLIT

    def cases_in(self, split: str) -> list[CaseFiles]:
        """The usable cases of one split ("train", "val", "test" or "all")."""
        if split == "all":
            return list(self.cases)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or 'all', got {split!r}")
        wanted = set(self.split.get(split, []))
        return [case for case in self.cases if case.case_id in wanted]

    def summary(self) -> dict[str, Any]:
        """JSON-able overview (no voxel data, no paths beyond the root)."""
        held = Counter(m for case in self.cases for m in case.modalities)
        institutions = Counter(case.institution or "unknown" for case in self.cases)
        return {
            "site": self.site,
            "root": str(self.root),
            "release": self.release,
            "et_label": self.et_label,
            "label_convention": LABEL_CONVENTIONS[self.et_label],
            "n_cases": len(self.cases),
            "n_with_seg": sum(case.seg is not None for case in self.cases),
            "modalities": list(self.modalities),
            "excluded": list(self.excluded),
            "modality_counts": {m: held.get(m, 0) for m in MODALITIES},
            "institutions": dict(sorted(institutions.items())),
            "split": {name: len(self.split.get(name, [])) for name in SPLITS},
            "n_problems": len(self.problems),
            "problems": list(self.problems),
            "notes": list(self.notes),
        }

    def to_json(self, path: str | Path) -> None:
        """Write the manifest atomically (temp file then rename): never half a file."""
        path = Path(path)
        payload = {
            "format": "fedmodal-site-manifest/1",
            "site": self.site,
            "root": str(self.root),
            "release": self.release,
            "et_label": self.et_label,
            "modalities": list(self.modalities),
            "excluded": list(self.excluded),
            "seed": self.seed,
            "fractions": list(self.fractions) if self.fractions is not None else None,
            "split": self.split,
            "problems": self.problems,
            "notes": self.notes,
            "cases": [_case_to_record(case, self.root) for case in self.cases],
        }
        write_json_atomically(path, payload)

    @classmethod
    def from_json(cls, path: str | Path, root: str | Path | None = None) -> SiteManifest:
        """Read a manifest written by :meth:`to_json`.

        Args:
            path: the JSON file.
            root: the data folder, if it moved since the manifest was written (case paths
                are stored relative to it).
        """
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        data_root = Path(root) if root is not None else Path(payload["root"])
        return cls(
            site=payload["site"],
            root=data_root,
            release=payload["release"],
            et_label=int(payload["et_label"]),
            cases=[_case_from_record(record, data_root, payload["release"]) for record in payload["cases"]],
            modalities=tuple(payload["modalities"]),
            excluded=tuple(payload["excluded"]),
            problems=list(payload["problems"]),
            split={k: list(v) for k, v in payload["split"].items()},
            notes=list(payload.get("notes", [])),
            seed=int(payload.get("seed", 0)),
            fractions=tuple(payload["fractions"]) if payload.get("fractions") else None,  # type: ignore[arg-type]
        )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _case_to_record(case: CaseFiles, root: Path) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "folder": _relative(case.folder, root),
        "images": {m: _relative(case.images[m], root) for m in case.modalities},
        "seg": _relative(case.seg, root) if case.seg is not None else None,
        "institution": case.institution,
        "grade": case.grade,
        "notes": list(case.notes),
    }


def _case_from_record(record: dict[str, Any], root: Path, release: str) -> CaseFiles:
    return CaseFiles(
        case_id=record["case_id"],
        folder=root / record["folder"],
        release=release,
        images={m: root / p for m, p in record["images"].items()},
        seg=root / record["seg"] if record.get("seg") else None,
        institution=record.get("institution"),
        grade=record.get("grade"),
        notes=list(record.get("notes", [])),
    )


def read_site_file(root: str | Path) -> dict[str, Any]:
    """The site's declaration ``fedmodal_site.json`` in its data folder, or {} if none."""
    path = Path(root) / SITE_FILE
    if not path.is_file():
        return {}
    try:
        declared = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(None, None, path, f"not valid JSON ({error})") from error
    if not isinstance(declared, dict):
        raise DataError(None, None, path, "must hold a JSON object")
    return declared


def build_manifest(
    root: str | Path,
    site: str | None = None,
    exclude_modalities: tuple[str, ...] | list[str] = (),
    on_error: str | None = None,
    need_seg: bool = True,
    split: tuple[float, float, float] | None = None,
    seed: int | None = None,
    include_synthetic: bool = False,
) -> SiteManifest:
    """Read a site's data folder into a :class:`SiteManifest`.

    Args:
        root: the site's data folder (any BraTS release layout).
        site: the site's name (default: ``fedmodal_site.json``'s "site", else the folder name).
        exclude_modalities: modalities held but not to be used; added to the site file's.
        on_error: "skip" (skip a bad case, report it in ``problems``) or "stop" (raise the
            first :class:`DataError`). Default: the site file's, else "skip".
        need_seg: whether a case without a segmentation is a problem.
        split: (train, val, test) fractions. Default: the site file's, else (0.7, 0.1, 0.2).
        seed: seed of the split hash. Default: the site file's, else 0.
        include_synthetic: let the synthetic files of ``fedmodal complete`` stand in for a
            case's missing modalities (a "completed site"); real files always win.

    Raises:
        DataError: no case folder found, an invalid site file, or any case problem under "stop".
    """
    root = Path(root).resolve()
    declared = read_site_file(root)
    site = site or declared.get("site") or root.name
    on_error = on_error or declared.get("on_error", "skip")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    seed = int(seed if seed is not None else declared.get("seed", 0))
    try:
        excluded_set = {canonical_modality(m) for m in [*declared.get("exclude_modalities", []), *exclude_modalities]}
    except KeyError as error:
        raise DataError(site, None, root / SITE_FILE, f"exclude_modalities: {error.args[0]}") from error
    excluded = ordered_modalities(excluded_set)

    try:
        release = detect_release(root)
    except DataError as error:
        raise DataError(site, error.case, error.file, error.problem) from error
    cases = discover_cases(root, release)
    if include_synthetic:
        cases = [with_synthetic(case) for case in cases]

    usable: list[CaseFiles] = []
    problems: list[dict[str, Any]] = []
    for case in cases:
        try:
            check_case(case, site, need_seg=need_seg)
        except DataError as error:
            if on_error == "stop":
                raise
            logger.warning("skipping %s", error)
            problems.append(error.to_record())
            continue
        usable.append(case)
    notes = [note for case in usable for note in case.notes]

    held = [m for m in MODALITIES if usable and all(m in case.images for case in usable)]
    modalities = tuple(m for m in held if m not in excluded)

    declared_split = split if split is not None else declared.get("split", DEFAULT_SPLIT)
    fractions: tuple[float, float, float] | None
    if isinstance(declared_split, dict):
        fractions = None
        assigned = _explicit_split(declared_split, usable, seed, notes)
    else:
        fractions = _check_fractions(declared_split)
        assigned = {name: [] for name in SPLITS}
        for case in usable:
            assigned[split_of(case.case_id, fractions, seed)].append(case.case_id)

    return SiteManifest(
        site=site,
        root=root,
        release=release,
        et_label=ET_LABEL[release],
        cases=usable,
        modalities=modalities,
        excluded=excluded,
        problems=problems,
        split=assigned,
        notes=notes,
        seed=seed,
        fractions=fractions,
    )


def _explicit_split(
    listed: dict[str, list[str]], usable: list[CaseFiles], seed: int, notes: list[str]
) -> dict[str, list[str]]:
    """A split the site listed case by case; unlisted usable cases go by hash (default fractions)."""
    unknown = set(listed) - set(SPLITS)
    if unknown:
        raise ValueError(f"site split lists unknown parts {sorted(unknown)}; expected {SPLITS}")
    usable_ids = {case.case_id for case in usable}
    assigned: dict[str, list[str]] = {name: [] for name in SPLITS}
    placed: set[str] = set()
    for name in SPLITS:
        for case_id in listed.get(name, []):
            if case_id not in usable_ids:
                notes.append(f"split lists {case_id} under {name}, but it is not a usable case")
            elif case_id in placed:
                notes.append(f"split lists {case_id} twice; kept its first place")
            else:
                assigned[name].append(case_id)
                placed.add(case_id)
    for case in usable:
        if case.case_id not in placed:
            assigned[split_of(case.case_id, DEFAULT_SPLIT, seed)].append(case.case_id)
    for name in SPLITS:
        assigned[name].sort()
    return assigned
