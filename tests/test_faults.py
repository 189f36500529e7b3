"""Site faults in NVFlare's own simulator: in ModalityBank a hung site is dropped and rejoins,
a killed site is dropped and the run finishes with the others (both say so); FedAvg finishes
its rounds with the sites left.

The faults are real: the test stops (SIGSTOP / SIGCONT) or kills (SIGKILL) the simulator's
worker process of one site, found by its command line under this test's workspace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmodal.data.phantoms import build_federation
from fedmodal.fl.allow_list import customize_simulator
from fedmodal.fl.simulator import check_client_identities
from fedmodal.jobs import JOBS
from fedmodal.jobs.spec import export_job, route_settings
from sim import TINY_NETS

pytestmark = pytest.mark.integration

NVFLARE = Path(sys.executable).with_name("nvflare")
TINY = {
    "image_size": 32,
    "ngf": 8,
    "n_blocks": 2,
    "batch_size": 2,
    "pretrain_steps": 14,
    "bank_steps": 14,
    "sample_every": 0,
    "log_every": 1,
    "checkpoint_every": 0,
    "preview_count": 2,
    "step_timeout": 4,
    "rejoin_every": 2,
    "ndf": 8,
    "n_layers": 2,
    "split": "all",
}


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    return build_federation(tmp_path_factory.mktemp("faultdata"), shape=(40, 40, 24), cases_per_site=2, test_cases=1)


def site_worker_pid(workspace: Path, site: str) -> int | None:
    """The simulator's worker process of `site` in this workspace (a process this test started)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ours = any(str(workspace) in part for part in cmdline)
        if ours and "nvflare.private.fed.app.simulator.simulator_worker" in cmdline and site in cmdline:
            return int(entry.name)
    return None


def steps_done(log: Path) -> int:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return text.count('progress {"phase"')


def simulate_with_fault(tmp: Path, job: str, values: dict, data: Path, sites: int, ready, fault) -> str:
    """Run `job` with `values` in the simulator with `sites` sites; once `ready(log text)` holds,
    call `fault(pid of site-3's worker, log path)`; the run must still succeed. Returns the log."""
    spec = JOBS[job]
    job_dir = export_job(spec, tmp / "jobs", route_settings(spec, values))
    workspace = tmp / "ws"
    customize_simulator(workspace)
    env = {**os.environ, "FEDMODAL_DATA_ROOT": str(data), "HOME": str(tmp), "OMP_NUM_THREADS": "1"}
    log = tmp / "simulator.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(NVFLARE), "simulator", str(job_dir), "-w", str(workspace), "-n", str(sites), "-t", str(sites)],
            env=env,
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 300
            while not ready(log.read_text(errors="replace")):
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            pid = site_worker_pid(workspace, "site-3")
            assert pid is not None, "no simulator worker process for site-3"
            fault(pid, log)
            proc.wait(timeout=600)
            check_client_identities(workspace)
            assert proc.returncode == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return log.read_text(errors="replace")


def run_with_fault(tmp: Path, data: Path, fault) -> dict:
    """jobs/modalitybank, site-3 faulted in the middle of pretraining; its summary.json."""
    simulate_with_fault(tmp, "modalitybank", TINY, data, 3, lambda text: text.count('progress {"phase"') >= 3, fault)
    return json.loads((tmp / "ws/server/simulate_job/modalitybank/summary.json").read_text())


def test_a_hung_site_is_dropped_and_rejoins(phantom_data, tmp_path):
    def hang_for_a_while(pid: int, log: Path) -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            seen = steps_done(log)
            deadline = time.time() + 120
            while steps_done(log) < seen + 3:  # the others train on without it
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)

    summary = run_with_fault(tmp_path, phantom_data, hang_for_a_while)
    assert summary["steps"] == {"pretrain": TINY["pretrain_steps"], "bank": TINY["bank_steps"]}  # none skipped
    events = [(m["event"], m["site"]) for m in summary["membership"]]
    assert events[0] == ("dropped", "site-3") and ("rejoined", "site-3") in events, summary["membership"]
    dropped_at = next(m["step"] for m in summary["membership"] if m["event"] == "dropped")
    rejoined_at = next(m["step"] for m in summary["membership"] if m["event"] == "rejoined")
    assert dropped_at < rejoined_at <= TINY["pretrain_steps"] + TINY["bank_steps"]


def test_a_killed_site_is_dropped_and_the_run_finishes_with_the_others(phantom_data, tmp_path):
    summary = run_with_fault(tmp_path, phantom_data, lambda pid, log: os.kill(pid, signal.SIGKILL))
    assert summary["steps"] == {"pretrain": TINY["pretrain_steps"], "bank": TINY["bank_steps"]}
    assert [(m["event"], m["site"]) for m in summary["membership"]] == [("dropped", "site-3")]
    assert "no answer within" in summary["membership"][0]["reason"]


