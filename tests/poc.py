"""Shared by the POC tests: provision a localhost federation, start its processes, talk to it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_YML = REPO / "provisioning" / "project.yml"
CUSTOMIZE = REPO / "provisioning" / "customize_site.py"
JOB = REPO / "jobs" / "site-inventory"
MB_JOB = REPO / "jobs" / "modalitybank"
BIN = Path(sys.executable).parent
SITES = ("hospital-1", "hospital-2", "hospital-3")
PROJECT_ADMIN = "admin@fedmodal.example.org"
LEAD_2 = "lead@hospital-2.example.org"
MEMBER = "dpo@hospital-3.example.org"
ORG_ADMIN_1 = "it@hospital-1.example.org"
START_TIMEOUT = 90
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def build_data(root: Path) -> Path:
    """Three sites of two tiny BraTS 2021 phantom cases each (site-N lacks one modality)."""
    from fedmodal.data.phantoms import build_federation

    return Path(build_federation(root, preset="modalitybank-missing", shape=(32, 32, 20), cases_per_site=2))


def localize_project(text: str, port: int) -> str:
    """project.yml for this machine: server `localhost` on `port`."""
    text = text.replace("fedmodal-server.example.org", "localhost")
    return re.sub(r"fed_learn_port: \d+", f"fed_learn_port: {port}", text)


def provision(project_text: str, workspace: Path, env: dict) -> Path:
    workspace.mkdir(parents=True, exist_ok=True)
    project = workspace / "project.yml"
    project.write_text(project_text)
    subprocess.run(
        [str(BIN / "nvflare"), "provision", "-p", str(project), "-w", str(workspace)],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    prods = sorted(workspace.glob("*/prod_*"))
    assert prods, f"nothing provisioned under {workspace}"
    return prods[-1]


class Processes:
    """Processes this test started, each the leader of its own process group."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, kit: Path, env: dict, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
                cwd=kit,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # anything left in the group once its leader is gone
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _stop_group(pgid: int, timeout: float) -> None:
    """Stop a process group whose leader is not our child (so it cannot linger as our zombie)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def stop_job_processes(kits: list[Path]) -> None:
    """Job processes run in their own sessions (NVFlare starts them with setsid): stop any left."""
    for kit in kits:
        log = kit / "log.txt"
        if not log.is_file():
            continue
        for pid in set(re.findall(r"Launch the job in process ID: (\d+)", log.read_text(errors="replace"))):
            cmdline = Path(f"/proc/{pid}/cmdline")
            try:
                if str(kit) in cmdline.read_bytes().decode(errors="replace").replace("\0", " "):
                    _stop_group(int(pid), 5.0)
            except OSError:
                continue


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


def session(user: str, prod: Path, timeout: float = 20.0):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    return new_secure_session(user, str(prod / user), timeout=timeout)


def connected_sites(sess) -> list[str]:
    return sorted(c.name for c in sess.get_system_info().client_info)


def wait_for_sites(sess, sites, timeout: float) -> list[str]:
    deadline = time.time() + timeout
    while True:
        names = connected_sites(sess)
        if set(sites) <= set(names) or time.time() > deadline:
            return names
        time.sleep(0.5)


def start_federation(tmp_path_factory, name: str = "deploy"):
    """A provisioned federation (server `localhost` + hospital-1..3) as a pytest generator fixture's body."""
    root = tmp_path_factory.mktemp(name)
    home = root / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("FEDMODAL_DATA_ROOT", None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # the FLARE API in this process, too
        yield from _run_federation(root, env)


def _run_federation(root: Path, env: dict):
    data = build_data(root / "data")
    port = free_port()
    prod = provision(localize_project(PROJECT_YML.read_text(), port), root / "provision", env)
    subprocess.run(
        [sys.executable, str(CUSTOMIZE), str(prod), "--server-storage", str(root / "server-storage")],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    procs = Processes()
    logs = root / "logs"
    logs.mkdir()
    fed = {"root": root, "prod": prod, "env": env, "port": port, "procs": procs, "logs": logs, "data": data}
    try:
        t0 = time.time()
        procs.start("server", prod / "localhost", env, logs / "server.out")
        for i, site in enumerate(SITES, start=1):
            site_env = dict(env, FEDMODAL_DATA_ROOT=str(data / f"site-{i}"))
            procs.start(site, prod / site, site_env, logs / f"{site}.out")
        sess = None
        while sess is None:
            try:
                sess = session(PROJECT_ADMIN, prod, timeout=5.0)
            except Exception:
                if time.time() - t0 > START_TIMEOUT:
                    raise
                time.sleep(0.5)
        names = wait_for_sites(sess, SITES, START_TIMEOUT - (time.time() - t0))
        fed["startup_seconds"] = time.time() - t0
        assert set(SITES) <= set(names), f"connected after {START_TIMEOUT}s: {names}; logs in {logs}"
        fed["admin"] = sess
        yield fed
        fed["admin"].close()  # a test that restarts the server leaves its new session here
    finally:
        procs.stop_all()
        stop_job_processes([prod / "localhost", *(prod / s for s in SITES)])
        print(
            f"\nfedmodal POC: start-up {fed.get('startup_seconds', float('nan')):.1f} s, "
            f"submit-to-finish {fed.get('job_seconds', float('nan')):.1f} s, "
            f"modalitybank {fed.get('mb_job_seconds', float('nan')):.1f} s (logs: {logs})"
        )
