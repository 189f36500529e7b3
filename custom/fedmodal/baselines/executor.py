"""The FedAvg / FedProx site: NVFlare tasks in, `SegTrainer` work, weights and metrics out.

Runs under NVFlare's own `FedAvg` workflow (task "train") and `CrossSiteModelEval` (tasks
"submit_model" and "validate"). Per training round, reading top to bottom:
receive the global model -> validate it on the site's val split (the server's model
selection uses this) -> train local epochs (FedProx term when the server sends `fedprox_mu`)
-> validate the local model (best and last local models kept) -> send weights as numpy
arrays (no tensor decomposer needed on either side) with the step count as FedAvg weight.

Only weights and scalar metrics leave the site; images and labels never do.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from nvflare.apis.dxo import MetaKey
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants, ValidateType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedmodal.baselines.config import SegConfig
from fedmodal.fl.site import SiteConfig, prepare_site


class SegExecutor(Executor):
    """A site of the segmentation FedAvg / FedProx job.

    Args:
        site: `fedmodal.fl.site.SiteConfig` fields (data root, phantom preset, device, ...).
        seg: `fedmodal.baselines.config.SegConfig` fields; its "net" names the network preset,
            which must be the one the server's persistor builds (`NamedSegmentationNet`).
        local_epochs: passes over the site's training cases per round.
        seed: run seed; the site's seed derives from it and the site name.
        analytic_sender_id: id of the client's `TBWriter` component (metrics to the server's
            TensorBoard); empty to disable.
        train_task, validate_task, submit_model_task: task names.
    """

    def __init__(
        self,
        site: dict | None = None,
        seg: dict | None = None,
        local_epochs: int = 5,
        seed: int = 0,
        analytic_sender_id: str = "analytic_sender",
        train_task: str = AppConstants.TASK_TRAIN,
        validate_task: str = AppConstants.TASK_VALIDATION,
        submit_model_task: str = AppConstants.TASK_SUBMIT_MODEL,
    ):
        super().__init__()
        # Kept as given (NVFlare's job export reads constructor arguments back from attributes).
        self.site, self.seg = dict(site or {}), dict(seg or {})
        self.site_config = SiteConfig.from_dict(self.site, where="the segmentation executor's site settings")
        self.cfg = SegConfig.from_dict(self.seg, where="the segmentation executor's seg settings")
        self.local_epochs = int(local_epochs)
        self.seed = int(seed)
        self.analytic_sender_id = analytic_sender_id
        self.train_task, self.validate_task, self.submit_model_task = train_task, validate_task, submit_model_task
        self.tasks = {train_task: self._train, validate_task: self._validate, submit_model_task: self._submit_model}

        self.site_name = ""
        self.trainer = None
        self.data = None
        self.loader = None
        self.volumes: dict[str, list] = {}
        self.writer = None
        self.out_dir: Path | None = None
        self.best_local = -math.inf

    # ------------------------------------------------------------------ set-up

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.site_name = fl_ctx.get_identity_name()
            if self.analytic_sender_id:
                self.writer = fl_ctx.get_engine().get_component(self.analytic_sender_id)
                if self.writer is None:
                    self.log_warning(fl_ctx, f"no component {self.analytic_sender_id!r}: metrics stay in the site log")

    def _setup(self, fl_ctx: FLContext) -> None:
        """Read the site's data and build the trainer, once (first task)."""
        from fedmodal.baselines.data import site_data, train_loader
        from fedmodal.baselines.trainer import SegTrainer

        site = prepare_site(self.site_name, self.site_config, self.seed, include_synthetic=self.cfg.include_synthetic)
        self.data = site_data(site.manifest, self.cfg.include_synthetic)
        self.loader = train_loader(self.data.cases("train"), self.cfg, site.seed, site.device)
        self.trainer = SegTrainer(self.cfg, device=site.device, seed=site.seed)
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        self.out_dir = run_dir / "seg"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_info(fl_ctx, f"data {json.dumps(self.data.summary())}, device {site.device}, seed {site.seed}")

    def _volumes(self, split: str) -> list:
        from fedmodal.baselines.data import load_volumes

        if split not in self.volumes:
            self.volumes[split] = load_volumes(
                self.data.validation_cases() if split == "val" else self.data.cases(split)
            )
        return self.volumes[split]

    # ------------------------------------------------------------------ tasks

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        task = self.tasks.get(task_name)
        if task is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            if self.trainer is None:
                self._setup(fl_ctx)
            return task(shareable, fl_ctx, abort_signal)
        except Exception as error:  # reported to the server as an execution exception
            self.log_exception(fl_ctx, f"{task_name} failed at {self.site_name}: {error}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        from fedmodal.baselines.trainer import flat_metrics, save_checkpoint

        incoming = FLModelUtils.from_shareable(shareable)
        current_round = int(incoming.current_round or 0)
        self.trainer.load_weights(incoming.params, source=f"the global model of round {current_round}")

        global_val = flat_metrics(self.trainer.score(self._volumes("val")), prefix="val_")
        mu = float((incoming.meta or {}).get(AlgorithmConstants.FEDPROX_MU) or 0.0)
        stats = self.trainer.train_epochs(
            self.loader, self.local_epochs, fedprox_mu=mu, should_stop=lambda: abort_signal.triggered
        )
        if stats["stopped"]:
            return make_reply(ReturnCode.TASK_ABORTED)

        local_val = flat_metrics(self.trainer.score(self._volumes("val")), prefix="val_")
        meta = {
            "trained_modalities": list(self.data.modalities),
            "sites": [self.site_name],
            "round": current_round,
            "fedprox_mu": mu,
        }
        save_checkpoint(self.out_dir / "local_last.pt", self.trainer, {**meta, "val_dice": local_val["val_dice"]})
        if local_val["val_dice"] > self.best_local:
            self.best_local = local_val["val_dice"]
            save_checkpoint(self.out_dir / "local_best.pt", self.trainer, {**meta, "val_dice": self.best_local})

        record = {
            "site": self.site_name,
            "round": current_round,
            "train_loss": round(stats["loss"], 5),
            "steps": stats["steps"],
            "train_s": round(stats["seconds"], 1),
            "global_val_dice": round(global_val["val_dice"], 4),
            "local_val_dice": round(local_val["val_dice"], 4),
            "fedprox_mu": mu,
        }
        self.log_info(fl_ctx, "round " + json.dumps(record))
        self._stream(
            {
                "train_loss": stats["loss"],
                "global_val_dice": global_val["val_dice"],
                "local_val_dice": local_val["val_dice"],
                **{f"global_{k}": v for k, v in global_val.items() if k.startswith(("val_dice_", "val_hd95_"))},
            },
            current_round,
        )

        result = FLModel(
            params=self.trainer.state_numpy(),
            params_type=ParamsType.FULL,
            metrics={
                k: v for k, v in global_val.items() if k != "val_n_cases"
            },  # the received model's: for model selection
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: stats["steps"]},
            current_round=current_round,
        )
        return FLModelUtils.to_shareable(result)

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """Score a model on the site's test split (cross-site evaluation sends every server and
        site model here); a model sent for before-train validation is scored on the val split."""
        from fedmodal.baselines.trainer import flat_metrics

        incoming = FLModelUtils.from_shareable(shareable)
        cross_site = (incoming.meta or {}).get(MetaKey.VALIDATE_TYPE) != ValidateType.BEFORE_TRAIN_VALIDATE
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        self.trainer.load_weights(incoming.params, source=f"model {owner}")
        split = "test" if cross_site else "val"
        volumes = self._volumes(split)
        if not volumes:
            self.log_warning(fl_ctx, f"no {split} case at {self.site_name}: nothing to score {owner} on")
            return make_reply(ReturnCode.EMPTY_RESULT)
        start = time.time()
        metrics = flat_metrics(self.trainer.score(volumes), prefix="" if cross_site else "val_")
        self.log_info(
            fl_ctx,
            f"{split} "
            + json.dumps(
                {
                    "site": self.site_name,
                    "model": owner,
                    **{k: round(v, 4) for k, v in metrics.items()},
                    "seconds": round(time.time() - start, 1),
                }
            ),
        )
        return FLModelUtils.to_shareable(FLModel(metrics=metrics))

    def _submit_model(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """The site's best local model (by local validation Dice) for cross-site evaluation."""
        from fedmodal.baselines.trainer import load_checkpoint

        path = self.out_dir / "local_best.pt"
        if not path.is_file():
            self.log_warning(fl_ctx, "no local model to submit yet")
            return make_reply(ReturnCode.EMPTY_RESULT)
        state = load_checkpoint(path)["state_dict"]
        params = {k: v.numpy() for k, v in state.items()}
        return FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL))

    # ------------------------------------------------------------------ analytics

    def _stream(self, metrics: dict[str, float], step: int) -> None:
        """Send scalars to the server's TensorBoard (tags under the site's name there)."""
        if self.writer is None:
            return
        for key, value in metrics.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(key, float(value), global_step=int(step))
