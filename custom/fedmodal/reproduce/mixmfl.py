"""`fedmodal reproduce mixmfl`: MDM-MixMFL's Tables 1 and 3 on the mix-modal phantom federation.

Stages (each resumable, each command in `commands.txt`):
MDM-MixMFL and its four Table 3 ablations, FedAvg and FedProx (jobs/fedavg on the same sites,
a U-Net of about MixMFLNet's size), each through `nvflare simulator`; local-only training of
every site (`fedmodal train-seg`); then the tables. Every method trains the same number of
local epochs (rounds x local epochs) and is scored per client on the client's own test split
with the modalities the client holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedmodal.mixmfl.workflow import MixMFLServerConfig
from fedmodal.reproduce.runner import DONE_FILE, Reproduction, Stage, data_input, write_table
from fedmodal.reproduce.stages import REGIONS, fedavg_scores_stage, keygroup_stage, local_stage

CLIENTS = [f"site-{k}" for k in range(1, 7)]
# rounds x local epochs of every federated method; local-only trains rounds x local epochs epochs.
# "quick" is the default job's budget (fedmodal.mixmfl.workflow.MixMFLServerConfig); "paper" the
# paper's 200 epochs.
_JOB = MixMFLServerConfig()
BUDGETS = {
    "quick": {"rounds": _JOB.num_rounds, "local_epochs": _JOB.local_epochs},
    "paper": {"rounds": 200, "local_epochs": 1},
}
ABLATIONS = {
    "mixmfl": ("MDM-MixMFL", {}),
    "mixmfl-no-tailored": ("w/o tailored updating", {"tailored_updating": False}),
    "mixmfl-no-memory": ("w/o memory", {"use_memory": False}),
    "mixmfl-no-triplet": ("w/o triplet loss", {"use_triplet": False}),
    "mixmfl-no-classification": ("w/o classification loss", {"use_classification": False}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("results/mixmfl"), help="results folder (default results/mixmfl)"
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick", help="quick (default) or paper")
    parser.add_argument("--data-root", type=Path, help="the federation (default: the mixmfl phantom preset)")


def mixmfl_stage(variant: dict[str, Any], budget: dict[str, int]):
    values = {"num_rounds": budget["rounds"], "local_epochs": budget["local_epochs"], **variant}
    return keygroup_stage("mixmfl", "mixmfl/per_site.json", values, sites=len(CLIENTS))


def mdice(metrics: dict[str, float]) -> float:
    """The mean of the WT, TC and ET Dice (the paper's mDice), in percent."""
    return 100 * sum(metrics[f"dice_{r}"] for r in REGIONS) / len(REGIONS)


def tables_stage(folder: Path, rep: Reproduction) -> dict[str, Any]:
    names = [*ABLATIONS, "fedavg", "fedprox", "local"]
    results = {name: json.loads((rep.out / name / DONE_FILE).read_text()) for name in names}
    labels = {
        **{k: v[0] for k, v in ABLATIONS.items()},
        "fedavg": "FedAvg",
        "fedprox": "FedProx",
        "local": "Local only",
    }
    main = ["local", "fedavg", "fedprox", "mixmfl"]
    rows = []
    for name in main:
        per_client = [mdice(results[name][c]) for c in CLIENTS]
        rows.append([labels[name], *[f"{v:.2f}" for v in per_client], f"{sum(per_client) / len(per_client):.2f}"])
    write_table(rep.out / "table1.md", ["Method", *[f"Client{k}" for k in range(1, 7)], "Average"], rows)
    rows = []
    for name in main:
        cells = []
        for metric in ("dice", "hd95"):
            for region in REGIONS:
                values = [results[name][c][f"{metric}_{region}"] for c in CLIENTS]
                mean = sum(values) / len(values)
                cells.append(f"{100 * mean:.2f}" if metric == "dice" else f"{mean:.2f}")
        rows.append([labels[name], *cells])
    header = ["Method", *[f"Dice {r} (%)" for r in REGIONS], *[f"HD95 {r} (mm)" for r in REGIONS]]
    write_table(rep.out / "regions.md", header, rows)
    rows = [[labels[name], f"{sum(mdice(results[name][c]) for c in CLIENTS) / len(CLIENTS):.2f}"] for name in ABLATIONS]
    write_table(rep.out / "ablation.md", ["Variant", "Average mDice (%)"], rows)
    return {"tables": ["table1.md", "regions.md", "ablation.md"]}


def run(args: argparse.Namespace) -> int:
    from fedmodal.data.phantoms import ensure_federation

    budget = BUDGETS[args.budget]
    data = args.data_root or ensure_federation("mixmfl")
    stages = [
        Stage(name, mixmfl_stage(variant, budget), estimate_s=30 * budget["rounds"])
        for name, (_, variant) in ABLATIONS.items()
    ]
    stages += [
        Stage("fedavg", fedavg_scores_stage(budget, 0.0, "mixmfl", len(CLIENTS)), estimate_s=12 * budget["rounds"]),
        Stage("fedprox", fedavg_scores_stage(budget, 0.01, "mixmfl", len(CLIENTS)), estimate_s=12 * budget["rounds"]),
        Stage("local", local_stage(budget, "mixmfl", CLIENTS), estimate_s=6 * 3 * budget["rounds"]),
    ]
    rep = Reproduction(
        args.out,
        [*stages, Stage("tables", tables_stage, estimate_s=1)],
        env={"FEDMODAL_DATA_ROOT": str(data)},
        inputs={"table": "mixmfl", "budget": budget, "data": data_input(args.data_root, "mixmfl")},
    )
    rep.run()
    for table in ("table1.md", "regions.md", "ablation.md"):
        print(f"\n{table}\n" + (rep.out / table).read_text())
    return 0