def test_fedavg_finishes_its_rounds_without_a_killed_site(tmp_path):
    """jobs/fedavg with min_responses 2 of 3: site-3 is killed during round 1; the remaining
    rounds complete with two sites, and cross-site evaluation goes on without it."""
    data = build_federation(tmp_path / "data", shape=(32, 32, 24), cases_per_site=5, test_cases=1)
    values = {
        "seg.net": "unet2d-wt-tiny",
        "local_epochs": 1,
        "batch_size": 4,
        "samples_per_case": 2,
        "num_rounds": 3,
        "min_responses": 2,
        "wait_after_min": 5,
        "submit_model_timeout": 20,
        "validation_timeout": 60,
    }
    kill = lambda pid, log: os.kill(pid, signal.SIGKILL)  # noqa: E731
    text = simulate_with_fault(tmp_path, "fedavg", values, data, 3, lambda t: "Round 1 started." in t, kill)
    workspace = tmp_path / "ws"
    assert "Round 2 started." in text and "Finished FedAvg." in text, text[-3000:]
    assert "Aggregated 2/3 results" in text
    assert (workspace / "server/simulate_job/app_server/FL_global_model.pt").is_file()


def round_records(text: str) -> list[dict]:
    """The key-group workflow's per-round log records, in order."""
    return [json.loads(line.split("round ", 1)[1]) for line in text.splitlines() if 'round {"round"' in line]


def keygroup_federation(tmp: Path, job: str) -> Path:
    # Three simulator clients use the preset's site-1..3; for both presets they cover all four modalities.
    return build_federation(tmp / "data", shape=(32, 32, 24), cases_per_site=4, test_cases=1, preset=job)


def test_mixmfl_goes_on_without_a_hung_site_which_rejoins_from_the_current_model(tmp_path):
    """site-3 stopped (SIGSTOP) during round 2 and resumed after round 3: rounds 2-3 go on with
    two sites after `wait_after_min`, site-3 registers again beside a later round, trains the
    last round from the global model and is scored at the end."""
    values = {
        **TINY_NETS["mixmfl"],
        "min_cluster_size": 3,
        "kmeans_k": 2,
        "local_epochs": 1,
        # Rounds take a quarter second here: room for site-3 to register again after its stop.
        "num_rounds": 10,
        "wait_after_min": 3,
        "task_timeout": 300,
    }

    def hang_for_two_rounds(pid: int, log: Path) -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.time() + 300
            while len(round_records(log.read_text(errors="replace"))) < 3:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)

    data = keygroup_federation(tmp_path, "mixmfl")
    text = simulate_with_fault(
        tmp_path, "mixmfl", values, data, 3, lambda t: len(round_records(t)) >= 1, hang_for_two_rounds
    )
    records = round_records(text)
    assert [r["round"] for r in records] == list(range(1, 11))  # no round skipped
    missed = [r["round"] for r in records if "site-3" in r["missed"]]
    rejoined = [r["round"] for r in records if "site-3" in r["rejoined"]]
    assert missed and missed[0] == 2, records
    assert rejoined and rejoined[0] > missed[-1], records
    assert "site-3" in records[-1]["sites"], records[-1]  # trained again after rejoining
    assert all(sorted(r["sites"]) == ["site-1", "site-2"] for r in records if r["round"] in missed)
    per_site = json.loads((tmp_path / "ws/server/simulate_job/mixmfl/per_site.json").read_text())
    assert sorted(per_site["results"]) == ["site-1", "site-2", "site-3"] and per_site["unscored"] == []
    assert per_site["dropped"][0] == {"round": 2, "sites": ["site-3"]}


def test_fedmepd_finishes_without_a_killed_client_and_says_so(tmp_path):
    values = {**TINY_NETS["fedmepd"], "num_rounds": 3, "wait_after_min": 3, "task_timeout": 300}
    kill = lambda pid, log: os.kill(pid, signal.SIGKILL)  # noqa: E731
    data = keygroup_federation(tmp_path, "fedmepd")
    text = simulate_with_fault(tmp_path, "fedmepd", values, data, 3, lambda t: len(round_records(t)) >= 1, kill)
    records = round_records(text)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert sorted(records[0]["sites"]) == ["site-1", "site-2", "site-3"]
    assert [r["missed"] for r in records[1:]] == [["site-3"], []]  # dropped once, then no longer asked to train
    assert all(sorted(r["sites"]) == ["site-1", "site-2"] for r in records[1:])
    per_site = json.loads((tmp_path / "ws/server/simulate_job/fedmepd/per_site.json").read_text())
    assert sorted(per_site["results"]) == ["site-1", "site-2"] and per_site["unscored"] == ["site-3"]
    assert "sent no result; the round goes on without them" in text
