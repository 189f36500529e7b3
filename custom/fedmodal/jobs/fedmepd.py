"""jobs/fedmepd: FedMEPD on the full-modal server + 8 clients federation (FedMEMA with personalise=false)."""

from __future__ import annotations

from nvflare.job_config.api import FedJob

from fedmodal.fedmepd.config import FedMEPDConfig
from fedmodal.fedmepd.workflow import FedMEPDServerConfig
from fedmodal.fl.keygroup_workflow import TASKS
from fedmodal.fl.site import SiteConfig
from fedmodal.fl.timing import server_params
from fedmodal.jobs.spec import JobSpec, add_payload_audit


def build(name: str, settings: dict, min_clients: int) -> FedJob:
    from fedmodal.fedmepd.executor import FedMEPDExecutor
    from fedmodal.fedmepd.workflow import FedMEPDController

    job = FedJob(name=name, min_clients=min_clients)
    job.to_server(server_params(settings["server"].task_poll))
    controller = FedMEPDController(fedmepd=settings["fedmepd"].to_dict(), server=settings["server"].to_dict())
    job.to_server(controller, id="fedmepd")
    job.to_clients(FedMEPDExecutor(site=settings["site"].to_dict()), tasks=list(TASKS))
    add_payload_audit(job, TASKS)
    return job


# The authors' public code (METHODS.md section 3): encoders of 16/32/64/128 channels, random
# 80^3 crops, batch 1, 30 warm-up rounds and filter counters of 10 (the dataclass defaults,
# which this CPU job's own defaults shorten).
PAPER = {
    "fedmepd": {
        "channels": [16, 32, 64, 128],
        "patch_size": [80, 80, 80],
        "batch_size": 1,
        "warmup_rounds": FedMEPDConfig.warmup_rounds,
        "counter_start": FedMEPDConfig.counter_start,
    }
}

FEDMEPD = JobSpec(
    name="fedmepd",
    description="FedMEPD: per-modality encoders, a full-modal server epoch and anchors, partially personalised decoders",
    sections={"fedmepd": FedMEPDConfig, "server": FedMEPDServerConfig, "site": SiteConfig},
    build=build,
    # A 20-round CPU job: the paper's 30 warm-up rounds and counters of 10 would personalise nothing.
    defaults={"fedmepd": {"warmup_rounds": 3, "counter_start": 3}, "site": {"preset": "fedmepd"}},
    profiles={"paper": PAPER},
)
