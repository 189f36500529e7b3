"""`fedmodal synthesis-quality`: synthetic against real images on held-out full-modal cases.

For every test slice, G receives the real case's mask (label map + brain contour) and each
synthetic modality is scored against the real one inside the brain (MAE, PSNR, SSIM).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from fedmodal.brats import MODALITIES
from fedmodal.metrics import summarise, synthesis_scores

logger = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint: str | Path, cases, image_size: int | None, slices: str, et_label: int, batch: int = 32
) -> dict:
    """Per-modality synthesis scores of one checkpoint: modality -> metric -> {mean, std, n}."""
    from fedmodal.data.datasets import SynthesisSlices
    from fedmodal.modalitybank.generator_trainer import load_trained_generator

    trainer = load_trained_generator(checkpoint)
    size = image_size or trainer.config.image_size
    dataset = SynthesisSlices(cases, size=size, slices=slices, et_label=et_label)
    if len(dataset) == 0:
        raise ValueError(f"no {slices} slices in the {len(cases)} test cases")
    modalities = trainer.known_modalities()
    scores = {m: [] for m in modalities}
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        cond = torch.stack([torch.as_tensor(it["cond"]) for it in items]).float()
        fakes = trainer.synthesize(cond, modalities)
        for i, item in enumerate(items):
            brain = np.asarray(item["brain"])[0].astype(bool)
            if not brain.any():
                continue
            for m in modalities:
                channel = MODALITIES.index(m)
                if not bool(np.asarray(item["avail"])[channel]):
                    continue
                real = np.asarray(item["image"])[channel]
                scores[m].append(synthesis_scores(fakes[m][i, 0].numpy(), real, brain))
    return {m: summarise(s) for m, s in scores.items() if s}


def markdown_table(results: dict[str, dict]) -> str:
    """Rows = method x modality; columns MAE, PSNR (dB), SSIM as mean ± std."""
    lines = ["| method | modality | slices | MAE | PSNR (dB) | SSIM |", "|---|---|---|---|---|---|"]
    for method, per_modality in results.items():
        for modality, summary in per_modality.items():
            cells = [f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}" for k in ("mae", "psnr", "ssim")]
            lines.append(f"| {method} | {modality} | {summary['mae']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a ModalityBank checkpoint folder, optionally named (e.g. bank=runs/x/checkpoint); repeat to compare",
    )
    parser.add_argument("--test", default=None, help="held-out full-modal BraTS folder (default: the phantom test set)")
    parser.add_argument("--slices", default="tumour", choices=["tumour", "brain"], help="which axial slices to score")
    parser.add_argument("--out", default="synthesis_quality", help="output prefix: writes <out>.md and <out>.json")


def run(args: argparse.Namespace) -> int:
    from fedmodal.data.manifest import build_manifest

    if args.test is None:
        from fedmodal.data.phantoms import ensure_federation

        test_root = ensure_federation() / "test"
    else:
        test_root = Path(args.test)
    manifest = build_manifest(test_root, site="test", need_seg=True)
    results = {}
    for spec in args.checkpoint:
        name, _, directory = spec.rpartition("=")
        name = name or Path(directory).resolve().parent.name
        logger.info("scoring %s (%s) on %d cases of %s", name, directory, len(manifest.cases), test_root)
        results[name] = evaluate_checkpoint(directory, manifest.cases, None, args.slices, manifest.et_label)
    table = markdown_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(table)
    print(f"written: {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0
