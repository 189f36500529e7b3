"""Stages every reproduction uses: a job in the simulator, FedAvg/FedProx, local-only training.

A budget is {"rounds": R, "local_epochs": E}: federated methods run R rounds of E local epochs,
local-only training R x E epochs, so every method trains the same number of local epochs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmodal.reproduce.runner import Reproduction, executable

REGIONS = ("WT", "TC", "ET")
BASELINE_NET = "unet2d-brats"  # the 2D WT/TC/ET U-Net of the comparisons (fedmodal.nets.segmentation)


def simulate(rep: Reproduction, folder: Path, job: str, values: dict[str, Any], sites: int) -> Path:
    """Export `job` with `values` changed and run it in `nvflare simulator`; returns the server's run folder."""
    from fedmodal.fl.allow_list import customize_simulator
    from fedmodal.fl.simulator import check_client_identities
    from fedmodal.jobs import JOBS
    from fedmodal.jobs.spec import export_job, route_settings

    spec = JOBS[job]
    job_dir = export_job(spec, folder / "job", route_settings(spec, values))
    ws = folder / "ws"
    shutil.rmtree(ws, ignore_errors=True)  # an interrupted run's workspace is not resumed
    customize_simulator(ws)
    command = [executable("nvflare"), "simulator", job_dir, "-w", ws, "-n", str(sites), "-t", str(sites)]
    try:
        rep.command(command, cwd=folder, log=folder / "simulator.log")
    except RuntimeError:
        check_client_identities(ws)  # names NVFlare's client mix-up when that is why it failed
        raise
    check_client_identities(ws)
    return ws / "server" / "simulate_job"


def keygroup_stage(job: str, per_site_file: str, values: dict[str, Any], sites: int):
    """A key-group job (mixmfl, fedmepd): per-client metrics from the server's per_site.json."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        server = simulate(rep, folder, job, values, sites)
        return json.loads((server / per_site_file).read_text())["results"]

    return run


def fedavg_scores_stage(budget: dict[str, int], fedprox_mu: float, preset: str, sites: int):
    """jobs/fedavg on the same sites: the last global model on each client's own test split."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        values = {
            "num_rounds": budget["rounds"],
            "local_epochs": budget["local_epochs"],
            "fedprox_mu": fedprox_mu,
            "seg.net": BASELINE_NET,
            "site.preset": preset,
        }
        server = simulate(rep, folder, "fedavg", values, sites)
        table = json.loads((server / "cross_site_val" / "cross_site_table.json").read_text())
        return {site: models["SRV_FL_global_model.pt"] for site, models in sorted(table.items())}

    return run


def local_stage(budget: dict[str, int], preset: str, clients: Sequence[str]):
    """`fedmodal train-seg` on each client alone (the comparisons' U-Net), scored on its own test split."""
    from fedmodal.nets.segmentation import preset_net_args

    net = preset_net_args(BASELINE_NET)
    net_flags = ["--dims", str(net["spatial_dims"]), "--regions", *net["regions"],
                 "--channels", *map(str, net["channels"]), "--num-res-units", str(net["num_res_units"]),
                 "--patch-size", *map(str, net["roi_size"]), "--output-prior", str(net.get("output_prior", 0.0))]  # fmt: skip

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        results = {}
        epochs = budget["rounds"] * budget["local_epochs"]
        for site in clients:
            out = folder / site
            command = [executable("fedmodal"), "train-seg", "--preset", preset, "--sites", site, *net_flags,
                       "--epochs", str(epochs), "--val-every", str(max(1, epochs // 4)), "--test", "none",
                       "--num-threads", "1", "--out", out]  # fmt: skip
            rep.command(command, cwd=folder, log=folder / f"{site}.log")
            results[site] = json.loads((out / "results.json").read_text())[f"{site}-test"]
        return results

    return run
