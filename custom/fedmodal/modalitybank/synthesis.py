"""Synthetic modalities from segmentation masks with a trained ModalityBank generator.

`fedmodal synthesize` writes every modality G knows for given cases' masks; `fedmodal
complete SITE_DIR` writes each case's missing modalities beside its real files as
`<case>_<modality>_synthetic.nii.gz`, which `build_manifest(..., include_synthetic=True)` and the
segmentation trainers pick up. Volumes are synthesised slice by slice on the same in-plane
geometry the training slices used (brain box, square pad, resize), then put back on the mask's
own grid and affine.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from fedmodal.atomic import save_atomically
from fedmodal.data.datasets import brain_crop_box, condition_map
from fedmodal.data.layouts import CaseFiles, synthetic_file
from fedmodal.data.loading import load_case

logger = logging.getLogger(__name__)

OUTPUT_SCALE = 1000.0  # synthetic intensities in [0, 1000] inside the brain, 0 outside (like BraTS)
CROP_MARGIN = 4  # the margin SynthesisSlices keeps around the brain box


@torch.no_grad()
def synthesize_volume(
    trainer, label: np.ndarray, brain: np.ndarray, modalities, batch: int = 32
) -> dict[str, np.ndarray]:
    """Synthetic volumes (X, Y, Z) in [-1, 1] (-1 outside the brain) for a RAS label map.

    Args:
        trainer: a loaded generator (`load_trained_generator`).
        label: canonical labels (X, Y, Z).
        brain: brain mask (X, Y, Z).
        modalities: modalities to synthesise.
        batch: slices per generator call.
    """
    size = trainer.config.image_size
    out = {m: np.full(label.shape, -1.0, dtype=np.float32) for m in modalities}
    if not brain.any():
        raise ValueError("the brain mask is empty: nothing to synthesise")
    xs, ys = brain_crop_box(brain, CROP_MARGIN)
    h, w = xs.stop - xs.start, ys.stop - ys.start
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    z_with_brain = [z for z in range(label.shape[2]) if brain[xs, ys, z].any()]
    for start in range(0, len(z_with_brain), batch):
        zs = z_with_brain[start : start + batch]
        lab = torch.from_numpy(np.ascontiguousarray(label[xs, ys][..., zs].transpose(2, 0, 1))).float()[:, None]
        brn = torch.from_numpy(np.ascontiguousarray(brain[xs, ys][..., zs].transpose(2, 0, 1))).float()[:, None]
        pad = (left, side - w - left, top, side - h - top)
        lab = F.interpolate(F.pad(lab, pad), size=(size, size), mode="nearest-exact")
        brn = F.interpolate(F.pad(brn, pad), size=(size, size), mode="nearest-exact") > 0.5
        cond = torch.stack([condition_map(lab[i, 0].long(), brn[i, 0]) for i in range(len(zs))]).float()
        fakes = trainer.synthesize(cond, tuple(modalities))
        for modality, fake in fakes.items():
            back = F.interpolate(fake, size=(side, side), mode="bilinear", align_corners=False)
            back = back[:, 0, top : top + h, left : left + w].numpy()  # (n, h, w)
            for i, z in enumerate(zs):
                out[modality][xs, ys, z] = back[i]
    for volume in out.values():
        volume[~brain] = -1.0
    return out


def _write_like(volume_ras: np.ndarray, brain_ras: np.ndarray, reference: Path, path: Path) -> None:
    """Write a RAS volume on the grid, orientation and affine of `reference` (atomically)."""
    ref = nib.load(str(reference))
    ref_ornt = nib.orientations.io_orientation(ref.affine)
    ras_ornt = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ras_ornt, ref_ornt)
    intensity = np.where(brain_ras, (volume_ras + 1.0) / 2.0 * OUTPUT_SCALE, 0.0).astype(np.float32)
    data = nib.orientations.apply_orientation(intensity, transform)
    if data.shape != ref.shape[:3]:
        raise ValueError(f"synthetic volume {data.shape} does not fit {reference} {ref.shape[:3]}")
    image = nib.Nifti1Image(data, ref.affine, header=ref.header)
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(1.0, 0.0)
    save_atomically(path, lambda temp: nib.save(image, str(temp)))


def synthesize_case(trainer, case: CaseFiles, modalities, out_paths: dict[str, Path], et_label=None) -> None:
    """Synthesise `modalities` for one case's seg and write each to `out_paths[modality]`."""
    if case.seg is None:
        raise ValueError(f"case {case.case_id} ({case.folder}) has no segmentation to synthesise from")
    loaded = load_case(case, modalities=case.modalities, et_label=et_label)
    brain = loaded["brain"] | (loaded["label"] > 0)
    volumes = synthesize_volume(trainer, loaded["label"], brain, modalities)
    for modality, volume in volumes.items():
        out_paths[modality].parent.mkdir(parents=True, exist_ok=True)
        _write_like(volume, brain, case.seg, out_paths[modality])


