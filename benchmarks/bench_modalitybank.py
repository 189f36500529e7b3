"""ModalityBank: federated steps per second against the same training in one process.

Both sides run the same code on the same phantom data, batch and networks (the job's own
config): the centralised run hands the coordinator's payloads straight to in-process site
workers; the federated run is `nvflare simulator` on jobs/modalitybank with only the step
counts changed. Also reports bytes per step per site (from the payload audit) and the bank's
size against the frozen generator.

    python benchmarks/bench_modalitybank.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def job_settings(**values) -> dict:
    """jobs/modalitybank's settings by section (fedmodal.jobs), with `values` changed."""
    from fedmodal.jobs import job_settings as settings_of

    return settings_of("modalitybank", **values)


WARMUP_STEPS = 3  # the first steps of a phase pay one-off costs (allocation, lazy layers): not timed


def steady_rate(seconds: list[float]) -> float:
    """Steps per second after the warm-up steps."""
    timed = seconds[WARMUP_STEPS:]
    return len(timed) / sum(timed)


def central(steps: int, data_root: Path, threads: int) -> dict:
    """Steps per second per phase with every site's worker in this process."""
    from fedmodal.modalitybank.central import build_workers, train

    torch.set_num_threads(threads)

    settings = job_settings(pretrain_steps=steps, bank_steps=steps)  # the job's own configuration
    out = Path(tempfile.mkdtemp(prefix="mb-central-"))
    workers = build_workers(
        {site: data_root / site for site in ("site-1", "site-2", "site-3")},
        settings["generator"],
        out,
        slices=settings["server"].slices,
        site=settings["site"],
        adversary=settings["adversary"],
    )
    parts: dict = {}
    _, _, timings = train(workers, settings["generator"], parts=parts)
    shutil.rmtree(out, ignore_errors=True)
    rates = {phase: steady_rate(t) for phase, t in timings.items()}
    # Median seconds of a step's parts: the server's work against the sites' (3 sites, in turn).
    rates["median_parts"] = {
        phase: {part: float(np.median([s[part] for s in split[WARMUP_STEPS:]])) for part in split[0]}
        for phase, split in parts.items()
    }
    return rates


def site_bytes(workspace: Path, site: str) -> dict:
    """A simulated site's bytes per step (both ways) and at registration, from its payload audit."""
    path = workspace / site / "simulate_job/payload_audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]

    def size(record: dict) -> int:
        return sum(i["bytes"] or 0 for i in record["items"].values())

    step_bytes = sum(size(r) for r in records if r["task"] == "mb_step")
    n_steps = max(1, sum(1 for r in records if r["task"] == "mb_step" and r["direction"] == "in"))
    register_bytes = sum(size(r) for r in records if r["task"] == "mb_register")
    return {"bytes_per_step": step_bytes / n_steps, "register_bytes": register_bytes}


