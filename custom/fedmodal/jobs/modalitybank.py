"""jobs/modalitybank and jobs/modalitybank-asyndgan: the protocol of METHODS.md section 1."""

from __future__ import annotations

from nvflare.job_config.api import FedJob

from fedmodal.fl.timing import server_params
from fedmodal.jobs.spec import JobSpec, add_payload_audit
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.config import AdversaryConfig, BankSiteConfig, ControllerConfig, GeneratorConfig

TASKS = [P.TASK_REGISTER, P.TASK_STEP, P.TASK_PREVIEW]
# NVFlare 2.9 otherwise ships every numpy array by a second download round trip, which costs
# more than it saves for a step's ~200 KB.
INLINE_NUMPY = {"np_download_chunk_size": 0}


def build(name: str, settings: dict, min_clients: int) -> FedJob:
    from fedmodal.modalitybank.controller import ModalityBankController
    from fedmodal.modalitybank.executor import ModalityBankExecutor

    workflow_id = "asyndgan" if settings["generator"].mode == "asyndgan" else "modalitybank"
    job = FedJob(name=name, min_clients=min_clients)
    job.to_server({**INLINE_NUMPY, **server_params(settings["server"].task_poll)})
    controller = ModalityBankController(generator=settings["generator"].to_dict(), server=settings["server"].to_dict())
    job.to_server(controller, id=workflow_id)
    job.to_clients(INLINE_NUMPY)
    executor = ModalityBankExecutor(site=settings["site"].to_dict(), adversary=settings["adversary"].to_dict())
    job.to_clients(executor, tasks=TASKS)
    # The payload audit sees everything that enters or leaves a site (a deployed site also
    # audits through its privacy scope; the filter records each payload once).
    add_payload_audit(job, TASKS)
    return job


# The paper's networks at its slice size (METHODS.md section 1): ResNet G with ngf 64, 9 blocks
# and pix2pix's transposed-convolution upsampling on 256x256 slices, a 70x70 PatchGAN D of 64
# base channels. For GPU sites.
PAPER = {
    "generator": {"image_size": 256, "ngf": 64, "n_blocks": 9, "upsample": "transpose"},
    "adversary": {"ndf": 64, "n_layers": 3},
}

SECTIONS = {
    "generator": GeneratorConfig,
    "server": ControllerConfig,
    "site": BankSiteConfig,
    "adversary": AdversaryConfig,
}

MODALITYBANK = JobSpec(
    name="modalitybank",
    description="ModalityBank: a central generator and per-modality bank against the sites' discriminators",
    sections=SECTIONS,
    build=build,
    profiles={"paper": PAPER},
)
MODALITYBANK_ASYNDGAN = JobSpec(
    name="modalitybank-asyndgan",
    description="AsynDGAN baseline: the same protocol, one output channel per modality, no bank",
    sections=SECTIONS,
    build=build,
    defaults={"generator": {"mode": "asyndgan"}},
    profiles={"paper": PAPER},
)
