"""The phantom federation: determinism, BraTS layout, missing modalities, MRI contrast, races."""

from __future__ import annotations

import json
import threading

import nibabel as nib
import numpy as np
import pytest

from fedmodal.brats import ET_LABEL, MODALITIES
from fedmodal.data import phantoms
from fedmodal.data.layouts import case_file_paths

SHAPE = (48, 48, 32)  # 5 mm voxels: small and fast, tumours still have all three regions
TINY = (32, 32, 20)  # for layout-only checks


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "fed"
    return phantoms.build_federation(root, seed=3, shape=SHAPE, cases_per_site=2, test_cases=2, workers=1)


@pytest.fixture(scope="module")
def info(federation):
    return json.loads((federation / phantoms.FEDERATION_FILE).read_text())


def test_same_seed_same_voxels_other_seed_differs():
    a = phantoms.generate_case(0, "site-1", 0, SHAPE)
    b = phantoms.generate_case(0, "site-1", 0, SHAPE)
    c = phantoms.generate_case(1, "site-1", 0, SHAPE)
    for m in MODALITIES:
        assert a.images[m].dtype == np.int16
        np.testing.assert_array_equal(a.images[m], b.images[m])
        assert not np.array_equal(a.images[m], c.images[m])
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    assert a.info == b.info


def test_written_case_equals_its_own_generation(federation, info):
    # A case depends on (seed, site, index) only, not on what was built before it.
    site, index = "site-2", 1
    case_id = info["sites"][site]["case_ids"][index]
    paths = case_file_paths(info["layout"], case_id, info["sites"][site]["modalities"])
    expected = phantoms.generate_case(3, site, index, SHAPE)
    for m in info["sites"][site]["modalities"]:
        np.testing.assert_array_equal(_load(federation / site / paths[m]), expected.images[m])
    seg = _load(federation / site / paths["seg"])
    np.testing.assert_array_equal(seg == 4, expected.label == 3)
    np.testing.assert_array_equal(seg == 1, expected.label == 1)


def test_rebuild_is_byte_identical(tmp_path):
    kwargs = dict(seed=5, shape=TINY, cases_per_site=1, test_cases=1, workers=1)
    a = phantoms.build_federation(tmp_path / "a", **kwargs)
    b = phantoms.build_federation(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 3 * 4 + 5
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_nifti_is_brats_like(federation, info):
    case_id = info["test"]["case_ids"][0]
    paths = case_file_paths(info["layout"], case_id, MODALITIES)
    affine, spacing = phantoms.grid_affine(SHAPE)
    brains = []
    for m in MODALITIES:
        img = nib.load(str(federation / "test" / paths[m]))
        assert img.shape == SHAPE
        assert img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.affine, affine)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        np.testing.assert_allclose(img.header.get_zooms(), spacing, rtol=1e-5)
        data = np.asarray(img.dataobj)
        assert data.min() == 0 and data.max() > 0
        brains.append(data > 0)
    # Skull-stripped: every modality has the same brain, background is 0.
    for brain in brains[1:]:
        np.testing.assert_array_equal(brain, brains[0])
    assert 0.1 < brains[0].mean() < 0.6
    seg = _load(federation / "test" / paths["seg"])
    assert not (seg[~brains[0]]).any()


def test_federation_json(info):
    assert info["preset"] == "modalitybank-missing"
    assert info["seed"] == 3
    assert info["shape"] == list(SHAPE)
    assert info["layout"] == "brats2021" and info["et_label"] == 4
    assert info["spacing"] == pytest.approx([5.0, 5.0, 155 / 32])
    assert info["sites"]["site-1"]["missing"] == ["t1ce"]
    assert info["sites"]["site-2"]["missing"] == ["t2"]
    assert info["sites"]["site-3"]["missing"] == ["flair"]
    for s in info["sites"].values():
        assert "t1" in s["modalities"] and s["cases"] == len(s["case_ids"]) == 2
        assert set(s["scanner"]) >= {"gamma", "scale", "bias", "noise", "blur_mm", "tumour_mix"}
    assert info["test"]["modalities"] == list(MODALITIES) and info["test"]["cases"] == 2
    ids = [i for s in info["sites"].values() for i in s["case_ids"]] + info["test"]["case_ids"]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("preset", list(phantoms.PRESETS))
