"""`fedmodal reproduce NAME`: one command per paper table (resumable; see fedmodal.reproduce.runner)."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, help)
TABLES = {
    "mixmfl": ("fedmodal.reproduce.mixmfl", "MDM-MixMFL Tables 1 and 3 (per-client mDice, regions, ablations)"),
    "fedmepd": ("fedmodal.reproduce.fedmepd", "FedMEPD vs FedMEMA vs FedAvg vs local, per client (Dice, HD95)"),
    "modalitybank-table1": (
        "fedmodal.reproduce.modalitybank",
        "ModalityBank Table I: segmentation trained on synthetic T1/T2/FLAIR vs real, FedAvg, AsynDGAN",
    ),
    "modalitybank-table2": (
        "fedmodal.reproduce.modalitybank",
        "ModalityBank Table II: sites lacking a modality, synthetic and completed sites",
    ),
    "modalitybank-table3": (
        "fedmodal.reproduce.modalitybank",
        "ModalityBank Table III: the bank with its generator pretrained on other data",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="table", metavar="TABLE", required=True)
    for name, (module, help_text) in TABLES.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(TABLES[args.table][0]).run(args)
