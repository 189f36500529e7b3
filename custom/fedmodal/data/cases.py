"""Reading one BraTS case's volumes: the one place NIfTI voxels are read.

:func:`read_case` reads a case's modalities (and seg) fully, checks that they share one grid,
and returns them as arrays in RAS orientation; every failure is a :class:`DataError` naming
the site, case and file.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from fedmodal.data.errors import DataError
from fedmodal.data.layouts import CaseFiles

# Affines of co-registered BraTS volumes are identical; allow float noise from resaving.
AFFINE_TOLERANCE = 1e-3
# A BraTS volume is 240x240x155 voxels (36 MB as float32); a header declaring more than this is
# refused before any voxel is read, so a damaged header cannot make a site allocate it.
MAX_VOLUME_BYTES = 2 * 1024**3
_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass
class CaseVolumes:
    """The voxels of one case, every array on one grid in RAS orientation.

    Args:
        case_id: the case's id.
        images: canonical modality -> array as stored (dtype kept), only the modalities read.
        seg: the on-disk label map, or None when the case has none (or it was not asked for).
        affine: voxel -> world (mm) of the RAS arrays.
        zooms: voxel size in mm along the RAS axes.
    """

    case_id: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    seg: np.ndarray | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape shared by every array."""
        first = next(iter(self.images.values()), self.seg)
        return tuple(first.shape) if first is not None else ()


def read_volume(
    path: str | Path, site: str | None, case_id: str | None, verify_gzip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI fully, as stored: (array, affine).

    Reads every voxel, so a ``.gz`` truncated inside its voxels fails here rather than later.

    Args:
        path: the NIfTI file.
        site: the site's name, for the error.
        case_id: the case's id, for the error.
        verify_gzip: also read a ``.gz`` stream to its end, so a damaged trailer (checksum,
            length: a transfer cut short after the last voxel) is refused too. The checks of a
            site's data do; reads for training after them need not.

    Raises:
        DataError: unreadable, or not a 3D volume (a trailing axis of 1 is dropped).
    """
    try:
        image = nib.load(str(path))
        _check_header(image, path, site, case_id)
        data = np.asanyarray(image.dataobj)
        if verify_gzip and str(path).endswith(".gz"):
            _read_gzip_to_end(path)
    except DataError:
        raise
    except Exception as error:  # nibabel raises many types (EOFError, zlib.error, ImageFileError...)
        raise DataError(site, case_id, path, f"unreadable NIfTI ({type(error).__name__}: {error})") from error
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(site, case_id, path, f"expected a 3D volume, got shape {tuple(data.shape)}")
    return data, np.asarray(image.affine, dtype=np.float64)


def _read_gzip_to_end(path: str | Path, chunk: int = 1 << 20) -> None:
    """Decompress to the end: gzip checks its CRC and length only there."""
    with gzip.open(path, "rb") as stream:
        while stream.read(chunk):
            pass


def _check_header(image, path: str | Path, site: str | None, case_id: str | None) -> None:
    """What the header declares must be readable before a voxel is: size, spacing, affine."""
    shape = tuple(int(n) for n in image.shape)
    nbytes = int(np.prod(shape, dtype=np.float64) * np.dtype(image.get_data_dtype()).itemsize)
    if any(n <= 0 for n in shape) or nbytes > MAX_VOLUME_BYTES:
        raise DataError(site, case_id, path, f"header declares a {shape} volume ({nbytes} bytes): damaged header?")
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise DataError(site, case_id, path, f"voxel spacing {tuple(zooms.tolist())} is not positive and finite")
    if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(image.affine[:3, :3])) < 1e-9:
        raise DataError(site, case_id, path, "the header's affine is singular or not finite")


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a volume to RAS (axis flips and permutations only, no resampling).

    Args:
        data: the 3D array.
        affine: its voxel -> world affine.

    Returns:
        the RAS array and its affine (as ``nibabel.as_closest_canonical``).
    """
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), _RAS)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    ras = np.ascontiguousarray(nib.orientations.apply_orientation(data, transform))  # torch refuses negative strides
    return ras, affine @ nib.orientations.inv_ornt_aff(transform, data.shape)


def iter_case_files(
    case: CaseFiles,
    site: str | None = None,
    modalities: Sequence[str] | None = None,
    with_seg: bool = True,
    verify_gzip: bool = False,
) -> Iterator[tuple[str, Path, np.ndarray, np.ndarray]]:
    """Read a case's files one by one, each checked against the first: (token, path, array, affine).

    Arrays and affines are as stored on disk; ``token`` is the modality or "seg".

    Args:
        case: the case's files.
        site: the site's name, for errors.
        modalities: the modalities to read, of those the case holds (default: all).
        with_seg: also read the seg when the case has one.
        verify_gzip: check each ``.gz`` stream to its end (see `read_volume`).

    Raises:
        DataError: an unreadable file, or a shape or affine unlike the first file's.
    """
    files = [(m, case.images[m]) for m in case.modalities if modalities is None or m in modalities]
    if with_seg and case.seg is not None:
        files.append(("seg", case.seg))
    reference: tuple[str, tuple[int, ...], np.ndarray] | None = None
    for token, path in files:
        data, affine = read_volume(path, site, case.case_id, verify_gzip)
        if reference is None:
            reference = (token, data.shape, affine)
        else:
            ref_token, ref_shape, ref_affine = reference
            if data.shape != ref_shape:
                raise DataError(site, case.case_id, path, f"shape {data.shape} differs from {ref_token}'s {ref_shape}")
            if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE):
                raise DataError(
                    site,
                    case.case_id,
                    path,
                    f"affine differs from {ref_token}'s (not co-registered?):\n{affine}\nvs\n{ref_affine}",
                )
        yield token, path, data, affine


def read_case(
    case: CaseFiles,
    modalities: Sequence[str] | None = None,
    with_seg: bool = True,
    site: str | None = None,
) -> CaseVolumes:
    """Read a case's modalities (and seg) as arrays on one grid, in RAS orientation.

    Args:
        case: the case's files.
        modalities: the modalities to read, of those the case holds (default: all).
        with_seg: also read the seg when the case has one.
        site: the site's name, for errors.

    Raises:
        DataError: an unreadable file, or files of different shapes or affines.
    """
    volumes = CaseVolumes(case_id=case.case_id)
    for token, _path, data, affine in iter_case_files(case, site, modalities, with_seg):
        ras, ras_affine = to_ras(data, affine)
        if token == "seg":
            volumes.seg = ras
        else:
            volumes.images[token] = ras
        volumes.affine = ras_affine
    volumes.zooms = tuple(float(z) for z in np.sqrt((volumes.affine[:3, :3] ** 2).sum(axis=0)))
    return volumes