def test_missing_modalities_have_no_file(tmp_path, preset):
    root = phantoms.build_federation(
        tmp_path / preset, preset=preset, shape=TINY, cases_per_site=1, test_cases=1, workers=1
    )
    info = json.loads((root / phantoms.FEDERATION_FILE).read_text())
    assert list(info["sites"]) == list(phantoms.PRESETS[preset].sites)
    folders = {**{s: v["modalities"] for s, v in info["sites"].items()}, "test": list(MODALITIES)}
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(folders)
    for site, held in folders.items():
        case_ids = info["sites"][site]["case_ids"] if site != "test" else info["test"]["case_ids"]
        for case_id in case_ids:
            every = case_file_paths(info["layout"], case_id, MODALITIES)
            for m in MODALITIES:
                assert (root / site / every[m]).is_file() == (m in held), (site, m)
            assert (root / site / every["seg"]).is_file()
            case_dir = (root / site / every["seg"]).parent
            assert len(list(case_dir.iterdir())) == len(held) + 1


def test_preset_modalities_follow_the_papers():
    missing = phantoms.PRESETS["modalitybank-missing"].sites
    assert [set(MODALITIES) - set(v) for v in missing.values()] == [{"t1ce"}, {"t2"}, {"flair"}]
    assert set(phantoms.PRESETS["modalitybank-full"].sites.values()) == {("t1", "t2", "flair")}
    fedmepd = phantoms.PRESETS["fedmepd"].sites
    assert fedmepd["server"] == MODALITIES
    order = ("flair", "t1ce", "t1", "t2")
    masks = ["".join("1" if m in fedmepd[f"site-{k}"] else "0" for m in order) for k in range(1, 9)]
    assert masks == ["1111", "1110", "1011", "1100", "0011", "0100", "0001", "1111"]
    mixmfl = phantoms.PRESETS["mixmfl"].sites
    assert len(mixmfl) == 6 and len(set(mixmfl.values())) == 6
    assert all(len(v) == 2 for v in mixmfl.values())


def test_mri_contrast_on_generated_volumes():
    # Voxel-weighted means pooled over cases of three scanners, each case normalised by its
    # own white matter, measured with the case's labels and deformed tissue maps.
    sums: dict[tuple[str, str], list[float]] = {}
    for i in range(6):
        case = phantoms.generate_case(0, f"site-{1 + i % 3}", i, SHAPE)
        lab, tis = case.label, case.tissues
        regions = {
            "wm": (tis["wm"] > 0.9) & (lab == 0),
            "gm": (tis["gm"] > 0.7) & (lab == 0),
            "csf": (tis["csf"] > 0.8) & (lab == 0),
            "necrosis": lab == 1,
            "oedema": lab == 2,
            "enhancing": lab == 3,
        }
        assert all(regions[r].sum() > 0 for r in ("wm", "gm", "csf", "oedema", "enhancing"))
        for m, img in case.images.items():
            img = img.astype(float) / img[regions["wm"]].mean()
            for r, mask in regions.items():
                acc = sums.setdefault((m, r), [0.0, 0])
                acc[0] += img[mask].sum()
                acc[1] += int(mask.sum())
    mean = {k: s / n for k, (s, n) in sums.items()}  # wm is 1 by construction

    assert mean["t1ce", "enhancing"] > 1.2  # enhancing rim: bright in T1c ...
    assert mean["t1", "enhancing"] < 0.9  # ... but not in T1
    assert mean["flair", "oedema"] > 1.3 and mean["t2", "oedema"] > 1.3
    assert mean["flair", "csf"] < 0.6 and mean["t2", "csf"] > 1.8 and mean["t1", "csf"] < 0.6
    assert mean["t1", "gm"] < 1 and mean["t1ce", "gm"] < 1  # WM brighter than GM in T1/T1c
    assert mean["t2", "gm"] > 1 and mean["flair", "gm"] > 1  # darker in T2/FLAIR
    assert mean["t1", "necrosis"] < 0.8 and mean["t1ce", "necrosis"] < 0.9 and mean["t2", "necrosis"] > 1.5


