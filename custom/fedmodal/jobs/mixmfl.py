"""jobs/mixmfl: MDM-MixMFL on the mix-modal federation (each site a different pair of modalities)."""

from __future__ import annotations

from nvflare.job_config.api import FedJob

from fedmodal.fl.keygroup_workflow import TASKS
from fedmodal.fl.site import SiteConfig
from fedmodal.fl.timing import server_params
from fedmodal.jobs.spec import JobSpec, add_payload_audit
from fedmodal.mixmfl.config import MixMFLConfig
from fedmodal.mixmfl.workflow import MixMFLServerConfig


def build(name: str, settings: dict, min_clients: int) -> FedJob:
    from fedmodal.mixmfl.executor import MixMFLExecutor
    from fedmodal.mixmfl.workflow import MixMFLController

    job = FedJob(name=name, min_clients=min_clients)
    job.to_server(server_params(settings["server"].task_poll))
    job.to_server(
        MixMFLController(mixmfl=settings["mixmfl"].to_dict(), server=settings["server"].to_dict()), id="mixmfl"
    )
    job.to_clients(MixMFLExecutor(site=settings["site"].to_dict()), tasks=list(TASKS))
    add_payload_audit(job, TASKS)
    return job


# The paper's setting (METHODS.md section 2): 3D crops of 128^3, batch 4, Adam 4e-4, 200 epochs.
PAPER = {
    "mixmfl": {"spatial_dims": 3, "patch_size": [128, 128, 128], "batch_size": 4, "lr": 4e-4},
    "server": {"num_rounds": 200, "local_epochs": 1},
}

MIXMFL = JobSpec(
    name="mixmfl",
    description="MDM-MixMFL: tailored encoders averaged per modality, shared parts over all, a prototype memory",
    sections={"mixmfl": MixMFLConfig, "server": MixMFLServerConfig, "site": SiteConfig},
    build=build,
    defaults={"site": {"preset": "mixmfl"}},
    profiles={"paper": PAPER},
)