def federated(steps: int, data_root: Path, transport: str, task_request_interval: float, server_threads: int) -> dict:
    """Steps per second per phase and bytes per step per site, from a simulator run."""
    from fedmodal.fl.allow_list import customize_simulator
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    work = Path(tempfile.mkdtemp(prefix="mb-fed-"))
    spec = JOBS["modalitybank"]
    values = {
        "pretrain_steps": steps,
        "bank_steps": steps,
        "sample_every": 0,
        "log_every": 10,
        "server.num_threads": server_threads,
        "step_transport": transport,
    }
    job = export_job(spec, work / "jobs", route_settings(spec, values))
    server_file = job / "app/config/config_fed_server.json"
    config = json.loads(server_file.read_text())
    config["server"]["task_request_interval"] = task_request_interval
    server_file.write_text(json.dumps(config))
    customize_simulator(work / "ws")  # the allow-list
    env = {**os.environ, "FEDMODAL_DATA_ROOT": str(data_root), "HOME": str(work)}
    nvflare = Path(sys.executable).with_name("nvflare")
    started = time.perf_counter()
    proc = subprocess.run(
        [str(nvflare), "simulator", str(job), "-w", str(work / "ws"), "-n", "3", "-t", "3"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    summary = json.loads((work / "ws/server/simulate_job/modalitybank/summary.json").read_text())
    per_site = {site: site_bytes(work / "ws", site) for site in ("site-1", "site-2", "site-3")}
    shutil.rmtree(work, ignore_errors=True)
    return {
        "steps_per_second": {phase: steady_rate(t) for phase, t in summary["step_seconds"].items()},
        "median_step_seconds": summary["median_step_seconds"],
        # Of a median step, the time the server waited for the sites (transport + site work).
        "median_wait_seconds": summary["median_wait_seconds"],
        # The rest of a step is the server's own work (G forward, backward, update, bookkeeping).
        "median_server_seconds": {
            phase: float(np.median(np.subtract(t, summary["wait_seconds"][phase])[WARMUP_STEPS:]))
            for phase, t in summary["step_seconds"].items()
        },
        "wall_seconds": wall,
        "per_site": per_site,
    }


def bank_sizes() -> list[dict]:
    from fedmodal.nets import madafm
    from fedmodal.nets.generator import ResnetGenerator

    generator = job_settings()["generator"]
    rows = []
    for ngf, blocks, label in ((generator.ngf, generator.n_blocks, "default job"), (64, 9, "paper")):
        for target in ("resblocks", "all"):
            g = madafm.modulate(ResnetGenerator(2, 2, 1, ngf=ngf, n_blocks=blocks), target=target, modalities=("t2",))
            counts = madafm.count_parameters(g, "t2")
            rows.append({"generator": f"{label} (ngf {ngf}, {blocks} blocks)", "target": target, **counts})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per phase")
    parser.add_argument("--central-threads", type=int, nargs="+", default=[1, 2], help="torch threads, central run")
    parser.add_argument(
        "--federated",
        nargs="+",
        default=["direct:0.05:2", "direct:0.05:1", "task:0.05:2", "task:0.05:1", "task:2.0:1"],
        metavar="TRANSPORT:INTERVAL:THREADS",
        help="simulator runs: step transport (direct or task), server task_request_interval (s), server torch threads",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="keep N busy-loop processes running throughout, to measure on a machine busy with other work",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "modalitybank.json"))
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        return run(args)
    finally:
        for hog in hogs:  # only the processes started here, by PID
            hog.kill()
            hog.wait()


def run(args: argparse.Namespace) -> int:
    from fedmodal.data.phantoms import ensure_federation

    data_root = ensure_federation()
    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "busy_loops": args.busy},
        "steps_per_phase": args.steps,
    }
    results["central_steps_per_second"] = {str(t): central(args.steps, data_root, t) for t in args.central_threads}
    specs = {spec: (kind, float(i), int(t)) for spec in args.federated for kind, i, t in [spec.split(":")]}
    results["federated"] = {spec: federated(args.steps, data_root, *setting) for spec, setting in specs.items()}
    results["bank"] = bank_sizes()

    print(
        f"\nModalityBank, {args.steps} steps per phase, default job configuration, {os.cpu_count()} CPUs, "
        f"{args.busy} busy-loop processes beside\n"
    )
    print(
        "| run | pretrain steps/s | bank steps/s | ratio to the fastest central (pretrain, bank) "
        "| median wait for the sites (pretrain, bank) | median server work (pretrain, bank) |"
    )
    print("|---|---|---|---|---|---|")
    by_threads = results["central_steps_per_second"]
    for threads, rates in by_threads.items():
        print(
            f"| central, one process, {threads} torch thread(s) | {rates['pretrain']:.3f} | {rates['bank']:.3f} | | | |"
        )
    # The ratio is against the faster central configuration.
    c = {phase: max(rates[phase] for rates in by_threads.values()) for phase in ("pretrain", "bank")}
    split_lines = [
        f"| {threads} | {phase} | {p['generate'] * 1000:.0f} | {p['sites'] * 1000:.0f} | {p['apply'] * 1000:.0f} |"
        for threads, rates in by_threads.items()
        for phase, p in rates["median_parts"].items()
    ]
    for spec, fed in results["federated"].items():
        transport, interval, threads = spec.split(":")
        f, w, own = fed["steps_per_second"], fed["median_wait_seconds"], fed["median_server_seconds"]
        print(
            f"| simulator, {transport} steps, task_request_interval {interval} s, server {threads} thread(s) | "
            f"{f['pretrain']:.3f} | {f['bank']:.3f} | "
            f"{f['pretrain'] / c['pretrain']:.2f}, {f['bank'] / c['bank']:.2f} | "
            f"{w['pretrain'] * 1000:.0f} ms, {w['bank'] * 1000:.0f} ms | "
            f"{own['pretrain'] * 1000:.0f} ms, {own['bank'] * 1000:.0f} ms |"
        )
    print("\n| central threads | phase | G forward (ms) | 3 sites' D steps (ms) | G backward + update (ms) |")
    print("|---|---|---|---|---|")
    print("\n".join(split_lines))
    fed = next(iter(results["federated"].values()))
    print("\n| site | bytes per step (both ways) | registration bytes |\n|---|---|---|")
    for site, row in fed["per_site"].items():
        print(f"| {site} | {row['bytes_per_step'] / 1024:.1f} KiB | {row['register_bytes'] / 1024:.1f} KiB |")
    print("\n| generator | bank target | bank per modality | frozen | ratio |\n|---|---|---|---|---|")
    for row in results["bank"]:
        print(f"| {row['generator']} | {row['target']} | {row['bank']:,} | {row['frozen']:,} | {row['ratio']:.1%} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
