"""ModalityBank: what a curious server could learn from the sites' gradients, and what DP costs.

The server keeps every fake it sent for a sample key and every gradient row it got back, and
reconstructs that key's real slice (`fedmodal.modalitybank.leakage`). The site is the real one:
site-1's `SiteWorker` on the phantom federation at the job's image size (64) with the default
`AdversaryConfig`, reached only through step payloads. Attacks, each on the same few keys:

- bisection: crafted fakes (the server controls G's output), each pixel's interval halved by the
  sign of the returned row. It stops refining at float32 resolution (24 visits), so its 100-visit
  score is its 24-visit score and it is run for 24 visits.
- fit, random probes: uniform random fakes, the image whose simulated L1 gradient fits the rows.
- fit, honest fakes: the fakes an honest server sends, G's output for the key's mask at each
  step of the DP-off central run below (visit v sees G as of step ceil(v * steps / visits)).

Per DP setting and visit count: SSIM and PSNR in the brain (`fedmodal.metrics.synthesis`) of the
reconstruction against the real slice, beside chance (a flat image; another case's slice) and
the formal epsilon (`leakage.dp_epsilon`). The non-adaptive attacks run once per L1 weight with
DP off; each DP setting is applied to their rows by the site's own `SiteAdversary._privatise`,
exactly what the site does after its discriminator step (which does not depend on DP). The
bisection adapts to the answers, so it runs against a site with that setting.

What each setting costs: a short central AsynDGAN run of G's t2 (`fedmodal.modalitybank.central`
workers of the three sites, so the two that hold t2 train; a small generator ngf 16 / 2 blocks,
`--cost-steps` steps, the same for every setting), scored on the held-out test tumour slices
with `fedmodal.metrics.synthesis` (MAE / PSNR / SSIM in the brain), relative to DP off. A short
run shows the direction and rough size of the cost, not the converged one.

    python benchmarks/bench_leakage.py                 # default grid: 9 minutes on 2 cores under load 12
    python benchmarks/bench_leakage.py --visits 30 --cost-steps 30 --cost off "clip=0.01,noise=0.5"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SITE, MODALITY = "site-1", "t2"
VISIT_POINTS = (1, 10, 100)
BISECTION_LIMIT = 24  # float32 halvings of [-1, 1] after which the midpoint no longer moves
ATTACKS = ("bisection", "fit, random probes", "fit, honest fakes")
LEAK_GRID = [
    "off",
    "clip=0.01",
    "clip=0.01,noise=0.1",
    "clip=0.01,noise=0.5",
    "clip=0.01,noise=1",
    "clip=0.01,noise=2",
    "clip=0.001,noise=0.5",
    "clip=0.1,noise=0.5",
    "clip=1,noise=0.5",  # the README's example site file
    "l1=0",
]
COST_GRID = ["off", "clip=0.01,noise=0.5", "clip=0.01,noise=2", "l1=0"]


def adversary(spec: str):
    """An AdversaryConfig from "off" or "clip=C,noise=S,l1=L" (unnamed fields keep the defaults)."""
    from fedmodal.modalitybank.config import AdversaryConfig

    names = {"clip": "dp_clip", "noise": "dp_noise", "l1": "lambda_l1"}
    values = {}
    if spec != "off":
        for part in spec.split(","):
            name, _, value = part.partition("=")
            values[names[name.strip()]] = float(value)
    return AdversaryConfig(**values)


def reset_adversary(worker, config) -> None:
    """Give a worker fresh discriminators under `config`, as a new SiteWorker would build them."""
    from fedmodal.modalitybank.site_trainer import SiteAdversary

    seed = worker.adversary.seed
    worker.adversary = SiteAdversary(worker.modalities, spatial_dims=2, config=config, seed=seed)


def target_keys(worker, count: int) -> list[str]:
    """The middle slice of each of the site's first `count` cases (different patients)."""
    cases: dict[str, list[str]] = {}
    for key in worker.keys:
        cases.setdefault(key.split("/")[0], []).append(key)
    return [keys[len(keys) // 2] for keys in list(cases.values())[:count]]


def central_run(workers, steps: int, keys: list[str], seed: int = 0):
    """The protocol in one process (as `central.train`), keeping G's fakes for `keys` at every step."""
    from fedmodal.modalitybank.config import GeneratorConfig
    from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
    from fedmodal.modalitybank.generator_trainer import GeneratorTrainer

    generator = GeneratorConfig(
        mode="asyndgan",
        target_modalities=(MODALITY,),
        ngf=16,
        n_blocks=2,
        pretrain_steps=steps,
        bank_steps=0,
        seed=seed,
    )
    sites = [SiteState.from_registration(name, w.registration()) for name, w in sorted(workers.items())]
    trainer = GeneratorTrainer(resolve_config(generator, sites))
    coordinator = StepCoordinator(trainer, sites, np.random.default_rng(seed))
    site = coordinator.sites[SITE]  # the masks the server holds since registration
    masks = site.masks[torch.as_tensor([site.keys.index(k) for k in keys])]
    snapshots = []
    while not trainer.finished:
        payloads = coordinator.step_payloads()
        coordinator.finish_step({name: workers[name].step(p) for name, p in payloads.items()})
        snapshots.append(trainer.synthesize(masks, (MODALITY,))[MODALITY])
    return trainer, torch.stack(snapshots)


def test_slices(test_root: Path):
    """The held-out full-modal test slices (tumour slices, the job's image size), read once."""
    from fedmodal.data.datasets import SynthesisSlices
    from fedmodal.data.manifest import build_manifest
    from fedmodal.modalitybank.config import GeneratorConfig

    manifest = build_manifest(test_root, site="test", need_seg=True)
    dataset = SynthesisSlices(
        manifest.cases, size=GeneratorConfig().image_size, slices="tumour", et_label=manifest.et_label
    )
    items = [dataset[i] for i in range(len(dataset))]
    return tuple(torch.stack([torch.as_tensor(it[k]) for it in items]).float() for k in ("cond", "image", "brain"))


def synthesis_cost(trainer, test) -> dict:
    """MAE / PSNR / SSIM in the brain of G's t2 on the held-out test slices (means over slices)."""
    from fedmodal import MODALITIES
    from fedmodal.metrics import synthesis_scores

    cond, images, brain = test
    fakes = torch.cat([trainer.synthesize(c, (MODALITY,))[MODALITY] for c in cond.split(32)])
    real = images[:, MODALITIES.index(MODALITY)]
    rows = [synthesis_scores(fakes[i, 0].numpy(), real[i].numpy(), brain[i, 0].numpy()) for i in range(len(real))]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("mae", "psnr", "ssim")} | {"slices": len(rows)}


class Scorer:
    """SSIM / PSNR in the brain against the real slices (the benchmark's view; the attacker has none)."""

    def __init__(self, worker, keys: list[str]):
        from fedmodal import MODALITIES

        index = worker._lookup(keys)
        channel = MODALITIES.index(MODALITY)
        self.real = worker.images[index][:, channel : channel + 1]
        self.brain = worker.brain[index]

    def __call__(self, estimate: torch.Tensor) -> dict:
        from fedmodal.metrics import synthesis_scores

        rows = [
            synthesis_scores(estimate[i, 0].numpy(), self.real[i, 0].numpy(), self.brain[i, 0].numpy())
            for i in range(self.real.shape[0])
        ]
        return {k: float(np.mean([r[k] for r in rows])) for k in ("ssim", "psnr")}


def bisection(worker, keys, scorer: Scorer, visits: int, wrong_sign=None) -> dict:
    """Scores after each visit point; also the share of pixels whose sign was misread at visit 1."""
    from fedmodal.modalitybank.leakage import SignBisection, probe

    attack = SignBisection(scorer.real.shape)
    out, flips = {}, None
    for visit in range(1, min(visits, BISECTION_LIMIT) + 1):
        fakes = attack.fakes()
        rows = probe(worker, keys, MODALITY, fakes, step=visit)
        if flips is None:  # the L1 sign the site computed, against the sign the server read
            truth = torch.sign(fakes - scorer.real)
            inside = scorer.brain > 0
            flips = float(((rows >= 0) != (truth >= 0))[inside].float().mean())
        attack.update(fakes, rows)
        for point in VISIT_POINTS:
            if point <= visits and min(point, BISECTION_LIMIT) == visit:
                out[point] = scorer(attack.estimate())
    return {"scores": out, "misread_signs_visit1": flips}


def nonadaptive_rows(worker, keys, honest: torch.Tensor, visits: int, seed: int = 0):
    """Random probes and honest fakes of every key in one batch per visit; the site's raw rows."""
    from fedmodal.modalitybank.leakage import probe

    generator = torch.Generator().manual_seed(seed)
    steps = honest.shape[0]
    fakes, rows = [], []
    for visit in range(1, visits + 1):
        random = torch.rand((len(keys), 1, *honest.shape[-2:]), generator=generator) * 2 - 1
        sent = torch.cat([random, honest[min(steps, math.ceil(visit * steps / visits)) - 1]])
        fakes.append(sent)
        rows.append(probe(worker, keys + keys, MODALITY, sent, step=visit))
    return torch.stack(fakes), torch.stack(rows)


def fit_scores(fakes, rows, config, scorer: Scorer, visits: int, seed: int) -> dict:
    """Both fits under `config`'s DP (the site's own privatisation of the raw rows)."""
    from fedmodal.modalitybank.leakage import fit_to_signs
    from fedmodal.modalitybank.site_trainer import SiteAdversary

    site = SiteAdversary((MODALITY,), spatial_dims=2, config=config, seed=seed)
    private = site._privatise(rows.flatten(0, 1)).view_as(rows)
    smooth = 1.5 if config.dp_noise > 0 else 0.0  # the server knows the job's DP settings
    half = rows.shape[1] // 2
    out = {}
    for name, part in (("fit, random probes", slice(0, half)), ("fit, honest fakes", slice(half, None))):
        out[name] = {
            point: scorer(fit_to_signs(fakes[:point, part], private[:point, part], smooth=smooth))
            for point in VISIT_POINTS
            if point <= visits
        }
    return out


def leakage(worker, keys, honest, specs: list[str], visits: int) -> dict:
    from fedmodal.modalitybank.leakage import dp_epsilon

    scorer = Scorer(worker, keys)
    results = {"chance": {"flat image": scorer(torch.zeros_like(scorer.real))}}
    results["chance"]["another case's slice"] = scorer(scorer.real.roll(1, 0))
    results["chance"]["G's fake, no gradient"] = scorer(honest[-1])
    raw = {}
    for spec in specs:
        config = adversary(spec)
        started = time.perf_counter()
        if config.lambda_l1 not in raw:
            reset_adversary(worker, adversary("off").with_values(lambda_l1=config.lambda_l1))
            raw[config.lambda_l1] = nonadaptive_rows(worker, keys, honest, visits)
        reset_adversary(worker, config)
        row = {"bisection": bisection(worker, keys, scorer, visits)}
        row.update({k: {"scores": v} for k, v in fit_scores(*raw[config.lambda_l1], config, scorer, visits, 1).items()})
        # No clip means no noise either (the site's _privatise returns the gradient as it is).
        # None: no formal bound (no noise; or no clip, when the site adds no noise either).
        epsilon = {p: dp_epsilon(p, config.dp_noise) if config.dp_clip > 0 else math.inf for p in VISIT_POINTS}
        row["epsilon"] = {p: None if math.isinf(e) else e for p, e in epsilon.items()}
        row["config"] = {"dp_clip": config.dp_clip, "dp_noise": config.dp_noise, "lambda_l1": config.lambda_l1}
        row["seconds"] = time.perf_counter() - started
        results[spec] = row
        print(f"leakage {spec}: {row['seconds']:.0f} s", flush=True)
    return results


def cost(workers, keys, specs: list[str], steps: int, test_root: Path):
    """Each setting's central run and its test scores; also G's fakes for `keys` in the DP-off run."""
    test = test_slices(test_root)
    costs, honest = {}, None
    for spec in ["off", *[s for s in specs if s != "off"]]:
        started = time.perf_counter()
        for worker in workers.values():
            reset_adversary(worker, adversary(spec))
        trainer, snapshots = central_run(workers, steps, keys)
        if spec == "off":
            honest = snapshots
        costs[spec] = {**synthesis_cost(trainer, test), "seconds": time.perf_counter() - started}
        print(f"cost {spec}: {costs[spec]['seconds']:.0f} s", flush=True)
    return costs, honest


def fmt(value: float, digits: int = 3) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def tables(results: dict) -> str:
    leak, costs, visits = results["leakage"], results["cost"], results["visits"]
    points = [p for p in VISIT_POINTS if p <= visits]
    head = " | ".join(f"SSIM @{p}" for p in points) + " | " + " | ".join(f"PSNR @{p}" for p in points)
    lines = [
        f"Reconstruction of {results['keys']} real {MODALITY} slices of {SITE} (64 x 64, default AdversaryConfig), "
        "SSIM and PSNR (dB) in the brain after 1 / 10 / 100 visits of each key",
        "",
        f"| setting | attack | {head} | epsilon @{points[-1]} (delta 1e-5) |",
        "|---|---|" + "---|" * (2 * len(points) + 1),
    ]
    for name, scores in leak["chance"].items():
        cells = [fmt(scores["ssim"])] * len(points) + [fmt(scores["psnr"], 1)] * len(points)
        lines.append(f"| chance | {name} | " + " | ".join(cells) + " | |")
    for spec, row in leak.items():
        if spec == "chance":
            continue
        for attack in ATTACKS:
            s = row[attack]["scores"]
            cells = [fmt(s[p]["ssim"]) for p in points] + [fmt(s[p]["psnr"], 1) for p in points]
            eps = row["epsilon"][points[-1]]
            eps = ("inf" if eps is None else f"{eps:.0f}") if attack == ATTACKS[0] else ""
            lines.append(f"| {spec} | {attack} | " + " | ".join(cells) + f" | {eps} |")
    lines += [
        "",
        f"What it costs: central AsynDGAN run of G's {MODALITY} (the sites that hold it), ngf 16 / 2 blocks, "
        f"{results['cost_steps']} steps, scored on the {results['cost']['off']['slices']} held-out test tumour slices",
        "",
        "| setting | SSIM | PSNR (dB) | MAE | SSIM vs off | PSNR vs off |",
        "|---|---|---|---|---|---|",
    ]
    off = costs["off"]
    for spec, c in costs.items():
        lines.append(
            f"| {spec} | {c['ssim']:.3f} | {c['psnr']:.2f} | {c['mae']:.3f} | "
            f"{c['ssim'] - off['ssim']:+.3f} | {c['psnr'] - off['psnr']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=4, help="sample keys attacked (one per case)")
    parser.add_argument("--visits", type=int, default=100, help="visits of each key (1, 10, 100 are scored)")
    parser.add_argument("--cost-steps", type=int, default=40, help="steps of each central cost run")
    parser.add_argument("--leak", nargs="+", default=LEAK_GRID, help='settings: "off" or "clip=C,noise=S,l1=L"')
    parser.add_argument("--cost", nargs="+", default=COST_GRID, help="settings of the cost runs (off is always run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "leakage.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fedmodal.data.phantoms import ensure_federation
    from fedmodal.modalitybank.central import build_workers
    from fedmodal.modalitybank.config import GeneratorConfig

    started = time.perf_counter()
    data_root = ensure_federation()
    out = Path(tempfile.mkdtemp(prefix="leak-workers-"))
    try:
        roots = {site: data_root / site for site in ("site-1", "site-2", "site-3")}
        workers = build_workers(roots, GeneratorConfig(), out)  # the job's image size, slices and batch
        keys = target_keys(workers[SITE], args.keys)
        costs, honest = cost(workers, keys, args.cost, args.cost_steps, data_root / "test")
        leak = leakage(workers[SITE], keys, honest, args.leak, args.visits)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "site": SITE,
        "modality": MODALITY,
        "keys": len(keys),
        "visits": args.visits,
        "cost_steps": args.cost_steps,
        "leakage": leak,
        "cost": costs,
        "seconds": time.perf_counter() - started,
    }
    table = tables(results)
    print("\n" + table)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    path.with_suffix(".md").write_text(table)
    print(f"written: {path} and {path.with_suffix('.md')} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
