"""Site inventory: every site reports what its data folder holds; the server writes `inventory.json`.

The smallest real fedmodal job (`jobs/site-inventory`), and the first one a new federation runs:
it proves each hospital's kit, package install and data root work before any training. Only the
manifest summary leaves a site (counts, modalities, release, split sizes, problems); no voxels,
and not the site's local path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nvflare.apis.controller_spec import Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from fedmodal.atomic import write_json_atomically
from fedmodal.fl.simulator import guard_simulator_client_names
from fedmodal.fl.site import SiteConfig, data_root_is_set, prepare_site

TASK_NAME = "inventory"
INVENTORY_FILE = "inventory.json"
SITE_ONLY_KEYS = ("root",)  # summary items that stay at the site


def relative_to_root(value, root: Path):
    """`value` with every mention of the site's folder made relative to it (strings, lists, dicts)."""
    if isinstance(value, str):
        return value.replace(f"{root}/", "").replace(str(root), ".")
    if isinstance(value, list):
        return [relative_to_root(v, root) for v in value]
    if isinstance(value, dict):
        return {k: relative_to_root(v, root) for k, v in value.items()}
    return value


class InventoryExecutor(Executor):
    """Builds the site's data manifest and returns its summary.

    Args:
        site: `fedmodal.fl.site.SiteConfig` fields (data root, phantom preset, ...).
        need_seg: whether a case without a segmentation counts as a problem.
    """

    def __init__(self, site: dict | None = None, need_seg: bool = True):
        super().__init__()
        self.site = dict(site or {})
        self.site_config = SiteConfig.from_dict(self.site, where="the inventory executor's site settings")
        self.need_seg = need_seg

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != TASK_NAME:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        name = fl_ctx.get_identity_name()
        start = time.time()
        site = prepare_site(name, self.site_config, run_seed=0, need_seg=self.need_seg)
        self.log_info(fl_ctx, f"built the data manifest of {site.root}")
        summary = {k: v for k, v in site.manifest.summary().items() if k not in SITE_ONLY_KEYS}
        summary = relative_to_root(summary, Path(site.manifest.root))
        summary["data_source"] = "site data root" if data_root_is_set(self.site_config.data_root) else "phantoms"
        summary["seconds"] = round(time.time() - start, 3)
        self.log_info(
            fl_ctx, "summary: " + json.dumps({k: summary[k] for k in ("n_cases", "modalities", "n_problems")})
        )
        return DXO(data_kind=DataKind.APP_DEFINED, data={"summary": summary}).to_shareable()


class InventoryController(Controller):
    """Asks every site for its summary and writes them, sorted by site, to `<run dir>/inventory.json`.

    Args:
        min_sites: sites that must answer; 0 means every site connected when the job starts.
        task_timeout: seconds the sites get to answer (0: no limit).
    """

    def __init__(self, min_sites: int = 0, task_timeout: int = 600):
        super().__init__()
        guard_simulator_client_names()  # before the simulator starts its clients
        self.min_sites = min_sites
        self.task_timeout = task_timeout

    def start_controller(self, fl_ctx: FLContext):
        pass

    def stop_controller(self, fl_ctx: FLContext):
        pass

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        engine = fl_ctx.get_engine()
        sites = sorted(c.name for c in engine.get_clients())
        min_sites = self.min_sites or len(sites)
        request = DXO(data_kind=DataKind.APP_DEFINED, data={"request": "manifest summary"}).to_shareable()
        task = Task(name=TASK_NAME, data=request, timeout=self.task_timeout)
        self.log_info(fl_ctx, f"asking {sites} for their data inventory")
        self.broadcast_and_wait(task, fl_ctx, min_responses=min_sites, abort_signal=abort_signal)
        if abort_signal.triggered:
            return

        summaries, failures = {}, {}
        for client_task in task.client_tasks:
            name = client_task.client.name
            result = client_task.result
            rc = result.get_return_code() if result is not None else "no reply"
            if rc != ReturnCode.OK:
                failures[name] = str(rc)
                continue
            summaries[name] = from_shareable(result).data["summary"]
        inventory = {
            "job_id": fl_ctx.get_job_id(),
            "sites": [summaries[name] for name in sorted(summaries)],
            "failed_sites": dict(sorted(failures.items())),
        }
        run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
        path = os.path.join(run_dir, INVENTORY_FILE)
        write_json_atomically(path, inventory)
        self.log_info(
            fl_ctx, f"wrote {path}: {len(summaries)} site(s), {sum(s['n_cases'] for s in summaries.values())} cases"
        )
        if len(summaries) < min_sites:
            self.system_panic(f"only {sorted(summaries)} answered; failed: {failures}", fl_ctx)

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx):
        self.log_warning(fl_ctx, f"ignoring a late result of {task_name} from {client.name}")
