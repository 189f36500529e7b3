"""`fedmodal reproduce fedmepd`: FedMEPD against FedMEMA, FedAvg and local-only training, per client.

On the `fedmepd` phantom federation (a full-modal server site and 8 clients with the reference
modality masks, each client split 60/40): FedMEPD and FedMEMA (anchors, no decoder
personalisation, 3 anchors per class) through jobs/fedmepd, FedAvg through jobs/fedavg on the 8
clients, local-only with `fedmodal train-seg`; every method trains the same number of local
epochs and each client's model is scored on its own test split with its own modalities.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedmodal.fedmepd.workflow import FedMEPDServerConfig
from fedmodal.reproduce.runner import DONE_FILE, Reproduction, Stage, data_input, write_table
from fedmodal.reproduce.stages import REGIONS, fedavg_scores_stage, keygroup_stage, local_stage

CLIENTS = [f"site-{k}" for k in range(1, 9)]
_JOB = FedMEPDServerConfig()
BUDGETS = {
    "quick": {"rounds": _JOB.num_rounds, "local_epochs": _JOB.local_epochs},  # the default job's
    "paper": {"rounds": 300, "local_epochs": 1},
}
METHODS = {
    "local": "Local only",
    "fedavg": "FedAvg",
    "fedmema": "FedMEMA",
    "fedmepd": "FedMEPD",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("results/fedmepd"), help="results folder (default results/fedmepd)"
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick", help="quick (default) or paper")
    parser.add_argument("--data-root", type=Path, help="the federation (default: the fedmepd phantom preset)")


def tables_stage(folder: Path, rep: Reproduction) -> dict[str, Any]:
    results = {name: json.loads((rep.out / name / DONE_FILE).read_text()) for name in METHODS}
    for metric in ("dice", "hd95"):
        rows = []
        for name, label in METHODS.items():
            per_client = [sum(results[name][c][f"{metric}_{r}"] for r in REGIONS) / len(REGIONS) for c in CLIENTS]
            scale = 100 if metric == "dice" else 1
            rows.append(
                [label, *[f"{scale * v:.2f}" for v in per_client], f"{scale * sum(per_client) / len(CLIENTS):.2f}"]
            )
        header = ["Method", *[f"Client{k}" for k in range(1, 9)], "Mean"]
        write_table(rep.out / f"per_client_{metric}.md", header, rows)
    rows = []
    for name, label in METHODS.items():
        cells = []
        for metric in ("dice", "hd95"):
            for region in REGIONS:
                mean = sum(results[name][c][f"{metric}_{region}"] for c in CLIENTS) / len(CLIENTS)
                cells.append(f"{100 * mean:.2f}" if metric == "dice" else f"{mean:.2f}")
        rows.append([label, *cells])
    header = ["Method", *[f"Dice {r} (%)" for r in REGIONS], *[f"HD95 {r} (mm)" for r in REGIONS]]
    write_table(rep.out / "regions.md", header, rows)
    return {"tables": ["per_client_dice.md", "per_client_hd95.md", "regions.md"]}


def run(args: argparse.Namespace) -> int:
    from fedmodal.data.phantoms import ensure_federation

    budget = BUDGETS[args.budget]
    data = args.data_root or ensure_federation("fedmepd")
    rounds = {"num_rounds": budget["rounds"], "local_epochs": budget["local_epochs"]}
    per_round = 45 * budget["local_epochs"]  # seconds of a FedMEPD round on 2 cores, measured
    stages = [
        Stage("fedmepd", keygroup_stage("fedmepd", "fedmepd/per_site.json", rounds, 8), per_round * budget["rounds"]),
        Stage(
            "fedmema",
            keygroup_stage("fedmepd", "fedmepd/per_site.json", {**rounds, "personalise": False, "anchors_k": 3}, 8),
            per_round * budget["rounds"],
        ),
        Stage("fedavg", fedavg_scores_stage(budget, 0.0, "fedmepd", len(CLIENTS)), 12 * budget["rounds"]),
        Stage("local", local_stage(budget, "fedmepd", CLIENTS), 8 * 3 * budget["rounds"]),
        Stage("tables", tables_stage, 1),
    ]
    inputs = {"table": "fedmepd", "budget": budget, "data": data_input(args.data_root, "fedmepd")}
    rep = Reproduction(args.out, stages, env={"FEDMODAL_DATA_ROOT": str(data)}, inputs=inputs)
    rep.run()
    for table in ("per_client_dice.md", "per_client_hd95.md", "regions.md"):
        print(f"\n{table}\n" + (rep.out / table).read_text())
    return 0
