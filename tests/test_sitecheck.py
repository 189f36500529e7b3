"""Site manifest (policy, modalities, split, JSON) and the `fedmodal site-check` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmodal.cli import main
from fedmodal.data.errors import DataError
from fedmodal.data.manifest import SiteManifest, build_manifest, split_of
from test_layouts import SHAPE, write_case, write_volume


def site_with_one_bad_case(root):
    for i in range(3):
        write_case(root, "brats2021", i)
    _, files = write_case(root, "brats2021", 3)
    raw = files["t1ce"].read_bytes()
    files["t1ce"].write_bytes(raw[: len(raw) // 2])
    return files["t1ce"]


# ----------------------------------------------------------------------------- manifest


def test_skip_policy_reports_and_stop_policy_raises(tmp_path):
    bad_file = site_with_one_bad_case(tmp_path)
    manifest = build_manifest(tmp_path, site="site-1", on_error="skip")
    assert [c.case_id for c in manifest.cases] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    assert len(manifest.problems) == 1
    problem = manifest.problems[0]
    assert problem["site"] == "site-1" and problem["case"] == "BraTS2021_00003"
    assert problem["file"] == str(bad_file) and "unreadable" in problem["problem"]
    with pytest.raises(DataError, match="BraTS2021_00003"):
        build_manifest(tmp_path, site="site-1", on_error="stop")


def test_manifest_modalities_exclusion_and_site_file(tmp_path):
    write_case(tmp_path, "brats2023", 0)
    write_case(tmp_path, "brats2023", 1, modalities=("t1", "t1ce", "flair"))
    manifest = build_manifest(tmp_path)
    assert manifest.release == "brats2023" and manifest.et_label == 3
    assert manifest.site == tmp_path.name
    assert manifest.modalities == ("t1", "t1ce", "flair")  # held by every case
    assert build_manifest(tmp_path, exclude_modalities=["t1c"]).modalities == ("t1", "flair")
    (tmp_path / "fedmodal_site.json").write_text(json.dumps({"site": "hospital-a", "exclude_modalities": ["t1n"]}))
    declared = build_manifest(tmp_path)
    assert declared.site == "hospital-a" and declared.excluded == ("t1",)
    assert declared.modalities == ("t1ce", "flair")
    summary = declared.summary()
    assert summary["modality_counts"] == {"t1": 2, "t1ce": 2, "t2": 1, "flair": 2}
    json.dumps(summary)  # JSON-able
    (tmp_path / "fedmodal_site.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        build_manifest(tmp_path)


def test_split_is_deterministic_and_stable_when_cases_are_added(tmp_path):
    fractions = (0.5, 0.25, 0.25)
    ids = [f"BraTS2021_{i:05d}" for i in range(200)]
    first = {case_id: split_of(case_id, fractions, seed=3) for case_id in ids}
    assert first == {case_id: split_of(case_id, fractions, seed=3) for case_id in ids}
    counts = {name: list(first.values()).count(name) for name in ("train", "val", "test")}
    assert 70 < counts["train"] < 130 and counts["val"] > 25 and counts["test"] > 25
    assert first != {case_id: split_of(case_id, fractions, seed=4) for case_id in ids}

    for i in range(4):
        write_case(tmp_path, "brats2021", i)
    before = build_manifest(tmp_path, split=fractions, seed=3)
    for i in range(4, 7):
        write_case(tmp_path, "brats2021", i)
    after = build_manifest(tmp_path, split=fractions, seed=3)
    for name in ("train", "val", "test"):
        assert set(before.split[name]) <= set(after.split[name])
    assert sum(len(v) for v in after.split.values()) == 7
    assert {c.case_id for c in after.cases_in("train")} == set(after.split["train"])
    with pytest.raises(ValueError, match="fractions"):
        build_manifest(tmp_path, split=(0.5, 0.5, 0.5))


def test_explicit_split_from_site_file(tmp_path):
    for i in range(3):
        write_case(tmp_path, "brats2021", i)
    (tmp_path / "fedmodal_site.json").write_text(
        json.dumps({"split": {"train": ["BraTS2021_00000", "BraTS2021_00009"], "test": ["BraTS2021_00001"]}})
    )
    manifest = build_manifest(tmp_path)
    assert "BraTS2021_00000" in manifest.split["train"] and manifest.split["test"][0] == "BraTS2021_00001"
    assert any("BraTS2021_00009" in note for note in manifest.notes)
    assert sum(len(v) for v in manifest.split.values()) == 3


def test_manifest_json_round_trip_is_atomic(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_case(root, "brats2020", 1, institution=None)
    write_case(root, "brats2020", 2, modalities=("t1", "t2"))
    manifest = build_manifest(root, need_seg=True)
    path = tmp_path / "out" / "manifest.json"
    manifest.to_json(path)
    again = SiteManifest.from_json(path)
    assert again.summary() == manifest.summary()
    assert [c.images for c in again.cases] == [c.images for c in manifest.cases]
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temp file left

    # A failure while writing leaves the previous file whole and no temp file behind.
    import fedmodal.data.manifest as manifest_module

    def broken_dump(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(manifest_module.json, "dump", broken_dump)
    with pytest.raises(RuntimeError):
        manifest.to_json(path)
    monkeypatch.undo()
    assert SiteManifest.from_json(path).summary() == manifest.summary()
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_no_case_folder_is_a_site_error(tmp_path):
    with pytest.raises(DataError, match="no BraTS case folder") as info:
        build_manifest(tmp_path, site="site-9")
    assert info.value.site == "site-9"


# ----------------------------------------------------------------------------- CLI


def test_site_check_prints_report(tmp_path, capsys):
    root = tmp_path / "site"
    write_case(root, "brats2018", 0, institution="CBICA")
    write_case(root, "brats2018", 1, institution="CBICA", grade="LGG")
    write_case(root, "brats2018", 2, institution="TCIA01", modalities=("t1", "t2", "flair"))
    assert main(["site-check", str(root), "--site", "site-1"]) == 0
    out = capsys.readouterr().out
    assert "brats2018" in out and "site-1" in out
    assert "usable cases   3" in out
    assert "t1, t2, flair" in out
    assert "CBICA (2), TCIA01 (1)" in out
    assert "4 ET" in out


def test_site_check_json_skip_and_stop(tmp_path, capsys):
    bad_file = site_with_one_bad_case(tmp_path)
    assert main(["site-check", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_cases"] == 3 and summary["n_problems"] == 1
    assert summary["problems"][0]["file"] == str(bad_file)
    assert summary["institutions"] == {"unknown": 3}

    assert main(["site-check", str(tmp_path), "--on-error", "stop"]) == 1
    captured = capsys.readouterr()
    assert "BraTS2021_00003" in captured.err and bad_file.name in captured.err


def test_site_check_fails_without_usable_case(tmp_path, capsys):
    _, files = write_case(tmp_path, "brats2021", 0)
    write_volume(files["t1"], np.zeros(SHAPE, np.float32))
    assert main(["site-check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "empty brain" in out and "no usable case" in out
    assert main(["site-check", str(tmp_path / "nothing-here")]) == 1


def test_site_check_no_seg_and_manifest_file(tmp_path, capsys):
    root = tmp_path / "site"
    write_case(root, "brats2021", 0, with_seg=False)
    assert main(["site-check", str(root)]) == 1  # seg needed by default
    manifest_path = tmp_path / "m.json"
    assert main(["site-check", str(root), "--no-seg", "--write-manifest", str(manifest_path)]) == 0
    assert SiteManifest.from_json(manifest_path).cases[0].seg is None
