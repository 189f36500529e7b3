"""`fedmodal evaluate`: score segmentation checkpoints on a test folder, in the papers' table layout.

Each model's row holds Dice, sensitivity, specificity and HD95 (mean ± std over cases) per
region, as in the ModalityBank / FedMEPD tables. Writes `results.md`, `results.csv` (one line
per model, region and metric), `cases.csv` (per case) and `results.json` (everything).

A model is fed the modalities it was trained with (recorded in fedmodal checkpoints); the
others are zeroed and flagged missing, as at a site lacking them. `--modalities` overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmodal.amp import PRECISIONS
from fedmodal.atomic import open_atomically, write_text_atomically
from fedmodal.brats import MODALITIES
from fedmodal.metrics import (
    REGIONS,
    TABLE_METRICS,
    TUMOUR_RULES,
    format_table,
    segmentation_scores,
    summarise,
    tumour_rules,
)

logger = logging.getLogger(__name__)

EMPTY_ROW = "Empty prediction"


def parse_model_args(values: Sequence[str]) -> dict[str, Path]:
    """["FedAvg=run/best.pt", "site1.pt"] -> {"FedAvg": ..., "site1": ...} (names kept in order)."""
    models: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            path, name = value, Path(value).stem
            if name in ("best", "last", "best_FL_global_model", "FL_global_model"):
                name = f"{Path(value).parent.name}/{Path(value).stem}"
        if name in models:
            raise ValueError(f"two models named {name!r}; name them NAME=PATH")
        models[name] = Path(path)
    return models


def empty_scores(
    volumes: Sequence[Mapping[str, Any]], regions: Sequence[str], lesion_wise=None
) -> list[dict[str, Any]]:
    """Scores of an all-background prediction: the floor every model must clear."""
    out = []
    for volume in volumes:
        label = volume["label"].numpy()
        scores = segmentation_scores(
            np.zeros_like(label), label, volume["spacing"], et_label=3, regions=regions, lesion_wise=lesion_wise
        )
        out.append({"case_id": volume["case_id"], "scores": scores, "seconds": 0.0})
    return out


def score_models(
    models: Mapping[str, Path],
    volumes: Sequence[Mapping[str, Any]],
    modalities: Sequence[str] | None = None,
    device: str = "cpu",
    net_args: Mapping[str, Any] | None = None,
    with_empty: bool = False,
    lesion_wise=None,
    precision: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Score each checkpoint on the volumes.

    Args:
        models: row name -> checkpoint path.
        volumes: from `fedmodal.baselines.data.load_volumes`.
        modalities: input modalities for every model; None: each model's trained ones
            (checkpoint meta "trained_modalities"), else all the volumes hold.
        device: torch device.
        net_args: `SegmentationNet` args for NVFlare model files outside their app folder.
        with_empty: add an "Empty prediction" row.
        lesion_wise: a tumour type's `LesionRules`: add the BraTS 2023+ lesion-wise scores.
        precision: inference arithmetic (`fedmodal.amp`; "auto": mixed precision on CUDA).

    Returns:
        row name -> {"path", "modalities", "regions", "cases": per-case results, "summary"}.
    """
    from fedmodal.baselines.trainer import trainer_from_checkpoint

    rows: dict[str, dict[str, Any]] = {}
    for name, path in models.items():
        start = time.time()
        trainer, meta = trainer_from_checkpoint(path, device=device, net_args=net_args, precision=precision)
        used = tuple(modalities) if modalities else tuple(meta.get("trained_modalities") or MODALITIES)
        results = trainer.score(volumes, modalities=used, lesion_wise=lesion_wise)
        rows[name] = {
            "path": str(path),
            "modalities": list(used),
            "regions": list(trainer.cfg.regions),
            "meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, list, dict, bool))},
            "cases": results,
            "summary": summarise([r["scores"] for r in results]),
            "seconds": round(time.time() - start, 2),
        }
        logger.info("scored %s on %d cases in %.1fs", name, len(results), time.time() - start)
    if with_empty:
        regions = sorted({r for row in rows.values() for r in row["regions"]}, key=REGIONS.index) or list(REGIONS)
        results = empty_scores(volumes, regions, lesion_wise)
        rows[EMPTY_ROW] = {
            "path": None,
            "modalities": [],
            "regions": regions,
            "meta": {},
            "cases": results,
            "summary": summarise([r["scores"] for r in results]),
            "seconds": 0.0,
        }
    return rows


