"""fedmodal.jobs: every job defined once; the committed folders are exactly its export."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmodal.jobs import JOBS
from fedmodal.jobs.spec import export_job, parse_overrides, route_settings

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "jobs"


def tree(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".__nvfl")
    )


def test_every_committed_job_folder_is_a_job_definition():
    assert sorted(p.name for p in COMMITTED.iterdir() if p.is_dir()) == sorted(JOBS)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_committed_folder_is_byte_for_byte_its_export(name, tmp_path):
    exported = export_job(JOBS[name], tmp_path)
    committed = COMMITTED / name
    assert tree(exported) == tree(committed), f"regenerate with: fedmodal job export {name} jobs/"
    for rel in tree(exported):
        same = filecmp.cmp(exported / rel, committed / rel, shallow=False)
        assert same, f"jobs/{name}/{rel} differs from its export; regenerate with: fedmodal job export {name} jobs/"
    # Configuration only: sites run the installed package, never code shipped in the job.
    assert not any("custom" in Path(rel).parts for rel in tree(committed))


def test_asyndgan_job_differs_from_modalitybank_only_by_mode_and_name(tmp_path):
    bank = export_job(JOBS["modalitybank"], tmp_path / "a")
    asyndgan = export_job(JOBS["modalitybank-asyndgan"], tmp_path / "b")
    a = json.loads((bank / "app/config/config_fed_server.json").read_text())["workflows"][0]
    b = json.loads((asyndgan / "app/config/config_fed_server.json").read_text())["workflows"][0]
    assert (a["id"], b["id"]) == ("modalitybank", "asyndgan")
    assert a["args"]["generator"].pop("mode") == "bank" and b["args"]["generator"].pop("mode") == "asyndgan"
    assert a["args"] == b["args"]
    assert (bank / "app/config/config_fed_client.json").read_text() == (
        asyndgan / "app/config/config_fed_client.json"
    ).read_text()


def test_settings_are_routed_to_their_section_and_typos_are_refused():
    spec = JOBS["modalitybank"]
    assert route_settings(spec, {"image_size": 96, "ndf": 64, "server.device": "cpu"}) == {
        "generator": {"image_size": 96},
        "adversary": {"ndf": 64},
        "server": {"device": "cpu"},
    }
    assert parse_overrides(spec, ["bank_steps=10", 'target_modalities=["t2"]', "site.split=all"]) == {
        "generator": {"bank_steps": 10, "target_modalities": ["t2"]},
        "site": {"split": "all"},
    }
    with pytest.raises(ValueError, match="in sections"):
        route_settings(spec, {"device": "cpu"})  # both the server and the sites have a device
    with pytest.raises(ValueError, match="no setting of job modalitybank"):
        route_settings(spec, {"image_sise": 96})
    with pytest.raises(ValueError, match="unknown GeneratorConfig settings"):
        spec.settings({"generator": {"image_sise": 96}})


def test_a_component_refuses_an_unknown_setting_naming_it():
    from fedmodal.modalitybank.controller import ModalityBankController
    from fedmodal.modalitybank.executor import ModalityBankExecutor

    with pytest.raises(ValueError, match=r"\['ngff'\] in the controller's generator"):
        ModalityBankController(generator={"ngff": 8})
    with pytest.raises(ValueError, match=r"\['ndff'\] in the ModalityBank executor's adversary"):
        ModalityBankExecutor(adversary={"ndff": 8})


def test_fedavg_server_and_sites_name_the_same_network(tmp_path):
    job = export_job(JOBS["fedavg"], tmp_path, route_settings(JOBS["fedavg"], {"seg.net": "unet2d-wt-tiny"}))
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["model"]["args"] == {"preset": "unet2d-wt-tiny"}
    assert client["executors"][0]["executor"]["args"]["seg"]["net"] == "unet2d-wt-tiny"
    assert "channels" not in client["executors"][0]["executor"]["args"]["seg"]  # named once, by the preset


def test_job_list_and_export_commands(tmp_path, capsys):
    from fedmodal.cli import main

    assert main(["job", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in JOBS)
    assert main(["job", "export", "modalitybank", str(tmp_path), "--set", "bank_steps=7"]) == 0
    server = json.loads((tmp_path / "modalitybank/app/config/config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["generator"]["bank_steps"] == 7


@pytest.mark.integration
def test_job_run_in_simenv_needs_no_allow_list_step(tmp_path):
    """`fedmodal job run NAME --env sim` runs NVFlare's SimEnv in a fresh workspace: the
    allow-list is written for it, so no `local/` copy step is needed."""
    import os
    import subprocess
    import sys

    from fedmodal.data.phantoms import build_federation

    data = build_federation(tmp_path / "data", shape=(32, 32, 24), cases_per_site=2, test_cases=1)
    env = {**os.environ, "HOME": str(tmp_path), "FEDMODAL_DATA_ROOT": str(data)}
    fedmodal = Path(sys.executable).with_name("fedmodal")
    done = subprocess.run(
        [str(fedmodal), "job", "run", "site-inventory", "--env", "sim", "-n", "3", "--workspace", str(tmp_path / "ws")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    inventory = json.loads((tmp_path / "ws/site-inventory/server/simulate_job/inventory.json").read_text())
    assert [s["site"] for s in inventory["sites"]] == ["site-1", "site-2", "site-3"]
    assert inventory["failed_sites"] == {}


def test_every_job_declares_what_a_site_needs_and_a_gpu_variant_is_one_setting(tmp_path):
    for name in JOBS:
        meta = json.loads((COMMITTED / name / "meta.json").read_text())
        assert meta["resource_spec"] == {"@default": {"num_of_gpus": 0, "num_of_cpus": 1, "memory": "4Gi"}}, name
    spec = JOBS["modalitybank"]
    gpu = export_job(spec, tmp_path, route_settings(spec, {"site_gpus": 1, "site_memory": "16Gi"}))
    meta = json.loads((gpu / "meta.json").read_text())
    assert meta["resource_spec"]["@default"] == {"num_of_gpus": 1, "num_of_cpus": 1, "memory": "16Gi"}
    from nvflare.utils.job_launcher_utils import get_resource_manager_spec, validate_portable_resource_spec

    validate_portable_resource_spec(meta["resource_spec"])  # what NVFlare's server checks on submission
    cpu = json.loads((COMMITTED / "modalitybank" / "meta.json").read_text())
    # NVFlare drops the 0-GPU request before a site's resource manager sees it: CPU sites schedule it.
    assert get_resource_manager_spec(cpu, "site-1") == {}


def test_poc_kits_get_the_allow_list_before_they_start(tmp_path):
    """`fedmodal job run NAME --env poc` writes fedmodal's allow-list into every fresh POC kit."""
    from fedmodal.jobs.poc import customize_poc_kits

    for kit, marker in (
        ("server", "fed_server.json"),
        ("site-1", "fed_client.json"),
        ("admin@nvidia.com", "fed_admin.json"),
    ):
        (tmp_path / "example_project/prod_00" / kit / "startup").mkdir(parents=True)
        (tmp_path / "example_project/prod_00" / kit / "startup" / marker).write_text("{}")
    local = tmp_path / "example_project/prod_00/site-1/local"
    local.mkdir()
    (local / "resources.json.default").write_text(json.dumps({"format_version": 2, "components": []}))
    written = customize_poc_kits(tmp_path)
    assert sorted(p.parent.parent.name for p in written) == ["server", "site-1"]  # not the admin kit
    resources = json.loads((local / "resources.json").read_text())
    assert "fedmodal." in resources["class_allow_list"] and resources["components"] == []


