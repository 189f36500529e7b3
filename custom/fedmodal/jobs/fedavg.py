"""jobs/fedavg: segmentation with NVFlare's FedAvg (FedProx with fedprox_mu > 0) and cross-site evaluation."""

from __future__ import annotations

from nvflare.job_config.api import FedJob

from fedmodal.baselines.config import FederatedSegConfig, SegConfig
from fedmodal.fl.site import SiteConfig
from fedmodal.fl.timing import server_params
from fedmodal.jobs.spec import JobSpec, add_payload_audit

TASKS = ["train", "validate", "submit_model"]
ANALYTICS_EVENT = "analytix_log_stats"  # NVFlare's event for streamed metrics (TBWriter)


def build(name: str, settings: dict, min_clients: int) -> FedJob:
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
    from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
    from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.app_opt.tracking.tb.tb_writer import TBWriter

    from fedmodal.baselines.cse import CrossSiteTable
    from fedmodal.baselines.executor import SegExecutor
    from fedmodal.fl.fedavg import TolerantFedAvg
    from fedmodal.nets.segmentation import NamedSegmentationNet

    run, seg = settings["fedavg"], settings["seg"]
    if not seg.net:
        raise ValueError("the fedavg job names its network by preset: set seg.net (e.g. unet2d-wt)")
    job = FedJob(name=name, min_clients=min_clients)
    # The server builds the network from the same preset name the sites use; a resumed run
    # starts from the earlier run's persisted global model instead of fresh weights.
    persistor = PTFileModelPersistor(
        model=NamedSegmentationNet(seg.net), source_ckpt_file_full_name=run.resume_from or None
    )
    job.to_server(server_params(run.task_poll))
    job.to_server(persistor, id="persistor")
    job.to_server(IntimeModelSelector(key_metric=run.key_metric), id="model_selector")
    job.to_server(PTFileModelLocator(pt_persistor_id="persistor"), id="model_locator")
    job.to_server(CrossSiteTable(), id="cross_site_table")
    job.to_server(TBAnalyticsReceiver(events=[f"fed.{ANALYTICS_EVENT}"]), id="tb_receiver")  # as FEDAVG's metrics_event
    fedavg = TolerantFedAvg(
        num_clients=0,
        num_rounds=run.num_rounds - run.start_round,  # NVFlare counts the rounds still to run
        start_round=run.start_round,
        persistor_id="persistor",
        fedprox_mu=run.fedprox_mu,
        min_responses=run.min_responses,
        wait_after_min=run.wait_after_min,
        round_timeout=run.round_timeout,
        task_check_period=run.task_poll,
    )
    job.to_server(fedavg, id="fedavg")
    cse = CrossSiteModelEval(
        model_locator_id="model_locator",
        submit_model_timeout=run.submit_model_timeout,
        validation_timeout=run.validation_timeout,
    )
    job.to_server(cse, id="cross_site_eval")

    executor = SegExecutor(
        site=settings["site"].to_dict(), seg=seg.training_dict(), local_epochs=run.local_epochs, seed=run.seed
    )
    job.to_clients(executor, tasks=TASKS)
    job.to_clients(TBWriter(), id="analytic_sender")
    job.to_clients(ConvertToFedEvent(events_to_convert=[ANALYTICS_EVENT], fed_event_prefix="fed."), id="event_to_fed")
    add_payload_audit(job, TASKS)
    return job


FEDAVG = JobSpec(
    name="fedavg",
    description="segmentation baselines: FedAvg (FedProx with fedprox_mu > 0) and cross-site evaluation",
    sections={"fedavg": FederatedSegConfig, "seg": SegConfig, "site": SiteConfig},
    build=build,
    defaults={"seg": {"net": "unet2d-wt"}},
    metrics_event=f"fed.{ANALYTICS_EVENT}",
)
