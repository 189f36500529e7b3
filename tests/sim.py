"""Shared by the simulator tests: export a job with changed settings, run `nvflare simulator`, read audits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fedmodal.fl.allow_list import customize_simulator
from fedmodal.fl.simulator import check_client_identities
from fedmodal.jobs import JOBS
from fedmodal.jobs.spec import export_job, route_settings

NVFLARE = Path(sys.executable).with_name("nvflare")

# The smallest networks the key-group jobs' simulator tests train (2D, 32 x 32 patches).
TINY_NETS = {
    "mixmfl": {"features": [4, 8, 16], "patch_size": [32, 32], "batch_size": 4, "samples_per_case": 2},
    "fedmepd": {"spatial_dims": 2, "channels": [8, 16, 32, 64], "patch_size": [32, 32], "batch_size": 2,
                "samples_per_case": 2},
}  # fmt: skip


def run_job(name: str, values: dict, tmp: Path, data: Path, sites: int, timeout: float) -> tuple[Path, str]:
    """Run job `name` with `values` in the simulator under `tmp` on `data`; (workspace, log). Asserts success."""
    spec = JOBS[name]
    job = export_job(spec, tmp / "jobs", route_settings(spec, values))
    env = {**os.environ, "FEDMODAL_DATA_ROOT": str(data), "HOME": str(tmp), "OMP_NUM_THREADS": "1"}
    shutil.rmtree(tmp / "ws", ignore_errors=True)
    customize_simulator(tmp / "ws")
    proc = subprocess.run(
        [str(NVFLARE), "simulator", str(job), "-w", str(tmp / "ws"), "-n", str(sites), "-t", str(sites)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    check_client_identities(tmp / "ws")
    assert proc.returncode == 0, log[-4000:]
    return tmp / "ws", log


def write_client_log(ws: Path, folder: str, identity: str) -> None:
    """A simulator client folder's log.txt whose lines name `identity` (as NVFlare's client runner writes them)."""
    (ws / folder).mkdir(parents=True, exist_ok=True)
    line = f"2026-12-03 14:22:29,977 - ClientRunner - INFO - [identity={identity}, run=simulate_job] - synced\n"
    (ws / folder / "log.txt").write_text(line * 3)


def read_audit(ws: Path, site: str) -> list[dict]:
    """A site's payload audit records."""
    path = ws / site / "simulate_job" / "payload_audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def site_modalities(data: Path, sites) -> dict[str, set[str]]:
    """The modalities each phantom site holds, from its federation.json."""
    federation = json.loads((data / "federation.json").read_text())["sites"]
    return {s: set(federation[s]["modalities"]) for s in sites}
