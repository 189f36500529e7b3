"""NVFlare 2.9's simulator can start a client under another client's name (fedmodal.fl.simulator);
fedmodal's server workflows guard against it. Here the race is made certain and the guard holds."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedmodal.fl.allow_list import customize_simulator
from fedmodal.fl.simulator import (
    ThreadOwnClientName,
    check_client_identities,
    guard_simulator_client_names,
    misassigned_clients,
)
from fedmodal.jobs import JOBS
from sim import write_client_log

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("simulator_race_driver.py")


def test_each_thread_sends_the_client_name_it_set():
    shared = ThreadOwnClientName({"client_name": "site-3", "other": 1})
    both_named = threading.Barrier(2)
    sent = {}

    def start(name: str) -> None:
        shared["client_name"] = name
        both_named.wait()  # the other thread has named its client too: the shared dict would hold the last
        sent[name] = pickle.loads(pickle.dumps(shared))

    threads = [threading.Thread(target=start, args=(name,)) for name in ("site-1", "site-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sent == {"site-1": {"client_name": "site-1", "other": 1}, "site-2": {"client_name": "site-2", "other": 1}}
    assert all(type(d) is dict for d in sent.values())  # the client process needs no fedmodal class
    assert shared["client_name"] == "site-3" and shared.get("missing", 0) == 0  # unset in this thread: shared


def test_the_guard_stays_out_of_a_process_without_the_simulator():
    code = "from fedmodal.fl.simulator import guard_simulator_client_names as g; print(g())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.fixture
def unguarded_runner(monkeypatch):
    """NVFlare's simulator client runner as NVFlare ships it, restored after the test."""
    from nvflare.private.fed.app.simulator import simulator_runner

    runner = simulator_runner.SimulatorClientRunner
    monkeypatch.setattr(runner, "__init__", runner.__init__)
    monkeypatch.delattr(runner, "_fedmodal_client_names_guarded", raising=False)
    return runner


def test_the_guard_wraps_the_client_runner_once(unguarded_runner):
    assert guard_simulator_client_names()
    once = unguarded_runner.__init__
    assert guard_simulator_client_names() and unguarded_runner.__init__ is once


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_jobs_server_workflow_puts_the_guard_in_place_when_built(name, unguarded_runner):
    JOBS[name].job()  # builds the server's workflows, as the simulator does before its clients start
    assert getattr(unguarded_runner, "_fedmodal_client_names_guarded", False), name


def test_a_client_that_ran_as_another_is_recognised_and_refused(tmp_path):
    for site in ("site-1", "site-2", "site-3"):
        write_client_log(tmp_path, site, site)
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "log.txt").write_text("[identity=simulator_server, run=simulate_job]\n")
    assert misassigned_clients(tmp_path) == {}
    check_client_identities(tmp_path)
    write_client_log(tmp_path, "site-1", "site-3")  # the race as seen in CI and in a Table III run
    assert misassigned_clients(tmp_path) == {"site-1": ["site-3"]}
    with pytest.raises(RuntimeError, match="the process started for site-1 ran as site-3"):
        check_client_identities(tmp_path)


@pytest.mark.integration
def test_every_client_runs_as_itself_when_the_race_is_certain(tmp_path):
    from fedmodal.data.phantoms import build_federation

    data = build_federation(tmp_path / "data", shape=(32, 32, 24), cases_per_site=2, test_cases=1)
    ws = tmp_path / "ws"
    customize_simulator(ws)
    record = tmp_path / "sends.jsonl"
    env = {**os.environ, "HOME": str(tmp_path), "FEDMODAL_DATA_ROOT": str(data), "RACE_RECORD": str(record)}
    command = [sys.executable, str(DRIVER), str(REPO / "jobs" / "site-inventory"), "-w", str(ws), "-n", "3", "-t", "3"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    sends = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(s["started"] for s in sends) == ["site-1", "site-2", "site-3"]
    # The race was on: some thread named its client while another was between naming and sending.
    overlapping = [(a, b) for a in sends for b in sends if a is not b and b["opened"] < a["opened"] < b["closed"]]
    assert overlapping, sends
    assert all(s["sent"] == s["started"] for s in sends), sends
    assert misassigned_clients(ws) == {}
    inventory = json.loads((ws / "server/simulate_job/inventory.json").read_text())
    assert [s["site"] for s in inventory["sites"]] == ["site-1", "site-2", "site-3"]
