"""The joins of `fedmodal reproduce modalitybank-table*` on tiny data: synthetic cases in BraTS
naming are read by the data layer, completed sites train with --include-synthetic, the
evaluation writes the table, and a finished stage is skipped on a rerun."""

from __future__ import annotations

import json

import pytest

from fedmodal.data.manifest import build_manifest
from fedmodal.data.phantoms import build_federation
from fedmodal.modalitybank.central import build_workers, train
from fedmodal.modalitybank.config import AdversaryConfig, BankSiteConfig, GeneratorConfig
from fedmodal.reproduce import modalitybank as mb
from fedmodal.reproduce.runner import COMMANDS_FILE, Reproduction, Stage

TINY_BUDGET = {
    "pretrain_steps": 2,
    "bank_steps": 2,
    "rounds": 1,
    "local_epochs": 1,
    "seg_flags": ["--channels", "4", "8", "--patch-size", "32", "32", "--batch-size", "4", "--samples-per-case", "2"],
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mb-tables")
    data = build_federation(tmp / "data", shape=(32, 32, 24), cases_per_site=3, test_cases=2)  # missing preset
    generator = GeneratorConfig(image_size=32, ngf=8, n_blocks=2, batch_size=2, pretrain_steps=2, bank_steps=2)
    workers = build_workers(
        {s: data / s for s in mb.SITES},
        generator,
        tmp / "sites",
        site=BankSiteConfig(split="all"),
        adversary=AdversaryConfig(ndf=8, n_layers=2),
    )
    trainer, _, _ = train(workers, generator)
    return data, trainer.save(tmp / "checkpoint")


def test_synthetic_and_completed_sites_train_and_the_table_is_written(federation, tmp_path, capsys):
    data, checkpoint = federation
    # The generator's stage, done beforehand: a stage of a reproduction that reports its checkpoint.
    stages = [Stage("modalitybank", lambda folder, rep: {"checkpoint": str(checkpoint)})]
    synthetic = lambda rep: rep.out / "synthetic-modalitybank"  # noqa: E731
    stages += [
        Stage("synthetic-modalitybank", mb.synthetic_stage("modalitybank", data)),
        Stage("completed", mb.completed_stage(data)),
        Stage("seg-site-1", mb.seg_stage(lambda rep: data, ["site-1"], TINY_BUDGET)),
        Stage("seg-modalitybank", mb.seg_stage(synthetic, mb.SITES, TINY_BUDGET, synthetic=True)),
        Stage(
            "seg-completed-site-1",
            mb.seg_stage(lambda rep: rep.out / "completed", ["site-1"], TINY_BUDGET, synthetic=True),
        ),
    ]
    rows = {
        "Real-site-1 (n/a T1c)": "seg-site-1",
        "ModalityBank (synthetic)": "seg-modalitybank",
        "Completed-site-1 (syn T1c)": "seg-completed-site-1",
    }
    stages.append(Stage("evaluate", mb.evaluate_stage(rows, data / "test", "tiny Table II")))
    out = tmp_path / "table2"
    results = Reproduction(out, stages, env={"FEDMODAL_DATA_ROOT": str(data)}).run()

    # Synthetic cases (seg + <case>_<mod>_synthetic files) are a site of every modality G knows.
    synthetic_site = build_manifest(out / "synthetic-modalitybank" / "site-1", include_synthetic=True)
    assert synthetic_site.modalities == ("t1", "t1ce", "t2", "flair")
    assert all(case.seg.name == f"{case.case_id}_seg.nii.gz" for case in synthetic_site.cases)
    assert build_manifest(out / "synthetic-modalitybank" / "site-1", need_seg=True).cases == []  # opt-in only
    # The completed site gains its missing T1c; the trained models record what they were fed.
    assert build_manifest(out / "completed" / "site-1", include_synthetic=True).modalities == (
        "t1",
        "t1ce",
        "t2",
        "flair",
    )
    import torch

    fed = {
        stage: torch.load(results[stage]["model"], weights_only=False)["meta"]["trained_modalities"]
        for stage in rows.values()
    }
    assert fed["seg-site-1"] == ["t1", "t2", "flair"]
    assert fed["seg-completed-site-1"] == ["t1", "t1ce", "t2", "flair"]
    assert fed["seg-modalitybank"] == ["t1", "t1ce", "t2", "flair"]

    table = (out / "table.md").read_text()
    for label in rows:
        assert f"| {label} |" in table
    assert "Dice(%)" in table and (out / "table.csv").is_file()
    assert set(results["evaluate"]) >= set(rows)
    commands = (out / COMMANDS_FILE).read_text()
    assert "synthesize" in commands and "--with-seg" in commands and "complete" in commands

    # A rerun redoes nothing: every stage is skipped and no command is added.
    capsys.readouterr()
    Reproduction(out, stages, env={"FEDMODAL_DATA_ROOT": str(data)}).run()
    assert capsys.readouterr().out.count("already done, skipped") == len(stages)
    assert (out / COMMANDS_FILE).read_text() == commands


def test_every_table_has_its_stages_and_rows_in_the_papers_order(federation):
    data, _ = federation
    table1 = [s.name for s in mb.table_stages("modalitybank-table1", mb.BUDGETS["quick"], data)]
    assert table1[:2] == ["modalitybank", "asyndgan"] and table1[-1] == "evaluate"
    table2 = [s.name for s in mb.table_stages("modalitybank-table2", mb.BUDGETS["quick"], data)]
    assert "completed" in table2 and "seg-completed-site-3" in table2
    assert mb.missing_modalities(data) == {"site-1": "T1c", "site-2": "T2", "site-3": "FLAIR"}
    table3 = [s.name for s in mb.table_stages("modalitybank-table3", mb.BUDGETS["quick"], data)]
    assert "pretrain-missing-preset" in table3 and "modalitybank-mixmfl-preset" in table3
    with pytest.raises(ValueError, match="unknown table"):
        mb.table_stages("modalitybank-table4", mb.BUDGETS["quick"], data)
    json.dumps(mb.BUDGETS)  # budgets are plain data (recorded with the results)
