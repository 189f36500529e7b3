"""The class allow-list that admits fedmodal's job components at a site (no BYOC needed).

NVFlare 2.9 builds a job's components only from classes a site's `local/resources.json` allows,
unless the job ships code. fedmodal jobs ship none: each site allows the `fedmodal.` prefix and
the few NVFlare classes the jobs name beyond NVFlare's default list. This file imports only the
standard library and NVFlare, so `provisioning/customize_site.py` loads it by path wherever
`nvflare provision` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

FEDMODAL_PREFIX = "fedmodal."
# NVFlare classes that fedmodal jobs name but NVFlare's default allow-list lacks.
NVFLARE_EXTRAS = ("nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",)
PREFIXES = (FEDMODAL_PREFIX, *NVFLARE_EXTRAS)


def with_allow_list(resources: dict, prefixes=PREFIXES) -> dict:
    """The resources with `prefixes` appended to `class_allow_list` (NVFlare's default list if absent)."""
    if "class_allow_list" not in resources:
        from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

        resources["class_allow_list"] = list(DEFAULT_CLASS_ALLOW_LIST)
    allow = resources["class_allow_list"]
    for prefix in prefixes:
        if prefix not in allow:
            allow.append(prefix)
    resources["class_list_enforcement_mode"] = "enforce"
    return resources


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON, written to a temporary name and renamed (never a torn file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    tmp.replace(path)


def customize_simulator(workspace: Path, prefixes=PREFIXES) -> Path:
    """`<workspace>/local/resources.json` with the allow-list: `nvflare simulator -w <workspace>`
    copies `<workspace>/local/` into every simulated site and keeps it between runs."""
    path = Path(workspace) / "local" / "resources.json"
    resources = json.loads(path.read_text()) if path.is_file() else {"format_version": 2}
    write_json(path, with_allow_list(resources, prefixes))
    return path
