"""How the federation grows with its hospitals: 3, 6 and 12 sites in NVFlare's simulator.

For each count the default phantom preset is repeated to that many hospitals (`fedmodal
phantoms --sites N`: site-4 holds what site-1 holds, with its own scanner and patients, the
preset's 16 cases each). Then, one after the other on this machine:

- ModalityBank (jobs/modalitybank with only the step counts changed, `-n N -t N`): steps per
  second per phase, the median step and the server's median wait for the sites (summary.json),
  the server's peak resident memory and the largest site process's (polled from /proc), and
  bytes per step per site (payload audit);
- FedAvg (jobs/fedavg without cross-site evaluation, as `bench_fedavg.py` runs it): seconds per
  round.

    python benchmarks/bench_scale.py --sites 3 6 12 --out benchmarks/results/scale
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fedavg import run_simulator as fedavg_round_seconds  # noqa: E402
from bench_modalitybank import site_bytes, step_figures  # noqa: E402
from procwatch import ProcessWatch, simulator_role  # noqa: E402
from report import publish  # noqa: E402


def modalitybank(num_sites: int, data: Path, steps: int, work: Path) -> dict:
    from fedmodal.fl.allow_list import customize_simulator
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["modalitybank"]
    values = {"pretrain_steps": steps, "bank_steps": steps, "sample_every": 0, "log_every": 10}
    job = export_job(spec, work / "jobs", route_settings(spec, values))
    customize_simulator(work / "ws")
    env = {**os.environ, "FEDMODAL_DATA_ROOT": str(data), "HOME": str(work)}
    nvflare = Path(sys.executable).with_name("nvflare")
    command = [str(nvflare), "simulator", str(job), "-w", str(work / "ws"), "-n", str(num_sites), "-t", str(num_sites)]
    started = time.perf_counter()
    with ProcessWatch(str(work / "ws"), simulator_role) as memory:
        done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ModalityBank with {num_sites} sites failed:\n{(done.stdout + done.stderr)[-3000:]}")
    summary = json.loads((work / "ws/server/simulate_job/modalitybank/summary.json").read_text())
    sites = [f"site-{k}" for k in range(1, num_sites + 1)]
    per_site = [site_bytes(work / "ws", s)["bytes_per_step"] for s in sites]
    return {
        "wall_s": round(wall, 1),
        **step_figures(summary),
        "server_peak_gb": round(memory.peak_gb("server"), 2),
        "site_peak_gb": round(memory.peak_gb("site jobs"), 2),
        "bytes_per_step_per_site": {"min": min(per_site), "max": max(per_site)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 6, 12], help="hospital counts")
    parser.add_argument("--steps", type=int, default=40, help="ModalityBank steps per phase")
    parser.add_argument("--rounds", type=int, default=3, help="FedAvg rounds (the first is not timed)")
    parser.add_argument("--local-epochs", type=int, default=1, help="FedAvg local epochs per round")
    parser.add_argument("--out", default=None, help="also write the numbers here (JSON + Markdown)")
    args = parser.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2")

    from fedmodal.data.phantoms import ensure_federation

    results = {}
    for n in args.sites:
        data = ensure_federation(num_sites=n)
        with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n}-") as work:
            mb = modalitybank(n, data, args.steps, Path(work) / "mb")
            sites = [f"site-{k}" for k in range(1, n + 1)]
            fedavg = fedavg_round_seconds(sites, data, args.rounds, args.local_epochs, Path(work) / "fedavg")
        results[n] = {"modalitybank": mb, "fedavg": fedavg}
        print(f"{n} sites: {json.dumps(results[n])}", flush=True)

    lines = [
        f"Scale in NVFlare's simulator on this machine (nproc {os.cpu_count()}): ModalityBank {args.steps} steps a "
        f"phase, FedAvg {args.rounds} rounds of {args.local_epochs} local epoch(s), 16 phantom cases a site",
        "",
        "| sites | MB pretrain steps/s | MB bank steps/s | median step s (pretrain / bank) | median server s | "
        "median wait for sites s | server peak GB | largest site GB | bytes/step/site (both ways) | FedAvg s/round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in results.items():
        mb = r["modalitybank"]
        rates, step, server, wait = (
            mb["steps_per_second"],
            mb["median_step_seconds"],
            mb["median_server_seconds"],
            mb["median_wait_seconds"],
        )
        lines.append(
            f"| {n} | {rates['pretrain']:.2f} | {rates['bank']:.2f} | {step['pretrain']:.2f} / {step['bank']:.2f} | "
            f"{server['pretrain']:.2f} / {server['bank']:.2f} | {wait['pretrain']:.2f} / {wait['bank']:.2f} | "
            f"{mb['server_peak_gb']:.2f} | {mb['site_peak_gb']:.2f} | "
            f"{mb['bytes_per_step_per_site']['max'] / 1024:.1f} KiB | {r['fedavg']['round_s']:.2f} |"
        )
    publish("\n".join(lines) + "\n", results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
