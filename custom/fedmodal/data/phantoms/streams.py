"""Randomness: every stream is a pure function of (seed, purpose, site, index)."""

from __future__ import annotations

import zlib

import numpy as np


def _site_key(site: str) -> int:
    return zlib.crc32(site.encode("utf-8"))


def stream(seed: int, purpose: int, site: str, index: int = 0) -> np.random.Generator:
    """The random generator of one purpose (``PROFILE_STREAM``, ``CASE_STREAM``...) at one site and index."""
    return np.random.default_rng([int(seed), purpose, _site_key(site), int(index)])


PROFILE_STREAM, CASE_STREAM = 1, 2
