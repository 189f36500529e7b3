"""ModalityBank: federated steps per second against the same training in one process.

Both sides run the same code on the same phantom data, batch and networks (the job's own
config): the centralised run hands the coordinator's payloads straight to in-process site
workers; the federated runs are `nvflare simulator` on jobs/modalitybank with only the step
counts changed, and the same job deployed: `provisioning/project.yml` provisioned into a
temporary folder, the server and three hospitals started from their startup kits as real
processes over mutual TLS, the job submitted through the FLARE API (`--provisioned`). Also
reports bytes per step per site (from the payload audit) and the bank's size against the
frozen generator.

    python benchmarks/bench_modalitybank.py --steps 40
    python benchmarks/bench_modalitybank.py --steps 30 --central-threads 2 \
        --federated direct:0.05:2 --provisioned direct:0.05:2 direct:0.05:2:adhoc
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procwatch import ProcessWatch, deployed_role, simulator_role  # noqa: E402
from report import median_run  # noqa: E402


def job_overrides(values: dict, profile: str | None = None) -> dict:
    """jobs/modalitybank's overrides by section: its named `profile` (e.g. "paper"), then `values`."""
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import route_settings, with_profile

    spec = JOBS["modalitybank"]
    return with_profile(spec, profile, route_settings(spec, values))


def job_settings(profile: str | None = None, **values) -> dict:
    """jobs/modalitybank's settings by section (fedmodal.jobs), with `values` changed."""
    from fedmodal.jobs import JOBS

    return JOBS["modalitybank"].settings(job_overrides(values, profile))


WARMUP_STEPS = 3  # the first steps of a phase pay one-off costs (allocation, lazy layers): not timed


def steady_rate(seconds: list[float]) -> float:
    """Steps per second after the warm-up steps."""
    timed = seconds[WARMUP_STEPS:]
    return len(timed) / sum(timed)


def central(steps: int, data_root: Path, threads: int, profile: str | None = None) -> dict:
    """Steps per second per phase with every site's worker in this process (threads 0: torch's
    default); on CUDA also the peak GPU memory."""
    from fedmodal.fl.site import peak_gpu_memory
    from fedmodal.modalitybank.central import train_job

    if threads > 0:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # The job's own configuration (`profile`: a named one of it).
    settings = job_settings(profile, pretrain_steps=steps, bank_steps=steps)
    out = Path(tempfile.mkdtemp(prefix="mb-central-"))
    parts: dict = {}
    roots = {site: data_root / site for site in ("site-1", "site-2", "site-3")}
    trainer, _, timings = train_job(settings, roots, out, parts)
    shutil.rmtree(out, ignore_errors=True)
    rates = {phase: steady_rate(t) for phase, t in timings.items()}
    rates["peak_gpu_memory_bytes"] = peak_gpu_memory(trainer.device)
    # Median seconds of a step's parts: the server's work against the sites' (3 sites, in turn).
    rates["median_parts"] = {
        phase: {part: float(np.median([s[part] for s in split[WARMUP_STEPS:]])) for part in split[0]}
        for phase, split in parts.items()
    }
    return rates


def audit_bytes(audit: Path) -> dict:
    """A site's bytes per step (both ways) and at registration, from its payload audit."""
    records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]

    def size(record: dict) -> int:
        return sum(i["bytes"] or 0 for i in record["items"].values())

    step_bytes = sum(size(r) for r in records if r["task"] == "mb_step")
    n_steps = max(1, sum(1 for r in records if r["task"] == "mb_step" and r["direction"] == "in"))
    register_bytes = sum(size(r) for r in records if r["task"] == "mb_register")
    return {"bytes_per_step": step_bytes / n_steps, "register_bytes": register_bytes}


def site_bytes(workspace: Path, site: str) -> dict:
    """A simulated site's bytes per step and at registration."""
    return audit_bytes(workspace / site / "simulate_job/payload_audit.jsonl")


def export_job(
    dest: Path, steps: int, transport: str, task_poll: float, server_threads: int, profile: str | None = None
) -> Path:
    """jobs/modalitybank (its `profile`, if named) with only the step counts and the measured settings changed."""
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job as export

    spec = JOBS["modalitybank"]
    values = {
        "pretrain_steps": steps,
        "bank_steps": steps,
        "sample_every": 0,
        "log_every": 10,
        "server.num_threads": server_threads,
        "server.task_poll": task_poll,
        "step_transport": transport,
    }
    return export(spec, dest, job_overrides(values, profile))