def test_tumour_regions_nest(federation, info):
    case_id = info["sites"]["site-1"]["case_ids"][0]
    seg = _load(federation / "site-1" / case_file_paths("brats2021", case_id, ())["seg"])
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    assert {2, 4} <= set(np.unique(seg))
    from scipy import ndimage

    # Oedema surrounds the core: the core's dilation stays inside the tumour.
    core = (seg == 1) | (seg == 4)
    ring = ndimage.binary_dilation(core) & ~core
    assert ((seg[ring] > 0).mean()) > 0.85


@pytest.mark.parametrize("layout", ["brats2018", "brats2023"])
def test_labels_use_the_layouts_et_value(tmp_path, layout):
    root = phantoms.build_federation(
        tmp_path / layout, layout=layout, shape=SHAPE, cases_per_site=1, test_cases=1, workers=1
    )
    info = json.loads((root / phantoms.FEDERATION_FILE).read_text())
    assert info["et_label"] == ET_LABEL[layout]
    case_id = info["test"]["case_ids"][0]
    paths = case_file_paths(layout, case_id, MODALITIES)
    seg = _load(root / "test" / paths["seg"])
    values = set(np.unique(seg).tolist())
    assert ET_LABEL[layout] in values
    assert values <= {0, 1, 2, ET_LABEL[layout]}
    for m in MODALITIES:
        assert (root / "test" / paths[m]).is_file()


@pytest.mark.parametrize("layout", ["brats2018", "brats2020", "brats2021", "brats2023"])
def test_sites_read_back_through_the_layout_discovery(tmp_path, layout):
    from fedmodal.data.checks import check_case
    from fedmodal.data.discovery import detect_release, discover_cases

    root = phantoms.build_federation(
        tmp_path / layout, layout=layout, shape=TINY, cases_per_site=2, test_cases=1, workers=1
    )
    info = json.loads((root / phantoms.FEDERATION_FILE).read_text())
    folders = {**info["sites"], "test": info["test"]}
    for site, meta in folders.items():
        assert detect_release(root / site) == layout
        cases = discover_cases(root / site)
        assert [c.case_id for c in cases] == sorted(meta["case_ids"])
        for case in cases:
            assert case.modalities == tuple(meta["modalities"])
            check_case(case, site, need_seg=True)


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "fed").write_text("not a federation")
    with pytest.raises(FileExistsError, match="other files"):
        phantoms.build_federation(tmp_path / "fed", shape=TINY, cases_per_site=1, test_cases=0)


def test_reuse_refuse_overwrite(tmp_path):
    kwargs = dict(shape=TINY, cases_per_site=1, test_cases=0, workers=1)
    root = phantoms.build_federation(tmp_path / "fed", **kwargs)
    stamp = json.loads((root / phantoms.FEDERATION_FILE).read_text())["build"]["id"]
    assert phantoms.build_federation(root, **kwargs) == root  # same spec: reused
    assert json.loads((root / phantoms.FEDERATION_FILE).read_text())["build"]["id"] == stamp
    with pytest.raises(FileExistsError, match="seed"):
        phantoms.build_federation(root, seed=9, **kwargs)
    phantoms.build_federation(root, seed=9, overwrite=True, **kwargs)
    assert json.loads((root / phantoms.FEDERATION_FILE).read_text())["seed"] == 9
    assert not (root / "test").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fed.") and p.is_dir()] == []


def test_racing_builders_share_one_build(tmp_path, monkeypatch):
    calls = []
    real = phantoms.cache.build_into

    def counting(folder, spec, workers):
        calls.append(folder)
        return real(folder, spec, workers)

    monkeypatch.setattr(phantoms.cache, "build_into", counting)  # where the builder looks it up
    root = tmp_path / "shared"
    results, errors = [], []

    def site():
        try:
            results.append(phantoms.ensure_federation(root=root, shape=TINY, cases_per_site=1, test_cases=1))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=site) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert results == [root.absolute()] * 3
    assert (root / phantoms.FEDERATION_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]


