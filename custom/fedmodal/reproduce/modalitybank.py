"""`fedmodal reproduce modalitybank-table1|table2|table3`: what ModalityBank is for, end to end.

A 2D whole-tumour segmentation network is trained on each kind of data the paper compares and
scored on the held-out real test set (Dice, sensitivity, specificity, HD95, mean ± std):

- Table I (`modalitybank-full`: three sites holding T1, T2, FLAIR): pooled real data (Real-All),
  FedAvg over the sites, each site alone, and the synthetic T1/T2/FLAIR that AsynDGAN and
  ModalityBank generate from every site's masks.
- Table II (`modalitybank-missing`: each site lacks one of T1c, T2, FLAIR): each real site with
  its missing modality, FedAvg, ModalityBank's synthetic data, and each site completed by
  `fedmodal complete` (its real files plus the synthetic missing one).
- Table III: ModalityBank's bank when its generator was pretrained elsewhere (`fedmodal
  pretrain-generator` on a server-held folder of another phantom preset) against pretrained
  federated on the sites' source modality (Table I's run).

The generators train through `nvflare simulator`; synthesis, segmentation and scoring run
locally. Every stage is resumable and every command lands in `commands.txt`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from fedmodal.modalitybank.config import GeneratorConfig
from fedmodal.modalitybank.controller import OUTPUT_DIR
from fedmodal.reproduce.runner import DONE_FILE, Reproduction, Stage, data_input, executable
from fedmodal.reproduce.stages import simulate

SITES = ["site-1", "site-2", "site-3"]
_G = GeneratorConfig()
# Generator steps per phase, and the segmentation budget: local runs train `epochs` epochs,
# FedAvg `rounds` x `local_epochs` (the same number of local epochs). "quick" is the default
# job's generator and fits about an hour here per table; "paper" is for GPU sites. Optional
# keys: "seg_flags" (more `fedmodal train-seg` options), "fedavg" (more jobs/fedavg settings).
BUDGETS = {
    "quick": {"pretrain_steps": _G.pretrain_steps, "bank_steps": _G.bank_steps, "rounds": 20, "local_epochs": 5},
    "paper": {"pretrain_steps": 20000, "bank_steps": 20000, "rounds": 40, "local_epochs": 5},
}
TABLES = {
    "modalitybank-table1": {
        "preset": "modalitybank-full",
        "title": "ModalityBank Table I: three sites with T1, T2, FLAIR",
        "modalities": ("t1", "t2", "flair"),
    },
    "modalitybank-table2": {
        "preset": "modalitybank-missing",
        "title": "ModalityBank Table II: each site lacks one of T1c, T2, FLAIR",
    },
    "modalitybank-table3": {
        "preset": "modalitybank-full",
        "title": "ModalityBank Table III: where the generator was pretrained",
        "modalities": ("t1", "t2", "flair"),
    },
}
# Table III's other pretraining sources: phantom presets the server holds as its own data.
PRETRAIN_SOURCES = {"missing-preset": "modalitybank-missing", "mixmfl-preset": "mixmfl"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/<table>)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick", help="quick (default) or paper")
    parser.add_argument("--data-root", type=Path, help="the federation (default: the table's phantom preset)")


# ----------------------------------------------------------------------------- stages


def generator_stage(job: str, budget: dict[str, int], extra: dict[str, Any] | None = None):
    """A ModalityBank or AsynDGAN job in the simulator; keeps its checkpoint, summary and grids."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        values = {"pretrain_steps": budget["pretrain_steps"], "bank_steps": budget["bank_steps"], **(extra or {})}
        server = simulate(rep, folder, job, values, len(SITES))
        outputs = server / OUTPUT_DIR
        grids = rep.out / "grids" / folder.name
        grids.mkdir(parents=True, exist_ok=True)
        samples = sorted((outputs / "samples").glob("*.png"))
        if samples:
            shutil.copy2(samples[-1], grids / f"server_{samples[-1].name}")
        for site in SITES:  # each site's real-vs-synthetic previews, drawn at the site
            for png in sorted((folder / "ws" / site / "simulate_job" / OUTPUT_DIR).rglob("*.png")):
                shutil.copy2(png, grids / f"{site}_{png.name}")
        summary = json.loads((outputs / "summary.json").read_text())
        return {"checkpoint": str(outputs / "checkpoint"), "steps_per_second": summary.get("steps_per_second")}

    return run


def checkpoint_of(rep: Reproduction, stage: str) -> str:
    return json.loads((rep.out / stage / DONE_FILE).read_text())["checkpoint"]


