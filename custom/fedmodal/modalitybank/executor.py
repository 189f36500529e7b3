"""ModalityBank's site executor: real images and discriminators stay at the hospital.

NVFlare glue only: it finds the site's data, applies the site's policy file, and hands every
task's payload to a `SiteWorker`.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FilterKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from fedmodal.data.manifest import read_site_file
from fedmodal.fl.direct import TASK_DATA, TASK_RESULT, filter_like_task
from fedmodal.fl.site import resolve_site_root, select_device, site_seed
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.site_trainer import AdversaryConfig
from fedmodal.modalitybank.site_worker import SiteWorker

class ModalityBankExecutor(Executor):
    """Site side of ModalityBank.

    Args:
        data_root: the site's BraTS folder, usually `{$FEDMODAL_DATA_ROOT}` (see
            fedmodal.fl.site.resolve_site_root); unset means the phantom federation.
        split: the manifest split to train on ("train", "val", "test" or "all").
        share_masks: send the label maps once at registration (the paper's protocol). A
            `fedmodal_site.json` in the data root may say "share_masks": false, which wins.
        ndf, n_layers: discriminator width and depth.
        lambda_l1: weight of the L1 term.
        l1_in_brain: restrict L1 to the brain.
        dp_clip, dp_noise: per-sample gradient clipping bound and noise multiplier; the site's
            `fedmodal_site.json` may raise either (the stricter value wins).
        on_error: "skip" bad cases (reported) or "stop" at the first.
        seed: run seed (the site's seed is derived from it and the site's name).
        device: "auto", "cpu" or "cuda[:i]".
        num_threads: torch CPU threads at this site (0 keeps torch's default).
        state_dir: where the site keeps its discriminators at each server checkpoint (per site
            and run), so that a run resumed with the controller's `resume_from` continues with
            them. Empty means `modalitybank_state/` in the site's NVFlare workspace, which lasts
            across jobs in a deployment; the simulator wipes its workspace on every run, so
            point this elsewhere there.
    """

    def __init__(
        self,
        data_root: str | None = None,
        split: str = "train",
        share_masks: bool = True,
        ndf: int = 64,
        n_layers: int = 3,
        lambda_l1: float = 100.0,
        l1_in_brain: bool = False,
        dp_clip: float = 0.0,
        dp_noise: float = 0.0,
        on_error: str = "skip",
        seed: int = 0,
        device: str = "auto",
        num_threads: int = 0,
        state_dir: str = "",
    ):
        super().__init__()
        self.data_root = data_root
        self.split = split
        self.share_masks = share_masks
        self.adversary_args = dict(ndf=ndf, n_layers=n_layers, lambda_l1=lambda_l1, l1_in_brain=l1_in_brain)
        self.dp_clip, self.dp_noise = dp_clip, dp_noise
        self.on_error = on_error
        self.seed = seed
        self.device_name = device
        self.num_threads = num_threads
        self.state_dir = state_dir
        self.worker: SiteWorker | None = None
        self._direct_registered = False

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        # Steps may also come as direct messages (the controller's step_transport "direct").
        if event_type == EventType.START_RUN and not self._direct_registered:
            fl_ctx.get_engine().register_aux_message_handler(P.TASK_STEP, self._direct_step)
            self._direct_registered = True

    def _direct_step(self, topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        """A step sent as a direct message: the same filters as the task, the same work."""
        self.log_debug(fl_ctx, f"direct {P.TASK_STEP} received")
        try:
            request = filter_like_task(TASK_DATA, FilterKey.IN, P.TASK_STEP, request, fl_ctx)
        except Exception as e:
            self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()}: a filter refused {P.TASK_STEP}: {e}")
            return make_reply(ReturnCode.TASK_DATA_FILTER_ERROR)
        reply = self.execute(P.TASK_STEP, request, fl_ctx, Signal())
        try:
            return filter_like_task(TASK_RESULT, FilterKey.OUT, P.TASK_STEP, reply, fl_ctx)
        except Exception as e:
            self.log_exception(fl_ctx, f"site {fl_ctx.get_identity_name()}: a filter refused the {P.TASK_STEP} result: {e}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            payload = from_shareable(shareable).data
            if task_name == P.TASK_REGISTER:
                config = payload[P.CONFIG]
                self.worker = self._build_worker(config, fl_ctx)
                if config.get(P.RESUME_STEP) is not None:
                    self.log_info(fl_ctx, self.worker.load_state(int(config[P.RESUME_STEP])))
                reply = self.worker.registration()
            elif self.worker is None:
                raise RuntimeError(f"site {site}: {task_name} before registration (was the site process restarted?)")
            elif task_name == P.TASK_STEP:
                reply = self.worker.step(payload)
            elif task_name == P.TASK_PREVIEW:
                path = self.worker.preview(payload)
                self.worker.save()
                self.log_info(fl_ctx, f"site {site}: real vs synthetic grid written to {path}")
                reply = {}
            else:
                return make_reply(ReturnCode.TASK_UNKNOWN)
            return DXO(DataKind.COLLECTION, reply).to_shareable()
        except Exception as e:  # the server stops the run naming this site; the trace is in this log
            self.log_exception(fl_ctx, f"site {site}: {task_name} failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _state_root(self, fl_ctx: FLContext) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        return Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / "modalitybank_state"

    def _build_worker(self, config: dict, fl_ctx: FLContext) -> SiteWorker:
        from fedmodal.data.datasets import SynthesisSlices
        from fedmodal.data.manifest import build_manifest

        site = fl_ctx.get_identity_name()
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        device = select_device(self.device_name, self.num_threads)
        root = resolve_site_root(self.data_root, site)
        policy = read_site_file(root)
        manifest = build_manifest(root, site=site, on_error=self.on_error, need_seg=True)
        for problem in manifest.problems:
            self.log_warning(fl_ctx, f"skipped: {problem}")
        cases = manifest.cases if self.split == "all" else manifest.cases_in(self.split)
        if not cases:
            raise ValueError(f"site {site}: no usable case in split {self.split!r} of {root}")
        dataset = SynthesisSlices(cases, size=int(config["image_size"]), slices=config["slices"], et_label=manifest.et_label)
        seed = site_seed(int(config["seed"]), site)
        adversary_config = AdversaryConfig(
            **self.adversary_args,
            dp_clip=max(self.dp_clip, float(policy.get("dp_clip", 0.0))),
            dp_noise=max(self.dp_noise, float(policy.get("dp_noise", 0.0))),
            seed=seed,
        )
        shares_masks = bool(self.share_masks and policy.get("share_masks", True))
        worker = SiteWorker(
            site,
            dataset,
            manifest.modalities,
            adversary_config,
            batch_size=int(config["batch_size"]),
            shares_masks=shares_masks,
            seed=seed,
            out_dir=run_dir / "modalitybank",
            device=device,
            state_dir=self._state_root(fl_ctx) / site / str(config[P.RUN_ID]),
        )
        self.log_info(
            fl_ctx,
            f"site {site}: {len(cases)} cases, {len(worker.keys)} slices from {root}, modalities "
            f"{list(worker.modalities)}, {'shares' if shares_masks else 'keeps'} masks, "
            f"DP clip {adversary_config.dp_clip} noise {adversary_config.dp_noise}",
        )
        return worker
