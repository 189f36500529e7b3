"""FedAvg in NVFlare's simulator against the same local work without federation, side by side.

Per round a FedAvg site receives the global model, validates it, trains `local_epochs`,
validates again and sends its weights. The benchmark times:

1. `nvflare simulator` on `jobs/fedavg` (cross-site evaluation removed), one client per
   thread: seconds per round from the server log (round 0, which includes each site's data
   loading, is left out);
2. the same per-round site work with no federation: one process per site, all at once (as the
   simulator runs them), each doing load weights -> validate -> train -> validate per round,
   the rounds in step (each starts when the last site finished the one before, as in FedAvg);
3. the same, each site at its own pace (what the README reported before: a faster site starts
   its next round while a slower one finishes, so the slowest round is shorter than in step);
4. the same work one site after the other in a single process (the total CPU work).

(1) and (2) alternate `--repeats` times and the medians are compared.

The overhead ratio is (1) / (2): what NVFlare's task exchange, serialisation, aggregation and
polling add to a round. The machine load average is printed, because the machine may be shared.

    python benchmarks/bench_fedavg.py --rounds 4 --local-epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import median_run  # noqa: E402

TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def job_settings(**values) -> dict:
    """jobs/fedavg's settings by section (fedmodal.jobs), with `values` changed."""
    from fedmodal.jobs import job_settings as settings_of

    return settings_of("fedavg", **values)


# ----------------------------------------------------------------------------- no federation


def prepare_worker(site: str, root: Path, num_threads: int, values: dict | None = None):
    """A site's trainer, loader and validation volumes, built from the job's own settings (with
    `values` changed, keys as `--set` takes them), on the site's device."""
    import torch

    from fedmodal.baselines.data import load_volumes, site_data, train_loader
    from fedmodal.baselines.trainer import SegTrainer
    from fedmodal.fl.site import prepare_site

    torch.set_num_threads(num_threads)
    settings = job_settings(**{**(values or {}), "site.data_root": str(root)})  # the site's exact work
    cfg = settings["seg"]
    site_ = prepare_site(site, settings["site"], settings["fedavg"].seed, include_synthetic=cfg.include_synthetic)
    data = site_data(site_.manifest, cfg.include_synthetic)
    loader = train_loader(data.cases("train"), cfg, site_.seed, site_.device)
    volumes = load_volumes(data.validation_cases())
    return SegTrainer(cfg, device=site_.device, seed=site_.seed), loader, volumes


def one_round(worker, local_epochs: int) -> None:
    """A FedAvg site's round without NVFlare: take the weights, validate, train, validate."""
    from fedmodal.baselines.trainer import flat_metrics

    trainer, loader, volumes = worker
    trainer.load_weights(trainer.state_numpy())  # what receiving the global model costs locally
    flat_metrics(trainer.score(volumes))
    trainer.train_epochs(loader, local_epochs)
    flat_metrics(trainer.score(volumes))


def site_worker(site: str, root: Path, rounds: int, local_epochs: int, num_threads: int) -> dict:
    """One site's rounds, each timed on its own (no waiting for the other sites)."""
    setup = time.time()
    worker = prepare_worker(site, root, num_threads)
    setup = time.time() - setup
    times = []
    for _ in range(rounds):
        start = time.time()
        one_round(worker, local_epochs)
        times.append(time.time() - start)
    return {"site": site, "setup_s": setup, "round_s": times}


def lockstep_worker(site: str, root: Path, rounds: int, local_epochs: int, barrier, results, values=None) -> None:
    """One site's rounds in step with the others, as FedAvg's rounds are: every round starts
    when the last site finished the one before. Puts the barrier's release times in `results`."""
    worker = prepare_worker(site, root, 1, values)
    barrier.wait()
    releases = [time.time()]
    for _ in range(rounds):
        one_round(worker, local_epochs)
        barrier.wait()
        releases.append(time.time())
    results.put({"site": site, "releases": releases})


