"""Shared by the POC tests: provision a localhost federation, start its processes, talk to it."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from fedmodal.fl.provisioned import (  # noqa: F401  (re-exported for the POC tests)
    PROJECT_ADMIN,
    START_TIMEOUT,
    ProvisionedFederation,
    connected_sites,
    provision,
    session,
    wait_for_sites,
)

REPO = Path(__file__).resolve().parents[1]
PROJECT_YML = REPO / "provisioning" / "project.yml"
CUSTOMIZE = REPO / "provisioning" / "customize_site.py"
JOB = REPO / "jobs" / "site-inventory"
MB_JOB = REPO / "jobs" / "modalitybank"
SITES = ("hospital-1", "hospital-2", "hospital-3")
LEAD_2 = "lead@hospital-2.example.org"
MEMBER = "dpo@hospital-3.example.org"
ORG_ADMIN_1 = "it@hospital-1.example.org"
JOB_TIMEOUT = 120
MB_JOB_TIMEOUT = 300  # four job processes import torch, then 2 + 3 GAN steps on CPU
# tests/test_modalitybank_sim.py's tiny run (step_timeout bounds each direct exchange).
MB_TINY_SERVER = {
    "image_size": 32,
    "ngf": 8,
    "n_blocks": 2,
    "batch_size": 2,
    "pretrain_steps": 2,
    "bank_steps": 3,
    "sample_every": 2,
    "log_every": 1,
    "checkpoint_every": 2,
    "preview_count": 2,
    "step_timeout": 120,
}
MB_TINY_SITE = {"ndf": 8, "n_layers": 2, "split": "all"}


def build_data(root: Path) -> Path:
    """Three sites of two tiny BraTS 2021 phantom cases each (site-N lacks one modality)."""
    from fedmodal.data.phantoms import build_federation

    return Path(build_federation(root, preset="modalitybank-missing", shape=(32, 32, 20), cases_per_site=2))


def job_copy(dest: Path, job: Path = JOB) -> str:
    """A copy of the job to submit: the FLARE API signs the folder it submits in place."""
    folder = dest / job.name
    shutil.copytree(job, folder)
    return str(folder)


def tiny_modalitybank(dest: Path) -> str:
    """jobs/modalitybank at the simulator test's tiny size (its step transport as shipped): the
    recipe's export, which the FLARE API then signs in place."""
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["modalitybank"]
    return str(export_job(spec, dest, route_settings(spec, {**MB_TINY_SERVER, **MB_TINY_SITE})))


def log_tails(federation: dict, job_id: str, lines: int = 12) -> str:
    """Each participant's logs of a job (its job log and its parent's), with their last lines.

    A finished job's server run folder is moved into the job store as a zip (`workspace`):
    the server's job log is read from there once its run folder is gone."""
    prod = federation["prod"]
    parts = []

    def tail(name: str, text: str) -> None:
        parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))

    for kit in ("localhost", *SITES):
        job_log = prod / kit / job_id / "log.txt"
        stored = federation["root"] / "server-storage" / "jobs-storage" / job_id / "workspace"
        if job_log.is_file():
            tail(str(job_log), job_log.read_text(errors="replace"))
        elif kit == "localhost" and stored.is_file():
            try:
                with zipfile.ZipFile(stored) as z:
                    tail(f"{stored} (zip) log.txt", z.read("log.txt").decode(errors="replace"))
            except (zipfile.BadZipFile, KeyError) as error:
                parts.append(f"--- {stored}: {error}")
        else:
            parts.append(f"--- {job_log}: missing")
        if (prod / kit / "log.txt").is_file():
            tail(str(prod / kit / "log.txt"), (prod / kit / "log.txt").read_text(errors="replace"))
    return "\n".join(parts)


def start_federation(tmp_path_factory, name: str = "deploy", customize_args: tuple[str, ...] = ()):
    """A provisioned federation (server `localhost` + hospital-1..3) as a pytest generator fixture's
    body; `customize_args` go to provisioning/customize_site.py."""
    root = tmp_path_factory.mktemp(name)
    home = root / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))  # ProvisionedFederation puts this venv on PATH
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # the FLARE API in this process, too
        yield from _run_federation(root, env, customize_args)


def _run_federation(root: Path, env: dict, customize_args: tuple[str, ...]):
    data = build_data(root / "data")
    fed = {}
    deployed = None
    try:
        deployed = ProvisionedFederation(
            root,
            PROJECT_YML,
            CUSTOMIZE,
            {site: data / f"site-{i}" for i, site in enumerate(SITES, start=1)},
            env=env,
            start_timeout=START_TIMEOUT,
            customize_args=customize_args,
        )
        fed.update(
            root=root,
            prod=deployed.prod,
            env=deployed.env,
            port=deployed.port,
            procs=deployed.procs,
            logs=deployed.logs,
            data=data,
            admin=deployed.admin,
            startup_seconds=deployed.startup_seconds,
        )
        yield fed
    finally:
        if deployed is not None:
            # A test that restarts the server leaves its new session in the dict: close that one.
            deployed.admin = fed.get("admin", deployed.admin)
            deployed.close()
        print(
            f"\nfedmodal POC: start-up {fed.get('startup_seconds', float('nan')):.1f} s, "
            f"submit-to-finish {fed.get('job_seconds', float('nan')):.1f} s, "
            f"modalitybank {fed.get('mb_job_seconds', float('nan')):.1f} s (logs: {root / 'logs'})"
        )
