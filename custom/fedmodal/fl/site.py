"""Site-local facts every fedmodal executor needs: where the data is, the device, the seed."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "FEDMODAL_DATA_ROOT"


def resolve_site_root(data_root: str | os.PathLike | None, site_name: str, preset: str = "modalitybank-missing") -> Path:
    """The folder of BraTS cases this site trains on.

    A job config passes `{$FEDMODAL_DATA_ROOT}`, which NVFlare substitutes from the site's
    environment (None when unset). Rules, in order:
    - unset: the default phantom federation (built on first use), folder `<root>/<site_name>`;
    - `<data_root>/<site_name>` exists: that folder (one root serving simulated sites);
    - otherwise `data_root` itself (a hospital's own BraTS folder).
    """
    if not data_root or str(data_root).startswith("{$"):
        from fedmodal.data.phantoms import ensure_federation

        root = ensure_federation(preset)
        site_root = root / site_name
        if not site_root.is_dir():
            sites = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"site {site_name!r}: {DATA_ROOT_ENV} is not set and the phantom federation at {root} "
                f"has no site of that name (it has {sites}); set {DATA_ROOT_ENV} to this site's BraTS folder"
            )
        logger.info("site %s: no %s set, using phantom data at %s", site_name, DATA_ROOT_ENV, site_root)
        return site_root
    root = Path(data_root).expanduser()
    if (root / site_name).is_dir():
        return root / site_name
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
