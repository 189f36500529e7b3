"""jobs/modalitybank in NVFlare's own simulator, at a tiny size, with the privacy audit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmodal.data.phantoms import build_federation
from fedmodal.fl.simulator import check_client_identities
from fedmodal.jobs import JOBS
from fedmodal.jobs.spec import export_job, route_settings
from fedmodal.modalitybank.site_worker import state_file

MODALITYBANK = JOBS["modalitybank"]

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "modalitybank"
# The allow-list a simulator workspace needs for fedmodal's classes, as the README's command uses it.
SIMULATOR_LOCAL = REPO / "simulator_workspace" / "local"
NVFLARE = Path(sys.executable).with_name("nvflare")

pytestmark = pytest.mark.integration

TINY_SERVER = dict(
    image_size=32,
    ngf=8,
    n_blocks=2,
    batch_size=2,
    pretrain_steps=2,
    bank_steps=3,
    sample_every=2,
    log_every=1,
    checkpoint_every=2,
    preview_count=2,
    step_timeout=300,
)
TINY_SITE = dict(ndf=8, n_layers=2, split="all")


def tiny_job(tmp_path: Path, server_args: dict, site_args: dict) -> Path:
    """jobs/modalitybank at a tiny size: the recipe's export with changed settings."""
    values = {**TINY_SERVER, **TINY_SITE, **server_args, **site_args}
    return export_job(MODALITYBANK, tmp_path / "jobs", route_settings(MODALITYBANK, values))


def read_audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    data = build_federation(tmp_path_factory.mktemp("mbdata"), shape=(40, 40, 24), cases_per_site=2, test_cases=2)
    # site-2's IT keeps its masks at home: the site file overrides the job.
    (data / "site-2" / "fedmodal_site.json").write_text(json.dumps({"share_masks": False}))
    return data


def simulate(tmp_path: Path, data: Path, transport: str, **server_args) -> tuple[Path, str]:
    """One simulator run of the tiny job; the sites keep their state in <tmp_path>/site-state."""
    workspace = tmp_path / "ws"
    site_args = {"state_dir": str(tmp_path / "site-state")}
    job = tiny_job(tmp_path, {"step_transport": transport, **server_args}, site_args)
    shutil.copytree(SIMULATOR_LOCAL, workspace / "local")
    env = {**os.environ, "FEDMODAL_DATA_ROOT": str(data), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(NVFLARE), "simulator", str(job), "-w", str(workspace), "-n", "3", "-t", "3"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    check_client_identities(workspace)
    assert proc.returncode == 0, log[-4000:]
    return workspace, log


# Steps travel as direct (aux) messages by default, or as NVFlare tasks: both must hold the
# same protocol and the same audit.
TRANSPORTS = ("direct", "task")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, phantom_data) -> dict[str, tuple[Path, str]]:
    return {t: simulate(tmp_path_factory.mktemp(f"mbsim-{t}"), phantom_data, t) for t in TRANSPORTS}


@pytest.fixture(params=TRANSPORTS)
def simulated_run(request, runs):
    return runs[request.param]


