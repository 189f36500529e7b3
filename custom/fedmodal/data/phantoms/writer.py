"""Writing a federation: plan every case, write its NIfTI files, then ``federation.json``."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from fedmodal.brats import ENHANCING, ET_LABEL, MODALITIES, NECROSIS, OEDEMA
from fedmodal.data.layouts import case_file_paths, make_case_id
from fedmodal.data.manifest import SITE_FILE
from fedmodal.data.phantoms.case import generate_case
from fedmodal.data.phantoms.grid import BRATS_FOV_MM, grid_affine
from fedmodal.data.phantoms.presets import PRESETS
from fedmodal.data.phantoms.scanner import site_profile
from fedmodal.data.phantoms.spec import spec_sites

logger = logging.getLogger(__name__)

TEST_SITE = "test"
FEDERATION_FILE = "federation.json"


def _institution(site: str) -> str:
    return "".join(ch for ch in site.upper() if ch.isalnum())


def _plan(spec: dict) -> list[dict]:
    """Every case to write: site folder (also the generator's site key), index, case id, modalities."""
    held = spec_sites(spec)
    sites = list(held)
    jobs, number = [], 1
    for site in sites:
        for i in range(spec["cases_per_site"][site]):
            jobs.append({"folder": site, "index": i, "profile": site, "number": number, "modalities": held[site]})
            number += 1
    for i in range(spec["test_cases"]):
        # Test cases are new patients scanned at the training sites, in turn.
        jobs.append(
            {
                "folder": TEST_SITE,
                "index": i,
                "profile": sites[i % len(sites)],
                "number": number,
                "modalities": MODALITIES,
            }
        )
        number += 1
    for job in jobs:
        job["case_id"] = make_case_id(spec["layout"], job["number"], institution=_institution(job["folder"]))
    return jobs


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"fedmodal phantom"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write_case(job: dict, spec: dict, site_root: Path) -> dict:
    """Generate one planned case and write the files of the modalities its site holds."""
    profile = site_profile(spec["seed"], job["profile"])
    case = generate_case(spec["seed"], job["folder"], job["index"], spec["shape"], profile)
    paths = case_file_paths(spec["layout"], job["case_id"], job["modalities"], with_seg=True)
    for m in job["modalities"]:
        _save_nifti(case.images[m], case.affine, site_root / paths[m])
    seg = case.label.copy()
    seg[case.label == ENHANCING] = ET_LABEL[spec["layout"]]
    _save_nifti(seg, case.affine, site_root / paths["seg"])
    return {"case_id": job["case_id"], **case.info}


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def read_federation(root) -> dict | None:
    """The ``federation.json`` of a complete federation at ``root``, or None."""
    path = Path(root) / FEDERATION_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _write_case_in(args: tuple[dict, dict, str]) -> dict:
    job, spec, folder = args
    return write_case(job, spec, Path(folder) / job["folder"])


def _write_client_split(site_folder: Path, case_ids: list[str], train_share: float) -> None:
    """The site's `fedmodal_site.json` naming its train and test cases (at least one of each)."""
    n_train = min(max(1, round(train_share * len(case_ids))), len(case_ids) - 1)
    split = {"train": case_ids[:n_train], "val": [], "test": case_ids[n_train:]}
    (site_folder / SITE_FILE).write_text(json.dumps({"split": split}, indent=1))


def build_into(folder: Path, spec: dict, workers: int) -> dict:
    """Write every case of ``spec`` into ``folder``, then its ``federation.json``; returns that record."""
    preset = PRESETS[spec["preset"]]
    affine, spacing = grid_affine(spec["shape"])
    jobs = _plan(spec)
    start = time.perf_counter()
    records: dict[str, list] = {}
    tasks = [(job, spec, str(folder)) for job in jobs]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) >= 4 * workers:
            # Fresh interpreters, not fork: the caller may be a threaded FLARE client.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            results = pool.map(_write_case_in, tasks)
        else:
            results = map(_write_case_in, tasks)
        for n, (job, record) in enumerate(zip(jobs, results), start=1):
            records.setdefault(job["folder"], []).append(record)
            if n == len(jobs) or n % 10 == 0:
                logger.info("phantoms: %d/%d cases (%.1f s)", n, len(jobs), time.perf_counter() - start)
    sites = {}
    for site, modalities in spec_sites(spec).items():
        sites[site] = {
            "modalities": list(modalities),
            "missing": [m for m in MODALITIES if m not in modalities],
            "cases": spec["cases_per_site"][site],
            "case_ids": [r["case_id"] for r in records[site]],
            "scanner": site_profile(spec["seed"], site).to_json(),
        }
        if preset.client_split and site.startswith("site-"):
            _write_client_split(folder / site, sites[site]["case_ids"], preset.client_split[0])
    test = None
    if spec["test_cases"]:
        test = {
            "path": TEST_SITE,
            "modalities": list(MODALITIES),
            "cases": spec["test_cases"],
            "case_ids": [r["case_id"] for r in records[TEST_SITE]],
            "scanned_at": [j["profile"] for j in jobs if j["folder"] == TEST_SITE],
        }
    info = {
        "format": "fedmodal-phantoms",
        "spec": spec,
        "preset": spec["preset"],
        "description": preset.description,
        "seed": spec["seed"],
        "shape": spec["shape"],
        "spacing": list(spacing),
        "fov_mm": list(BRATS_FOV_MM),
        "affine": affine.tolist(),
        "layout": spec["layout"],
        "et_label": ET_LABEL[spec["layout"]],
        "labels": {"necrosis": NECROSIS, "oedema": OEDEMA, "enhancing": ET_LABEL[spec["layout"]]},
        "sites": sites,
        "test": test,
        "tumours": records,
        "build": {
            "seconds": round(time.perf_counter() - start, 2),
            "bytes": _folder_bytes(folder),
            "id": uuid.uuid4().hex,
        },
    }
    # federation.json last: its presence marks a complete build.
    (folder / FEDERATION_FILE).write_text(json.dumps(info, indent=1))
    return info
