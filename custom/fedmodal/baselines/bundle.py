"""`fedmodal export-bundle`: a segmentation model as a MONAI bundle, and the pieces its config names.

The bundle (`configs/metadata.json`, `configs/inference.json`, `models/model.pt`,
`docs/README.md`) rebuilds `fedmodal.nets.segmentation.SegmentationNet` from the checkpoint's
arguments, loads the weights, and runs fedmodal's inference with MONAI parts: the case loader
and brain z-score `fedmodal evaluate` uses, the availability channels, MONAI's
`SliceInferer` (2D nets, axial slices) or `SlidingWindowInferer` (3D) with the model's window,
overlap and Gaussian weighting, sigmoid and threshold, then the regions become labels and
each case's seg is written as `fedmodal predict` writes it (own grid and orientation, the
release's labels and seg name). The bundle needs the fedmodal package installed.

Run it with ``python -m monai.bundle run --config_file BUNDLE/configs/inference.json
--dataset_dir CASE_OR_SITE --output_dir OUT`` (MONAI's command line needs `fire`), or from
Python with ``monai.bundle.run(config_file=..., dataset_dir=..., output_dir=...)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from fedmodal.brats import MODALITIES

BUNDLE_VERSION = "0.1.0"
MODEL_FILE = "models/model.pt"
# MONAI bundles' usual logging config (`ConfigWorkflow` reads `configs/logging.conf` when present).
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


# ----------------------------------------------------------------------------- what the config calls


def running_bundle_root(default: str = ".") -> str:
    """The folder of the bundle being run.

    MONAI's `ConfigWorkflow.run` puts the bundle root (the parent of the config's `configs/`
    folder) at `sys.path[1]` before it evaluates the run expressions; `--bundle_root` overrides.
    """
    for entry in sys.path[1:2]:
        if (Path(entry) / MODEL_FILE).is_file():
            return entry
    return default


def case_datalist(dataset_dir: str | Path) -> list[dict[str, Any]]:
    """The MONAI data dicts of a case folder or of every case of a site folder (any release naming).

    Each is `fedmodal.data.loading.case_record` plus "reference", the image whose grid the
    prediction is written on. Cases are checked first (`fedmodal.data.checks.check_case`).
    """
    from fedmodal.baselines.predict import find_cases
    from fedmodal.data.checks import check_case
    from fedmodal.data.loading import case_record

    if not dataset_dir:
        raise ValueError("no data: pass --dataset_dir CASE_OR_SITE_FOLDER")
    records = []
    for case in find_cases(dataset_dir):
        check_case(case, Path(dataset_dir).name, need_seg=False)
        records.append({**case_record(case), "reference": str(case.images[case.modalities[0]])})
    return records


class NetworkInputd(MapTransform):
    """The network input: the 4 image channels with those outside `modalities` zeroed, then the
    4 availability planes (`fedmodal.baselines.data.network_input`).

    Args:
        keys: the image key.
        modalities: modalities the model is fed; a held one outside them counts as missing.
        mask_channels: append the availability planes (the network's `mask_channels`).
        avail_key: the availability key from `LoadBraTSCased`.
    """

    def __init__(
        self,
        keys: Sequence[str] | str = "image",
        modalities: Sequence[str] = MODALITIES,
        mask_channels: bool = True,
        avail_key: str = "avail",
    ) -> None:
        super().__init__(keys)
        self.used = torch.tensor([m in set(modalities) for m in MODALITIES])
        self.mask_channels, self.avail_key = bool(mask_channels), avail_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from fedmodal.baselines.data import network_input

        d = dict(data)
        d[self.avail_key] = torch.as_tensor(d[self.avail_key]).bool() & self.used
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).as_subclass(torch.Tensor).float()
            d[key] = network_input(image[None], d[self.avail_key][None], self.mask_channels)[0]
        return d


class RegionsToLabeld(MapTransform):
    """Binary region channels (R, X, Y, Z) -> a canonical label map (X, Y, Z), inside the brain only
    (`fedmodal.baselines.data.regions_to_label`: WT -> 2, then TC -> 1, then ET -> 3)."""

    def __init__(self, keys: Sequence[str] | str = "pred", regions: Sequence[str] = ("WT",), brain_key: str = "brain"):
        super().__init__(keys)
        self.regions, self.brain_key = tuple(regions), brain_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from fedmodal.baselines.data import regions_to_label

        d = dict(data)
        brain = torch.as_tensor(d[self.brain_key]).as_subclass(torch.Tensor).bool().cpu()
        brain = brain[0] if brain.ndim == 4 else brain  # (1, X, Y, Z) from LoadBraTSCased
        for key in self.key_iterator(d):
            masks = torch.as_tensor(d[key]).as_subclass(torch.Tensor).bool().cpu() & brain[None]
            d[key] = regions_to_label(masks, self.regions)
        return d


class SaveBraTSSegd(MapTransform):
    """Write a canonical RAS label map as the case's BraTS seg, as `fedmodal predict` does
    (`fedmodal.data.segfiles.write_seg`: the reference image's grid and orientation, the
    release's labels, `<output_dir>/<the release's seg name>`, atomically)."""

    def __init__(self, keys: Sequence[str] | str = "pred", output_dir: str | Path = "eval", description: str = ""):
        super().__init__(keys)
        self.output_dir, self.description = Path(output_dir), description

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from fedmodal.data.segfiles import seg_file_name, write_seg

        d = dict(data)
        release, case_id = d["release"], d["case_id"]
        for key in self.key_iterator(d):
            name = seg_file_name(case_id, release)
            d[f"{key}_file"] = str(write_seg(d[key], d["reference"], release, self.output_dir / name, self.description))
        return d


@torch.no_grad()
def infer(dataset, network: torch.nn.Module, inferer, postprocessing, device: str | torch.device = "cpu") -> list[str]:
    """Run the bundle: each case's input through `inferer` and `network`, then `postprocessing`
    (which writes the seg). Returns the files written."""
    network.eval()
    written = []
    for item in dataset:
        x = torch.as_tensor(item["image"]).as_subclass(torch.Tensor)[None].to(device)
        item["pred"] = inferer(x, network)[0].as_subclass(torch.Tensor).cpu()
        written.append(postprocessing(item)["pred_file"])
        print(f"wrote {written[-1]}", flush=True)
    return written


# ----------------------------------------------------------------------------- export


def inference_config(trainer, modalities: Sequence[str]) -> dict[str, Any]:
    """The bundle's `inference.json` for a trainer's network and inference settings."""
    cfg, net = trainer.cfg, trainer.net.config()
    window = {"roi_size": list(cfg.patch_size), "sw_batch_size": cfg.sw_batch_size, "overlap": cfg.sw_overlap}
    if cfg.spatial_dims == 2:
        inferer = {"_target_": "SliceInferer", "spatial_dim": 2, **window, "mode": "gaussian"}
    else:
        inferer = {"_target_": "SlidingWindowInferer", **window, "mode": "gaussian"}
    return {
        "imports": ["$import torch", "$import fedmodal.baselines.bundle", "$import fedmodal"],
        "bundle_root": "$fedmodal.baselines.bundle.running_bundle_root()",
        "dataset_dir": "",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "modalities": list(modalities),
        "regions": list(cfg.regions),
        "threshold": cfg.threshold,
        "network_def": {"_target_": "fedmodal.nets.segmentation.SegmentationNet", **net},
        "network": "$@network_def.to(@device)",
        "checkpoint": f"$@bundle_root + '/{MODEL_FILE}'",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "datalist": "$fedmodal.baselines.bundle.case_datalist(@dataset_dir)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "fedmodal.data.loading.LoadBraTSCased"},
                {"_target_": "fedmodal.data.transforms.ZScoreOverBraind", "keys": "image"},
                {
                    "_target_": "fedmodal.baselines.bundle.NetworkInputd",
                    "keys": "image",
                    "modalities": "@modalities",
                    "mask_channels": bool(net["mask_channels"]),
                },
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": "@threshold"},
                {"_target_": "fedmodal.baselines.bundle.RegionsToLabeld", "keys": "pred", "regions": "@regions"},
                {
                    "_target_": "fedmodal.baselines.bundle.SaveBraTSSegd",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "description": f"fedmodal bundle prediction, regions {'/'.join(cfg.regions)}",
                },
            ],
        },
        "run": [
            "$@load_weights",
            "$fedmodal.baselines.bundle.infer(@dataset, @network, @inferer, @postprocessing, @device)",
        ],
    }


def metadata(trainer, modalities: Sequence[str], source: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's `metadata.json` (MONAI's bundle metadata fields)."""
    import monai
    import nibabel

    from fedmodal.baselines.predict import label_legend

    cfg = trainer.cfg
    in_channels = [*MODALITIES, *(f"{m} available" for m in MODALITIES)] if cfg.mask_channels else list(MODALITIES)
    return {
        "schema": META_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by fedmodal export-bundle from {Path(source).name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"fedmodal": _fedmodal_version(), "nibabel": nibabel.__version__},
        "name": f"fedmodal brain tumour segmentation ({'/'.join(cfg.regions)})",
        "task": "Brain tumour segmentation of BraTS multi-modal MRI with missing modalities",
        "description": (
            f"A fedmodal SegmentationNet ({cfg.spatial_dims}D {cfg.arch}) predicting {', '.join(cfg.regions)} from "
            f"{', '.join(modalities)}; missing modalities are zero channels flagged unavailable."
        ),
        "authors": "fedmodal",
        "copyright": "see the fedmodal project",
        "intended_use": "research only, not for clinical use",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": len(in_channels),
                    "spatial_shape": list(cfg.patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): name for i, name in enumerate(in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(cfg.regions),
                    "spatial_shape": list(cfg.patch_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(i): r for i, r in enumerate(cfg.regions)},
                }
            },
        },
        "fedmodal": {
            "source": str(source),
            "net": trainer.net.config(),
            "modalities": list(modalities),
            "labels": {
                r: {str(k): v for k, v in label_legend(cfg.regions, r).items()} for r in ("brats2021", "brats2023")
            },
            "meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list))},
        },
    }


def _fedmodal_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedmodal")
    except PackageNotFoundError:
        return "unknown"


def readme(trainer, modalities: Sequence[str], source: str) -> str:
    """The bundle's `docs/README.md`."""
    from fedmodal.baselines.predict import label_legend

    cfg = trainer.cfg
    legend = "\n".join(
        f"- {release}: " + ", ".join(f"{k} = {v}" for k, v in label_legend(cfg.regions, release).items())
        for release in ("brats2021", "brats2023")
    )
    return f"""# fedmodal brain tumour segmentation bundle

Exported by `fedmodal export-bundle` from `{Path(source).name}`: a {cfg.spatial_dims}D fedmodal
`SegmentationNet` ({cfg.arch}, channels {list(cfg.channels)}) predicting {", ".join(cfg.regions)} from
{", ".join(modalities)}. Research use only.

## Requirements

The config builds fedmodal's classes, so the **fedmodal package must be installed** (with MONAI,
PyTorch and nibabel, its dependencies). MONAI's command line also needs `fire`
(`pip install fire`, or `monai[fire]`).

## Run

```
python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
    --dataset_dir CASE_OR_SITE_FOLDER --output_dir OUT
```

or from Python: `monai.bundle.run(config_file="BUNDLE/configs/inference.json", dataset_dir=..., output_dir=...)`.
The bundle finds its own folder (MONAI puts it on `sys.path` when it runs); pass `--bundle_root BUNDLE`
if you load the config some other way. `--device` picks the device (default CUDA when present).

`dataset_dir` is one BraTS case folder or a folder of cases in any release's naming (2018-2021:
`BraTS2021_00000/BraTS2021_00000_t1.nii.gz`...; 2023+: `BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz`...).

## What it does (as `fedmodal predict`)

1. Reads the case's modalities in RAS orientation; a missing one is a zero channel with availability 0.
   Only {", ".join(modalities)} are fed; others the case holds are treated as missing.
2. Z-scores each modality over the brain (non-zero in any modality, holes filled).
3. Appends the four availability planes and runs {"MONAI `SliceInferer` over axial slices" if cfg.spatial_dims == 2 else "MONAI `SlidingWindowInferer`"}
   (window {list(cfg.patch_size)}, overlap {cfg.sw_overlap}, Gaussian weights), sigmoid, threshold {cfg.threshold},
   keeps the brain only.
4. Regions become BraTS labels (WT -> 2, then TC -> 1, then ET), written as uint8
   `OUT/<case>_seg.nii.gz` (2023+: `OUT/<case>-seg.nii.gz`) on the case's own grid, affine and
   orientation, in the case release's convention:

{legend}

Inference runs in fp32.
"""


def export_bundle(
    model: str | Path,
    out_dir: str | Path,
    net_args: Mapping[str, Any] | None = None,
    modalities: Sequence[str] | None = None,
) -> Path:
    """Write a MONAI bundle of a segmentation checkpoint into `out_dir` (each file atomically):
    `configs/{metadata.json,inference.json,logging.conf}`, `models/model.pt` (the state dict),
    `docs/README.md`.

    Args:
        model: a fedmodal checkpoint or an NVFlare global model file.
        out_dir: the bundle folder.
        net_args: `SegmentationNet` args for an NVFlare file moved out of its app folder.
        modalities: modalities the bundle feeds (default: the checkpoint's trained ones, else all).
    """
    from fedmodal.atomic import save_atomically, write_json_atomically, write_text_atomically
    from fedmodal.baselines.predict import used_modalities
    from fedmodal.baselines.trainer import trainer_from_checkpoint

    trainer, meta = trainer_from_checkpoint(model, net_args=net_args)
    used = used_modalities(meta, modalities)
    out = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in trainer.net.state_dict().items()}
    save_atomically(out / MODEL_FILE, lambda temp: torch.save(state, temp))
    write_json_atomically(out / "configs" / "metadata.json", metadata(trainer, used, str(model), meta))
    write_json_atomically(out / "configs" / "inference.json", inference_config(trainer, used))
    write_text_atomically(out / "docs" / "README.md", readme(trainer, used, str(model)))
    write_text_atomically(out / "configs" / "logging.conf", LOGGING_CONF)
    return out


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedmodal export-bundle`."""
    parser.add_argument("model", help="fedmodal checkpoint (best.pt) or NVFlare model file (FL_global_model.pt)")
    parser.add_argument("-o", "--out", required=True, help="the bundle folder to write")
    parser.add_argument(
        "--modalities", nargs="+", default=None, metavar="MOD", help="modalities to feed (default: the model's)"
    )
    parser.add_argument(
        "--net-config",
        default=None,
        help="SegmentationNet args (JSON file or string) for NVFlare model files moved out of their app",
    )


def run(args: argparse.Namespace) -> int:
    from fedmodal.baselines.predict import read_net_config

    out = export_bundle(args.model, args.out, read_net_config(args.net_config), args.modalities)
    print(f"wrote MONAI bundle {out}")
    print(
        f"run: python -m monai.bundle run --config_file {out / 'configs' / 'inference.json'} --dataset_dir CASE --output_dir OUT"
    )
    print(json.dumps(json.loads((out / "configs" / "metadata.json").read_text())["fedmodal"]["labels"]))
    return 0