def synthetic_stage(generator: str, data: Path):
    """Every site's masks through the trained generator: a federation of synthetic sites (seg
    beside the synthetic images, read with --include-synthetic)."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        checkpoint = checkpoint_of(rep, generator)
        for site in SITES:
            command = [executable("fedmodal"), "synthesize", data / site, "--checkpoint", checkpoint,
                       "-o", folder / site, "--with-seg"]  # fmt: skip
            rep.command(command, cwd=folder, log=folder / f"{site}.log")
        return {"root": str(folder), "cases": sum(1 for site in SITES for _ in (folder / site).iterdir())}

    return run


def completed_stage(data: Path):
    """Each real site copied and completed with ModalityBank's synthetic missing modality."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        checkpoint = checkpoint_of(rep, "modalitybank")
        for site in SITES:
            shutil.copytree(data / site, folder / site, dirs_exist_ok=True)
            command = [executable("fedmodal"), "complete", folder / site, "--checkpoint", checkpoint]
            rep.command(command, cwd=folder, log=folder / f"{site}.log")
        return {"root": str(folder)}

    return run


def seg_stage(data_of, sites: list[str], budget: dict[str, int], synthetic: bool = False):
    """`fedmodal train-seg` (the default 2D whole-tumour U-Net) on `sites` of the federation
    `data_of(rep)` names; several sites are pooled."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        epochs = budget["rounds"] * budget["local_epochs"]
        command = [executable("fedmodal"), "train-seg", "--data-root", data_of(rep), "--sites", *sites,
                   "--epochs", str(epochs), "--val-every", str(max(1, epochs // 4)), "--test", "none",
                   "--num-threads", "0", "--out", folder / "model", *budget.get("seg_flags", [])]  # fmt: skip
        if synthetic:
            command.append("--include-synthetic")
        rep.command(command, cwd=folder, log=folder / "train.log")
        return {"model": str(folder / "model" / "last.pt")}

    return run


def fedavg_model_stage(budget: dict[str, int]):
    """jobs/fedavg (the same 2D U-Net) over the real sites; its last global model."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        values = {"num_rounds": budget["rounds"], "local_epochs": budget["local_epochs"], **budget.get("fedavg", {})}
        server = simulate(rep, folder, "fedavg", values, len(SITES))
        return {"model": str(server / "app_server" / "FL_global_model.pt")}

    return run


