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
import torch

from fedmodal.amp import PRECISIONS
from fedmodal.fl.site import prepare_site, select_device
from fedmodal.modalitybank.config import AdversaryConfig, BankSiteConfig, ControllerConfig, GeneratorConfig
from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
from fedmodal.modalitybank.generator_trainer import GeneratorTrainer
from fedmodal.modalitybank.site_worker import SiteWorker, build_site_worker

logger = logging.getLogger(__name__)


def build_workers(
    site_roots: dict[str, Path],
    generator: GeneratorConfig,
    out_dir: Path,
    slices: str = ControllerConfig.slices,
    site: BankSiteConfig | None = None,
    adversary: AdversaryConfig | None = None,
) -> dict[str, SiteWorker]:
    """One `SiteWorker` per site folder, built as the site executor builds it (same site set-up,
    same `fedmodal_site.json` policy). The sites share this process, so a site's own
    `num_threads` (which sets its process's torch threads) does not apply: the caller's
    thread count is kept."""
    site = site or BankSiteConfig()
    threads = torch.get_num_threads()
    registration = {"image_size": generator.image_size, "slices": slices, "batch_size": generator.batch_size}
    workers = {}
    for name, root in sorted(site_roots.items()):
        prepared = prepare_site(name, site.with_values(data_root=str(root)), run_seed=generator.seed)
        workers[name] = build_site_worker(
            prepared, site, adversary or AdversaryConfig(), registration, Path(out_dir) / name
        )
    torch.set_num_threads(threads)
    return workers


def train(
    workers: dict[str, SiteWorker],
    generator: GeneratorConfig,
    log_every: int = 20,
    parts: dict | None = None,
    server: ControllerConfig | None = None,
):
    """Run the protocol in-process; returns (trainer, coordinator, seconds per step by phase).

    `server`: the job's server settings that apply here: G's device and precision, and the
    arrays' wire precision (its thread count is the caller's to set).

    `parts`, if given, is filled per phase with each step's seconds split into the server's
    fake generation, every site's discriminator step and the server's backward pass and update.
    """
    server = server or ControllerConfig()
    sites = [SiteState.from_registration(name, w.registration()) for name, w in sorted(workers.items())]
    config = resolve_config(generator, sites)
    trainer = GeneratorTrainer(config, select_device(server.device), server.precision)
    coordinator = StepCoordinator(trainer, sites, np.random.default_rng(config.seed), server.wire_precision)
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
            logger.info(
                "%s step %d: %.2f steps/s", phase, len(timings[phase]), log_every / sum(timings[phase][-log_every:])
            )
    return trainer, coordinator, timings


def train_job(settings: dict, site_roots: dict[str, Path], out_dir: Path, parts: dict | None = None):
    """A job's settings (`fedmodal.jobs.job_settings("modalitybank")`) trained in one process on
    `site_roots`: the federated job's exact work without NVFlare. Returns what `train` returns."""
    workers = build_workers(
        site_roots,
        settings["generator"],
        out_dir,
        slices=settings["server"].slices,
        site=settings["site"],
        adversary=settings["adversary"],
    )
    return train(workers, settings["generator"], parts=parts, server=settings["server"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are the job's (fedmodal.modalitybank.config), so the result loads into the
    # default jobs/modalitybank as its "pretrained_generator".
    g, a, c = GeneratorConfig(), AdversaryConfig(), ControllerConfig()
    parser.add_argument("data", nargs="+", help="BraTS folders the server holds (any release layout)")
    parser.add_argument("-o", "--out", required=True, help="checkpoint folder to write (generator.pt)")
    parser.add_argument("--source", default=g.source_modality, help="source modality (every folder must hold it)")
    parser.add_argument("--steps", type=int, default=g.pretrain_steps)
    parser.add_argument("--image-size", type=int, default=g.image_size)
    parser.add_argument("--ngf", type=int, default=g.ngf)
    parser.add_argument("--n-blocks", type=int, default=g.n_blocks)
    parser.add_argument("--upsample", default=g.upsample, choices=["transpose", "resize"])
    parser.add_argument("--batch-size", type=int, default=g.batch_size)
    parser.add_argument("--ndf", type=int, default=a.ndf)
    parser.add_argument("--slices", default=c.slices, choices=["tumour", "brain"])
    parser.add_argument("--seed", type=int, default=g.seed)
    parser.add_argument("--device", default=c.device, help="auto (CUDA when present), cpu, cuda:0 ...")
    parser.add_argument("--precision", default=c.precision, choices=PRECISIONS, help="auto: mixed precision on CUDA")


def run(args: argparse.Namespace) -> int:
    roots = {Path(d).name or f"data-{i}": Path(d) for i, d in enumerate(args.data)}
    generator = GeneratorConfig(
        mode="bank",
        image_size=args.image_size,
        ngf=args.ngf,
        n_blocks=args.n_blocks,
        upsample=args.upsample,
        source_modality=args.source,
        pretrain_steps=args.steps,
        bank_steps=0,
        batch_size=args.batch_size,
        seed=args.seed,
    )  # bank_steps=0: the generator stays plain
    workers = build_workers(
        roots,
        generator,
        Path(args.out) / "discriminators",
        slices=args.slices,
        site=BankSiteConfig(split="all", device=args.device),
        adversary=AdversaryConfig(ndf=args.ndf, precision=args.precision),
    )
    missing = [name for name, w in workers.items() if args.source not in w.modalities]
    if missing:
        raise SystemExit(f"{missing} do not hold the source modality {args.source!r}")
    trainer, _, timings = train(
        workers, generator, server=ControllerConfig(device=args.device, precision=args.precision)
    )
    trainer.save(args.out)
    rate = len(timings["pretrain"]) / sum(timings["pretrain"])
    print(
        f"pretrained {args.source} generator ({len(timings['pretrain'])} steps, {rate:.2f} steps/s) written to {args.out}"
    )
    print(f'use it with the job\'s controller setting server.pretrained_generator: "{Path(args.out).resolve()}"')
    return 0
