"""Atomic file writes: a reader sees the old file or the whole new one, never a part of it.

Every write goes to a temporary file in the target's folder (the same file system, so the
rename is atomic), is flushed to disk (fsync), then replaces the target with ``os.replace``. If
the writer raises, the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden file name beside ``path`` that ends in ``path``'s own name.

    Ending in the target's name keeps its extension, for writers that choose a format by it
    (nibabel's ``.nii.gz``, matplotlib's ``.png``); the random part keeps concurrent writers apart.

    Args:
        path: the file that will be replaced.
    """
    path = Path(path)
    return path.with_name(f".{uuid.uuid4().hex[:12]}.tmp.{path.name}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_atomically(path: str | os.PathLike, save: Callable[[Path], Any]) -> Path:
    """Let ``save`` write a temporary file, then put it in place of ``path``.

    For writers that take a path, e.g. ``lambda p: torch.save(obj, p)``,
    ``lambda p: nib.save(image, p)`` or ``lambda p: fig.savefig(p)``.

    Args:
        path: the file to write (its folder is created if needed).
        save: called once with the temporary path; must write the whole file there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_sibling(path)
    try:
        save(temp)
        _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def open_atomically(path: str | os.PathLike, mode: str = "w", **open_args: Any) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``.

    Args:
        path: the file to write (its folder is created if needed).
        mode: a write mode of :func:`open` ("w", "wb", ...).
        **open_args: passed to :func:`open` (encoding, newline, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_sibling(path)
    try:
        with open(temp, mode, **open_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: the file to write.
        data: its whole content.
    """
    with open_atomically(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: the file to write.
        text: its whole content.
        encoding: the text encoding.
    """
    with open_atomically(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomically(path: str | os.PathLike, payload: Any, indent: int | None = 2, **dump_args: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (no trailing newline, as ``json.dump``).

    Args:
        path: the file to write.
        payload: anything :func:`json.dump` accepts.
        indent: JSON indentation.
        **dump_args: passed to :func:`json.dump` (e.g. ``default=float``).
    """
    with open_atomically(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=indent, **dump_args)
    return Path(path)