def evaluate_stage(rows: dict[str, str], test: Path, title: str, modalities: tuple[str, ...] = ()):
    """`fedmodal evaluate` of every row's model on the real held-out test set; table.md/.csv.

    `modalities`: the inputs of every model (NVFlare's global model records none, so without
    them it would be fed every modality the test cases hold); empty: each model's own."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        models = [
            f"{label}={json.loads((rep.out / stage / DONE_FILE).read_text())['model']}" for label, stage in rows.items()
        ]
        command = [executable("fedmodal"), "evaluate", "--model", *models, "--data", test,
                   "--out", folder, "--title", title, "--num-threads", "0"]  # fmt: skip
        if modalities:
            command += ["--modalities", *modalities]
        rep.command(command, cwd=folder, log=folder / "evaluate.log")
        shutil.copy2(folder / "results.md", rep.out / "table.md")
        shutil.copy2(folder / "results.csv", rep.out / "table.csv")
        summary = json.loads((folder / "results.json").read_text())["models"]
        return {label: summary[label]["summary"] for label in rows}

    return run


# ----------------------------------------------------------------------------- tables


def table_stages(table: str, budget: dict[str, int], data: Path) -> list[Stage]:
    """The stages of one table, in order (the paper's row order in the evaluation)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {sorted(TABLES)}")
    gen_s = (budget["pretrain_steps"] + budget["bank_steps"]) * 0.4  # s per generator run, measured here
    seg_s = 0.5 * budget["rounds"] * budget["local_epochs"]  # one site's U-Net; pooled runs ~3x
    real = lambda rep: data  # noqa: E731
    synthetic = lambda rep: rep.out / "synthetic-modalitybank"  # noqa: E731
    title = TABLES[table]["title"]
    test = data / "test"
    if table == "modalitybank-table1":
        stages = [
            Stage("modalitybank", generator_stage("modalitybank", budget), gen_s),
            Stage("asyndgan", generator_stage("modalitybank-asyndgan", budget), gen_s),
            Stage("synthetic-modalitybank", synthetic_stage("modalitybank", data), 60),
            Stage("synthetic-asyndgan", synthetic_stage("asyndgan", data), 60),
            Stage("seg-real-all", seg_stage(real, SITES, budget), 3 * seg_s),
            Stage("seg-fedavg-all", fedavg_model_stage(budget), 2 * seg_s),
            *[Stage(f"seg-{site}", seg_stage(real, [site], budget), seg_s) for site in SITES],
            Stage(
                "seg-asyndgan",
                seg_stage(lambda rep: rep.out / "synthetic-asyndgan", SITES, budget, synthetic=True),
                3 * seg_s,
            ),
            Stage("seg-modalitybank", seg_stage(synthetic, SITES, budget, synthetic=True), 3 * seg_s),
        ]
        rows = {"Real-All": "seg-real-all", "FedAvg-All": "seg-fedavg-all"}
        rows.update({f"Real-{site}": f"seg-{site}" for site in SITES})
        rows.update({"AsynDGAN (synthetic)": "seg-asyndgan", "ModalityBank (synthetic)": "seg-modalitybank"})
    elif table == "modalitybank-table2":
        lacking = missing_modalities(data)
        stages = [
            Stage("modalitybank", generator_stage("modalitybank", budget), gen_s),
            Stage("synthetic-modalitybank", synthetic_stage("modalitybank", data), 60),
            Stage("completed", completed_stage(data), 60),
            *[Stage(f"seg-{site}", seg_stage(real, [site], budget), seg_s) for site in SITES],
            Stage("seg-fedavg-all", fedavg_model_stage(budget), 2 * seg_s),
            Stage("seg-modalitybank", seg_stage(synthetic, SITES, budget, synthetic=True), 3 * seg_s),
            *[
                Stage(
                    f"seg-completed-{site}",
                    seg_stage(lambda rep: rep.out / "completed", [site], budget, synthetic=True),
                    seg_s,
                )
                for site in SITES
            ],
        ]
        rows = {f"Real-{site} (n/a {lacking[site]})": f"seg-{site}" for site in SITES}
        rows.update({"FedAvg-All": "seg-fedavg-all", "ModalityBank (synthetic)": "seg-modalitybank"})
        rows.update({f"Completed-{site} (syn {lacking[site]})": f"seg-completed-{site}" for site in SITES})
    else:  # modalitybank-table3
        stages = [Stage("modalitybank", generator_stage("modalitybank", budget), gen_s)]
        stages += [Stage("synthetic-modalitybank", synthetic_stage("modalitybank", data), 60)]
        stages += [Stage("seg-modalitybank", seg_stage(synthetic, SITES, budget, synthetic=True), 3 * seg_s)]
        rows = {"pretrained federated on T1 (the sites)": "seg-modalitybank"}
        for name, preset in PRETRAIN_SOURCES.items():
            stages += [
                Stage(f"pretrain-{name}", pretrain_stage(preset, budget), gen_s / 2),
                Stage(f"modalitybank-{name}", pretrained_bank_stage(name, budget), gen_s),
                Stage(f"synthetic-{name}", synthetic_stage(f"modalitybank-{name}", data), 60),
                Stage(
                    f"seg-{name}",
                    seg_stage(lambda rep, n=name: rep.out / f"synthetic-{n}", SITES, budget, synthetic=True),
                    3 * seg_s,
                ),
            ]
            rows[f"pretrained on the server's {preset} phantoms"] = f"seg-{name}"
    modalities = TABLES[table].get("modalities", ())
    return [*stages, Stage("evaluate", evaluate_stage(rows, test, title, modalities), 90)]


def pretrain_stage(preset: str, budget: dict[str, int]):
    """`fedmodal pretrain-generator` on every site folder of another phantom preset (data the server holds)."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        from fedmodal.data.manifest import build_manifest
        from fedmodal.data.phantoms import ensure_federation

        root = ensure_federation(preset)
        sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-"))
        source = GeneratorConfig().source_modality  # the job's: its bank phase starts from it
        sources = [p for p in sites if source in build_manifest(p, site=p.name).modalities]
        command = [executable("fedmodal"), "pretrain-generator", *sources, "-o", folder / "checkpoint",
                   "--steps", str(budget["pretrain_steps"])]  # fmt: skip
        rep.command(command, cwd=folder, log=folder / "pretrain.log")
        return {"checkpoint": str(folder / "checkpoint"), "source": str(root)}

    return run


def pretrained_bank_stage(name: str, budget: dict[str, int]):
    """The federated bank phase on a generator pretrained elsewhere (no federated pretraining)."""

    def run(folder: Path, rep: Reproduction) -> dict[str, Any]:
        extra = {"server.pretrained_generator": checkpoint_of(rep, f"pretrain-{name}")}
        return generator_stage("modalitybank", budget, extra)(folder, rep)

    return run


def missing_modalities(data: Path) -> dict[str, str]:
    """What each site lacks of T1c, T2 and FLAIR, from its folder (for the row labels)."""
    from fedmodal.data.manifest import build_manifest

    names = {"t1ce": "T1c", "t2": "T2", "flair": "FLAIR"}
    out = {}
    for site in SITES:
        held = build_manifest(data / site, site=site).modalities
        out[site] = ", ".join(label for m, label in names.items() if m not in held) or "none"
    return out


def run(args: argparse.Namespace) -> int:
    from fedmodal.data.phantoms import ensure_federation

    table = args.table
    budget = BUDGETS[args.budget]
    data = (args.data_root or ensure_federation(TABLES[table]["preset"])).resolve()
    out = args.out or Path("results") / table
    inputs = {"table": table, "budget": budget, "data": data_input(args.data_root, TABLES[table]["preset"])}
    rep = Reproduction(out, table_stages(table, budget, data), env={"FEDMODAL_DATA_ROOT": str(data)}, inputs=inputs)
    rep.run()
    print(f"\n{TABLES[table]['title']}\n\n" + (rep.out / "table.md").read_text())
    return 0