def test_two_processes_building_one_root(tmp_path):
    # What the FLARE simulator does: every site process asks for the federation at once.
    import subprocess
    import sys

    code = (
        "import sys; from fedmodal.data import phantoms; "
        f"print(phantoms.ensure_federation(root=sys.argv[1], shape={TINY!r}, cases_per_site=2, test_cases=1))"
    )
    root = tmp_path / "fed"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(root)] * 2
    info = json.loads((root / phantoms.FEDERATION_FILE).read_text())
    assert sum(len(s["case_ids"]) for s in info["sites"].values()) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fed.lock", "fed"]


def test_default_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMODAL_PHANTOM_ROOT", raising=False)
    monkeypatch.setenv("FEDMODAL_CACHE", str(tmp_path / "cache"))
    default = phantoms.default_root()
    assert default.parent == tmp_path / "cache" / "phantoms"
    assert default.name.startswith("modalitybank-missing-seed0-96x96x62-brats2021")
    assert phantoms.default_root("fedmepd") != default
    assert phantoms.default_root(cases_per_site=2) != default
    assert phantoms.default_root(cases_per_site=16, test_cases=10) == default  # the preset's counts: same spec
    monkeypatch.setenv("FEDMODAL_PHANTOM_ROOT", str(tmp_path / "here"))
    assert phantoms.default_root() == tmp_path / "here"
    root = phantoms.ensure_federation(shape=TINY, cases_per_site=1, test_cases=0)
    assert root == tmp_path / "here" and (root / phantoms.FEDERATION_FILE).is_file()


def test_cli_builds_and_reports(tmp_path, capsys):
    from fedmodal.cli import main

    out = tmp_path / "cli"
    argv = [
        "phantoms",
        "--out",
        str(out),
        "--shape",
        *map(str, TINY),
        "--cases-per-site",
        "1",
        "--test-cases",
        "1",
        "--layout",
        "brats2020",
        "--preset",
        "mixmfl",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "built mixmfl" in text and str(out) in text and " MB" in text and " s," in text
    assert (out / "site-6").is_dir()
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out


def test_a_federation_scales_to_more_hospitals_by_repeating_the_presets(tmp_path, monkeypatch):
    """`num_sites` repeats the preset's hospitals in turn, each with its own scanner and cases;
    the preset's own count keeps the preset's spec (and its cache folder)."""
    monkeypatch.setenv("FEDMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMODAL_PHANTOM_ROOT", raising=False)
    assert phantoms.federation_spec(num_sites=3) == phantoms.federation_spec()
    assert phantoms.default_root(num_sites=6) != phantoms.default_root()
    root = phantoms.build_federation(tmp_path / "six", num_sites=6, shape=TINY, cases_per_site=1, test_cases=1)
    info = json.loads((root / phantoms.FEDERATION_FILE).read_text())
    base = phantoms.PRESETS["modalitybank-missing"].sites
    assert list(info["sites"]) == [f"site-{k}" for k in range(1, 7)]
    for k in range(1, 7):
        assert tuple(info["sites"][f"site-{k}"]["modalities"]) == base[f"site-{(k - 1) % 3 + 1}"]
    assert info["sites"]["site-4"]["scanner"] != info["sites"]["site-1"]["scanner"]
    seg = case_file_paths(info["layout"], info["sites"]["site-4"]["case_ids"][0], MODALITIES)["seg"]
    first = case_file_paths(info["layout"], info["sites"]["site-1"]["case_ids"][0], MODALITIES)["seg"]
    assert not np.array_equal(_load(root / "site-4" / seg), _load(root / "site-1" / first))  # new patients
    from fedmodal.cli import main

    argv = ["phantoms", "--out", str(tmp_path / "cli"), "--shape", *map(str, TINY), "--test-cases", "0"]
    assert main([*argv, "--sites", "4", "--cases-per-site", "1"]) == 0
    assert (tmp_path / "cli" / "site-4").is_dir() and not (tmp_path / "cli" / "site-5").exists()
    fedmepd = phantoms.federation_spec("fedmepd", num_sites=2)
    assert sorted(fedmepd["cases_per_site"]) == ["server", "site-1", "site-2"]  # the server stays
    with pytest.raises(ValueError, match="num_sites must be at least 1"):
        phantoms.federation_spec(num_sites=0)
