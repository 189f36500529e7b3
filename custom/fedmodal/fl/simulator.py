"""fedmodal's guard against a race in NVFlare 2.9's simulator, and the check that finds its trace.

NVFlare 2.9's simulator runs one thread per client; each starts its client's process, then
`SimulatorClientRunner.do_one_task` writes the client's name into a `build_ctx` dict that all
threads share and sends that dict to the new process. When two threads do so at the same moment
(they poll their new processes on the same one-second tick), a process can receive the other
thread's name: one client then runs twice and the one it should have been never trains, so a
job stalls or finishes without a site. Seen in CI and in a Table III run; it is what users get
from a plain `nvflare simulator jobs/...` too.

`guard_simulator_client_names` mends it where it happens: every fedmodal server workflow calls it
when it is built, which in the simulator is before any client thread starts. It gives each
client runner a `build_ctx` whose client name belongs to the thread that set it, so what a
thread sends names its own client. Outside the simulator (POC, production) it does nothing.
`misassigned_clients` reads a finished workspace for the trace of the race.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
from pathlib import Path

_SIMULATOR_RUNNER = "nvflare.private.fed.app.simulator.simulator_runner"
_CLIENT_NAME = "client_name"  # the build_ctx key do_one_task sets before sending it
_IDENTITY = re.compile(r"\[identity=([^,\]\s]+)")


class ThreadOwnClientName(dict):
    """NVFlare's shared `build_ctx`, with a client name per thread: the name a thread set is the
    one it reads and the one it pickles (as a plain dict, so the client process needs nothing)."""

    def __init__(self, shared: dict):
        super().__init__(shared)
        self._names = threading.local()

    def __setitem__(self, key, value):
        if key == _CLIENT_NAME:
            self._names.value = value
        else:
            super().__setitem__(key, value)

    def __getitem__(self, key):
        if key == _CLIENT_NAME and hasattr(self._names, "value"):
            return self._names.value
        return super().__getitem__(key)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def own(self) -> dict:
        """The plain dict this thread sends."""
        return {key: self[key] for key in self}

    def __reduce__(self):  # pickle and deepcopy both: a plain dict of this thread's values
        return dict, (self.own(),)


def guard_simulator_client_names() -> bool:
    """Give every simulator client runner made from now on a per-thread client name (idempotent).

    Returns whether NVFlare's simulator is loaded in this process (so the guard is in place).
    """
    runner_module = sys.modules.get(_SIMULATOR_RUNNER)
    if runner_module is None:  # a POC or production server: no simulator to mend
        return False
    runner = runner_module.SimulatorClientRunner
    if getattr(runner, "_fedmodal_client_names_guarded", False):
        return True
    unguarded_init = runner.__init__

    @functools.wraps(unguarded_init)
    def __init__(self, *args, **kwargs):
        unguarded_init(self, *args, **kwargs)
        if isinstance(self.build_ctx, dict) and not isinstance(self.build_ctx, ThreadOwnClientName):
            self.build_ctx = ThreadOwnClientName(self.build_ctx)

    runner.__init__ = __init__
    runner._fedmodal_client_names_guarded = True
    return True


def misassigned_clients(workspace: Path) -> dict[str, list[str]]:
    """{client folder: the other identities its process ran as} in a simulator workspace."""
    found = {}
    for log in sorted(Path(workspace).glob("*/log.txt")):
        client = log.parent.name
        if client in ("server", "startup", "local"):
            continue
        identities = set(_IDENTITY.findall(log.read_text(errors="replace")))
        others = sorted(identities - {client})
        if others:
            found[client] = others
    return found


def describe(misassigned: dict[str, list[str]]) -> str:
    return "; ".join(f"the process started for {c} ran as {', '.join(o)}" for c, o in misassigned.items())


def check_client_identities(workspace: Path) -> None:
    """Raise if any client of the simulator run in `workspace` ran under another client's name:
    such a run's results are not the federation's, whatever its exit code."""
    misassigned = misassigned_clients(workspace)
    if misassigned:
        raise RuntimeError(
            f"NVFlare's simulator mixed up its clients in {workspace}: {describe(misassigned)}. "
            "The run is not valid; run it again."
        )
