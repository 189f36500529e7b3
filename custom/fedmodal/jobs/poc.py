"""NVFlare's `PocEnv`, with fedmodal's class allow-list written into the fresh POC kits.

`PocEnv.deploy` provisions a new local POC and starts it at once; a kit started without the
allow-list refuses fedmodal's classes. This environment writes the allow-list (as
`provisioning/customize_site.py` does for real kits) between the two.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.recipe.poc_env import PocEnv

from fedmodal.fl.allow_list import with_allow_list, write_json


def customize_poc_kits(poc_workspace: str | Path) -> list[Path]:
    """Every server and client kit under `poc_workspace` gets the allow-list in local/resources.json."""
    written = []
    for marker in sorted(Path(poc_workspace).rglob("startup/fed_*.json")):
        if marker.name not in ("fed_server.json", "fed_client.json"):
            continue
        local = marker.parent.parent / "local"
        default = local / "resources.json.default"
        resources = json.loads(default.read_text()) if default.is_file() else {"format_version": 2}
        write_json(local / "resources.json", with_allow_list(resources))
        written.append(local / "resources.json")
    return written


class FedmodalPocEnv(PocEnv):
    """`PocEnv` whose kits admit fedmodal's classes (see the module docstring)."""

    def deploy(self, job) -> str:
        import nvflare.recipe.poc_env as poc_env

        start = poc_env._start_poc

        def start_customized(poc_workspace, *args, **kwargs):
            customize_poc_kits(poc_workspace)
            return start(poc_workspace, *args, **kwargs)

        poc_env._start_poc = start_customized
        try:
            return super().deploy(job)
        finally:
            poc_env._start_poc = start