def run_lockstep(sites: list[str], root: Path, rounds: int, local_epochs: int, values: dict | None = None) -> dict:
    """The sites' rounds without NVFlare, one process each, synchronised per round."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(sites)), context.Queue()
    os.environ["OMP_NUM_THREADS"] = "1"  # as the simulator's clients get it
    start = time.time()
    procs = [
        context.Process(target=lockstep_worker, args=(site, root, rounds, local_epochs, barrier, results, values))
        for site in sites
    ]
    for proc in procs:
        proc.start()
    outputs = sorted((results.get() for _ in sites), key=lambda o: o["site"])
    for proc in procs:
        proc.join()
    wall = time.time() - start
    releases = outputs[0]["releases"]
    per_round = [b - a for a, b in zip(releases[1:-1], releases[2:])]  # the first round is not timed
    return {"wall_s": wall, "round_s": sum(per_round) / len(per_round), "releases": releases}


def run_local(sites: list[str], root: Path, rounds: int, local_epochs: int, parallel: bool) -> dict:
    """Time the sites' local work: all sites at once (one process each) or one after the other."""
    options = ["--root", str(root), "--rounds", str(rounds), "--local-epochs", str(local_epochs)]
    start = time.time()
    if parallel:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", site, *options], stdout=subprocess.PIPE, text=True, env=env
            )
            for site in sites
        ]
        outputs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    else:
        outputs = [site_worker(site, root, rounds, local_epochs, 1) for site in sites]
    wall = time.time() - start
    # Rounds after the first, as for the simulator (the first also pays warm-up).
    if parallel:
        per_round = [max(o["round_s"][r] for o in outputs) for r in range(1, rounds)]
    else:
        per_round = [sum(o["round_s"][r] for o in outputs) for r in range(1, rounds)]
    return {"wall_s": wall, "round_s": sum(per_round) / len(per_round), "sites": outputs}


# ----------------------------------------------------------------------------- simulator


def run_simulator(
    sites: list[str], root: Path, rounds: int, local_epochs: int, work: Path, values: dict | None = None
) -> dict:
    """Run jobs/fedavg (no cross-site evaluation) in the simulator; seconds per round from the server log."""
    from fedmodal.fl.allow_list import customize_simulator
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["fedavg"]
    values = {**(values or {}), "num_rounds": rounds, "local_epochs": local_epochs}
    job = export_job(spec, work, route_settings(spec, values))
    server_path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_path.read_text())
    server["workflows"] = [w for w in server["workflows"] if w["id"] == "fedavg"]  # no cross-site evaluation
    server_path.write_text(json.dumps(server, indent=2))
    customize_simulator(work / "ws")
    env = {**os.environ, "HOME": str(work / "home"), "FEDMODAL_DATA_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    nvflare = Path(sys.executable).with_name("nvflare")
    command = [
        str(nvflare),
        "simulator",
        str(job),
        "-w",
        str(work / "ws"),
        "-n",
        str(len(sites)),
        "-t",
        str(len(sites)),
    ]
    start = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"simulator failed:\n{(done.stdout + done.stderr)[-3000:]}")
    marks: dict[str, datetime] = {}
    log = []  # (time, line) of every timestamped line
    last = None
    for line in (done.stdout + done.stderr).splitlines():
        found = TIMESTAMP.match(line)
        if found:
            last = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
            log.append((last, line))
        text = line.strip()
        if last and (re.fullmatch(r"Round \d+ started\.", text) or text == "Finished FedAvg."):
            marks[text] = last
    first, end = marks.get("Round 1 started."), marks.get("Finished FedAvg.")
    if first is None or end is None:
        raise SystemExit("could not find the round marks in the simulator log")
    starts = [marks[f"Round {r} started."] for r in range(1, rounds)] + [end]
    timeline = round_timeline(log, starts, len(sites))
    return {"wall_s": wall, "round_s": (end - first).total_seconds() / (rounds - 1), "timeline": timeline}


def round_timeline(log: list[tuple[datetime, str]], starts: list[datetime], n_sites: int) -> dict:
    """Medians over the timed rounds, from the simulator's log: seconds from a round's start until
    each site has the model (NVFlare logs each download's end, in the order they finish), and from
    the last result's aggregation to the next round's start (final average, model selection,
    persisting the model)."""
    delivered, closing = [], []
    for begin, finish in zip(starts, starts[1:]):
        inside = [(t, line) for t, line in log if begin <= t < finish]
        downloads = [t for t, line in inside if "object has been downloaded to all" in line][:n_sites]
        aggregated = [t for t, line in inside if f"Aggregated {n_sites}/{n_sites} results" in line]
        if len(downloads) == n_sites:
            delivered.append([(t - begin).total_seconds() for t in downloads])
        if aggregated:
            closing.append((finish - aggregated[-1]).total_seconds())
    return {
        "model_at_sites_s": [round(statistics.median(d[k] for d in delivered), 3) for k in range(n_sites)]
        if delivered
        else [],
        "last_result_to_next_round_s": round(statistics.median(closing), 3) if closing else None,
    }