# ---------------------------------------------------------------------------- CLI
def add_synthesize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="a BraTS folder (site or test set) whose cases' masks drive G")
    parser.add_argument("--checkpoint", required=True, help="ModalityBank checkpoint folder (generator.pt + bank/)")
    parser.add_argument(
        "-o", "--out", required=True, help="output folder: <out>/<case>/<case>_<modality>_synthetic.nii.gz"
    )
    parser.add_argument("--modalities", nargs="*", default=None, help="modalities to write (default: all G knows)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases")
    parser.add_argument(
        "--with-seg",
        action="store_true",
        help="copy each case's seg beside its synthetic images: the output is a site to train on "
        "(--include-synthetic), e.g. the synthetic data set of ModalityBank's Tables I and II",
    )


def run_synthesize(args: argparse.Namespace) -> int:
    from fedmodal.data.manifest import build_manifest
    from fedmodal.modalitybank.generator_trainer import load_trained_generator

    trainer = load_trained_generator(args.checkpoint)
    modalities = tuple(args.modalities or trainer.known_modalities())
    unknown = sorted(set(modalities) - set(trainer.known_modalities()))
    if unknown:
        raise SystemExit(f"the generator in {args.checkpoint} knows {list(trainer.known_modalities())}, not {unknown}")
    manifest = build_manifest(args.root, need_seg=True)
    cases = manifest.cases[: args.limit] if args.limit else manifest.cases
    out = Path(args.out)
    for case in cases:
        paths = {m: synthetic_file(case, m) for m in modalities}
        paths = {m: out / case.case_id / p.name for m, p in paths.items()}
        synthesize_case(trainer, case, modalities, paths, et_label=manifest.et_label)
        if args.with_seg:
            shutil.copy2(case.seg, out / case.case_id / case.seg.name)
        print(f"{case.case_id}: wrote {', '.join(sorted(modalities))}")
    print(f"{len(cases)} cases synthesised into {out}")
    return 0


def add_complete_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site_dir", help="a site's BraTS folder; missing modalities are written beside the real ones")
    parser.add_argument("--checkpoint", required=True, help="ModalityBank checkpoint folder (generator.pt + bank/)")
    parser.add_argument("--overwrite", action="store_true", help="replace synthetic files written before")


def run_complete(args: argparse.Namespace) -> int:
    from fedmodal.data.manifest import build_manifest
    from fedmodal.modalitybank.generator_trainer import load_trained_generator

    trainer = load_trained_generator(args.checkpoint)
    known = trainer.known_modalities()
    manifest = build_manifest(args.site_dir, need_seg=True)
    written = 0
    for case in manifest.cases:
        missing = [m for m in known if m not in case.images and (args.overwrite or m not in case.synthetic)]
        if not missing:
            continue
        synthesize_case(
            trainer, case, missing, {m: synthetic_file(case, m) for m in missing}, et_label=manifest.et_label
        )
        written += len(missing)
        print(f"{case.case_id}: completed {', '.join(missing)}")
    lacking = [m for m in known if m not in manifest.modalities]
    print(
        f"{written} synthetic volumes written in {args.site_dir} ({len(manifest.cases)} cases; the site lacked "
        f"{lacking or 'nothing G knows'}). Train on it with include_synthetic / --include-synthetic."
    )
    return 0
