"""What fedmodal knows about `nvflare simulator` runs beyond NVFlare's own checks.

NVFlare 2.9's simulator starts one process per client thread. `SimulatorRunner.do_one_task`
writes the client's name into a `build_ctx` dict that every client thread shares, then sends
that dict to the new process; when two threads start at the same moment a process can receive
the other thread's name. One client then runs twice, under the other's identity, and the one
it should have been never trains: jobs fail with sites dropping or never registering. The run
is not at fault, so the cure is to run it again; `misassigned_clients` recognises the case from
the client folders' logs (each folder is named after the client it was started for).
"""

from __future__ import annotations

import re
from pathlib import Path

_IDENTITY = re.compile(r"\[identity=([^,\]\s]+)")


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
