"""ModalityBank over a float32 and a float16 wire: bytes a step, link cost, synthesis quality.

Both runs train the default job's configuration (fedmodal.jobs) for the same steps with the
same seed, every site's worker in this process, so the only difference is the precision of the
fakes and gradients that cross the wire (`server.wire_precision`). Each run's generator is then
scored on the held-out phantom test cases (MAE, PSNR, SSIM inside the brain, as
`fedmodal synthesis-quality` does). Bytes a step are counted from the real payloads with the
payload audit's own sizes; the cost of a step on a wide-area link is computed from them (not
measured on an emulated link: network namespaces work here, but the kernel has no netem
qdisc, `tc qdisc add ... netem` answers "Specified qdisc kind is unknown").

    python benchmarks/bench_wire_precision.py --out benchmarks/results/wire_precision
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report import publish

PRECISIONS = ("float32", "float16")
SITES = ("site-1", "site-2", "site-3")


def job_settings(**values) -> dict:
    """jobs/modalitybank's settings by section (fedmodal.jobs), with `values` changed."""
    from fedmodal.jobs import job_settings as settings_of

    return settings_of("modalitybank", **values)


def payload_bytes(payload: dict) -> int:
    """A payload's size as the payload audit counts it (arrays by nbytes, metadata by its JSON)."""
    from fedmodal.fl.audit import describe

    return sum(describe(value)["bytes"] or 0 for value in payload.values())


def step_bytes(workers: dict, settings: dict, precision: str) -> dict[str, dict[str, dict[str, int]]]:
    """Bytes of one step per phase and site, each way, from a fresh coordinator's real payloads
    (pretraining trains one modality, the bank phase every modality a site holds)."""
    from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
    from fedmodal.modalitybank.generator_trainer import GeneratorTrainer

    sites = [SiteState.from_registration(name, w.registration()) for name, w in sorted(workers.items())]
    counted = {}
    for phase, skip in (("pretrain", {}), ("bank", {"pretrain_steps": 0})):
        config = resolve_config(settings["generator"].with_values(**skip), sites)
        trainer = GeneratorTrainer(config)
        assert trainer.phase == phase, (trainer.phase, phase)
        coordinator = StepCoordinator(trainer, sites, np.random.default_rng(config.seed), precision)
        counted[phase] = {
            name: {"down": payload_bytes(p), "up": payload_bytes(workers[name].step(p))}
            for name, p in sorted(coordinator.step_payloads().items())
        }
    return counted


def site_workers(settings: dict, data_root: Path, folder: Path) -> dict:
    """The three phantom sites' in-process workers, built from the job's settings."""
    from fedmodal.modalitybank.central import build_workers

    return build_workers(
        {site: data_root / site for site in SITES},
        settings["generator"],
        folder,
        slices=settings["server"].slices,
        site=settings["site"],
        adversary=settings["adversary"],
    )


def train_and_score(precision: str, steps: int | None, data_root: Path, out: Path) -> dict:
    from fedmodal.data.manifest import build_manifest
    from fedmodal.modalitybank.central import train
    from fedmodal.modalitybank.quality import evaluate_checkpoint

    values = {} if steps is None else {"pretrain_steps": steps, "bank_steps": steps}
    settings = job_settings(**values)
    workers = site_workers(settings, data_root, out / "sites")
    torch.manual_seed(settings["generator"].seed)
    started = time.perf_counter()
    server = settings["server"].with_values(wire_precision=precision)
    trainer, _, timings = train(workers, settings["generator"], server=server)
    seconds = time.perf_counter() - started
    trainer.save(out / "checkpoint")
    test = build_manifest(data_root / "test", site="test", need_seg=True)
    scores = evaluate_checkpoint(out / "checkpoint", test.cases, None, "tumour", test.et_label)
    # Fresh site workers: the byte count must not disturb the trained ones' discriminators.
    fresh = site_workers(settings, data_root, out / "sites-bytes")
    return {
        "steps": {phase: len(t) for phase, t in timings.items()},
        "seconds": round(seconds, 1),
        "scores": scores,
        "bytes_per_step": step_bytes(fresh, settings, precision),
    }


def link_seconds(down: int, up: int, rtt_s: float, mbit_per_s: float) -> float:
    """One step on a link: one round trip plus both ways' bytes at the link's rate."""
    return rtt_s + (down + up) * 8 / (mbit_per_s * 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per phase (default: the job's own)")
    parser.add_argument("--out", default=None, help="also write the numbers here (JSON + Markdown)")
    args = parser.parse_args()

    from fedmodal.data.phantoms import ensure_federation

    torch.set_num_threads(2)
    data_root = ensure_federation()
    work = Path(tempfile.mkdtemp(prefix="bench-wire-"))
    try:
        results = {p: train_and_score(p, args.steps, data_root, work / p) for p in PRECISIONS}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"ModalityBank, default job configuration, {results['float32']['steps']} steps, one process, same seed",
        "",
        "| wire | modality | MAE | PSNR (dB) | SSIM | train s |",
        "|---|---|---|---|---|---|",
    ]
    for precision, result in results.items():
        for modality, summary in result["scores"].items():
            cells = " | ".join(f"{summary[k]['mean']:.4f}" for k in ("mae", "psnr", "ssim"))
            lines.append(f"| {precision} | {modality} | {cells} | {result['seconds']} |")
    lines += [
        "",
        "A step on a wide-area link, computed (one round trip + both ways' bytes at 100 Mbit/s), not measured:",
        "",
        "| wire | phase | site | bytes a step down | up | 20 ms RTT | 100 ms RTT |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision, result in results.items():
        for phase, per_site in result["bytes_per_step"].items():
            for site, b in per_site.items():
                costs = [link_seconds(b["down"], b["up"], rtt, 100) * 1000 for rtt in (0.02, 0.1)]
                lines.append(
                    f"| {precision} | {phase} | {site} | {b['down'] / 1024:.1f} KiB | {b['up'] / 1024:.1f} KiB | "
                    f"{costs[0]:.1f} ms | {costs[1]:.1f} ms |"
                )
    publish("\n".join(lines) + "\n", results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
