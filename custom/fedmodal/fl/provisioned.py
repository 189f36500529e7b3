"""A provisioned federation on this machine: the project's server (renamed `localhost`) and its
hospitals started from their startup kits as real processes over mutual TLS.

What an operator does by hand (`nvflare provision`, `provisioning/customize_site.py`, each
kit's start script, the FLARE API as the project admin), done in a temporary folder, for the
POC tests and the deployment benchmark. Every process it starts is stopped by its process
group, and only those.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
PROJECT_ADMIN = "admin@fedmodal.example.org"
SERVER_KIT = "localhost"
START_TIMEOUT = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def localize_project(text: str, port: int) -> str:
    """project.yml for this machine: server `localhost` on `port`."""
    text = text.replace("fedmodal-server.example.org", SERVER_KIT)
    return re.sub(r"fed_learn_port: \d+", f"fed_learn_port: {port}", text)


def provision(project_text: str, workspace: Path, env: dict) -> Path:
    """`nvflare provision` of `project_text` into `workspace`; the prod folder of startup kits."""
    workspace.mkdir(parents=True, exist_ok=True)
    project = workspace / "project.yml"
    project.write_text(project_text)
    done = subprocess.run(
        [str(BIN / "nvflare"), "provision", "-p", str(project), "-w", str(workspace)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    prods = sorted(workspace.glob("*/prod_*"))
    if done.returncode != 0 or not prods:
        raise RuntimeError(f"nvflare provision of {project} failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return prods[-1]


class Processes:
    """Processes started here, each the leader of its own process group."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, kit: Path, env: dict, log: Path) -> subprocess.Popen:
        """Start a kit's parent process (`sub_start.sh --once`: no restart loop), output to `log`."""
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
    """Job processes run in their own sessions (NVFlare starts them with setsid): stop any left,
    recognised by the kit's log and by their command line naming the kit."""
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


def session(user: str, prod: Path, timeout: float = 20.0):
    """A FLARE API session as `user`, with the admin kit provisioned for them."""
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


def direct_links(job_log: Path) -> dict:
    """What a site's job log says of direct (ad-hoc) links to the server's job process
    (`customize_site.py --direct-links`): the URLs NVFlare connected to, the connectors it could
    not make, and TLS failures."""
    text = job_log.read_text(errors="replace")
    return {
        "connectors": sorted(set(re.findall(r"created adhoc connector \S+ to (\S+) on ", text))),
        "failed": len(re.findall(r"cannot create adhoc connector", text)),
        "tls_errors": len(re.findall(r"SSLError|CERTIFICATE_VERIFY_FAILED", text)),
    }


class ProvisionedFederation:
    """Provision `project_yml` under `root`, start the server and every site in `site_data`,
    open an admin session; `close()` (or leaving the `with` block) stops them all.

    The FLARE API keeps state under HOME: the caller points HOME (here and in `env`) at a
    folder of its own.

    Args:
        root: an empty folder for the provisioning, the server's job store and the logs.
        project_yml: the project file (its server is renamed `localhost`, on a free port).
        customize_script: `provisioning/customize_site.py` (site-local policies, job store).
        site_data: site (kit) name -> its data folder (the site's FEDMODAL_DATA_ROOT).
        env: the processes' environment (default: this one's).
        start_timeout: seconds for the server and every site to connect.
        customize_args: further arguments to the customize script (e.g. `--direct-links
            localhost:8100-8199`), run before anything starts.
    """

    def __init__(
        self,
        root: Path,
        project_yml: Path,
        customize_script: Path,
        site_data: Mapping[str, Path],
        env: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
        customize_args: Sequence[str] = (),
    ):
        self.root = Path(root)
        self.sites = tuple(site_data)
        self.env = dict(env if env is not None else os.environ)
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.pop("FEDMODAL_DATA_ROOT", None)
        self.port = free_port()
        self.procs = Processes()
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.admin = None
        self.startup_seconds = float("nan")
        try:
            self.prod = provision(
                localize_project(Path(project_yml).read_text(), self.port), self.root / "provision", self.env
            )
            missing = [s for s in self.sites if not (self.prod / s).is_dir()]
            if missing:
                raise ValueError(
                    f"{project_yml} provisions no site {missing}; it has {sorted(p.name for p in self.prod.iterdir())}"
                )
            command = [
                sys.executable,
                str(customize_script),
                str(self.prod),
                "--server-storage",
                str(self.server_storage),
                *customize_args,
            ]
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-2000:]}")
            self._start(site_data, start_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def server_storage(self) -> Path:
        return self.root / "server-storage"

    @property
    def kits(self) -> list[Path]:
        return [self.prod / SERVER_KIT, *(self.prod / s for s in self.sites)]

    def _start(self, site_data: Mapping[str, Path], timeout: float) -> None:
        t0 = time.time()
        self.procs.start("server", self.prod / SERVER_KIT, self.env, self.logs / "server.out")
        for site, data in site_data.items():
            self.procs.start(
                site, self.prod / site, dict(self.env, FEDMODAL_DATA_ROOT=str(data)), self.logs / f"{site}.out"
            )
        while self.admin is None:
            try:
                self.admin = session(PROJECT_ADMIN, self.prod, timeout=5.0)
            except Exception:
                if time.time() - t0 > timeout:
                    raise
                time.sleep(0.5)
        names = wait_for_sites(self.admin, self.sites, timeout - (time.time() - t0))
        if not set(self.sites) <= set(names):
            raise RuntimeError(f"connected after {timeout:.0f} s: {names}, not {list(self.sites)}; logs in {self.logs}")
        self.startup_seconds = time.time() - t0

    def run_job(self, job_folder: str | Path, timeout: float) -> tuple[str, dict, float]:
        """Submit a job folder as the project admin and wait for it: (job id, meta, seconds)."""
        t0 = time.time()
        job_id = self.admin.submit_job(str(job_folder))
        meta = self.admin.wait_for_job(job_id, timeout=timeout, poll_interval=1.0)
        return job_id, meta, time.time() - t0

    def close(self) -> None:
        if self.admin is not None:
            with contextlib.suppress(Exception):
                self.admin.close()
            self.admin = None
        self.procs.stop_all()
        if hasattr(self, "prod"):
            stop_job_processes(self.kits)

    def __enter__(self) -> ProvisionedFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
