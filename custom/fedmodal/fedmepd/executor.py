"""FedMEPD's client: its encoders and shared decoder filters travel, the rest stays.

Per round, top to bottom: take the encoders of the modalities held and the global decoder
(its personal filters keep their local values) -> train local epochs, the anchors calibrating
the fused features through the local attention layers -> send the encoders and only the
decoder rows that are not personal -> keep the whole model. The attention layers, the
auxiliary decoder, the personal filters, images and features never leave.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nvflare.apis.fl_context import FLContext

from fedmodal.fedmepd.config import FedMEPDConfig
from fedmodal.fedmepd.personalisation import merge_received, split_payload
from fedmodal.fedmepd.workflow import ANCHOR_PREFIX, DECODER, PERSONAL_PREFIX, ROWS_PREFIX
from fedmodal.fl.keygroup_workflow import KeyGroupExecutor
from fedmodal.fl.site import SiteConfig

STATE_DIR = "fedmepd_state"  # in the site's NVFlare workspace


def anchors_from(params: dict) -> list | None:
    scales = sorted(int(k[len(ANCHOR_PREFIX) :]) for k in params if k.startswith(ANCHOR_PREFIX))
    if not scales:
        return None
    return [params.get(f"{ANCHOR_PREFIX}{s}") for s in range(max(scales) + 1)]


class FedMEPDExecutor(KeyGroupExecutor):
    """A FedMEPD client.

    Args:
        site: `fedmodal.fl.site.SiteConfig` fields (data root, phantom preset, device, ...).
    """

    def __init__(self, site: dict | None = None):
        super().__init__()
        self.site = dict(site or {})
        self.site_config = SiteConfig.from_dict(self.site, where="the FedMEPD executor's site settings")
        self.trainer = None
        self.anchors = None
        self.personal: dict[str, np.ndarray] = {}

    def setup(self, config: dict, fl_ctx: FLContext) -> tuple[tuple[str, ...], int]:
        from fedmodal.baselines.data import load_volumes, site_training_data
        from fedmodal.fedmepd.trainer import FedMEPDTrainer

        name = fl_ctx.get_identity_name()
        self.cfg = FedMEPDConfig.from_dict(config["fedmepd"], where="the server's fedmepd settings")
        self.local_epochs = int(config["local_epochs"])
        site, self.data, self.loader = site_training_data(
            name, self.site_config, int(config["seed"]), self.cfg.seg_config()
        )
        train = self.data.cases("train")
        self._load_volumes = load_volumes
        self.test_volumes = None
        self.trainer = FedMEPDTrainer(self.cfg, self.data.modalities, device=site.device, seed=site.seed)
        root = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        self.state_path = root / STATE_DIR / name / f"{fl_ctx.get_job_id()}.pt"
        self.log_info(fl_ctx, f"{site.describe()}; {len(train)} training cases")
        return self.data.modalities, len(train)

    def _take(self, params: dict) -> None:
        """Load the round's encoders and decoder (personal rows stay local) and note the anchors."""
        self.personal = {
            k[len(PERSONAL_PREFIX) :]: np.asarray(v, dtype=bool)
            for k, v in params.items()
            if k.startswith(PERSONAL_PREFIX)
        }
        encoders = {k: v for k, v in params.items() if k.startswith("enc.")}
        decoder = {k: v for k, v in params.items() if k.startswith(DECODER)}
        held = [f"enc.{m}." for m in self.trainer.held]
        self.trainer.load_groups(encoders, groups=held)
        local = self.trainer.state_numpy([DECODER])
        self.trainer.load_groups(merge_received(local, decoder, self.personal), groups=[DECODER])
        self.anchors = anchors_from(params) if self.cfg.use_attention else None

    def train_round(self, params: dict, round_num: int, fl_ctx: FLContext) -> tuple[dict, dict]:
        self._take(params)
        stats = {}
        for _ in range(self.local_epochs):
            stats = self.trainer.train_epoch(self.loader, self.anchors)
        shared, present = split_payload(self.trainer.state_numpy([DECODER]), self.personal)
        out = self.trainer.state_numpy([f"enc.{m}." for m in self.trainer.held])
        out.update(shared)
        out.update({ROWS_PREFIX + layer: rows.astype(np.uint8) for layer, rows in present.items()})
        extras = {"personal": {layer: int(m.sum()) for layer, m in self.personal.items()}}
        self.trainer.save(self.state_path, meta={"round": round_num, **extras})
        metrics = {k: round(float(v), 5) for k, v in stats.items() if isinstance(v, (int, float))}
        metrics["personal_filters"] = int(sum(m.sum() for m in self.personal.values()))
        self.log_info(
            fl_ctx, "round " + json.dumps({"site": fl_ctx.get_identity_name(), "round": round_num, **metrics})
        )
        return out, metrics

    def evaluate(self, params: dict, fl_ctx: FLContext) -> dict:
        from fedmodal.baselines.trainer import flat_metrics

        if self.test_volumes is None:
            self.test_volumes = self._load_volumes(self.data.cases("test"), self.data.modalities)
        if not self.test_volumes:
            raise ValueError(f"site {fl_ctx.get_identity_name()}: no test case to score its model on")
        # The client's own model as it trained it (personal filters and all), with the final anchors.
        anchors = anchors_from(params) if self.cfg.use_attention else None
        return flat_metrics(self.trainer.score(self.test_volumes, anchors))
