"""Loading one BraTS case into the fixed four-channel form every pipeline starts from.

Every case loads into one shape whatever the site holds: ``image`` has the four canonical
channels (``fedmodal.brats.MODALITIES``) with zeros where a modality is missing, and ``avail``
says which channels are real. Labels are canonical (0 background, 1 NCR, 2 ED, 3 ET): on-disk
ET 4 maps to 3; the 2023+ resection cavity (4) maps to ``cavity_label``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from fedmodal.brats import ET_LABEL, MODALITIES, canonical_modality
from fedmodal.data.cases import read_case
from fedmodal.data.layouts import CaseFiles


def to_canonical_labels(
    seg: np.ndarray, release: str, et_label: int | None = None, cavity_label: int = 0
) -> np.ndarray:
    """Map an on-disk BraTS label map to canonical labels (int64).

    Args:
        seg: the label map as read from disk.
        release: the case's release (decides what 4 means when ``et_label`` is None).
        et_label: the enhancing-tumour label on disk (default ``layouts.ET_LABEL[release]``).
        cavity_label: canonical value for the resection cavity (on-disk 4 where ET is 3).
    """
    et_label = ET_LABEL[release] if et_label is None else et_label
    seg = np.rint(np.asarray(seg)).astype(np.int64)
    out = seg.copy()
    if et_label == 4:
        out[seg == 4] = 3
    else:
        out[seg == 4] = cavity_label
    return out


def case_record(case: CaseFiles, modalities: Sequence[str] = MODALITIES) -> dict[str, Any]:
    """A MONAI data dict for one case: paths of the held modalities among ``modalities``.

    Keys: "case_id", "release", one per held modality (canonical name -> path string), and
    "seg" when the case has one. Missing modalities are absent keys, never empty paths.
    """
    wanted = {canonical_modality(m) for m in modalities}
    record: dict[str, Any] = {"case_id": case.case_id, "release": case.release}
    for modality in case.modalities:
        if modality in wanted:
            record[modality] = str(case.images[modality])
    if case.seg is not None:
        record["seg"] = str(case.seg)
    return record


class LoadBraTSCased(MapTransform):
    """Load a :func:`case_record` into the fixed four-channel form, oriented to RAS.

    Writes "image" (4, X, Y, Z) float32 with zeros in missing channels, "avail" bool (4,),
    "label" (1, X, Y, Z) canonical labels (float32 for MONAI's spatial transforms; zeros and
    "has_label" False when there is no seg), and "brain" (1, X, Y, Z): voxels non-zero in
    any held modality, holes filled. Files are read by :func:`fedmodal.data.cases.read_case`.

    Args:
        et_label: the on-disk ET label (default: from the record's release).
        cavity_label: canonical value for the 2023+ resection cavity.

    Raises:
        DataError: an unreadable file, or files of different shapes or affines.
    """

    def __init__(self, et_label: int | None = None, cavity_label: int = 0) -> None:
        super().__init__(keys=[*MODALITIES, "seg"], allow_missing_keys=True)
        self.et_label = et_label
        self.cavity_label = cavity_label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        held = [m for m in MODALITIES if m in data]
        if not held:
            raise ValueError(f"case {data.get('case_id')}: no modality to load")
        release = data.get("release", "brats2021")
        files = CaseFiles(
            case_id=str(data.get("case_id")),
            folder=Path(data[held[0]]).parent,
            release=release,
            images={m: Path(data[m]) for m in held},
            seg=Path(data["seg"]) if "seg" in data else None,
        )
        volumes = read_case(files)
        spatial = volumes.shape
        image = torch.zeros((len(MODALITIES), *spatial), dtype=torch.float32)
        avail = torch.zeros(len(MODALITIES), dtype=torch.bool)
        for index, modality in enumerate(MODALITIES):
            if modality in volumes.images:
                image[index] = torch.as_tensor(volumes.images[modality], dtype=torch.float32)
                avail[index] = True
        # Brain: non-zero in any held modality, holes filled (dark voxels inside are brain).
        nonzero = (image[avail] != 0).any(dim=0).numpy()
        brain = torch.from_numpy(ndimage.binary_fill_holes(nonzero))[None]
        if volumes.seg is not None:
            label_np = to_canonical_labels(volumes.seg, release, self.et_label, self.cavity_label)
            label = torch.from_numpy(label_np).float()[None]
        else:
            label = torch.zeros((1, *spatial), dtype=torch.float32)
        affine = torch.as_tensor(volumes.affine, dtype=torch.float64)
        out = {k: v for k, v in data.items() if k not in self.keys}
        out["image"] = MetaTensor(image, affine=affine)
        out["label"] = MetaTensor(label, affine=affine.clone())
        out["brain"] = MetaTensor(brain.float(), affine=affine.clone())
        out["avail"] = avail
        out["has_label"] = volumes.seg is not None
        return out


def load_case(
    case: CaseFiles,
    modalities: Sequence[str] = MODALITIES,
    et_label: int | None = None,
    cavity_label: int = 0,
) -> dict[str, Any]:
    """Load one case in RAS with canonical labels.

    Args:
        case: the case.
        modalities: modalities to read; others are zero with ``avail`` False.
        et_label: on-disk ET label override (default: the release's).
        cavity_label: canonical value of the 2023+ resection cavity.

    Returns:
        dict: "image" float32 (4, X, Y, Z), "avail" bool (4,), "label" int64 (X, Y, Z) (zeros
        when there is no seg; see "has_label"), "brain" bool (X, Y, Z), "affine" (4, 4),
        "case_id".
    """
    loaded = LoadBraTSCased(et_label=et_label, cavity_label=cavity_label)(case_record(case, modalities))
    return {
        "image": loaded["image"].numpy().astype(np.float32, copy=False),
        "avail": loaded["avail"].numpy(),
        "label": loaded["label"][0].numpy().astype(np.int64),
        "brain": loaded["brain"][0].numpy().astype(bool),
        "affine": np.asarray(loaded["image"].affine, dtype=np.float64),
        "has_label": loaded["has_label"],
        "case_id": case.case_id,
    }
