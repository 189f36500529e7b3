"""Which generator settings give images worth training on, in the default job's time?

Each variant is jobs/modalitybank's configuration with some settings changed (`--set` keys),
trained with every site's worker in this process (no NVFlare: the same steps the job takes,
`fedmodal.modalitybank.central`), then scored on the held-out real test cases' tumour slices
(MAE, PSNR, SSIM inside the brain) and drawn: mask | synthetic T1, T1c, T2, FLAIR | real ones,
for the same four test masks in every variant's grid.

    python benchmarks/bench_generator_settings.py --out benchmarks/results/generator_settings \
        --variant default: --variant bf16:server.precision=bf16,adversary.precision=bf16 \
        --variant 96px-bf16:image_size=96,server.precision=bf16,adversary.precision=bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

SITES = ["site-1", "site-2", "site-3"]
GRID_CASES = 4


def parse_variant(spec: str) -> tuple[str, dict]:
    """ "name:key=value,key=value" -> (name, {key: value}) with values read as JSON where they parse."""
    from fedmodal.config import parse_value

    name, _, assignments = spec.partition(":")
    values = {}
    for item in filter(None, assignments.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        values[key] = parse_value(text)
    return name, values


def grid(trainer, test_cases, et_label: int, path: Path, title: str) -> None:
    from fedmodal.brats import MODALITIES
    from fedmodal.data.datasets import SynthesisSlices
    from fedmodal.modalitybank.grids import mask_picture, save_grid

    slices = SynthesisSlices(test_cases, size=trainer.config.image_size, slices="tumour", et_label=et_label)
    # One tumour slice from each of the first cases: the middle one of the case's tumour slices.
    by_case: dict[str, list[int]] = {}
    for i, key in enumerate(slices.keys):
        by_case.setdefault(key.split("/")[0], []).append(i)
    chosen = [ids[len(ids) // 2] for ids in list(by_case.values())[:GRID_CASES]]
    items = [slices[i] for i in chosen]
    cond = torch.stack([torch.as_tensor(it["cond"]) for it in items]).float()
    fakes = trainer.synthesize(cond)
    known = [m for m in MODALITIES if m in fakes]
    rows = []
    for i, item in enumerate(items):
        real = np.asarray(item["image"])
        rows.append(
            [
                mask_picture(item["cond"]),
                *[fakes[m][i, 0].numpy() for m in known],
                *[real[MODALITIES.index(m)] for m in known],
            ]
        )
    titles = ["mask", *[f"synthetic {m}" for m in known], *[f"real {m}" for m in known]]
    save_grid(rows, titles, path, title)


def run_variant(name: str, values: dict, data: Path, out: Path, steps: int | None) -> dict:
    from fedmodal.data.manifest import build_manifest
    from fedmodal.jobs import job_settings
    from fedmodal.modalitybank.central import train_job
    from fedmodal.modalitybank.quality import evaluate_checkpoint

    if steps:
        values = {"pretrain_steps": steps, "bank_steps": steps, **values}
    settings = job_settings("modalitybank", **values)
    torch.manual_seed(settings["generator"].seed)
    with tempfile.TemporaryDirectory(prefix="mb-variant-") as work:
        started = time.perf_counter()
        trainer, _, timings = train_job(settings, {site: data / site for site in SITES}, Path(work) / "sites")
        seconds = time.perf_counter() - started
        checkpoint = trainer.save(Path(work) / "checkpoint")  # scored, then dropped with the folder
        test = build_manifest(data / "test", site="test", need_seg=True)
        scores = evaluate_checkpoint(checkpoint, test.cases, None, "tumour", test.et_label)
    grid(trainer, test.cases, test.et_label, out / f"{name}.png", f"{name}: {values or 'the job defaults'}")
    return {
        "settings": values,
        "train_seconds": seconds,
        "steps_per_second": {phase: len(t) / sum(t) for phase, t in timings.items()},
        "scores": scores,
        "mean_ssim": float(np.mean([s["ssim"]["mean"] for s in scores.values()])),
    }


def main(argv: list[str] | None = None) -> int:
    from fedmodal.data.phantoms import ensure_federation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--steps", type=int, default=None, help="steps per phase for every variant (default: each's)")
    parser.add_argument("--preset", default="modalitybank-missing")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generator_settings"))
    args = parser.parse_args(argv)
    data = ensure_federation(args.preset).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "variants.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for spec in args.variant:
        name, values = parse_variant(spec)
        print(f"variant {name}: {values}", flush=True)
        results[name] = run_variant(name, values, data, out, args.steps)
        results_file.write_text(json.dumps(results, indent=2))  # kept after every variant
    lines = ["| variant | train s | steps/s (pretrain, bank) | MAE | PSNR (dB) | SSIM (mean of modalities) |"]
    lines.append("|---|---|---|---|---|---|")
    for name, r in results.items():
        mae = np.mean([s["mae"]["mean"] for s in r["scores"].values()])
        psnr = np.mean([s["psnr"]["mean"] for s in r["scores"].values()])
        rates = ", ".join(f"{v:.2f}" for v in r["steps_per_second"].values())
        lines.append(f"| {name} | {r['train_seconds']:.0f} | {rates} | {mae:.3f} | {psnr:.2f} | {r['mean_ssim']:.3f} |")
    publish("\n".join(lines), results, str(out / "generator_settings"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
