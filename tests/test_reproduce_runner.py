"""fedmodal.reproduce.runner: stages run once, a rerun skips what is done, commands are kept."""

from __future__ import annotations

import sys

import pytest

from fedmodal.reproduce.runner import COMMANDS_FILE, DONE_FILE, Reproduction, Stage, write_table
from sim import write_client_log


def test_a_finished_stage_is_not_redone_and_an_interrupted_one_continues(tmp_path, capsys):
    calls = []

    def first(folder, rep):
        calls.append("first")
        rep.command([sys.executable, "-c", "print('hello')"], cwd=folder, log=folder / "log.txt")
        return {"value": 1}

    def second(folder, rep):
        calls.append("second")
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return {"value": 2}

    stages = [Stage("first", first, estimate_s=5), Stage("second", second, estimate_s=7)]
    with pytest.raises(RuntimeError, match="interrupted"):
        Reproduction(tmp_path, stages, env={"FEDMODAL_DATA_ROOT": "/data"}).run()
    assert (tmp_path / "first" / DONE_FILE).is_file() and not (tmp_path / "second" / DONE_FILE).exists()
    results = Reproduction(tmp_path, stages).run()
    assert calls == ["first", "second", "second"]  # the first stage ran once
    assert results["first"]["value"] == 1 and results["second"]["value"] == 2
    assert "already done, skipped" in capsys.readouterr().out
    commands = (tmp_path / COMMANDS_FILE).read_text().splitlines()
    assert (
        len(commands) == 1
        and "FEDMODAL_DATA_ROOT=/data" in commands[0]
        and "-c" in commands[0]
        and "hello" in commands[0]
    )
    assert (tmp_path / "first" / "log.txt").read_text().strip() == "hello"


def test_a_rerun_with_other_inputs_is_refused_and_nothing_is_reused(tmp_path):
    calls = []

    def stage(folder, rep):
        calls.append(rep.inputs["budget"]["steps"])
        return {}

    quick = {"budget": {"steps": 500}, "data": "phantoms:modalitybank-full"}
    Reproduction(tmp_path, [Stage("gen", stage)], inputs=quick).run()
    Reproduction(tmp_path, [Stage("gen", stage)], inputs=quick).run()  # the same inputs: resumed
    longer = {"budget": {"steps": 2000}, "data": "phantoms:modalitybank-full"}
    with pytest.raises(SystemExit, match=r"budget: \{'steps': 500\} there, \{'steps': 2000\} now.*another --out"):
        Reproduction(tmp_path, [Stage("gen", stage)], inputs=longer).run()
    assert calls == [500]
    Reproduction(tmp_path / "elsewhere", [Stage("gen", stage)], inputs=longer).run()
    assert calls == [500, 2000]


def test_finished_stages_without_a_record_of_their_inputs_are_not_reused(tmp_path):
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / DONE_FILE).write_text("{}")  # made before reproduction.json existed
    with pytest.raises(SystemExit, match="no reproduction.json"):
        Reproduction(tmp_path, [Stage("gen", lambda folder, rep: {})], inputs={"budget": {}}).run()


def test_a_failing_command_names_its_log(tmp_path):
    def fails(folder, rep):
        rep.command(
            [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], cwd=folder, log=folder / "log.txt"
        )
        return {}

    with pytest.raises(RuntimeError, match=r"exit 3\), log .*log.txt:\nboom"):
        Reproduction(tmp_path, [Stage("fails", fails)]).run()


def test_a_relative_results_folder_works_from_the_stage_folders(tmp_path, monkeypatch):
    # Commands run inside their stage's folder; paths under a relative --out must still resolve.
    monkeypatch.chdir(tmp_path)

    def reads_a_file_of_its_own(folder, rep):
        (folder / "input.txt").write_text("found")
        rep.command(
            [sys.executable, "-c", f"print(open({str(folder / 'input.txt')!r}).read())"],
            cwd=folder,
            log=folder / "log.txt",
        )
        return {"peak": "largest_process_mb_so_far"}

    results = Reproduction("results/x", [Stage("reads", reads_a_file_of_its_own)]).run()
    assert (tmp_path / "results/x/reads/log.txt").read_text().strip() == "found"
    assert results["reads"]["largest_process_mb_so_far"] > 0