def wait_split(summary: dict, site_seconds: dict[str, list[float]]) -> dict:
    """Of each step's wait for the sites: the slowest site's own work (its `site_step_seconds.json`)
    and the rest, the transport (serialisation, filters, every hop and queue); medians per phase."""
    phases = list(summary["step_seconds"])
    counts = [len(summary["wait_seconds"][phase]) for phase in phases]
    if any(len(s) != sum(counts) for s in site_seconds.values()):  # a site missed steps: no split
        return {}
    split, offset = {}, 0
    for phase, n in zip(phases, counts):
        slowest = np.max([s[offset : offset + n] for s in site_seconds.values()], axis=0)
        rest = np.subtract(summary["wait_seconds"][phase], slowest)
        split[phase] = {
            "site_compute_s": float(np.median(slowest[WARMUP_STEPS:])),
            "transport_s": float(np.median(rest[WARMUP_STEPS:])),
        }
        offset += n
    return split


def read_site_records(folders: dict[str, Path]) -> dict[str, dict]:
    """Each site's compute per step (and peak GPU memory), from the file its executor writes at the end."""
    from fedmodal.modalitybank.executor import STEP_SECONDS_FILE

    return {site: json.loads((f / "modalitybank" / STEP_SECONDS_FILE).read_text()) for site, f in folders.items()}


def read_site_seconds(folders: dict[str, Path]) -> dict[str, list[float]]:
    """Each site's compute per step, from the file its executor writes at the end of a run."""
    return {site: record["seconds"] for site, record in read_site_records(folders).items()}


def step_figures(summary: dict, site_seconds: dict[str, list[float]] | None = None) -> dict:
    """Steps per second, median step, wait and server work per phase, from a run's summary.json;
    with the sites' own step times, also the split of the wait (`wait_split`)."""
    figures = {"wait_split": wait_split(summary, site_seconds)} if site_seconds is not None else {}
    return {
        **figures,
        "steps_per_second": {phase: steady_rate(t) for phase, t in summary["step_seconds"].items()},
        "median_step_seconds": summary["median_step_seconds"],
        # Of a median step, the time the server waited for the sites (transport + site work).
        "median_wait_seconds": summary["median_wait_seconds"],
        # The rest of a step is the server's own work (G forward, backward, update, bookkeeping).
        "median_server_seconds": {
            phase: float(np.median(np.subtract(t, summary["wait_seconds"][phase])[WARMUP_STEPS:]))
            for phase, t in summary["step_seconds"].items()
        },
    }


def federated(
    steps: int, data_root: Path, transport: str, task_poll: float, server_threads: int, profile: str | None = None
) -> dict:
    """Steps per second per phase and bytes per step per site, from a simulator run; on CUDA
    also each process's peak GPU memory."""
    from fedmodal.fl.allow_list import customize_simulator

    work = Path(tempfile.mkdtemp(prefix="mb-fed-"))
    job = export_job(work / "jobs", steps, transport, task_poll, server_threads, profile)
    customize_simulator(work / "ws")  # the allow-list
    env = {**os.environ, "FEDMODAL_DATA_ROOT": str(data_root), "HOME": str(work)}
    nvflare = Path(sys.executable).with_name("nvflare")
    started = time.perf_counter()
    with ProcessWatch(str(work / "ws"), simulator_role) as watch:
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
    sites = ("site-1", "site-2", "site-3")
    per_site = {site: site_bytes(work / "ws", site) for site in sites}
    site_records = read_site_records({site: work / "ws" / site / "simulate_job" for site in sites})
    shutil.rmtree(work, ignore_errors=True)
    figures = step_figures(summary, {site: r["seconds"] for site, r in site_records.items()})
    memory = {"server": summary.get("peak_gpu_memory_bytes")}
    memory.update({site: r.get("peak_gpu_memory_bytes") for site, r in site_records.items()})
    return {
        **figures,
        "wall_seconds": wall,
        "per_site": per_site,
        "cpu_seconds": watch.cpu_seconds(),
        "peak_gpu_memory_bytes": memory,
    }


