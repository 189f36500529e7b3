"""A server killed mid-run loses nothing: real processes over mutual TLS (a provisioned localhost).

The tiny ModalityBank job runs until its server has written a checkpoint inside the bank
phase; then the server's parent and job processes are killed with SIGKILL (no clean-up), the
server is started again from its kit, and the same job is submitted with `server.resume_from`
set to a copy of that checkpoint (NVFlare 2.9 goes on listing the killed job as running). The resumed run must finish, redo only the steps after the
checkpoint, and every hospital must reload the discriminators it saved at that step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from nvflare.apis.job_def import RunStatus

from poc import (
    MB_TINY_SERVER,
    MB_TINY_SITE,
    PROJECT_ADMIN,
    SITES,
    START_TIMEOUT,
    log_tails,
    session,
    start_federation,
    wait_for_sites,
)

pytestmark = pytest.mark.integration

STEPS = {"pretrain_steps": 4, "bank_steps": 8}
TOTAL = sum(STEPS.values())


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    yield from start_federation(tmp_path_factory, "restart")


def export(dest: Path, **values) -> str:
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["modalitybank"]
    settings = {**MB_TINY_SERVER, **MB_TINY_SITE, **STEPS, "sample_every": 0, **values}
    return str(export_job(spec, dest, route_settings(spec, settings)))


def wait_for_checkpoint(run_dir: Path, after_step: int, timeout: float) -> dict:
    """The server's checkpoint record once it is past `after_step`."""
    run_file = run_dir / "modalitybank" / "checkpoint" / "run.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            record = json.loads(run_file.read_text())
            if record["global_step"] > after_step:
                return record
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint past step {after_step} in {run_file} within {timeout}s")


def server_job_pid(kit: Path, job_id: str) -> int:
    """The server's job process (NVFlare starts it in its own session): its command line names
    the job and the server's kit."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if job_id in cmdline and str(kit) in cmdline and "runner_process" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no server job process for {job_id} under {kit}")


def test_a_killed_server_resumes_from_its_checkpoint_and_finishes_the_run(federation, tmp_path):
    sess, prod, procs = federation["admin"], federation["prod"], federation["procs"]
    server_kit = prod / "localhost"
    job_id = sess.submit_job(export(tmp_path / "first", checkpoint_every=2))
    checkpoint = wait_for_checkpoint(server_kit / job_id, after_step=STEPS["pretrain_steps"], timeout=240)
    # Keep the checkpoint as an operator would (the kill may land while the next one is written).
    saved = tmp_path / "checkpoint"
    shutil.copytree(server_kit / job_id / "modalitybank" / "checkpoint", saved)
    kept = json.loads((saved / "run.json").read_text())
    assert kept["global_step"] >= checkpoint["global_step"]
    assert kept["global_step"] < TOTAL, "the run finished before the server could be killed"

    job_pid = server_job_pid(server_kit, job_id)
    os.killpg(procs.procs["server"].pid, signal.SIGKILL)
    os.kill(job_pid, signal.SIGKILL)
    procs.procs.pop("server").wait(timeout=10)
    sess.close()

    procs.start("server", server_kit, federation["env"], federation["logs"] / "server-restarted.out")
    deadline = time.time() + START_TIMEOUT
    sess = None
    while sess is None:
        try:
            sess = session(PROJECT_ADMIN, prod, timeout=5.0)
        except Exception:
            assert time.time() < deadline, "the restarted server did not take an admin session"
            time.sleep(0.5)
    federation["admin"] = sess
    assert set(SITES) <= set(wait_for_sites(sess, SITES, START_TIMEOUT)), "the hospitals did not reconnect"
    # NVFlare 2.9 marks nothing at a restart: the killed job still reads RUNNING in the job store,
    # and abort_job refuses it ("is not running"); it blocks nothing, so the operator resubmits.
    assert sess.get_job_meta(job_id)["status"] == RunStatus.RUNNING.value

    resumed_id = sess.submit_job(export(tmp_path / "resumed", checkpoint_every=2, resume_from=str(saved)))
    meta = sess.wait_for_job(resumed_id, timeout=400, poll_interval=1.0)
    assert meta["status"] == RunStatus.FINISHED_COMPLETED.value, f"{meta}\n{log_tails(federation, resumed_id)}"

    result = Path(sess.download_job_result(resumed_id, destination=str(tmp_path / "result")))
    summary = json.loads(next(result.rglob("modalitybank/summary.json")).read_text())
    redone = TOTAL - kept["global_step"]
    assert sum(summary["steps"].values()) == redone, summary["steps"]  # none skipped, none done twice
    final = json.loads(next(result.rglob("modalitybank/checkpoint/run.json")).read_text())
    assert final == {"run_id": kept["run_id"], "global_step": TOTAL}
    for site in SITES:
        site_log = (prod / site / resumed_id / "log.txt").read_text(errors="replace")
        assert f"site {site}: discriminators resumed from" in site_log, site
        assert f"(step {kept['global_step']})" in site_log, site
