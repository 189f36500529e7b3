"""FedMEPD's server: per-modality encoders, a full-modal server epoch, anchors, partially
personalised decoders.

Per round (the key-group loop of `fedmodal.fl.keygroup_workflow`): each client gets the
encoders of the modalities it holds, the global fusion decoder, the anchors and its own
personal-filter mask; it returns its encoders and the decoder rows that are still shared.
Then the server averages each encoder over its holders, trains one epoch on its own
full-modal data (encoders + fusion decoder, starting from the global decoder), blends every
shared decoder filter 0.7 x the clients' per-filter weighted average + 0.3 x its own, counts
each client's filter similarities (a filter whose counter reaches 0 becomes that client's,
permanently) and refreshes the anchors from its fused features. Attention layers and the
auxiliary decoder never leave a client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from fedmodal.atomic import write_json_atomically
from fedmodal.fedmepd.anchors import AnchorBank
from fedmodal.fedmepd.config import FedMEPDConfig
from fedmodal.fedmepd.personalisation import (
    FilterCounters,
    aggregate_decoder,
    expand_payload,
    filter_counts,
)
from fedmodal.fl.keygroup_workflow import KeyGroupRunConfig, KeyGroupWorkflow, SiteFailure
from fedmodal.fl.keygroups import KeyGroups
from fedmodal.fl.site import DATA_ROOT_FROM_ENV, SiteConfig

DECODER = "dec."
ANCHOR_PREFIX = "anchor."  # "anchor.<scale>": (A, C_s) per-class cluster means, never one case's features
PERSONAL_PREFIX = "personal."  # "personal.<layer>": the client's personal-filter mask (server -> client)
ROWS_PREFIX = "decrows."  # "decrows.<layer>": which decoder rows a client sent (client -> server)


@dataclass
class FedMEPDServerConfig(KeyGroupRunConfig):
    """How the FedMEPD federation runs, and where the server's own full-modal data is
    (`KeyGroupRunConfig`: rounds, faults, resume, seed).

    Args:
        num_rounds: federated rounds.
        local_epochs: local epochs per round at each client.
        data_root: the server's full-modal BraTS folder; `{$FEDMODAL_DATA_ROOT}` of the server's
            environment (in production, the coordinating institution's data; unset: phantoms).
        server_site: the server's data folder name under a federation root (the simulator's and
            the phantoms' "server" folder).
        preset: phantom preset when no data root is set.
        device: "auto", "cpu" or "cuda[:i]" for the server's epoch (a GPU server in production).
        num_threads: torch CPU threads at the server (0 keeps torch's default: every core).
    """

    settings_name = "FedMEPD server"

    num_rounds: int = 20
    local_epochs: int = 1
    data_root: str = DATA_ROOT_FROM_ENV
    server_site: str = "server"
    preset: str = "fedmepd"
    device: str = "auto"
    num_threads: int = 0


class FedMEPDController(KeyGroupWorkflow):
    """FedMEPD (and FedMEMA with `fedmepd.personalise` false) at the server.

    Args:
        fedmepd: `fedmodal.fedmepd.config.FedMEPDConfig` fields; sent to the clients, which
            build their networks from it (the network is named once, here).
        server: `FedMEPDServerConfig` fields.
    """

    groups = KeyGroups(per_modality="enc.{modality}.", shared=())  # encoders over their holders only
    extra_prefixes = (DECODER, ROWS_PREFIX)

    def __init__(self, fedmepd: dict | None = None, server: dict | None = None):
        self.fedmepd, self.server = dict(fedmepd or {}), dict(server or {})
        self.method = FedMEPDConfig.from_dict(self.fedmepd, where="the FedMEPD controller's fedmepd settings")
        self.run_config = FedMEPDServerConfig.from_dict(self.server, where="the FedMEPD controller's server settings")
        run = self.run_config
        super().__init__(run, output_dir="fedmepd")
        self.trainer = None  # the server's FedMEPDTrainer, built at the start of the run
        self.bank = AnchorBank(
            num_classes=4, k=self.method.anchors_k, momentum=self.method.anchor_ema, seed=run.seed,
            min_cluster_size=self.method.min_cluster_size,
        )  # fmt: skip
        self.counters: dict[str, FilterCounters] = {}
        self.received: dict[str, dict] = {}  # this round's client decoders, full shape (NaN: personal)
        self.writer = None

    # ------------------------------------------------------------------ the server's own data
    def _server_data(self):
        from fedmodal.baselines.data import site_data, train_loader
        from fedmodal.fedmepd.trainer import FedMEPDTrainer
        from fedmodal.fl.site import prepare_site

        run = self.run_config
        config = SiteConfig(data_root=run.data_root, preset=run.preset, device=run.device, num_threads=run.num_threads)
        site = prepare_site(run.server_site, config, run.seed)
        data = site_data(site.manifest)
        missing = [m for m in ("t1", "t1ce", "t2", "flair") if m not in data.modalities]
        if missing:
            raise SiteFailure(
                f"the server's data at {site.root} lacks {missing}: FedMEPD's server needs every modality"
            )
        cases = data.cases("train") + data.cases("val") + data.cases("test")  # the server trains on all it holds
        self.loader = train_loader(cases, self.method.seg_config(), site.seed, site.device)
        self.trainer = FedMEPDTrainer(self.method, data.modalities, device=site.device, seed=site.seed)
        self.info(f"server data: {site.describe()}; {len(cases)} cases for the full-modal epoch")

    def _server_epoch(self) -> dict:
        stats = self.trainer.train_epoch(self.loader)
        self.bank.update(self.trainer.fused_features(self.loader))
        return stats

    # ------------------------------------------------------------------ hooks
    def initial_params(self) -> dict[str, np.ndarray]:
        self._server_data()
        stats = self._server_epoch()  # the first anchors come from a first full-modal epoch
        self.info(f"server warm-up epoch: {json.dumps({k: round(float(v), 4) for k, v in stats.items()})}")
        return self.trainer.state_numpy(["enc.", DECODER])

    def site_config(self) -> dict:
        return {
            "fedmepd": self.method.to_dict(),
            "local_epochs": self.run_config.local_epochs,
            "seed": self.run_config.seed,
        }

    def extras_for(self, site: str) -> dict[str, np.ndarray]:
        extras = {k: v for k, v in self.global_params.items() if k.startswith(DECODER)}
        extras.update({f"{ANCHOR_PREFIX}{s}": a for s, a in enumerate(self.bank.anchors()) if a is not None})
        if site in self.counters:
            extras.update(
                {PERSONAL_PREFIX + layer: m.astype(np.uint8) for layer, m in self.counters[site].mask().items()}
            )
        return extras

    def absorb(self, site: str, extras: dict[str, np.ndarray]) -> None:
        decoder = {k: v for k, v in extras.items() if k.startswith(DECODER)}
        present = {
            k[len(ROWS_PREFIX) :]: np.asarray(v, dtype=bool) for k, v in extras.items() if k.startswith(ROWS_PREFIX)
        }
        template = {k: v for k, v in self.global_params.items() if k.startswith(DECODER)}
        if site in self.counters:
            personal = self.counters[site].mask()
            leaked = [layer for layer, rows in present.items() if (rows & personal.get(layer, False)).any()]
            if leaked:
                raise SiteFailure(f"site {site} sent decoder filters that are personal to it in {leaked[:3]}")
        try:
            self.received[site] = expand_payload(decoder, present, template)
        except ValueError as e:
            raise SiteFailure(f"site {site}: {e}") from e

    def after_aggregation(self, round_num: int) -> None:
        encoders = {k: v for k, v in self.global_params.items() if k.startswith("enc.")}
        decoder_before = {k: v for k, v in self.global_params.items() if k.startswith(DECODER)}
        self.trainer.load_groups({**encoders, **decoder_before}, groups=["enc.", DECODER])
        stats = self._server_epoch()
        server_decoder = self.trainer.state_numpy([DECODER])
        samples = {s: self.sites[s]["num_samples"] for s in self.received}
        new_decoder, similarity = aggregate_decoder(
            decoder_before, server_decoder, self.received, samples, self.method.blend_client
        )
        self.global_params.update(new_decoder)
        self.global_params.update(self.trainer.state_numpy(["enc."]))  # the server's epoch trained them on
        if self.method.personalise:
            for site, s_f in sorted(similarity.items()):
                counters = self.counters.setdefault(
                    site,
                    FilterCounters(filter_counts(decoder_before), self.method.counter_start, self.method.warmup_rounds),
                )
                counters.update(s_f, round_num)
        self.received = {}
        self._report(round_num, stats)

    def _report(self, round_num: int, stats: dict) -> None:
        personal = {site: c.summary() for site, c in sorted(self.counters.items())}
        write_json_atomically(self.out / "personal_filters.json", {"round": round_num + 1, "sites": personal})
        counts = {site: p["personal_total"] for site, p in personal.items()}
        record = {
            "round": round_num + 1,
            "server_loss": round(float(stats.get("loss", float("nan"))), 5),
            "server_epoch_s": round(float(stats.get("seconds", float("nan"))), 2),
            "personal_filters": counts,
            "anchors": self.bank.summary(),
        }
        self.info("server " + json.dumps(record, default=float))
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))
        for site, p in personal.items():
            self.writer.add_scalar(f"personal_filters/{site}", p["personal_total"], round_num + 1)
            for layer, n in p["personal"].items():
                self.writer.add_scalar(f"personal_filters_by_layer/{site}/{layer}", n, round_num + 1)
        self.writer.add_scalar("server/loss", record["server_loss"], round_num + 1)
        self.writer.flush()

    def state_dict(self) -> dict:
        return {
            "anchors": self.bank.state_dict(),
            "counters": {site: c.state_dict() for site, c in self.counters.items()},
            "server_model": self.trainer.state_numpy(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._server_data()
        self.bank.load_state_dict(state["anchors"])
        self.trainer.load_groups(state["server_model"])
        template = {k: v for k, v in self.global_params.items() if k.startswith(DECODER)}
        for site, counters in state.get("counters", {}).items():
            restored = FilterCounters(filter_counts(template), self.method.counter_start, self.method.warmup_rounds)
            restored.load_state_dict(counters)
            self.counters[site] = restored