PROVISIONED_SITES = ("hospital-1", "hospital-2", "hospital-3")  # provisioning/project.yml's sites


def provisioned(
    steps: int, data_root: Path, transport: str, task_poll: float, server_threads: int, customize: tuple = ()
) -> dict:
    """The same job deployed as hospitals run it: `provisioning/project.yml` provisioned into a
    temporary folder (server `localhost`), server and hospital-1..3 started from their kits as
    real processes over mutual TLS (hospital-N reads phantom site-N), the job submitted as the
    project admin through the FLARE API. `customize` are further arguments to
    provisioning/customize_site.py (`--direct-links`)."""
    from nvflare.apis.job_def import RunStatus

    from fedmodal.fl.provisioned import ProvisionedFederation, direct_links

    work = Path(tempfile.mkdtemp(prefix="mb-poc-"))
    home = work / "home"
    home.mkdir()
    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # the FLARE API keeps state under HOME: not the user's
    site_data = {site: data_root / f"site-{i}" for i, site in enumerate(PROVISIONED_SITES, start=1)}
    try:
        with ProvisionedFederation(
            work,
            REPO / "provisioning/project.yml",
            REPO / "provisioning/customize_site.py",
            site_data,
            env={**os.environ, "HOME": str(home)},
            customize_args=customize,
        ) as fed:
            job = export_job(work / "jobs", steps, transport, task_poll, server_threads)
            with ProcessWatch(str(work), deployed_role) as watch:
                job_id, meta, wall = fed.run_job(job, timeout=3600)
            if meta.get("status") != RunStatus.FINISHED_COMPLETED.value:
                raise RuntimeError(f"job {job_id} ended {meta.get('status')}; logs in {fed.logs}")
            result = Path(fed.admin.download_job_result(job_id, destination=str(work / "result")))
            summary = json.loads(next(result.rglob("modalitybank/summary.json")).read_text())
            per_site = {site: audit_bytes(fed.prod / site / job_id / "payload_audit.jsonl") for site in fed.sites}
            site_seconds = read_site_seconds({site: fed.prod / site / job_id for site in fed.sites})
            direct = {site: direct_links(fed.prod / site / job_id / "log.txt") for site in fed.sites}
            startup = fed.startup_seconds
    finally:
        if saved_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved_home
    shutil.rmtree(work, ignore_errors=True)
    figures = step_figures(summary, site_seconds)
    return {
        **figures,
        "wall_seconds": wall,
        "startup_seconds": startup,
        "per_site": per_site,
        "direct_links": direct,
        "cpu_seconds": watch.cpu_seconds(),
    }


DIRECT_LINK_PORTS = "8100-8199"  # where the server's job processes listen with --direct-links


def with_every_run(done: list[dict]) -> dict:
    """The run with the median bank steps/s, with every run's steps/s beside it."""
    rates = [r.get("steps_per_second", r) for r in done]  # a central run is its rates
    chosen = median_run(done, key=lambda r: r.get("steps_per_second", r)["bank"])
    return {**chosen, "every_run": [{phase: r[phase] for phase in ("pretrain", "bank")} for r in rates]}


