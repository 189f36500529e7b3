"""ModalityBank's image quality, federated against the same training in one process.

Three generators' images of the held-out real test cases, scored inside the brain (MAE, PSNR,
SSIM per modality, the project's `synthesis_scores`):
- federated: jobs/modalitybank in `nvflare simulator` (3 sites), the job's own settings;
- central: the same generator, sites and steps with every site's worker in this process
  (`fedmodal.modalitybank.central`), no NVFlare;
- floor: no generator: for each test slice, the real training slice whose mask is closest
  (L1 between the conditioning maps), copied, per modality from a site that holds it.
And downstream: the default 2D whole-tumour U-Net trained on each generator's synthetic images of
every site's masks, scored on the real test set (Dice). It reports federated / central for SSIM
and Dice. The stages are those of `fedmodal reproduce` (resumable under --out).

    python benchmarks/bench_quality.py --out benchmarks/results/quality
    python benchmarks/bench_quality.py --steps 50 --epochs 10 --out /tmp/quality   # a short check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

SITES = ["site-1", "site-2", "site-3"]


def central_generator_stage(steps: dict[str, int], data: Path):
    """The job's generator trained in-process on the same sites for the same steps."""

    def run(folder: Path, rep) -> dict[str, Any]:
        from fedmodal.jobs import job_settings
        from fedmodal.modalitybank.central import train_job

        values = {"pretrain_steps": steps["pretrain_steps"], "bank_steps": steps["bank_steps"]}
        settings = job_settings("modalitybank", **values)
        trainer, _, timings = train_job(settings, {site: data / site for site in SITES}, folder / "sites")
        checkpoint = trainer.save(folder / "checkpoint")
        return {"checkpoint": str(checkpoint), "steps": {p: len(t) for p, t in timings.items()}}

    return run


def image_scores(checkpoint: str, test_cases, et_label: int) -> dict:
    from fedmodal.modalitybank.generator_trainer import load_trained_generator
    from fedmodal.modalitybank.quality import evaluate_checkpoint

    size = load_trained_generator(checkpoint).config.image_size
    return evaluate_checkpoint(checkpoint, test_cases, size, "tumour", et_label)


def floor_scores(data: Path, test_cases, size: int, et_label: int) -> dict:
    """The nearest-mask copy: per test slice and modality, the real training slice with the closest mask."""
    from fedmodal.brats import MODALITIES
    from fedmodal.data.datasets import SynthesisSlices
    from fedmodal.data.manifest import build_manifest
    from fedmodal.metrics import summarise, synthesis_scores

    pool = {}  # modality -> (conditioning maps (N, 2*S*S), images (N, S, S))
    for site in SITES:
        manifest = build_manifest(data / site, site=site)
        slices = SynthesisSlices(manifest.cases_in("train"), size=size, slices="tumour", modalities=manifest.modalities)
        items = [slices[i] for i in range(len(slices))]
        cond = np.stack([np.asarray(it["cond"]).ravel() for it in items])
        for m in manifest.modalities:
            images = np.stack([np.asarray(it["image"])[MODALITIES.index(m)] for it in items])
            before = pool.get(m)
            pool[m] = (
                (cond, images)
                if before is None
                else (np.concatenate([before[0], cond]), np.concatenate([before[1], images]))
            )
    test = SynthesisSlices(test_cases, size=size, slices="tumour", et_label=et_label)
    scores = {m: [] for m in pool}
    for i in range(len(test)):
        item = test[i]
        brain = np.asarray(item["brain"])[0].astype(bool)
        if not brain.any():
            continue
        cond = np.asarray(item["cond"]).ravel()
        for m, (conds, images) in pool.items():
            nearest = int(np.argmin(np.abs(conds - cond).sum(1)))
            real = np.asarray(item["image"])[MODALITIES.index(m)]
            scores[m].append(synthesis_scores(images[nearest], real, brain))
    return {m: summarise(scores[m]) for m in MODALITIES if scores.get(m)}


def main(argv: list[str] | None = None) -> int:
    from fedmodal.data.manifest import build_manifest
    from fedmodal.data.phantoms import ensure_federation
    from fedmodal.modalitybank.config import GeneratorConfig
    from fedmodal.reproduce import modalitybank as mb
    from fedmodal.reproduce.runner import DONE_FILE, Reproduction, Stage, data_input

    g = GeneratorConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per phase (default: the job's)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of each downstream U-Net (default 40)")
    parser.add_argument("--preset", default="modalitybank-missing", help="phantom federation (default: the job's)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    data = ensure_federation(args.preset).resolve()
    steps = {"pretrain_steps": args.steps or g.pretrain_steps, "bank_steps": args.steps or g.bank_steps}
    budget = {**steps, "rounds": args.epochs, "local_epochs": 1}
    out = Path(args.out)
    stages = [
        Stage("federated", mb.generator_stage("modalitybank", budget), 600),
        Stage("central", central_generator_stage(steps, data), 400),
    ]
    for name in ("federated", "central"):
        stages += [
            Stage(f"synthetic-{name}", mb.synthetic_stage(name, data), 60),
            Stage(
                f"seg-{name}",
                mb.seg_stage(lambda rep, n=name: rep.out / f"synthetic-{n}", SITES, budget, synthetic=True),
                600,
            ),
        ]
    rows = {"federated": "seg-federated", "central": "seg-central"}
    stages.append(Stage("evaluate", mb.evaluate_stage(rows, data / "test", "downstream WT Dice"), 90))
    inputs = {"benchmark": "quality", "budget": budget, "data": data_input(None, args.preset)}
    rep = Reproduction(out / "stages", stages, env={"FEDMODAL_DATA_ROOT": str(data)}, inputs=inputs)
    done = rep.run()

    test = build_manifest(data / "test", site="test", need_seg=True)
    images = {name: image_scores(done[name]["checkpoint"], test.cases, test.et_label) for name in rows}
    images["floor (nearest-mask copy)"] = floor_scores(data, test.cases, g.image_size, test.et_label)
    dice = {name: done["evaluate"][name]["WT"]["dice"] for name in rows}

    def mean_ssim(name: str) -> float:
        return float(np.mean([images[name][m]["ssim"]["mean"] for m in images[name]]))

    results = {
        "preset": args.preset,
        "steps_per_phase": steps,
        "downstream_epochs": args.epochs,
        "images": images,
        "downstream_wt_dice": dice,
        "federated_over_central": {
            "ssim": mean_ssim("federated") / mean_ssim("central"),
            "dice": dice["federated"]["mean"] / dice["central"]["mean"],
        },
        "stages": {k: json.loads((rep.out / k / DONE_FILE).read_text()).get("seconds") for k in done},
    }
    lines = [
        f"| generator | modality | MAE | PSNR (dB) | SSIM |  (test tumour slices, {args.preset})",
        "|---|---|---|---|---|",
    ]
    for name, per_modality in images.items():
        for m, s in per_modality.items():
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in ("mae", "psnr", "ssim")]
            lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    lines += ["", "| generator | downstream WT Dice (%) |", "|---|---|"]
    lines += [f"| {name} | {100 * d['mean']:.1f} ± {100 * d['std']:.1f} |" for name, d in dice.items()]
    ratio = results["federated_over_central"]
    lines += ["", f"federated / central: SSIM {ratio['ssim']:.3f}, downstream Dice {ratio['dice']:.3f}"]
    publish("\n".join(lines), results, str(out / "quality"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
