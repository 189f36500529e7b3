"""Where federations live and how one is built once: the cache folder, locks, atomic rename."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path

from fedmodal.data.phantoms.presets import DEFAULT_PRESET, PRESETS
from fedmodal.data.phantoms.spec import GENERATOR_VERSION, federation_spec
from fedmodal.data.phantoms.writer import build_into, read_federation

try:  # POSIX advisory locks; elsewhere the atomic rename alone settles a race.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive advisory lock on ``lock_path`` (waiting, with a log line, if taken)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("phantoms: another process is building %s; waiting for it", lock_path.name[1:-5])
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _differences(found: dict, spec: dict) -> str:
    return ", ".join(f"{k}: {found.get(k)!r} here, {v!r} asked" for k, v in spec.items() if found.get(k) != v)


def build_or_reuse(out_dir, spec: dict, overwrite: bool, workers: int = 1) -> tuple[Path, bool]:
    """Build the federation of ``spec`` at ``out_dir`` unless a complete one is there already.

    Args:
        out_dir: the federation's root folder.
        spec: from :func:`~fedmodal.data.phantoms.spec.federation_spec`.
        overwrite: replace a different federation (or other files) found at ``out_dir``.
        workers: processes generating cases.

    Returns:
        the absolute root, and whether this call built it.
    """
    out = Path(out_dir).expanduser().absolute()
    existing = read_federation(out)
    if existing is not None and existing.get("spec") == spec and not overwrite:
        return out, False
    with _exclusive(out.parent / f".{out.name}.lock"):
        existing = read_federation(out)
        if existing is not None and existing.get("spec") == spec and not overwrite:
            return out, False  # another process finished it while we waited
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            found = (existing or {}).get("spec")
            what = f"a different phantom federation ({_differences(found, spec)})" if found else "other files"
            raise FileExistsError(f"{out} already holds {what}; choose another folder or overwrite it (--force)")
        for stale in out.parent.glob(f".{out.name}.building-*"):  # left by a crashed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build_into(tmp, spec, max(1, int(workers)))
            # Without a working lock (no fcntl, some network file systems) another builder of
            # the same spec may have finished first: keep its tree, readers may be using it.
            winner = read_federation(out)
            if winner is not None and winner.get("spec") == spec and not overwrite:
                shutil.rmtree(tmp, ignore_errors=True)
                return out, False
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
            os.replace(tmp, out)
            if old is not None:
                _remove(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out, True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def build_federation(
    out_dir, preset: str = DEFAULT_PRESET, overwrite: bool = False, workers: int = 1, **spec_args
) -> Path:
    """Build a phantom federation at ``out_dir`` and return its path.

    Writes ``<out_dir>/<site>/...`` BraTS-named cases (a modality a site lacks has no file), a
    full-modal held-out ``<out_dir>/test/`` and ``<out_dir>/federation.json``. The tree is
    built in a temporary sibling folder and renamed into place; concurrent builders of the same
    folder wait for one another, and a complete federation of the same spec is reused.

    Args:
        out_dir: the federation's root folder.
        preset: a :data:`PRESETS` name.
        overwrite: replace a different federation (or other files) found at ``out_dir``.
        workers: processes generating cases; the data do not depend on it. More than 1 starts
            fresh interpreters (multiprocessing "spawn"), so a calling script needs the usual
            ``if __name__ == "__main__":`` guard.
        **spec_args: the rest of the spec, by keyword (one definition, in :func:`~fedmodal.data.phantoms.spec.federation_spec`):

            - seed: the seed every case derives from (default 0).
            - shape: grid over 240 x 240 x 155 mm (default ``DEFAULT_SHAPE``); (240, 240, 155)
              is BraTS's 1 mm grid.
            - layout: BraTS release naming and ET label (:data:`fedmodal.brats.RELEASES`,
              default ``DEFAULT_LAYOUT``).
            - cases_per_site: training cases per site (an int for all, or site -> count);
              default: the preset's.
            - test_cases: size of the held-out test set; default: the preset's.

    Raises:
        FileExistsError: ``out_dir`` holds something else and ``overwrite`` is False.
    """
    return build_or_reuse(out_dir, federation_spec(preset, **spec_args), overwrite, workers)[0]


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDMODAL_CACHE") or Path.home() / ".cache" / "fedmodal").expanduser()


def cache_root(spec: dict) -> Path:
    """The folder the federation of ``spec`` lives in by default (see :func:`default_root`)."""
    if os.environ.get("FEDMODAL_PHANTOM_ROOT"):
        return Path(os.environ["FEDMODAL_PHANTOM_ROOT"]).expanduser()
    preset = PRESETS[spec["preset"]]
    name = f"{spec['preset']}-seed{spec['seed']}-{'x'.join(map(str, spec['shape']))}-{spec['layout']}"
    counts = [spec["cases_per_site"], spec["test_cases"]]
    if counts != [preset.cases_per_site, preset.test_cases]:
        name += f"-n{zlib.crc32(json.dumps(counts, sort_keys=True).encode()):08x}"
    if "num_sites" in spec:
        name += f"-{spec['num_sites']}sites"
    return _cache_dir() / "phantoms" / f"{name}-v{GENERATOR_VERSION}"


def default_root(preset: str = DEFAULT_PRESET, **spec_args) -> Path:
    """Where a federation lives by default (``spec_args`` as :func:`build_federation`).

    ``$FEDMODAL_PHANTOM_ROOT`` if set; else ``$FEDMODAL_CACHE/phantoms/<name>`` (the cache
    defaults to ``~/.cache/fedmodal``), the name spelling out the spec so that different
    federations never share a folder (and one spec always maps to one folder).
    """
    return cache_root(federation_spec(preset, **spec_args))


def ensure_federation(preset: str = DEFAULT_PRESET, root=None, **spec_args) -> Path:
    """Return the root of the federation of this spec, building it on first use.

    Safe to call from several processes at once (the FLARE simulator starts every site
    together): one builds, the others wait and reuse its result.

    Args:
        preset, spec_args (seed, shape, layout, cases_per_site, test_cases): as
            :func:`build_federation`.
        root: where it lives; default :func:`default_root`.
    """
    spec = federation_spec(preset, **spec_args)
    path, built = build_or_reuse(cache_root(spec) if root is None else root, spec, overwrite=False)
    if built:
        logger.info("phantoms: built %s federation at %s", preset, path)
    return path
