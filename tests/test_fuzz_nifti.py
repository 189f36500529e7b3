"""Damaged input never crashes a site: every mutated case is read correctly or refused with a
DataError naming the file, in bounded time, and nothing is written half-way.

Property-based (hypothesis): NIfTI header fields (dims, datatype, pixdim, qform/sform, srow,
vox_offset) are overwritten with arbitrary values, gzip streams are truncated, files are
replaced by random bytes. CI runs a bounded number of examples per property.
"""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmodal.data.checks import check_case
from fedmodal.data.discovery import discover_cases
from fedmodal.data.errors import DataError
from fedmodal.data.manifest import build_manifest

SHAPE = (12, 12, 8)
MODS = ("t1", "t1ce", "t2", "flair")
CASE = "BraTS2021_00001"
FUZZ = settings(
    max_examples=40, deadline=10_000, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None
)

# NIfTI-1 header fields: (byte offset, struct format, count)
FIELDS = {
    "dim": (40, "h", 8),
    "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1),
    "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1),
    "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1),
    "quatern": (256, "f", 6),
    "srow": (280, "f", 12),
}


def write_case(root: Path) -> Path:
    """A valid BraTS 2021 case: four modalities and a seg on one grid."""
    folder = root / CASE
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    brain = np.zeros(SHAPE, dtype=bool)
    brain[2:10, 2:10, 1:7] = True
    for m in MODS:
        nib.save(
            nib.Nifti1Image((rng.random(SHAPE) * brain).astype(np.float32), np.eye(4)), folder / f"{CASE}_{m}.nii.gz"
        )
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[4:7, 4:7, 3:5] = 2
    seg[5, 5, 4] = 4
    nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / f"{CASE}_seg.nii.gz")
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_site(root: Path) -> None:
    """What a site does with a folder: check every case, then build the manifest (stop on error)."""
    (case,) = discover_cases(root)
    check_case(case, "site-1", need_seg=True)
    build_manifest(root, site="site-1", on_error="stop")


def assert_read_or_refused(root: Path, damaged: Path) -> None:
    before = files_of(root)
    try:
        read_site(root)
    except DataError as error:
        assert str(root) in str(error) or damaged.name in str(error) or CASE in str(error), str(error)
    after = files_of(root)
    # Nothing the reader wrote is half-way: no temporary file is left, and every file it wrote parses.
    new = sorted(set(after) - set(before))
    assert not [n for n in new if n.endswith(".tmp") or n.startswith(".")], new
    assert {n: after[n] for n in before} == before, "an input file was changed"


def patch_header(path: Path, field: str, values: list) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    offset, fmt, count = FIELDS[field]
    struct.pack_into("<" + fmt * count, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))


def int16s(n):
    return st.lists(st.integers(-32768, 32767), min_size=n, max_size=n)


def float32s(n):
    return st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=n, max_size=n)


def field_values():
    return st.sampled_from(sorted(FIELDS)).flatmap(
        lambda f: st.tuples(st.just(f), int16s(FIELDS[f][2]) if FIELDS[f][1] == "h" else float32s(FIELDS[f][2]))
    )


@FUZZ
@given(target=st.sampled_from(MODS + ("seg",)), mutation=field_values())
def test_mutated_headers_are_read_or_refused(target, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "site"
        folder = write_case(root)
        path = folder / f"{CASE}_{target}.nii.gz"
        field, values = mutation
        patch_header(path, field, list(values))
        assert_read_or_refused(root, path)


@FUZZ
@given(target=st.sampled_from(MODS + ("seg",)), keep=st.floats(0.0, 0.999))
def test_truncated_gzip_streams_are_refused(target, keep):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "site"
        path = write_case(root) / f"{CASE}_{target}.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
        assert_read_or_refused(root, path)
        try:
            read_site(root)
            raise AssertionError("a truncated volume was read as if whole")
        except DataError as error:
            assert path.name in str(error)


@FUZZ
@given(target=st.sampled_from(MODS + ("seg",)), junk=st.binary(min_size=0, max_size=4096), wrap=st.booleans())
def test_random_bytes_are_refused(target, junk, wrap):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "site"
        path = write_case(root) / f"{CASE}_{target}.nii.gz"
        path.write_bytes(gzip.compress(junk) if wrap else junk)
        assert_read_or_refused(root, path)


def test_a_header_declaring_a_huge_volume_is_refused_before_reading():
    """A damaged dim field must not make the site allocate the declared size."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "site"
        path = write_case(root) / f"{CASE}_t2.nii.gz"
        patch_header(path, "dim", [3, 30000, 30000, 30000, 1, 1, 1, 1])
        try:
            read_site(root)
            raise AssertionError("accepted")
        except DataError as error:
            assert "damaged header" in str(error) and path.name in str(error)