# ----------------------------------------------------------------------------- main


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root", default=None, help="federation folder (default: $FEDMODAL_DATA_ROOT or the phantoms)"
    )
    parser.add_argument("--sites", nargs="+", default=["site-1", "site-2", "site-3"])
    parser.add_argument("--rounds", type=int, default=4, help="rounds (>= 2; the first is not timed)")
    parser.add_argument("--local-epochs", type=int, default=None, help="default: the job's")
    parser.add_argument("--repeats", type=int, default=3, help="alternating federated and local runs (medians)")
    parser.add_argument("--out", default=None, help="also write the table and numbers here (JSON + Markdown)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(site_worker(args.worker, Path(args.root), args.rounds, args.local_epochs, 1)))
        return 0
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2")
    from fedmodal.baselines.local import resolve_root

    root = resolve_root(args.data_root, "modalitybank-missing")
    epochs = args.local_epochs or job_settings()["fedavg"].local_epochs
    load_before = load_average()
    # Federated and local runs alternate, each pair in turns of order, so that the machine's
    # drift in speed between runs (up to a third here) falls on both sides alike.
    fed_runs, local_runs = [], []
    for repeat in range(args.repeats):
        for kind in ("simulator", "local") if repeat % 2 == 0 else ("local", "simulator"):
            if kind == "simulator":
                with tempfile.TemporaryDirectory(prefix="bench-fedavg-") as work:
                    fed_runs.append(run_simulator(args.sites, root, args.rounds, epochs, Path(work)))
            else:
                local_runs.append(run_lockstep(args.sites, root, args.rounds, epochs))
    fed, lockstep = (median_run(runs, key=lambda r: r["round_s"]) for runs in (fed_runs, local_runs))
    parallel = run_local(args.sites, root, args.rounds, epochs, parallel=True)
    sequential = run_local(args.sites, root, args.rounds, epochs, parallel=False)
    load_after = load_average()

    rows = [
        ("no federation, one process per site, rounds in step (as FedAvg's)", lockstep),
        ("no federation, one process per site, each at its own pace", parallel),
        ("NVFlare simulator FedAvg (one thread per site)", fed),
        ("no federation, sites one after another", sequential),
    ]
    lines = [
        f"FedAvg round vs the same local work: {len(args.sites)} sites, {epochs} local epochs per round, "
        f"{args.rounds - 1} timed rounds; nproc {os.cpu_count()}, load average before {load_before}, after {load_after}",
        "",
        "| run | s/round | total wall s | overhead ratio |",
        "|---|---|---|---|",
    ]
    for name, result in rows:
        lines.append(
            f"| {name} | {result['round_s']:.2f} | {result['wall_s']:.1f} | {result['round_s'] / lockstep['round_s']:.2f} |"
        )
    if args.repeats > 1:
        lines += [
            "",
            f"Medians of {args.repeats} alternating runs; per run (federated / local s per round): "
            + ", ".join(f"{f['round_s']:.2f} / {p['round_s']:.2f}" for f, p in zip(fed_runs, local_runs)),
        ]
    timeline = fed["timeline"]
    if timeline["model_at_sites_s"]:
        lines += [
            "",
            "Inside the median federated round (medians over its timed rounds, from the simulator's log): the model "
            "is at the sites "
            + ", ".join(f"{t:.2f}" for t in timeline["model_at_sites_s"])
            + " s after the round starts; the next round starts "
            f"{timeline['last_result_to_next_round_s']:.2f} s after the last result is aggregated.",
        ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_fedavg.md").write_text(table + "\n")
        (out / "bench_fedavg.json").write_text(
            json.dumps(
                {
                    "simulator": fed,
                    "lockstep": lockstep,
                    "parallel": parallel,
                    "simulator_runs": fed_runs,
                    "lockstep_runs": local_runs,
                    "sequential": sequential,
                    "load_before": load_before,
                    "load_after": load_after,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
