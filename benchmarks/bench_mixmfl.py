"""MDM-MixMFL: seconds per round federated against the same local work without NVFlare.

Both sides run the job's own settings (fedmodal.jobs) on the mix-modal phantom federation:
without federation, each site's process loads its groups, trains its local epochs with memory
retrieval and computes its prototypes, all sites at once; federated, `nvflare simulator` runs
jobs/mixmfl with only the round count changed. Also reports bytes per round per site (from the
payload audit) and the prototype memory's size.

    python benchmarks/bench_mixmfl.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = [f"site-{k}" for k in range(1, 7)]


def job_settings(**values) -> dict:
    """jobs/mixmfl's settings by section (fedmodal.jobs), with `values` changed."""
    from fedmodal.jobs import job_settings as settings_of

    return settings_of("mixmfl", **values)


def site_worker(site: str, root: Path, rounds: int) -> dict:
    """One site's per-round MixMFL work without NVFlare: load groups, local epochs, prototypes."""
    import torch

    from fedmodal.baselines.data import site_data, train_loader
    from fedmodal.fl.site import prepare_site
    from fedmodal.mixmfl.memory import PrototypeMemory
    from fedmodal.mixmfl.trainer import MixMFLTrainer

    torch.set_num_threads(1)
    settings = job_settings(**{"site.data_root": str(root)})
    cfg, run = settings["mixmfl"], settings["server"]
    prepared = prepare_site(site, settings["site"], run.seed)
    data = site_data(prepared.manifest)
    loader = train_loader(data.cases("train"), cfg.loader_config(), prepared.seed)
    trainer = MixMFLTrainer(cfg, data.modalities, seed=prepared.seed)
    memory = PrototypeMemory(cfg.memory_capacity)
    times = []
    for _ in range(rounds):
        start = time.time()
        trainer.load_global(trainer.state_numpy(trainer.groups))  # what taking the global groups costs locally
        for _ in range(run.local_epochs):
            trainer.train_epoch(loader, memory)
        memory.update(trainer.prototypes(cfg.kmeans_k, cfg.min_cluster_size))
        times.append(time.time() - start)
    return {"site": site, "round_s": times}


def run_local(root: Path, rounds: int) -> dict:
    """Every site's local work at once, one process each (as the simulator runs them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", s, "--root", str(root), "--rounds", str(rounds)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for s in SITES
    ]
    outputs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    per_round = [max(o["round_s"][r] for o in outputs) for r in range(1, rounds)]  # the first pays warm-up
    return {"wall_s": time.time() - start, "round_s": sum(per_round) / len(per_round)}


def run_simulator(root: Path, rounds: int, work: Path) -> dict:
    from fedmodal.fl.allow_list import customize_simulator
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["mixmfl"]
    job = export_job(spec, work / "jobs", route_settings(spec, {"num_rounds": rounds}))
    customize_simulator(work / "ws")
    env = {**os.environ, "HOME": str(work), "FEDMODAL_DATA_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    nvflare = Path(sys.executable).with_name("nvflare")
    start = time.time()
    done = subprocess.run(
        [str(nvflare), "simulator", str(job), "-w", str(work / "ws"), "-n", "6", "-t", "6"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"simulator failed:\n{(done.stdout + done.stderr)[-3000:]}")
    records = [
        json.loads(line.split("round ", 1)[1])
        for line in (done.stdout + done.stderr).splitlines()
        if 'round {"round"' in line
    ]
    seconds = [r["seconds"] for r in records][1:]
    per_site = {}
    for site in SITES:
        audit = [
            json.loads(x)
            for x in (work / "ws" / site / "simulate_job" / "payload_audit.jsonl").read_text().splitlines()
        ]
        train = [r for r in audit if r["task"] == "train"]
        total = sum(sum(i["bytes"] or 0 for i in r["items"].values()) for r in train)
        memory = sum(
            i["bytes"] or 0
            for r in train
            if r["direction"] == "out"
            for k, i in r["items"].items()
            if k.startswith("memory.")
        )
        per_site[site] = {"bytes_per_round": total / rounds, "prototype_bytes_per_round": memory / rounds}
    import torch

    checkpoint = torch.load(work / "ws/server/simulate_job/mixmfl/checkpoint.pt", weights_only=False)
    memory_bytes = sum(v.nbytes for v in checkpoint["state"]["memory"].values())
    return {"wall_s": wall, "round_s": sum(seconds) / len(seconds), "per_site": per_site, "memory_bytes": memory_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds (>= 2; the first is not timed)")
    parser.add_argument("--out", default=None, help="also write the numbers here (JSON + Markdown)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(site_worker(args.worker, Path(args.root), args.rounds)))
        return 0
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2")
    from fedmodal.data.phantoms import ensure_federation

    root = ensure_federation("mixmfl")
    with tempfile.TemporaryDirectory(prefix="bench-mixmfl-") as work:
        fed = run_simulator(root, args.rounds, Path(work))
    local = run_local(root, args.rounds)
    lines = [
        f"MDM-MixMFL round vs the same local work: 6 sites, {args.rounds - 1} timed rounds, nproc {os.cpu_count()}",
        "",
        "| run | s/round | total wall s | ratio |",
        "|---|---|---|---|",
        f"| no federation, one process per site at once | {local['round_s']:.2f} | {local['wall_s']:.1f} | 1.00 |",
        f"| NVFlare simulator (one thread per site) | {fed['round_s']:.2f} | {fed['wall_s']:.1f} | "
        f"{fed['round_s'] / local['round_s']:.2f} |",
        "",
        "| site | bytes per round (both ways) | of which prototypes sent |",
        "|---|---|---|",
        *[
            f"| {s} | {v['bytes_per_round'] / 1024:.1f} KiB | {v['prototype_bytes_per_round'] / 1024:.2f} KiB |"
            for s, v in fed["per_site"].items()
        ],
        "",
        f"Prototype memory at the end: {fed['memory_bytes'] / 1024:.1f} KiB",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_mixmfl.md").write_text(table + "\n")
        (out / "bench_mixmfl.json").write_text(json.dumps({"simulator": fed, "local": local}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
