"""One site set-up for every fedmodal executor, centralised command and benchmark.

Where the data is, what the site's `fedmodal_site.json` allows, which cases it holds, its seed
and its device: `prepare_site` answers all of them the same way wherever a site is built, so a
site's policy applies whether it trains under NVFlare, in `fedmodal train-seg` or in a
benchmark. No NVFlare here.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmodal.config import Settings

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "FEDMODAL_DATA_ROOT"
# What job configs pass: NVFlare substitutes it from the site's environment (None when unset).
DATA_ROOT_FROM_ENV = "{$" + DATA_ROOT_ENV + "}"
DEFAULT_PRESET = "modalitybank-missing"
ON_ERROR = ("", "skip", "stop")


@dataclass
class SiteConfig(Settings):
    """Where a site's data is and how it runs, for every method.

    Args:
        data_root: the site's BraTS folder; jobs pass `{$FEDMODAL_DATA_ROOT}`, which NVFlare
            fills from the site's environment. Unset means the phantom federation `preset`.
        preset: phantom preset used when no data root is set.
        on_error: "skip" bad cases (reported) or "stop" at the first; empty means what the
            site's `fedmodal_site.json` says, else "skip".
        device: "auto" (CUDA when present), "cpu" or "cuda[:i]".
        num_threads: torch CPU threads at this site (0 keeps torch's default).
    """

    data_root: str = DATA_ROOT_FROM_ENV
    preset: str = DEFAULT_PRESET
    on_error: str = ""
    device: str = "auto"
    num_threads: int = 1

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")


@dataclass
class PreparedSite:
    """A site ready to train: its folder, declared policy, cases, seed and device."""

    name: str
    root: Path
    policy: dict[str, Any]
    manifest: Any  # fedmodal.data.manifest.SiteManifest
    seed: int
    device: torch.device

    def shares_masks(self, requested: bool = True) -> bool:
        """A site file's "share_masks": false wins over the job's request."""
        return bool(requested and self.policy.get("share_masks", True))

    def dp(self, clip: float, noise: float) -> tuple[float, float]:
        """DP clip and noise: the job's, raised to the site file's where that is stricter."""
        return max(float(clip), float(self.policy.get("dp_clip", 0.0))), max(
            float(noise), float(self.policy.get("dp_noise", 0.0))
        )

    def describe(self) -> str:
        m = self.manifest
        return (
            f"site {self.name}: {len(m.cases)} cases from {self.root}, modalities {list(m.modalities)}, "
            f"{len(m.problems)} skipped, seed {self.seed}, device {self.device}"
        )


def prepare_site(
    name: str,
    config: SiteConfig,
    run_seed: int,
    need_seg: bool = True,
    include_synthetic: bool = False,
) -> PreparedSite:
    """Resolve the site's folder, read its site file and cases, derive its seed, pick its device.

    Raises:
        FileNotFoundError: the data root (or phantom site) does not exist.
        fedmodal.data.checks.DataError: the site file or, under on_error "stop", a case is bad.
    """
    from fedmodal.data.manifest import build_manifest, read_site_file

    root = resolve_site_root(config.data_root, name, config.preset)
    policy = read_site_file(root)
    manifest = build_manifest(
        root, site=name, on_error=config.on_error or None, need_seg=need_seg, include_synthetic=include_synthetic
    )
    for problem in manifest.problems:
        logger.warning("site %s skipped: %s", name, problem)
    device = select_device(config.device, config.num_threads)
    return PreparedSite(name, root, policy, manifest, site_seed(run_seed, name), device)


def phantom_site_name(site_name: str) -> str:
    """A site's folder in a phantom federation: `hospital-N` -> `site-N`, other names unchanged.

    So a provisioned federation (hospital-1..3) runs on phantoms without renaming anything.
    """
    match = re.fullmatch(r"hospital-(\d+)", site_name)
    return f"site-{match.group(1)}" if match else site_name


def data_root_is_set(data_root) -> bool:
    """False for None, "" and an unsubstituted `{$FEDMODAL_DATA_ROOT}`."""
    return bool(data_root) and not str(data_root).startswith("{$")


def resolve_site_root(data_root: str | os.PathLike | None, site_name: str, preset: str = DEFAULT_PRESET) -> Path:
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
    """`auto` takes CUDA when present; `num_threads` > 0 sets torch's CPU threads, 0 keeps
    torch's default (one per physical core). On CUDA, cuDNN picks its fastest kernels."""
    if num_threads < 0:
        raise ValueError(f"num_threads must be 0 (torch's default) or more, not {num_threads}")
    if num_threads > 0:
        torch.set_num_threads(int(num_threads))
    if device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, which this machine does not have; use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        torch.cuda.set_device(chosen)  # so that code asking for "the" CUDA device gets this one
        # Training shapes are fixed (patches, slices), so the one-off kernel search pays for itself.
        torch.backends.cudnn.benchmark = True
    return chosen


def peak_gpu_memory(device: torch.device) -> int | None:
    """Bytes of the most GPU memory torch held on `device` in this process (None off CUDA)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))