@pytest.mark.parametrize("name", ["fedavg", "mixmfl", "fedmepd", "modalitybank"])
def test_one_poll_setting_drives_the_sites_task_requests_and_the_workflows_checks(name, tmp_path):
    from fedmodal.fl.timing import TASK_POLL_SECONDS

    def server_config(folder: Path) -> dict:
        return json.loads((folder / "app/config/config_fed_server.json").read_text())

    def workflow_polls(config: dict) -> list[float]:
        """The poll each training workflow was given, however its arguments are laid out."""
        found = []
        for workflow in config["workflows"]:
            args = workflow["args"]
            if "task_check_period" in args:
                found.append(args["task_check_period"])
            found += [
                section["task_poll"]
                for section in args.values()
                if isinstance(section, dict) and "task_poll" in section
            ]
        return found

    committed = server_config(COMMITTED / name)
    assert committed["server"]["task_request_interval"] == TASK_POLL_SECONDS  # NVFlare's own default is 2 s
    assert workflow_polls(committed) == [TASK_POLL_SECONDS]
    spec = JOBS[name]
    slower = server_config(export_job(spec, tmp_path, route_settings(spec, {"task_poll": 0.4})))
    assert slower["server"]["task_request_interval"] == 0.4
    assert workflow_polls(slower) == [0.4]


