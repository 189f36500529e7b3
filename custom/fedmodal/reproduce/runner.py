"""Resumable multi-stage runs that produce a paper's table: each stage once, its commands kept.

A reproduction is a list of stages (a simulator job, a local training, a scoring step). Each
writes into its own folder and ends by writing `done.json`; a rerun skips every stage whose
`done.json` exists, so an interrupted reproduction continues where it stopped. Every stage
prints a progress line with an ETA, and every command a stage runs is appended to
`commands.txt`, so each number in the table can be traced to the command that made it.
What a reproduction was asked for (its budget, its data) is kept in `reproduction.json`: a rerun
that asks for something else is refused rather than mixing its stages with the old ones.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmodal.atomic import write_json_atomically, write_text_atomically

DONE_FILE = "done.json"
COMMANDS_FILE = "commands.txt"
INPUTS_FILE = "reproduction.json"


@dataclass
class Stage:
    """One step of a reproduction.

    Args:
        name: its folder's name under the output folder.
        run: (stage folder, reproduction) -> summary dict (JSON-able), written to done.json.
        estimate_s: expected seconds, for the ETA until stages have been timed.
    """

    name: str
    run: Callable[[Path, Reproduction], dict[str, Any]]
    estimate_s: float = 60.0


class Reproduction:
    """Runs stages in order into `out`, skipping finished ones.

    Args:
        out: the results folder.
        stages: the stages, in order.
        env: extra environment for the commands (e.g. FEDMODAL_DATA_ROOT).
        inputs: what the stages' results depend on (the budget, the data); JSON-able.
    """

    def __init__(
        self,
        out: str | Path,
        stages: Sequence[Stage],
        env: dict[str, str] | None = None,
        inputs: dict[str, Any] | None = None,
    ):
        self.out = Path(out).resolve()  # stage commands run in their own folders: relative paths would break
        self.stages = list(stages)
        self.env = dict(env or {})
        self.inputs = json.loads(json.dumps(inputs or {}))  # as it reads back from reproduction.json
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")

    def check_inputs(self) -> None:
        """Record this reproduction's inputs, or refuse if the folder holds stages made from others."""
        recorded_file = self.out / INPUTS_FILE
        if recorded_file.is_file():
            recorded = json.loads(recorded_file.read_text())
            if recorded != self.inputs:
                changed = sorted(k for k in {*recorded, *self.inputs} if recorded.get(k) != self.inputs.get(k))
                detail = "; ".join(f"{k}: {recorded.get(k)} there, {self.inputs.get(k)} now" for k in changed)
                raise SystemExit(
                    f"{self.out} holds a reproduction made with other inputs ({detail}). Its finished stages "
                    "would be reused as they are: give another --out, or delete the folder to start again."
                )
        elif any((self.out / s.name / DONE_FILE).is_file() for s in self.stages):
            raise SystemExit(
                f"{self.out} holds finished stages but no {INPUTS_FILE} saying what they were made with: "
                "give another --out, or delete the folder to start again."
            )
        write_json_atomically(recorded_file, self.inputs)

    def run(self) -> dict[str, dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_inputs()
        results: dict[str, dict[str, Any]] = {}
        started = time.time()
        for i, stage in enumerate(self.stages):
            folder = self.out / stage.name
            done = folder / DONE_FILE
            if done.is_file():
                results[stage.name] = json.loads(done.read_text())
                self._progress(i, stage, "already done, skipped", started)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            self._progress(i, stage, "running", started)
            t0 = time.time()
            summary = stage.run(folder, self)
            # ru_maxrss of the reaped children (KiB on Linux): the largest process so far in this run,
            # which for the first stage is the stage's own peak.
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            summary = {**summary, "seconds": round(time.time() - t0, 1), "largest_process_mb_so_far": round(peak_mb)}
            write_json_atomically(done, summary)
            results[stage.name] = summary
            self._progress(i, stage, f"done in {summary['seconds']:.0f} s", started)
        return results

    def _progress(self, index: int, stage: Stage, state: str, started: float) -> None:
        remaining = sum(s.estimate_s for s in self.stages[index + 1 :] if not (self.out / s.name / DONE_FILE).is_file())
        elapsed = time.time() - started
        print(
            f"[{index + 1}/{len(self.stages)}] {stage.name}: {state} (elapsed {elapsed:.0f} s, ETA {remaining:.0f} s)",
            flush=True,
        )

    def command(self, args: Sequence[str], cwd: Path, log: Path, timeout: float | None = None) -> None:
        """Run one command (recorded in commands.txt), its output to `log`; a failure names the log."""
        env = {**os.environ, **self.env}
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        line = f"(cd {shlex.quote(str(cwd))} && {line} {shlex.join([str(a) for a in args])})"
        with open(self.out / COMMANDS_FILE, "a") as f:
            f.write(line + "\n")
        with open(log, "w") as out:
            done = subprocess.run(
                [str(a) for a in args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"command failed (exit {done.returncode}), log {log}:\n{tail}")


def data_input(data_root: str | Path | None, preset: str) -> str:
    """How a reproduction's inputs name its data: the folder given, or the phantom preset (whose
    cache folder differs from machine to machine, while its content does not)."""
    return str(Path(data_root).resolve()) if data_root else f"phantoms:{preset}"


def executable(name: str) -> str:
    """A console script of this environment (nvflare, fedmodal)."""
    return str(Path(sys.executable).with_name(name))


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table and its CSV twin (same name, .csv)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    write_text_atomically(path, "\n".join(lines) + "\n")
    csv = [",".join(header)] + [",".join(str(c) for c in row) for row in rows]
    write_text_atomically(path.with_suffix(".csv"), "\n".join(csv) + "\n")
