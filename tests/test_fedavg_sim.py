"""The FedAvg / FedProx job in NVFlare's own simulator, at tiny size, then `fedmodal evaluate`
on the global model it produced."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedmodal.fl.simulator import check_client_identities

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "fedavg"
SIMULATOR_LOCAL = REPO / "simulator_workspace" / "local"  # the class allow-list admitting fedmodal.*

pytestmark = pytest.mark.integration

TINY = {"seg.net": "unet2d-wt-tiny", "local_epochs": 1, "batch_size": 4, "samples_per_case": 2}


@pytest.fixture(scope="module")
def tiny_federation(tmp_path_factory) -> Path:
    from fedmodal.data.phantoms import build_federation

    return build_federation(
        tmp_path_factory.mktemp("fed") / "phantoms", shape=(32, 32, 24), cases_per_site=5, test_cases=2
    )


def tiny_job(dst: Path, rounds: int = 2, fedprox_mu: float = 0.01, **extra) -> Path:
    """jobs/fedavg with a tiny network, 2 rounds, 1 local epoch, FedProx on: the recipe's export."""
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["fedavg"]
    values = {**TINY, "num_rounds": rounds, "fedprox_mu": fedprox_mu, **extra}
    return export_job(spec, dst, route_settings(spec, values))


def simulate(job: Path, data: Path, tmp_path: Path, **env_extra: str) -> tuple[Path, str]:
    """Run `job` in the simulator (3 sites) under `tmp_path`; (workspace, log). Asserts success."""
    workspace = tmp_path / "workspace"
    shutil.copytree(SIMULATOR_LOCAL, workspace / "local")
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "FEDMODAL_DATA_ROOT": str(data),
        "FEDMODAL_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        **env_extra,
    }
    nvflare = Path(sys.executable).with_name("nvflare")
    command = [str(nvflare), "simulator", str(job), "-w", str(workspace), "-n", "3", "-t", "3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    check_client_identities(workspace)
    assert done.returncode == 0, log[-4000:]
    return workspace, log


@pytest.fixture(scope="module")
def fedavg_run(tiny_federation: Path, tmp_path_factory) -> tuple[Path, str, Path]:
    tmp_path = tmp_path_factory.mktemp("fedavg")
    # MLflow on, into a local file store: the sites' streamed metrics reach it through the server.
    tracking = {"tracking.mlflow": True, "tracking.tracking_uri": (tmp_path / "mlruns").as_uri()}
    # MLflow 3 keeps its file store for opted-in users only (a server or SQLite is its default).
    workspace, log = simulate(tiny_job(tmp_path, **tracking), tiny_federation, tmp_path, MLFLOW_ALLOW_FILE_STORE="true")
    return workspace, log, tmp_path


def test_the_sites_metrics_reach_mlflow_one_run_per_site(fedavg_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this reading client too

    workspace, log, tmp_path = fedavg_run
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("fedmodal")
    assert experiment is not None, log[-3000:]
    assert "MlflowException" not in log
    runs = client.search_runs([experiment.experiment_id])
    by_site = {
        site: [r for r in runs if r.info.run_name.startswith(f"{site}-")] for site in ("site-1", "site-2", "site-3")
    }
    assert all(len(found) == 1 for found in by_site.values()), [r.info.run_name for r in runs]
    for site, (run,) in by_site.items():
        assert run.data.metrics, f"{site}: no metric reached MLflow"
        name = sorted(run.data.metrics)[0]
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) >= 2, f"{site}: {name} has {len(history)} point(s) over 2 rounds"


def test_fedavg_job_runs_in_the_simulator(tiny_federation: Path, fedavg_run):
    workspace, log, tmp_path = fedavg_run
    from fedmodal.baselines.trainer import load_checkpoint

    server = workspace / "server" / "simulate_job"
    assert (server / "app_server" / "FL_global_model.pt").is_file(), log[-4000:]
    assert (server / "app_server" / "best_FL_global_model.pt").is_file()
    for site in ("site-1", "site-2", "site-3"):
        local_best = workspace / site / "simulate_job" / "seg" / "local_best.pt"
        assert local_best.is_file()
        assert (
            load_checkpoint(local_best)["meta"]["fedprox_mu"] == 0.01
        )  # the server's FedProx mu reached the site's training
        assert (server / "tb_events" / site).is_dir()  # site metrics streamed to the server
        # FedProx reached the sites; only weights and scalars left them.
        records = [
            json.loads(line)
            for line in (workspace / site / "simulate_job" / "payload_audit.jsonl").read_text().splitlines()
        ]
        sent = [r for r in records if r["direction"] == "out"]
        assert sent and all(
            item["kind"] in ("array", "scalar", "dict", "string") for r in sent for item in r["items"].values()
        )
        # Every task is audited both ways, cross-site evaluation's submit_model included.
        received = sorted(r["task"] for r in records if r["direction"] == "in")
        assert received == sorted(r["task"] for r in sent) and "submit_model" in received
    assert '"fedprox_mu": 0.01' in log
    table = (server / "cross_site_val" / "cross_site_table.md").read_text()
    assert "SRV_best_FL_global_model.pt" in table and "| site-1 |" in table

    from fedmodal.baselines import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "evaluation"
    args = parser.parse_args(
        [
            "--model",
            f"FedAvg={server / 'app_server' / 'FL_global_model.pt'}",
            "--data",
            str(tiny_federation / "test"),
            "--with-empty",
            "--lesion-wise",
            "--out",
            str(out),
            "--num-threads",
            "1",
        ]
    )
    assert evaluate.run(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"FedAvg", "Empty prediction"}
    table = (out / "results.md").read_text()
    assert "| FedAvg |" in table and "LW Dice(%)" in table and "LW HD95(mm)" in table
    # Predicting nothing misses every lesion: lesion-wise Dice 0 and the 374 mm penalty.
    empty = results["models"]["Empty prediction"]["summary"]["WT"]
    assert empty["lesion_dice"]["mean"] == 0.0 and empty["lesion_hd95"]["mean"] == 374.0
    assert "lesion_dice" in (out / "cases.csv").read_text().splitlines()[0]


def test_fedavg_resumes_from_its_persisted_global_model(tiny_federation: Path, fedavg_run, tmp_path: Path):
    """resume_from the first run's FL_global_model.pt at start_round 2 of 3: NVFlare's
    persistor loads it and only round 2 runs."""
    workspace, _, _ = fedavg_run
    saved = tmp_path / "FL_global_model.pt"
    shutil.copy(workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", saved)
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS["fedavg"]
    values = {**TINY, "num_rounds": 3, "start_round": 2, "resume_from": str(saved)}
    _, log = simulate(export_job(spec, tmp_path / "job", route_settings(spec, values)), tiny_federation, tmp_path)
    assert f"Loading checkpoint from {saved}" in log
    assert "Round 2 started." in log and "Round 0 started." not in log and "Round 1 started." not in log
    assert "Finished FedAvg." in log


def test_a_start_round_without_a_model_is_refused():
    from fedmodal.baselines.config import FederatedSegConfig

    with pytest.raises(ValueError, match="start_round 2 needs resume_from"):
        FederatedSegConfig(num_rounds=3, start_round=2)
    with pytest.raises(ValueError, match=r"start_round must be in \[0, num_rounds=3\)"):
        FederatedSegConfig(num_rounds=3, start_round=3, resume_from="/x.pt")