def test_job_trains_and_leaves_its_outputs(simulated_run):
    workspace, log = simulated_run
    assert "ModalityBank finished" in log, log[-4000:]
    out = workspace / "server" / "simulate_job" / "modalitybank"
    checkpoint = out / "checkpoint"
    assert (checkpoint / "generator.pt").is_file()
    assert sorted(p.name for p in (checkpoint / "bank").iterdir()) == ["flair.pt", "t1.pt", "t1ce.pt", "t2.pt"]
    assert list((out / "samples").glob("step_*.png"))
    assert list((out / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == {"pretrain": 2, "bank": 3}
    assert summary["sites"]["site-2"]["shares_masks"] is False
    for site in ("site-1", "site-2", "site-3"):
        site_out = workspace / site / "simulate_job" / "modalitybank"
        assert (site_out / "grids" / "final.png").is_file()
        # The site's own seconds per step stay beside its grids (benchmarks split the wait with them).
        timing = json.loads((site_out / "site_step_seconds.json").read_text())
        assert timing["steps"] == len(timing["seconds"]) == 5 and all(t > 0 for t in timing["seconds"])
    progress = [line for line in log.splitlines() if "progress {" in line]
    assert len(progress) == 5
    record = json.loads(progress[-1].split("progress ", 1)[1])
    assert record["phase"] == "bank" and record["step"] == 3 and "eta_s" in record


def test_privacy_audit_holds(simulated_run):
    """A site sends masks and keys once (or one batch of masks per step if it keeps them),
    gradients shaped like the fakes it received, and loss scalars; it never receives G."""
    workspace, _ = simulated_run
    for site in ("site-1", "site-2", "site-3"):
        records = read_audit(workspace / site / "simulate_job" / "payload_audit.jsonl")
        received = [r for r in records if r["direction"] == "in"]
        sent = [r for r in records if r["direction"] == "out"]
        assert [r["task"] for r in sent] == [r["task"] for r in received]
        shares_masks = site != "site-2"

        for incoming in received:
            for key, item in incoming["items"].items():
                if key.startswith("fake/"):
                    assert item["kind"] == "array" and item["shape"][1] == 1 and len(item["shape"]) == 4
                elif key == "augment":
                    assert item["kind"] == "array" and item["shape"][1] == 3
                else:
                    # Everything else is small metadata: no tensor or weight ever arrives.
                    assert key in {"config", "phase", "step", "phase_steps", "keys", "checkpoint"}, key
                    assert item["kind"] in {"dict", "scalar", "string", "list"}, (key, item)

        registrations = [r for r in sent if r["task"] == "mb_register"]
        assert len(registrations) == 1
        register_keys = set(registrations[0]["items"])
        if shares_masks:
            assert register_keys == {"modalities", "num_samples", "shares_masks", "sample_keys", "mask_codes"}
        else:
            assert register_keys == {"modalities", "num_samples", "shares_masks", "next_keys", "mask_codes"}
        assert registrations[0]["items"]["mask_codes"]["dtype"] == "uint8"

        for incoming, outgoing in zip(received, sent):
            if incoming["task"] != "mb_step":
                if incoming["task"] == "mb_preview":
                    assert outgoing["items"] == {}
                continue
            fakes = {k[5:]: v["shape"] for k, v in incoming["items"].items() if k.startswith("fake/")}
            grads = {k[5:]: v["shape"] for k, v in outgoing["items"].items() if k.startswith("grad/")}
            assert grads == fakes, f"{site}: gradients must match the fakes received"
            others = set(outgoing["items"]) - {f"grad/{m}" for m in grads}
            expected = {"losses"} if shares_masks else {"losses", "next_keys", "mask_codes"}
            assert others == expected, f"{site} sent {others}"
            losses = outgoing["items"]["losses"]
            assert losses["kind"] == "dict"
            assert all(k.split("/")[0] in fakes for k in losses["keys"])


def test_float16_wire_carries_half_the_bytes_through_nvflare(tmp_path, phantom_data):
    """`wire_precision: float16`: fakes and gradients cross NVFlare as float16 arrays, each
    with its scale as one number, and nothing else changes in what a site sends."""
    workspace, _ = simulate(tmp_path, phantom_data, "direct", wire_precision="float16")
    for site in ("site-1", "site-3"):  # both share masks
        records = read_audit(workspace / site / "simulate_job" / "payload_audit.jsonl")
        steps = [r for r in records if r["task"] == "mb_step"]
        assert steps
        for record in steps:
            items = record["items"]
            prefix = "fake/" if record["direction"] == "in" else "grad/"
            arrays = {k: v for k, v in items.items() if k.startswith(prefix)}
            assert arrays and all(v["dtype"] == "float16" for v in arrays.values()), (site, record)
            assert all(v["bytes"] == 2 * np.prod(v["shape"]) for v in arrays.values())
            scales = {k: v for k, v in items.items() if k.startswith("scale/")}
            assert set(scales) == {"scale/" + k for k in arrays}
            assert all(v["kind"] == "scalar" for v in scales.values())
            if record["direction"] == "in":
                assert items["wire"]["kind"] == "string"
            else:
                assert set(items) - set(arrays) - set(scales) == {"losses"}
    assert (workspace / "server" / "simulate_job" / "modalitybank" / "checkpoint" / "generator.pt").is_file()


def test_transports_train_the_same_generator(runs):
    """The transport moves the same payloads: both runs end with bit-identical weights."""
    checkpoints = {
        t: workspace / "server" / "simulate_job" / "modalitybank" / "checkpoint" for t, (workspace, _) in runs.items()
    }
    for name in ["generator.pt", *(f"bank/{m}.pt" for m in ("t1", "t1ce", "t2", "flair"))]:
        direct = torch.load(checkpoints["direct"] / name, weights_only=False)
        task = torch.load(checkpoints["task"] / name, weights_only=False)
        state_direct = direct.get("state_dict", direct)
        state_task = task.get("state_dict", task)
        assert state_direct.keys() == state_task.keys(), name
        for key in state_direct:
            assert torch.equal(state_direct[key], state_task[key]), f"{name}: {key} differs between transports"


def test_resume_continues_with_the_sites_discriminators(runs, tmp_path_factory, phantom_data):
    """resume_from a finished run's checkpoint, two more bank steps: G and bank come from the
    checkpoint, and every site reloads the discriminators it saved at that checkpoint."""
    workspace, _ = runs["direct"]
    checkpoint = workspace / "server" / "simulate_job" / "modalitybank" / "checkpoint"
    run = json.loads((checkpoint / "run.json").read_text())
    assert run["global_step"] == TINY_SERVER["pretrain_steps"] + TINY_SERVER["bank_steps"]
    tmp_path = tmp_path_factory.mktemp("mbsim-resume")
    shutil.copytree(workspace.parent / "site-state", tmp_path / "site-state")  # the sites' own folders
    resumed_ws, log = simulate(
        tmp_path, phantom_data, "direct", resume_from=str(checkpoint), bank_steps=TINY_SERVER["bank_steps"] + 2
    )
    for site in ("site-1", "site-2", "site-3"):
        state = tmp_path / "site-state" / site / run["run_id"] / state_file(run["global_step"])
        assert f"site {site}: discriminators resumed from {state} (step {run['global_step']})" in log
    summary = json.loads((resumed_ws / "server" / "simulate_job" / "modalitybank" / "summary.json").read_text())
    assert summary["steps"] == {"bank": 2}
    resumed = json.loads(
        (resumed_ws / "server" / "simulate_job" / "modalitybank" / "checkpoint" / "run.json").read_text()
    )
    assert resumed == {"run_id": run["run_id"], "global_step": run["global_step"] + 2}