def parse_deployed(spec: str) -> tuple:
    """ "direct:0.05:2[:adhoc]" -> (transport, task_poll, server threads, customize_site.py arguments)."""
    transport, interval, threads, *extra = spec.split(":")
    if extra not in ([], ["adhoc"]):
        raise SystemExit(f"--provisioned {spec!r}: the optional fourth field is 'adhoc'")
    customize = ("--direct-links", f"localhost:{DIRECT_LINK_PORTS}") if extra else ()
    return transport, float(interval), int(threads), customize


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
        help="simulator runs: step transport (direct or task), server task_poll (s), server torch threads",
    )
    parser.add_argument(
        "--provisioned",
        nargs="*",
        default=["direct:0.05:2"],
        metavar="TRANSPORT:INTERVAL:THREADS[:adhoc]",
        help="deployed runs (provisioned, mutual TLS, real processes): as --federated; ':adhoc' lets "
        "the job processes connect directly over mutual TLS (customize_site.py --direct-links, NVFlare's "
        "ad-hoc connections) instead of through the server's parent process",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="keep N busy-loop processes running throughout, to measure on a machine busy with other work",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of every mode, in turn; rows are medians")
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
        "repeats": args.repeats,
    }
    specs = {spec: (kind, float(i), int(t)) for spec in args.federated for kind, i, t in [spec.split(":")]}
    # Each repeat runs every mode once, in turn, so that a slow spell of the machine touches
    # all modes alike; a mode's row is its median run (by bank steps/s).
    runs: dict[str, dict[str, list]] = {"central_steps_per_second": {}, "federated": {}, "provisioned": {}}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        for t in args.central_threads:
            runs["central_steps_per_second"].setdefault(str(t), []).append(central(args.steps, data_root, t))
        for spec, setting in specs.items():
            runs["federated"].setdefault(spec, []).append(federated(args.steps, data_root, *setting))
        for spec in args.provisioned:
            runs["provisioned"].setdefault(spec, []).append(provisioned(args.steps, data_root, *parse_deployed(spec)))
    for mode, by_spec in runs.items():
        results[mode] = {spec: with_every_run(done) for spec, done in by_spec.items()}
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
    runs = [("simulator", spec, fed) for spec, fed in results["federated"].items()]
    runs += [("provisioned (mTLS)", spec, fed) for spec, fed in results["provisioned"].items()]
    for mode, spec, fed in runs:
        transport, interval, threads, *extra = spec.split(":")
        f, w, own = fed["steps_per_second"], fed["median_wait_seconds"], fed["median_server_seconds"]
        print(
            f"| {mode}, {transport} steps, task_poll {interval} s, server {threads} thread(s)"
            f"{', ad-hoc connections' if extra else ''} | "
            f"{f['pretrain']:.3f} | {f['bank']:.3f} | "
            f"{f['pretrain'] / c['pretrain']:.2f}, {f['bank'] / c['bank']:.2f} | "
            f"{w['pretrain'] * 1000:.0f} ms, {w['bank'] * 1000:.0f} ms | "
            f"{own['pretrain'] * 1000:.0f} ms, {own['bank'] * 1000:.0f} ms |"
        )
    print("\n| run | phase | server's own work (ms) | slowest site's work (ms) | transport (ms) |")
    print("|---|---|---|---|---|")
    for mode, spec, fed in runs:
        if not fed["wait_split"]:  # a site's step times do not line up with the server's steps
            print(f"| {mode}, {spec} | n/a: a site missed steps | | | |")
        for phase, part in fed["wait_split"].items():
            own = fed["median_server_seconds"][phase] * 1000
            print(
                f"| {mode}, {spec} | {phase} | {own:.0f} | {part['site_compute_s'] * 1000:.0f} | "
                f"{part['transport_s'] * 1000:.0f} |"
            )
    print("\n| run | every run's steps/s (pretrain / bank), in the order run |\n|---|---|")
    modes = {"central threads": by_threads, "simulator": results["federated"], "provisioned": results["provisioned"]}
    for mode, by_spec in modes.items():
        for spec, chosen in by_spec.items():
            every = ", ".join(f"{r['pretrain']:.2f} / {r['bank']:.2f}" for r in chosen["every_run"])
            print(f"| {mode} {spec} | {every} |")
    print(
        "\n| run | wall (s) | CPU seconds while it ran, by process: server job (simulator: its one server process) "
        "| server parent | 3 site jobs | 3 site parents |\n|---|---|---|---|---|---|"
    )
    for mode, spec, fed in runs:
        cpu = fed.get("cpu_seconds", {})
        server = cpu.get("server job", cpu.get("server", 0.0))
        print(
            f"| {mode}, {spec} | {fed['wall_seconds']:.0f} | {server:.0f} | {cpu.get('server parent', 0.0):.0f} | "
            f"{cpu.get('site jobs', 0.0):.0f} | {cpu.get('site parents', 0.0):.0f} |"
        )
    print("\n| deployed run | site | direct links to the server's job (from its job log) | TLS errors |")
    print("|---|---|---|---|")
    for spec, fed in results["provisioned"].items():
        for site, link in fed["direct_links"].items():
            made = ", ".join(link["connectors"]) or "none: relayed by the server's parent"
            print(f"| {spec} | {site} | {made} | {link['tls_errors']} |")
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
