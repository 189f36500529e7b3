"""ModalityBank's site executor: real images and discriminators stay at the hospital.

NVFlare glue only: it finds the site's data, applies the site's policy file, and hands every
task's payload to a `SiteWorker`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from fedmodal.atomic import write_json_atomically
from fedmodal.fl.direct import serve_direct
from fedmodal.fl.site import peak_gpu_memory, prepare_site
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.config import AdversaryConfig, BankSiteConfig
from fedmodal.modalitybank.site_worker import SiteWorker, build_site_worker

STEP_SECONDS_FILE = "site_step_seconds.json"


class ModalityBankExecutor(Executor):
    """Site side of ModalityBank.

    Args:
        site: `fedmodal.modalitybank.config.BankSiteConfig` fields (data root, split, mask
            sharing, device, ...); the site's `fedmodal_site.json` may tighten its policy.
        adversary: `fedmodal.modalitybank.config.AdversaryConfig` fields (discriminators,
            L1, DP); the site file may raise `dp_clip` and `dp_noise` (the stricter wins).
    """

    def __init__(self, site: dict | None = None, adversary: dict | None = None):
        super().__init__()
        # Kept as given (NVFlare's job export reads constructor arguments back from attributes).
        self.site = dict(site or {})
        self.adversary = dict(adversary or {})
        self.site_config = BankSiteConfig.from_dict(self.site, where="the ModalityBank executor's site settings")
        self.adversary_config = AdversaryConfig.from_dict(self.adversary, where="the ModalityBank executor's adversary")
        self.worker: SiteWorker | None = None
        self.run_id: str | None = None
        self._direct_registered = False
        self.step_seconds: list[float] = []  # this site's own work per step (kept here, for benchmarks)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        # Steps may also come as direct messages (the controller's step_transport "direct").
        if event_type == EventType.START_RUN and not self._direct_registered:
            serve_direct(P.TASK_STEP, self.execute, fl_ctx)
            self._direct_registered = True

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            payload = from_shareable(shareable).data
            if task_name == P.TASK_REGISTER:
                config = payload[P.CONFIG]
                if self.worker is not None and self.run_id == config[P.RUN_ID]:
                    # Asked again after the server dropped this site (it was slow or cut off):
                    # the same worker, discriminators and all, rejoins.
                    self.log_info(fl_ctx, f"site {site}: registering again for run {self.run_id}")
                else:
                    self.worker = self._build_worker(config, fl_ctx)
                    self.run_id = config[P.RUN_ID]
                    self.step_seconds = []
                    if config.get(P.RESUME_STEP) is not None:
                        self.log_info(fl_ctx, self.worker.load_state(int(config[P.RESUME_STEP])))
                reply = self.worker.registration()
            elif self.worker is None:
                raise RuntimeError(f"site {site}: {task_name} before registration (was the site process restarted?)")
            elif task_name == P.TASK_STEP:
                started = time.perf_counter()
                reply = self.worker.step(payload)
                self.step_seconds.append(time.perf_counter() - started)
            elif task_name == P.TASK_PREVIEW:
                path = self.worker.preview(payload)
                self.worker.save()
                self._write_step_seconds()
                self.log_info(fl_ctx, f"site {site}: real vs synthetic grid written to {path}")
                reply = {}
            else:
                return make_reply(ReturnCode.TASK_UNKNOWN)
            return DXO(DataKind.COLLECTION, reply).to_shareable()
        except Exception as e:  # the server stops the run naming this site; the trace is in this log
            self.log_exception(fl_ctx, f"site {site}: {task_name} failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _write_step_seconds(self) -> None:
        """The site's compute per step, beside its grids: with the server's wait per step it
        tells the transport from the site's work. Stays at the site."""
        seconds = self.step_seconds
        record = {
            "steps": len(seconds),
            "median_s": float(np.median(seconds)) if seconds else None,
            "seconds": seconds,
            "peak_gpu_memory_bytes": peak_gpu_memory(self.worker.adversary.device),
        }
        write_json_atomically(self.worker.out_dir / STEP_SECONDS_FILE, record)

    def _state_root(self, fl_ctx: FLContext) -> Path:
        if self.site_config.state_dir:
            return Path(self.site_config.state_dir).expanduser()
        return Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / "modalitybank_state"

    def _build_worker(self, config: dict, fl_ctx: FLContext) -> SiteWorker:
        name = fl_ctx.get_identity_name()
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        site = prepare_site(name, self.site_config, run_seed=int(config["seed"]))
        for problem in site.manifest.problems:
            self.log_warning(fl_ctx, f"skipped: {problem}")
        worker = build_site_worker(
            site,
            self.site_config,
            self.adversary_config,
            config,
            out_dir=run_dir / "modalitybank",
            state_dir=self._state_root(fl_ctx) / name / str(config[P.RUN_ID]),
            visit_ledger=self._state_root(fl_ctx) / name / "visits.json",  # lasts across runs and jobs
        )
        adversary = worker.adversary.config
        self.log_info(
            fl_ctx,
            f"site {name}: {len(worker.keys)} slices from {site.root}, modalities {list(worker.modalities)}, "
            f"{'shares' if worker.shares_masks else 'keeps'} masks, DP clip {adversary.dp_clip} noise {adversary.dp_noise}",
        )
        return worker
