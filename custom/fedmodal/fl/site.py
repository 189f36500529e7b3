"""Site-local facts every fedmodal executor needs: where the data is, the device, the seed."""

from __future__ import annotations

import logging
import os
import re
import zlib
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "FEDMODAL_DATA_ROOT"


def phantom_site_name(site_name: str) -> str:
    """A site's folder in a phantom federation: `hospital-N` -> `site-N`, other names unchanged.

    So a provisioned federation (hospital-1..3) runs on phantoms without renaming anything.
    """
    match = re.fullmatch(r"hospital-(\d+)", site_name)
    return f"site-{match.group(1)}" if match else site_name


def data_root_is_set(data_root) -> bool:
    """False for None, "" and an unsubstituted `{$FEDMODAL_DATA_ROOT}`."""
    return bool(data_root) and not str(data_root).startswith("{$")


def resolve_site_root(data_root: str | os.PathLike | None, site_name: str, preset: str = "modalitybank-missing") -> Path:
    """The folder of BraTS cases this site trains on.

    A job config passes `{$FEDMODAL_DATA_ROOT}`, which NVFlare substitutes from the site's
    environment (None when unset). Rules, in order:
    - unset: the default phantom federation (built on first use), folder `<root>/<site>`
      (`hospital-N` reads `site-N`);
    - `<data_root>/<site_name>` (or its phantom name) exists: that folder (one root serving
      several simulated sites);
    - otherwise `data_root` itself (a hospital's own BraTS folder).
    """
    if not data_root_is_set(data_root):
        from fedmodal.data.phantoms import ensure_federation

        root = ensure_federation(preset)
        site_root = root / phantom_site_name(site_name)
        if not site_root.is_dir():
            sites = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"site {site_name!r}: {DATA_ROOT_ENV} is not set and the phantom federation at {root} "
                f"has no site of that name (it has {sites}); set {DATA_ROOT_ENV} to this site's BraTS folder"
            )
        logger.info("site %s: no %s set, using phantom data at %s", site_name, DATA_ROOT_ENV, site_root)
        return site_root
    root = Path(data_root).expanduser()
    for name in (site_name, phantom_site_name(site_name)):
        if (root / name).is_dir():
            return root / name
    if not root.is_dir():
        raise FileNotFoundError(f"site {site_name!r}: data root {root} is not a folder")
    return root


def site_seed(run_seed: int, site_name: str) -> int:
    """A per-site seed derived from the run seed and the site's name, so runs repeat."""
    return (int(run_seed) * 1_000_003 + zlib.crc32(site_name.encode())) % (2**31 - 1)


def select_device(device: str = "auto", num_threads: int = 0) -> torch.device:
    """`auto` takes CUDA when present; `num_threads` > 0 caps torch's CPU threads."""
    if num_threads and num_threads > 0:
        torch.set_num_threads(int(num_threads))
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