def markdown_tables(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table per set of regions (WT-only 2D models and WT/TC/ET models apart)."""
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for name, row in rows.items():
        groups.setdefault(tuple(row["regions"]), {})[name] = row["summary"]
    # The empty row belongs in every table: score it on each group's regions.
    empty = rows.get(EMPTY_ROW)
    parts = []
    for regions, summaries in groups.items():
        if empty is not None and EMPTY_ROW not in summaries:
            summaries[EMPTY_ROW] = {r: empty["summary"][r] for r in regions if r in empty["summary"]}
        parts.append(format_table(summaries, fmt="markdown", regions=list(regions)))
    return "\n\n".join(parts)


def write_results(
    rows: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    title: str = "",
    context: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write results.md, results.csv, cases.csv and results.json into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        k: out / f
        for k, f in (("md", "results.md"), ("csv", "results.csv"), ("cases", "cases.csv"), ("json", "results.json"))
    }

    lines = [f"# {title}" if title else "# Segmentation results", ""]
    if context:
        lines += [f"- {k}: {v}" for k, v in context.items()] + [""]
    lines += [markdown_tables(rows), ""]
    lines += [
        "Inputs per model: " + "; ".join(f"{n}: {', '.join(r['modalities']) or '-'}" for n, r in rows.items()),
        "",
    ]
    write_text_atomically(paths["md"], "\n".join(lines))  # ends in "\n": the last line is empty

    with open_atomically(paths["csv"], newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "region", "metric", "mean", "std", "n"])
        for name, row in rows.items():
            for region, metrics in row["summary"].items():
                for metric in TABLE_METRICS:
                    if metric in metrics:
                        s = metrics[metric]
                        writer.writerow([name, region, metric, f"{s['mean']:.6g}", f"{s['std']:.6g}", s["n"]])

    with open_atomically(paths["cases"], newline="") as f:
        writer = csv.writer(f)
        columns = [
            m
            for m in TABLE_METRICS
            if any(m in s for r in rows.values() for c in r["cases"] for s in c["scores"].values())
        ]
        writer.writerow(["method", "case_id", "region", *columns])
        for name, row in rows.items():
            for case in row["cases"]:
                for region, metrics in case["scores"].items():
                    writer.writerow([name, case["case_id"], region, *(f"{metrics[m]:.6g}" for m in columns)])

    payload = {
        "title": title,
        "context": dict(context or {}),
        "models": {
            name: {
                **{k: v for k, v in row.items() if k != "cases"},
                "cases": [{k: v for k, v in c.items() if k != "prediction"} for c in row["cases"]],
            }
            for name, row in rows.items()
        },
    }
    write_text_atomically(paths["json"], json.dumps(payload, indent=2, default=float) + "\n")
    return paths


# ----------------------------------------------------------------------------- command line


def default_test_root() -> Path:
    """The held-out full-modal test folder of the default phantom federation."""
    from fedmodal.data.phantoms import ensure_federation

    return ensure_federation() / "test"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedmodal evaluate`."""
    parser.add_argument(
        "--model",
        "-m",
        nargs="+",
        required=True,
        metavar="[NAME=]PATH",
        help="checkpoint(s): fedmodal best.pt/last.pt, or an NVFlare server model file "
        "(best_FL_global_model.pt) inside its app folder; NAME= labels the table row",
    )
    parser.add_argument(
        "--data", default=None, help="test folder of BraTS cases (default: the phantom federation's held-out test/)"
    )
    parser.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val", "test"],
        help="which of the folder's cases to score (default all: the folder is a test set)",
    )
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        metavar="MOD",
        help="input modalities for every model (default: each model's trained modalities)",
    )
    parser.add_argument(
        "--include-synthetic", action="store_true", help="fill missing modalities from <case>_<mod>_synthetic files"
    )
    parser.add_argument(
        "--net-config",
        default=None,
        help="SegmentationNet args (JSON file or string) for NVFlare model files moved out of their app",
    )
    parser.add_argument("--with-empty", action="store_true", help="add an all-background reference row")
    parser.add_argument(
        "--lesion-wise",
        nargs="?",
        const="GLI",
        default=None,
        type=str.upper,
        choices=sorted(TUMOUR_RULES),
        metavar="TUMOUR",
        help="add the BraTS 2023+ lesion-wise Dice and HD95 with the rules of a tumour type: "
        "GLI (glioma, the default), SSA, PED, MEN or MET",
    )
    parser.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    parser.add_argument("--title", default="", help="title of results.md")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ...")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: mixed precision on CUDA")
    parser.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    from fedmodal.baselines.data import load_site, load_volumes
    from fedmodal.brats import canonical_modality
    from fedmodal.fl.site import select_device

    device = select_device(args.device, args.num_threads)
    data_root = Path(args.data) if args.data else default_test_root()
    site = load_site(data_root, include_synthetic=args.include_synthetic)
    cases = site.cases(args.split)
    if not cases:
        raise SystemExit(f"no {args.split} case with a segmentation under {data_root}")
    modalities = (
        tuple(m for m in MODALITIES if m in {canonical_modality(x) for x in args.modalities})
        if args.modalities
        else None
    )
    net_args = None
    if args.net_config:
        text = Path(args.net_config).read_text() if Path(args.net_config).is_file() else args.net_config
        net_args = json.loads(text)
    lesion_wise = tumour_rules(args.lesion_wise) if args.lesion_wise else None
    volumes = load_volumes(cases)
    rows = score_models(
        parse_model_args(args.model),
        volumes,
        modalities,
        str(device),
        net_args,
        args.with_empty,
        lesion_wise,
        args.precision,
    )
    context = {
        "data": str(data_root),
        "split": args.split,
        "cases": len(cases),
        "held modalities": ", ".join(site.modalities),
    }
    if args.lesion_wise:
        context["lesion-wise"] = f"BraTS 2023+ rules for {args.lesion_wise} ({lesion_wise})"
    paths = write_results(rows, args.out, args.title or f"Segmentation on {data_root.name}", context)
    print(markdown_tables(rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
