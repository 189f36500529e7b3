"""jobs/site-inventory: every site reports what its data folder would contribute."""

from __future__ import annotations

from dataclasses import dataclass

from nvflare.job_config.api import FedJob

from fedmodal.config import Settings
from fedmodal.fl.site import SiteConfig
from fedmodal.jobs.spec import JobSpec


@dataclass
class InventoryConfig(Settings):
    """Args:
    min_sites: sites that must answer; 0 means every site connected when the job starts.
    task_timeout: seconds the sites get to answer (0: no limit).
    need_seg: whether a case without a segmentation counts as a problem.
    """

    min_sites: int = 0
    task_timeout: int = 600
    need_seg: bool = True


def build(name: str, settings: dict, min_clients: int) -> FedJob:
    from fedmodal.fl.inventory import TASK_NAME, InventoryController, InventoryExecutor

    run = settings["inventory"]
    job = FedJob(name=name, min_clients=min_clients)
    job.to_server(InventoryController(min_sites=run.min_sites, task_timeout=run.task_timeout), id="inventory")
    job.to_clients(InventoryExecutor(site=settings["site"].to_dict(), need_seg=run.need_seg), tasks=[TASK_NAME])
    return job


SITE_INVENTORY = JobSpec(
    name="site-inventory",
    description="every site's data summary (cases, modalities, problems), gathered at the server",
    sections={"inventory": InventoryConfig, "site": SiteConfig},
    build=build,
    min_clients=1,
)
