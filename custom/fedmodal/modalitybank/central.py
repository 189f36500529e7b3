"""ModalityBank in one process: every site's worker beside the generator, no NVFlare.

Used to pretrain the generator on a dataset the server holds (`fedmodal pretrain-generator`)
and by the benchmark as the same work done without federation.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from fedmodal.fl.site import site_seed
from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
from fedmodal.modalitybank.generator_trainer import GeneratorTrainer
from fedmodal.modalitybank.site_trainer import AdversaryConfig
from fedmodal.modalitybank.site_worker import SiteWorker

logger = logging.getLogger(__name__)


def build_workers(
    site_roots: dict[str, Path],
    image_size: int,
    slices: str,
    batch_size: int,
    seed: int,
    out_dir: Path,
    split: str = "train",
    adversary: dict | None = None,
) -> dict[str, SiteWorker]:
    """One `SiteWorker` per site folder, built as the site executor builds it."""
    from fedmodal.data.datasets import SynthesisSlices
    from fedmodal.data.manifest import build_manifest

    workers = {}
    for name, root in sorted(site_roots.items()):
        manifest = build_manifest(root, site=name)
        cases = manifest.cases if split == "all" else manifest.cases_in(split)
        dataset = SynthesisSlices(cases, size=image_size, slices=slices, et_label=manifest.et_label)
        config = AdversaryConfig(**(adversary or {}), seed=site_seed(seed, name))
        workers[name] = SiteWorker(
            name, dataset, manifest.modalities, config, batch_size, True, site_seed(seed, name), Path(out_dir) / name
        )
    return workers


def train(workers: dict[str, SiteWorker], config_args: dict, log_every: int = 20, parts: dict | None = None):
    """Run the protocol in-process; returns (trainer, coordinator, seconds per step by phase).

    `parts`, if given, is filled per phase with each step's seconds split into the server's
    fake generation, every site's discriminator step and the server's backward pass and update.
    """
    sites = [SiteState.from_registration(name, w.registration()) for name, w in sorted(workers.items())]
    config = resolve_config(config_args, (), sites)
    trainer = GeneratorTrainer(config)
    coordinator = StepCoordinator(trainer, sites, np.random.default_rng(config.seed))
    timings: dict[str, list[float]] = {}
    while not trainer.finished:
        phase = trainer.phase
        started = time.perf_counter()
        payloads = coordinator.step_payloads()
        generated = time.perf_counter()
        replies = {n: workers[n].step(p) for n, p in payloads.items()}
        answered = time.perf_counter()
        coordinator.finish_step(replies)
        finished = time.perf_counter()
        timings.setdefault(phase, []).append(finished - started)
        if parts is not None:
            split = {"generate": generated - started, "sites": answered - generated, "apply": finished - answered}
            parts.setdefault(phase, []).append(split)
        if len(timings[phase]) % log_every == 0:
            logger.info("%s step %d: %.2f steps/s", phase, len(timings[phase]), log_every / sum(timings[phase][-log_every:]))
    return trainer, coordinator, timings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", help="BraTS folders the server holds (any release layout)")
    parser.add_argument("-o", "--out", required=True, help="checkpoint folder to write (generator.pt)")
    parser.add_argument("--source", default="t1", help="source modality (every folder must hold it)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--n-blocks", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ndf", type=int, default=32)
    parser.add_argument("--slices", default="tumour", choices=["tumour", "brain"])
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    roots = {Path(d).name or f"data-{i}": Path(d) for i, d in enumerate(args.data)}
    workers = build_workers(
        roots, args.image_size, args.slices, args.batch_size, args.seed, Path(args.out) / "discriminators",
        split="all", adversary={"ndf": args.ndf},
    )
    missing = [name for name, w in workers.items() if args.source not in w.modalities]
    if missing:
        raise SystemExit(f"{missing} do not hold the source modality {args.source!r}")
    config = dict(
        mode="bank", image_size=args.image_size, ngf=args.ngf, n_blocks=args.n_blocks, source_modality=args.source,
        pretrain_steps=args.steps, bank_steps=0, batch_size=args.batch_size, seed=args.seed,
    )
    trainer, _, timings = train(workers, config)  # bank_steps=0: the generator stays plain
    trainer.save(args.out)
    rate = len(timings["pretrain"]) / sum(timings["pretrain"])
    print(f"pretrained {args.source} generator ({len(timings['pretrain'])} steps, {rate:.2f} steps/s) written to {args.out}")
    print(f"use it with the job's controller argument \"pretrained_generator\": \"{Path(args.out).resolve()}\"")
    return 0