def test_the_paper_profile_sets_the_papers_sizes_and_set_values_still_win(tmp_path, capsys):
    from fedmodal.cli import main
    from fedmodal.jobs.spec import with_profile

    spec = JOBS["modalitybank"]
    generator = spec.settings(with_profile(spec, "paper"))["generator"]
    assert (generator.image_size, generator.ngf, generator.n_blocks) == (256, 64, 9)
    assert spec.settings(with_profile(spec, "paper"))["adversary"].ndf == 64
    chosen = spec.settings(with_profile(spec, "paper", parse_overrides(spec, ["image_size=128"])))["generator"]
    assert (chosen.image_size, chosen.ngf) == (128, 64)
    assert spec.settings(with_profile(spec, None))["generator"].ngf == 32  # no profile: the job's own

    mixmfl = JOBS["mixmfl"].settings(with_profile(JOBS["mixmfl"], "paper"))
    assert (mixmfl["mixmfl"].spatial_dims, tuple(mixmfl["mixmfl"].patch_size)) == (3, (128, 128, 128))
    assert mixmfl["server"].num_rounds == 200
    fedmepd = JOBS["fedmepd"].settings(with_profile(JOBS["fedmepd"], "paper"))["fedmepd"]
    assert (tuple(fedmepd.channels), fedmepd.batch_size, fedmepd.warmup_rounds) == ((16, 32, 64, 128), 1, 30)

    with pytest.raises(ValueError, match=r"job fedavg has no profile 'paper'; its profiles: none"):
        with_profile(JOBS["fedavg"], "paper")

    assert main(["job", "export", "modalitybank", str(tmp_path), "--profile", "paper", "--set", "bank_steps=7"]) == 0
    server = json.loads((tmp_path / "modalitybank" / "app" / "config" / "config_fed_server.json").read_text())
    exported = server["workflows"][0]["args"]["generator"]
    assert (exported["image_size"], exported["ngf"], exported["n_blocks"], exported["bank_steps"]) == (256, 64, 9, 7)
    assert main(["job", "list"]) == 0
    assert "profiles: paper" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"fedmodal job export: job fedavg has no profile 'paper'"):
        main(["job", "export", "fedavg", str(tmp_path), "--profile", "paper"])


def test_mlflow_tracking_is_off_by_default_and_only_where_sites_stream_metrics(tmp_path):
    fedavg = JOBS["fedavg"]
    assert not fedavg.settings()["tracking"].mlflow
    server = json.loads((REPO / "jobs/fedavg/app/config/config_fed_server.json").read_text())
    assert all("mlflow" not in c["path"].lower() for c in server["components"])
    on = route_settings(fedavg, {"tracking.mlflow": True, "tracking.tracking_uri": "http://tracking.example:5000"})
    job = export_job(fedavg, tmp_path, on)
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    (receiver,) = [c for c in server["components"] if c["id"] == "mlflow_receiver"]
    assert receiver["args"]["tracking_uri"] == "http://tracking.example:5000"
    assert receiver["args"]["events"] == [fedavg.metrics_event]
    with pytest.raises(ValueError, match="tracking.mlflow needs tracking.tracking_uri"):
        fedavg.settings(route_settings(fedavg, {"tracking.mlflow": True}))
    with pytest.raises(ValueError, match="has no section 'tracking'"):
        route_settings(JOBS["modalitybank"], {"tracking.mlflow": True})


def test_the_gpu_check_says_there_is_no_cuda_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_check.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
