"""`fedmodal synthesize`, `complete` and `synthesis-quality` on a tiny trained generator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmodal.cli import main
from fedmodal.data.manifest import build_manifest
from fedmodal.data.phantoms import build_federation
from fedmodal.modalitybank.central import build_workers, train
from fedmodal.modalitybank.config import AdversaryConfig, BankSiteConfig, GeneratorConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthesis")
    data = build_federation(tmp / "data", shape=(40, 40, 24), cases_per_site=2, test_cases=2)
    generator = GeneratorConfig(image_size=32, ngf=8, n_blocks=2, batch_size=2, pretrain_steps=2, bank_steps=2)
    workers = build_workers(
        {s: data / s for s in ("site-1", "site-2", "site-3")},
        generator,
        tmp / "sites",
        slices="tumour",
        site=BankSiteConfig(split="all"),
        adversary=AdversaryConfig(ndf=8, n_layers=2),
    )
    trainer, _, _ = train(workers, generator)
    checkpoint = trainer.save(tmp / "checkpoint")
    return data, checkpoint, tmp


def test_complete_writes_the_missing_modality_on_the_masks_grid(trained):
    data, checkpoint, tmp = trained
    site = tmp / "site-1"
    shutil.copytree(data / "site-1", site)
    assert build_manifest(site).modalities == ("t1", "t2", "flair")
    assert main(["complete", str(site), "--checkpoint", str(checkpoint)]) == 0

    completed = build_manifest(site, include_synthetic=True)
    assert completed.modalities == ("t1", "t1ce", "t2", "flair")
    assert build_manifest(site).modalities == ("t1", "t2", "flair"), "synthetic files are opt-in"
    for case in completed.cases:
        synthetic = case.images["t1ce"]
        assert synthetic.name == f"{case.case_id}_t1ce_synthetic.nii.gz"
        written, seg = nib.load(synthetic), nib.load(case.seg)
        assert written.shape == seg.shape
        assert np.allclose(written.affine, seg.affine)
        volume = written.get_fdata()
        brain = nib.load(case.images["t1"]).get_fdata() > 0
        assert np.all(volume[~brain & (seg.get_fdata() == 0)] == 0), "synthetic intensity outside the brain"
        assert volume[brain].std() > 0

    # A second run writes nothing new unless asked to.
    before = {p: p.stat().st_mtime_ns for p in site.rglob("*_synthetic.nii.gz")}
    assert main(["complete", str(site), "--checkpoint", str(checkpoint)]) == 0
    assert {p: p.stat().st_mtime_ns for p in site.rglob("*_synthetic.nii.gz")} == before


def test_synthesize_and_quality_report(trained, capsys):
    data, checkpoint, tmp = trained
    out = tmp / "synthetic"
    assert (
        main(["synthesize", str(data / "test"), "--checkpoint", str(checkpoint), "-o", str(out), "--limit", "1"]) == 0
    )
    written = sorted(p.name for p in out.rglob("*.nii.gz"))
    assert len(written) == 4 and all(name.endswith("_synthetic.nii.gz") for name in written)

    report = tmp / "quality"
    args = [
        "synthesis-quality",
        "--checkpoint",
        f"bank={checkpoint}",
        "--test",
        str(data / "test"),
        "--out",
        str(report),
    ]
    assert main(args) == 0
    results = json.loads(report.with_suffix(".json").read_text())
    assert set(results["bank"]) == {"t1", "t1ce", "t2", "flair"}
    for scores in results["bank"].values():
        assert scores["mae"]["n"] > 0 and 0 <= scores["mae"]["mean"] <= 2
        assert -1 <= scores["ssim"]["mean"] <= 1
    table = report.with_suffix(".md").read_text()
    assert table.count("| bank |") == 4

    with pytest.raises(FileNotFoundError, match="ModalityBank checkpoint"):
        main(["synthesize", str(data / "test"), "--checkpoint", str(tmp), "-o", str(out)])


def test_the_readme_pretraining_command_with_defaults_feeds_the_default_job(tmp_path):
    """`fedmodal pretrain-generator DATA -o OUT` at its defaults gives a generator that the
    default jobs/modalitybank loads as its pretrained_generator and trains its bank from."""
    from fedmodal.cli import main
    from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
    from fedmodal.modalitybank.generator_trainer import GeneratorTrainer

    data = build_federation(tmp_path / "data", shape=(40, 40, 24), cases_per_site=2, test_cases=1)
    assert (
        main(
            [
                "pretrain-generator",
                str(data / "site-1"),
                str(data / "site-2"),
                "-o",
                str(tmp_path / "pre"),
                "--steps",
                "2",
            ]
        )
        == 0
    )  # --steps only to keep the test short: every shape setting at its default

    job = json.loads((REPO / "jobs/modalitybank/app/config/config_fed_server.json").read_text())
    generator = GeneratorConfig.from_dict(job["workflows"][0]["args"]["generator"])
    workers = build_workers(
        {s: data / s for s in ("site-1", "site-2", "site-3")},
        generator,
        tmp_path / "sites",
        site=BankSiteConfig(split="all"),
        adversary=AdversaryConfig(ndf=8, n_layers=2),
    )
    sites = [SiteState.from_registration(n, w.registration()) for n, w in sorted(workers.items())]
    trainer = GeneratorTrainer(resolve_config(generator, sites))
    trainer.load_pretrained(tmp_path / "pre")
    assert trainer.phase == "bank" and trainer.modulated
    coordinator = StepCoordinator(trainer, sites, np.random.default_rng(0))
    payloads = coordinator.step_payloads()
    coordinator.finish_step({n: workers[n].step(p) for n, p in payloads.items()})
    assert trainer.progress.step == 1
