"""`fedmodal predict`: write a segmentation model's predictions as BraTS seg files.

The model is a fedmodal checkpoint or an NVFlare global model file (`trainer_from_checkpoint`).
The input is one case folder or a site folder in any BraTS release's naming. Each case is read
as `fedmodal evaluate` reads it (RAS, four channels, missing modalities zero with availability
0, z-scored over the brain) and predicted as evaluate scores it; the label map is written back
on the case's own grid, affine and orientation, in its release's label convention, as
`OUT/<the release's seg name>` (`BraTS2021_00000_seg.nii.gz`, `BraTS-GLI-00000-000-seg.nii.gz`).

Labels: a WT/TC/ET model writes BraTS labels (1 necrosis / non-enhancing core, 2 oedema, ET as
4 for 2018-2021 and 3 for 2023+). A model without ET or TC cannot split the core, so the
outermost region it knows takes the label that claims no more than it knows: a WT-only model
writes every tumour voxel as 2, the only BraTS label inside WT but outside TC and ET, so the
file scores as its WT and claims no core or enhancing tumour; a WT+TC model writes 2 for
oedema and 1 for the (unsplit) core. `predictions.json` beside the files says so per run, and
each file's header `descrip` names the model's regions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmodal.amp import PRECISIONS
from fedmodal.atomic import save_atomically, write_json_atomically
from fedmodal.brats import ET_LABEL, MODALITIES, canonical_modality
from fedmodal.data.errors import DataError
from fedmodal.data.layouts import GRADES, CaseFiles

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.json"


def find_cases(path: str | Path) -> list[CaseFiles]:
    """The cases under `path`: itself when it is a BraTS case folder, else every case the data
    layer finds in the site folder (any release's naming)."""
    from fedmodal.data.discovery import discover_cases, read_case_folder
    from fedmodal.data.layouts import release_of_folder

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no folder at {path}")
    release = release_of_folder(path.name)
    if release:
        grade = path.parent.name if path.parent.name in GRADES else None
        return [read_case_folder(path, release, grade)]
    return discover_cases(path)


def label_legend(regions: Sequence[str], release: str) -> dict[int, str]:
    """On-disk label value -> what it means, for a model predicting `regions`, in `release`'s convention."""
    regions = tuple(regions)
    legend = {}
    if "WT" in regions:
        if regions == ("WT",):
            legend[2] = "whole tumour (the model predicts WT only)"
        else:
            legend[2] = "oedema" if "TC" in regions else "whole tumour outside enhancing tumour"
    if "TC" in regions:
        legend[1] = "necrosis / non-enhancing core" if "ET" in regions else "tumour core (the model does not split ET)"
    if "ET" in regions:
        legend[ET_LABEL[release]] = "enhancing tumour"
    return dict(sorted(legend.items()))


def used_modalities(meta: Mapping[str, Any], modalities: Sequence[str] | None = None) -> tuple[str, ...]:
    """The modalities fed to a model: `modalities` if given, else the checkpoint's trained ones, else all."""
    wanted = {canonical_modality(m) for m in (modalities or meta.get("trained_modalities") or MODALITIES)}
    return tuple(m for m in MODALITIES if m in wanted)


def predict_case(trainer, case: CaseFiles, modalities: Sequence[str], out_dir: str | Path, site: str | None = None):
    """Predict one case and write its seg into `out_dir`; return (path, record).

    Raises:
        DataError: an unusable case (unreadable, mismatched grids, NaN, empty, or holding none
            of `modalities`).
    """
    from fedmodal.baselines.data import load_volumes
    from fedmodal.data.checks import check_case
    from fedmodal.data.segfiles import seg_file_name, write_seg

    check_case(case, site, need_seg=False)
    fed = tuple(m for m in case.modalities if m in modalities)
    if not fed:
        raise DataError(site, case.case_id, case.folder, f"holds none of the model's modalities {list(modalities)}")
    volume = load_volumes([case])[0]
    avail = volume["avail"] & torch.tensor([m in modalities for m in MODALITIES])
    label = trainer.predict(volume["image"], avail, volume["brain"])
    regions = "/".join(trainer.cfg.regions)
    path = write_seg(
        label,
        case.images[case.modalities[0]],
        case.release,
        Path(out_dir) / seg_file_name(case.case_id, case.release),
        description=f"fedmodal prediction, regions {regions}",
    )
    values, counts = np.unique(label, return_counts=True)
    record = {
        "case_id": case.case_id,
        "release": case.release,
        "file": path.name,
        "held_modalities": list(case.modalities),
        "fed_modalities": list(fed),
        "voxels": {str(ET_LABEL[case.release] if v == 3 else v): int(n) for v, n in zip(values, counts) if v},
    }
    return path, record


def draw_montage(case: CaseFiles, seg: str | Path, out_png: str | Path) -> Path:
    """A `fedmodal montage` PNG of a case's images with a predicted seg.

    Montage draws a case folder, so the images and the prediction are linked (copied where
    links are refused) into a temporary folder named after the case; the case's own seg, if
    any, is left out.
    """
    from fedmodal.data.montage import montage
    from fedmodal.data.segfiles import seg_file_name

    with tempfile.TemporaryDirectory(prefix="fedmodal-montage-") as temp:
        folder = Path(temp) / case.case_id
        folder.mkdir()
        links = [(p, folder / p.name) for p in case.images.values()]
        links.append((Path(seg), folder / seg_file_name(case.case_id, case.release)))
        for source, link in links:
            try:
                os.symlink(Path(source).resolve(), link)
            except OSError:
                shutil.copyfile(source, link)
        return save_atomically(out_png, lambda tmp: montage(folder, tmp))


def predict_folder(
    model: str | Path,
    input_dir: str | Path,
    out_dir: str | Path,
    modalities: Sequence[str] | None = None,
    net_args: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    on_error: str = "skip",
    with_montage: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Predict every case of `input_dir` (a case or a site folder) with `model`, into `out_dir`.

    Args:
        model: a fedmodal checkpoint or an NVFlare global model file.
        input_dir: a BraTS case folder or a site folder of them.
        out_dir: where seg files, `predictions.json` (and montages) go.
        modalities: modalities to feed (default: the checkpoint's trained ones, else all).
        net_args: `SegmentationNet` args for an NVFlare file moved out of its app folder.
        device: torch device.
        on_error: "skip" (report in `predictions.json` and go on) or "stop" (raise) for a bad case.
        with_montage: also write `<case id>.png` montages of each prediction.
        **overrides: inference settings (`threshold`, `sw_overlap`, `precision`...).

    Returns:
        the `predictions.json` content.
    """
    from fedmodal.baselines.trainer import trainer_from_checkpoint

    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    start = time.time()
    trainer, meta = trainer_from_checkpoint(model, device=device, net_args=net_args, **overrides)
    used = used_modalities(meta, modalities)
    cases = find_cases(input_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    site = Path(input_dir).name
    records, problems = [], []
    for case in cases:
        try:
            path, record = predict_case(trainer, case, used, out_dir, site)
        except DataError as error:
            if on_error == "stop":
                raise
            logger.warning("skipped %s", error)
            problems.append(error.to_record())
            continue
        if with_montage:
            record["montage"] = draw_montage(case, path, out_dir / f"{case.case_id}.png").name
        records.append(record)
        logger.info("wrote %s (%d of %d)", path, len(records), len(cases))
    releases = sorted({c.release for c in cases})
    report = {
        "model": str(model),
        "input": str(input_dir),
        "regions": list(trainer.cfg.regions),
        "modalities": list(used),
        "labels": {r: {str(k): v for k, v in label_legend(trainer.cfg.regions, r).items()} for r in releases},
        "grid": "each file on its case's own grid, affine and orientation (those of the case's images)",
        "settings": {
            **{k: getattr(trainer.cfg, k) for k in ("threshold", "sw_overlap", "patch_size")},
            "precision": trainer.amp.precision,  # what ran, "auto" resolved for the device
        },
        "cases": records,
        "problems": problems,
        "seconds": round(time.time() - start, 2),
    }
    write_json_atomically(out_dir / PREDICTIONS_FILE, report, default=str)
    return report


# ----------------------------------------------------------------------------- command line


def read_net_config(value: str | None) -> dict[str, Any] | None:
    """`--net-config`: a JSON file or a JSON string of `SegmentationNet` args."""
    if not value:
        return None
    return json.loads(Path(value).read_text() if Path(value).is_file() else value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedmodal predict`."""
    parser.add_argument("model", help="fedmodal checkpoint (best.pt) or NVFlare model file (FL_global_model.pt)")
    parser.add_argument("input", help="a BraTS case folder, or a site folder of cases (any release naming)")
    parser.add_argument("-o", "--out", required=True, help="output folder for the seg files and predictions.json")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        metavar="MOD",
        help="modalities to feed (default: the model's trained modalities; others are zero, availability 0)",
    )
    parser.add_argument(
        "--net-config",
        default=None,
        help="SegmentationNet args (JSON file or string) for NVFlare model files moved out of their app",
    )
    parser.add_argument("--on-error", default="skip", choices=["skip", "stop"], help="a bad case: skip it or stop")
    parser.add_argument("--montage", action="store_true", help="also draw <case id>.png with the predicted seg")
    parser.add_argument("--threshold", type=float, default=None, help="sigmoid threshold (default: the model's)")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ...")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: mixed precision on CUDA")
    parser.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    from fedmodal.fl.site import select_device

    overrides = {k: v for k, v in (("threshold", args.threshold), ("sw_overlap", args.overlap)) if v is not None}
    overrides["precision"] = args.precision
    report = predict_folder(
        args.model,
        args.input,
        args.out,
        modalities=args.modalities,
        net_args=read_net_config(args.net_config),
        device=select_device(args.device, args.num_threads),
        on_error=args.on_error,
        with_montage=args.montage,
        **overrides,
    )
    for record in report["cases"]:
        print(f"{record['case_id']}: {Path(args.out) / record['file']}  (fed {', '.join(record['fed_modalities'])})")
    for problem in report["problems"]:
        print(f"skipped {problem['case']}: {problem['problem']}")
    print(f"labels: {json.dumps(report['labels'])}")
    return 1 if report["problems"] else 0