def test_tables_are_markdown_and_csv(tmp_path):
    write_table(tmp_path / "t.md", ["method", "Dice"], [["FedAvg", 50.1], ["MixMFL", 58.6]])
    assert (tmp_path / "t.md").read_text().splitlines()[2] == "| FedAvg | 50.1 |"
    assert (tmp_path / "t.csv").read_text().splitlines() == ["method,Dice", "FedAvg,50.1", "MixMFL,58.6"]


def test_mixmfl_tables_are_assembled_from_every_stage(tmp_path):
    """The tables stage joins the method stages' per-client metrics in the paper's layout."""
    from fedmodal.atomic import write_json_atomically
    from fedmodal.reproduce.mixmfl import ABLATIONS, CLIENTS, tables_stage

    def metrics(dice: float) -> dict:
        return {**{f"dice_{r}": dice for r in ("WT", "TC", "ET")}, **{f"hd95_{r}": 10.0 for r in ("WT", "TC", "ET")}}

    scores = {"local": 0.3, "fedavg": 0.4, "fedprox": 0.45, **{name: 0.5 for name in ABLATIONS}}
    for name, dice in scores.items():
        per_client = {c: metrics(dice + 0.01 * k) for k, c in enumerate(CLIENTS)}
        write_json_atomically(tmp_path / name / DONE_FILE, per_client)
    rep = Reproduction(tmp_path, [])
    tables_stage(tmp_path / "tables", rep)
    table = (tmp_path / "table1.md").read_text().splitlines()
    assert table[0] == "| Method | Client1 | Client2 | Client3 | Client4 | Client5 | Client6 | Average |"
    assert table[2] == "| Local only | 30.00 | 31.00 | 32.00 | 33.00 | 34.00 | 35.00 | 32.50 |"
    assert table[5].startswith("| MDM-MixMFL | 50.00 |")
    assert "| w/o memory | 52.50 |" in (tmp_path / "ablation.md").read_text()
    assert "| FedProx | 47.50 | 47.50 | 47.50 | 10.00 | 10.00 | 10.00 |" in (tmp_path / "regions.md").read_text()


def test_a_simulator_run_whose_clients_were_mixed_up_is_refused_by_name(tmp_path, monkeypatch):
    """Even at exit 0: a site that never trained makes the stage's results not the federation's."""
    from fedmodal.reproduce import stages

    def command(args, cwd, log):
        ws = tmp_path / "stage" / "ws"
        assert not (ws / "site-2").exists(), "an earlier run's workspace is not reused"
        write_client_log(ws, "site-1", "site-3")

    (tmp_path / "stage" / "ws" / "site-2").mkdir(parents=True)
    rep = Reproduction(tmp_path / "out", [])
    monkeypatch.setattr(rep, "command", command)
    with pytest.raises(RuntimeError, match="started for site-1 ran as site-3"):
        stages.simulate(rep, tmp_path / "stage", "fedavg", {"num_rounds": 1}, 3)


def test_a_simulator_run_that_fails_for_its_own_reasons_says_its_own_error(tmp_path, monkeypatch):
    from fedmodal.reproduce import stages

    def command(args, cwd, log):
        write_client_log(tmp_path / "stage" / "ws", "site-1", "site-1")
        raise RuntimeError("command failed (exit 1)")

    rep = Reproduction(tmp_path / "out", [])
    monkeypatch.setattr(rep, "command", command)
    with pytest.raises(RuntimeError, match="exit 1"):
        stages.simulate(rep, tmp_path / "stage", "fedavg", {"num_rounds": 1}, 3)
    assert (tmp_path / "stage" / "ws" / "local" / "resources.json").is_file()  # the allow-list was in place
