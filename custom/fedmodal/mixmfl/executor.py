"""MDM-MixMFL's site: trains its own model on the groups it holds, writes prototypes, keeps it.

Per round, top to bottom: load the received shared groups and the tailored encoders of the
modalities held -> train local epochs, retrieving pseudo features for the missing modalities
from the memory -> k-means centres of each held modality's tailored features (clusters of
fewer than `min_cluster_size` samples are never sent) -> save the personalised model -> send
the trained groups and the centres. Images, labels and per-sample features stay here.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.fl_context import FLContext

from fedmodal.fl.keygroup_workflow import KeyGroupExecutor
from fedmodal.fl.site import SiteConfig
from fedmodal.mixmfl.config import MixMFLConfig
from fedmodal.mixmfl.workflow import MEMORY_PREFIX, memory_from_payload
from fedmodal.nets.mixmfl import key_group

STATE_DIR = "mixmfl_state"  # in the site's NVFlare workspace: lasts across jobs and restarts


class MixMFLExecutor(KeyGroupExecutor):
    """A MixMFL site.

    Args:
        site: `fedmodal.fl.site.SiteConfig` fields (data root, phantom preset, device, ...).
    """

    def __init__(self, site: dict | None = None):
        super().__init__()
        self.site = dict(site or {})
        self.site_config = SiteConfig.from_dict(self.site, where="the MixMFL executor's site settings")
        self.trainer = None
        self.memory = None

    def setup(self, config: dict, fl_ctx: FLContext) -> tuple[tuple[str, ...], int]:
        from fedmodal.baselines.data import load_volumes, site_training_data
        from fedmodal.mixmfl.trainer import MixMFLTrainer

        name = fl_ctx.get_identity_name()
        self.cfg = MixMFLConfig.from_dict(config["mixmfl"], where="the server's mixmfl settings")
        self.local_epochs = int(config["local_epochs"])
        site, self.data, self.loader = site_training_data(
            name, self.site_config, int(config["seed"]), self.cfg.loader_config()
        )
        train = self.data.cases("train")
        self.test_volumes = None
        self._load_volumes = load_volumes
        self.trainer = MixMFLTrainer(self.cfg, self.data.modalities, device=site.device, seed=site.seed)
        root = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        self.state_path = root / STATE_DIR / name / f"{config['run_id']}.pt"
        if self.state_path.is_file():  # this run's model, kept across a resume, a restart or a missed round
            saved_round = int(self.trainer.load(self.state_path).get("round", -1)) + 1
            self.log_info(
                fl_ctx, f"site {name}: personalised model of round {saved_round} reloaded from {self.state_path}"
            )
        self.log_info(fl_ctx, f"{site.describe()}; {len(train)} training cases")
        return self.data.modalities, len(train)

    def train_round(self, params: dict, round_num: int, fl_ctx: FLContext) -> tuple[dict, dict]:
        model = {k: v for k, v in params.items() if not k.startswith(MEMORY_PREFIX)}
        self.memory = memory_from_payload(params, self.cfg.memory_capacity)
        # Normally a site takes and sends its own groups; without tailored updating (Table 3)
        # every encoder is a shared group, so it takes and sends whatever the server sent.
        groups = self.trainer.groups if self.cfg.tailored_updating else sorted({key_group(k) for k in model})
        self.trainer.load_global(model, allowed_groups=groups)
        stats = {}
        for _ in range(self.local_epochs):
            stats = self.trainer.train_epoch(self.loader, self.memory if self.cfg.use_memory else None)
        centres = self.trainer.prototypes(self.cfg.kmeans_k, self.cfg.min_cluster_size)
        out = self.trainer.state_numpy(groups)
        out.update({MEMORY_PREFIX + m: c for m, c in centres.items() if len(c)})
        self.trainer.save(self.state_path, meta={"round": round_num})
        metrics = {k: round(float(v), 5) for k, v in stats.items() if isinstance(v, (int, float))}
        metrics["prototypes"] = {m: int(len(c)) for m, c in centres.items()}
        self.log_info(
            fl_ctx, "round " + json.dumps({"site": fl_ctx.get_identity_name(), "round": round_num, **metrics})
        )
        return out, metrics

    def evaluate(self, params: dict, fl_ctx: FLContext) -> dict:
        from fedmodal.baselines.trainer import flat_metrics

        if self.test_volumes is None:
            self.test_volumes = self._load_volumes(self.data.cases("test"), self.data.modalities)
        if not self.test_volumes:
            raise ValueError(f"site {fl_ctx.get_identity_name()}: no test case to score the personalised model on")
        memory = memory_from_payload(params, self.cfg.memory_capacity) if self.cfg.use_memory else None
        return flat_metrics(self.trainer.score(self.test_volumes, memory))
