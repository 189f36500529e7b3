"""Resident memory and CPU time of a run's processes, polled from /proc (Linux).

NVFlare starts a process per job and site (and a parent per site in a deployment), so where
a run's memory and CPU go is read from the processes themselves: every process whose command
line names `marker` (the run's workspace) is sampled every `every` seconds and given a role by
`role_of(cmdline)`. A process already running when the watch starts counts only the CPU it
spends from then on; one that starts later counts all of its own. What a process spends after
the last sample before it exits (at most `every` seconds) is not seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# NVFlare 2.9's entry points: which module a process runs says what it is.
SIMULATOR_SITE = "nvflare.private.fed.app.simulator.simulator_worker"
DEPLOYED_ROLES = (
    ("nvflare.private.fed.app.server.runner_process", "server job"),
    ("nvflare.private.fed.app.server.server_train", "server parent"),
    ("nvflare.private.fed.app.client.worker_process", "site jobs"),
    ("nvflare.private.fed.app.client.client_train", "site parents"),
)


def simulator_role(cmdline: str) -> str:
    """The simulator's site workers apart from the rest (its server and launcher)."""
    return "site jobs" if SIMULATOR_SITE in cmdline else "server"


def deployed_role(cmdline: str) -> str | None:
    return next((role for module, role in DEPLOYED_ROLES if module in cmdline), None)


class ProcessWatch:
    """Poll the processes naming `marker` while the `with` block runs."""

    def __init__(self, marker: str, role_of: Callable[[str], str | None], every: float = 0.5):
        self.marker, self.role_of, self.every = marker, role_of, every
        # pid -> [role, CPU seconds at first sight (0 for a process started after the watch), latest, peak KiB]
        self.seen: dict[int, list] = {}
        self._first_poll = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._sample()
        self._first_poll = False
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
                if self.marker not in cmdline:
                    continue
                role = self.role_of(cmdline)
                if role is None:
                    continue
                status = (entry / "status").read_text()
                # /proc/PID/stat: the command may hold spaces, so count fields after its ")".
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
            hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
            pid = int(entry.name)
            if pid not in self.seen:
                self.seen[pid] = [role, cpu if self._first_poll else 0.0, cpu, hwm]
            record = self.seen[pid]
            record[2], record[3] = cpu, max(record[3], hwm)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds spent while watched, summed per role."""
        totals: dict[str, float] = {}
        for role, first, last, _ in self.seen.values():
            totals[role] = totals.get(role, 0.0) + last - first
        return {role: round(seconds, 1) for role, seconds in sorted(totals.items())}

    def peak_gb(self, role: str) -> float:
        """GB of the largest process of `role`."""
        return max((kib for r, _, _, kib in self.seen.values() if r == role), default=0) / 1024**2
