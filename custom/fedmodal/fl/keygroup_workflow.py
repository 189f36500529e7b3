"""A federated round loop whose model is split into key groups, for methods with per-modality parts.

Server (`KeyGroupWorkflow`): register the sites (each says which modalities it holds and how
many samples), then per round send each site exactly the groups its modalities allow plus the
method's extra state (e.g. a prototype memory, anchors), average each group over its senders
(`fedmodal.fl.keygroups`), let the method absorb the sites' extras in site order, checkpoint;
at the end every site scores its own personalised model on its test split and the server
writes the per-site table. Site (`KeyGroupExecutor`): the same three tasks, with the method's
work behind `setup`, `train_round` and `evaluate`.

Faults cost a round, not the run: a round ends when every site has answered, or once
`min_sites` have and the rest had `wait_after_min` more seconds (or at `task_timeout`). A site
that misses a round (hung, crashed, restarted) is left out of that round's averages and is
asked to register again alongside the next round's training; once it answers it trains again
from the current global model. Fewer than `min_sites` answers stop the run with the last
round's checkpoint kept and named for `resume_from`.

What crosses the wire, and only this: the method's site config (server -> site, once), the
key groups a site may hold, extra arrays under the method's extra prefixes (counted in the
payload audit like any parameter), sample counts and scalar metrics.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController

from fedmodal.atomic import save_atomically, write_json_atomically
from fedmodal.config import Settings
from fedmodal.fl.keygroups import META_MODALITIES, META_NUM_SAMPLES, KeyGroupAggregator, KeyGroups
from fedmodal.fl.simulator import guard_simulator_client_names
from fedmodal.fl.timing import TASK_POLL_SECONDS, WAIT_AFTER_MIN_SECONDS

logger = logging.getLogger(__name__)

TASK_REGISTER = "kg_register"
TASK_TRAIN = "train"
TASK_EVALUATE = "kg_evaluate"
TASKS = (TASK_REGISTER, TASK_TRAIN, TASK_EVALUATE)
META_CONFIG = "fedmodal.config"  # the method's site config, server -> site at registration
META_ROUND = "fedmodal.round"
META_METRICS = "fedmodal.metrics"
CHECKPOINT_FILE = "checkpoint.pt"


class SiteFailure(RuntimeError):
    """Too few sites answered a task, or a site broke the protocol."""


@dataclass
class KeyGroupRunConfig(Settings):
    """How a key-group federation runs; each method's server settings extend it.

    Args:
        num_rounds: federated rounds.
        local_epochs: local epochs per round at each site.
        min_sites: sites that must register, and answer each round; with fewer the run stops
            (the last round's checkpoint is kept for `resume_from`).
        wait_after_min: seconds the other sites get once `min_sites` have answered a task;
            a site still silent then is left out of that round and asked to rejoin.
        task_timeout: seconds a round's task may last at most (0: no limit).
        task_poll: seconds between the workflow's checks for answers, and between an idle
            site's task requests.
        resume_from: the `checkpoint.pt` of an earlier run (model, method state and round).
        seed: run seed (initial weights; each site derives its own seed from it and its name).
    """

    num_rounds: int = 10
    local_epochs: int = 1
    min_sites: int = 2
    wait_after_min: int = WAIT_AFTER_MIN_SECONDS
    task_timeout: int = 3600
    task_poll: float = TASK_POLL_SECONDS
    resume_from: str = ""
    seed: int = 0


class KeyGroupWorkflow(ModelController):
    """The server's round loop; a method subclasses it and fills in the hooks.

    Hooks: `initial_params()` (the global model's keys, numpy), `site_config()` (what the sites
    build their trainer from), `extras_for(site)` and `absorb(site, extras)` (the method's extra
    state), `after_aggregation(round)`, `state_dict()` / `load_state_dict()` (kept with the
    checkpoint), `groups` and `extra_prefixes`.

    Args:
        run: rounds, fault tolerance, resume and seed (`KeyGroupRunConfig` or a subclass).
        output_dir: folder name under the run directory for checkpoints and tables.
        over_holders_only: average per-modality groups over their holders only (False: the
            "no tailored updating" ablation).
    """

    groups = KeyGroups()
    extra_prefixes: tuple[str, ...] = ()

    def __init__(self, run: KeyGroupRunConfig, output_dir: str = "keygroups", over_holders_only: bool = True):
        # Site errors are handled here (the site is left out of the round), not by NVFlare's panic.
        super().__init__(persistor_id="", ignore_result_error=True, task_check_period=float(run.task_poll))
        guard_simulator_client_names()  # before the simulator starts its clients
        self.num_rounds = int(run.num_rounds)
        self.task_timeout = int(run.task_timeout)
        self.min_sites = int(run.min_sites)
        self.wait_after_min = float(run.wait_after_min)
        self.resume_from = run.resume_from
        self.over_holders_only = bool(over_holders_only)
        self.output_dir = output_dir
        self.sites: dict[str, dict] = {}  # name -> {"modalities": [...], "num_samples": n}
        self.absent: set[str] = set()  # registered sites that missed the last task; asked to rejoin
        self.dropped: list[dict] = []  # {"round", "sites"}: who was left out of which round
        self.global_params: dict[str, np.ndarray] = {}
        self.out: Path | None = None

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def initial_params(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def site_config(self) -> dict: ...

    def extras_for(self, site: str) -> dict[str, np.ndarray]:
        return {}

    def absorb(self, site: str, extras: dict[str, np.ndarray]) -> None:
        """Take one site's extras (called in site order after each round)."""

    def after_aggregation(self, round_num: int) -> None:
        """Server-side work once the round's groups are averaged (e.g. training on server data)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        self.out = Path(self.get_run_dir()) / self.output_dir
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            start = self._start()
            self._register()
            for round_num in range(start, self.num_rounds):
                if self.abort_signal.triggered:
                    return
                self._round(round_num)
            self._evaluate()
        except SiteFailure as e:
            self.panic(str(e))

    def _start(self) -> int:
        if not self.resume_from:
            self.global_params = self.initial_params()
            return 0
        saved = torch.load(self.resume_from, map_location="cpu", weights_only=False)
        self.global_params = dict(saved["params"])
        self.load_state_dict(saved.get("state", {}))
        self.info(f"resumed from {self.resume_from} at round {saved['round']}")
        return int(saved["round"])

    def _register(self) -> None:
        names = self.sample_clients()
        if len(names) < self.min_sites:
            raise SiteFailure(f"{len(names)} sites connected ({names}); {self.min_sites} required")
        replies = self._ask({n: self._registration() for n in names}, needed=self.min_sites, what="registration")
        for name, reply in sorted(replies.items()):
            self._enrol(name, reply)
        self.absent = set(names) - set(replies)
        if self.absent:
            self.warning(f"sites {sorted(self.absent)} did not register; they are asked again each round")

    def _registration(self) -> tuple[str, FLModel]:
        return TASK_REGISTER, FLModel(params={}, meta={META_CONFIG: self.site_config()})

    def _enrol(self, name: str, reply: FLModel) -> None:
        meta = reply.meta or {}
        self.sites[name] = {"modalities": list(meta[META_MODALITIES]), "num_samples": int(meta[META_NUM_SAMPLES])}
        self.info(
            f"site {name}: modalities {self.sites[name]['modalities']}, {self.sites[name]['num_samples']} samples"
        )

    def payload(self, site: str, task_meta: dict) -> FLModel:
        held = self.sites[site]["modalities"]
        params = self.groups.select(self.global_params, held, self.over_holders_only)
        return FLModel(params={**params, **self.extras_for(site)}, params_type=ParamsType.FULL, meta=task_meta)

    def _round(self, round_num: int) -> None:
        started = time.perf_counter()
        meta = {META_ROUND: round_num}
        training = [s for s in sorted(self.sites) if s not in self.absent]
        connected = set(self.sample_clients())
        rejoining = sorted(s for s in self.absent if s in connected)
        replies = self._ask(
            {s: (TASK_TRAIN, self.payload(s, meta)) for s in training},
            needed=self.min_sites,
            what=f"round {round_num + 1}",
            optional={s: self._registration() for s in rejoining},
        )
        rejoined = sorted(s for s in rejoining if s in replies)
        for site in rejoined:  # registered while the others trained: trains from the next round
            self._enrol(site, replies.pop(site))
        missed = sorted(set(training) - set(replies))
        self.absent = (self.absent - set(rejoined)) | set(missed)
        if missed:
            self.dropped.append({"round": round_num + 1, "sites": missed})
            self.warning(f"round {round_num + 1}: sites {missed} sent no result; the round goes on without them")
        aggregator = KeyGroupAggregator(self.groups.per_modality, self.groups.shared, self.over_holders_only)
        metrics = {}
        for site, reply in sorted(replies.items()):
            model_part = {k: v for k, v in reply.params.items() if not k.startswith(self.extra_prefixes or ("\0",))}
            extras = {k: v for k, v in reply.params.items() if k not in model_part}
            aggregator.accept_model(FLModel(params=model_part, meta={**reply.meta, "client_name": site}))
            self.absorb(site, extras)
            metrics[site] = (reply.meta or {}).get(META_METRICS, {})
        self.global_params.update(aggregator.aggregate_model().params)
        self.after_aggregation(round_num)
        checkpoint = {"round": round_num + 1, "params": self.global_params, "state": self.state_dict()}
        save_atomically(self.out / CHECKPOINT_FILE, lambda path: torch.save(checkpoint, path))
        record = {
            "round": round_num + 1,
            "of": self.num_rounds,
            "seconds": round(time.perf_counter() - started, 2),
            "sites": metrics,
            "missed": missed,
            "rejoined": rejoined,
        }
        self.info("round " + json.dumps(record, default=float))

    def _evaluate(self) -> None:
        present = [s for s in sorted(self.sites) if s not in self.absent]
        tasks = {s: (TASK_EVALUATE, self.payload(s, {})) for s in present}
        replies = self._ask(tasks, needed=1, what="evaluation")
        results = {site: (reply.meta or {}).get(META_METRICS, {}) for site, reply in sorted(replies.items())}
        unscored = sorted(set(self.sites) - set(results))
        table = {"sites": self.sites, "results": results, "unscored": unscored, "dropped": self.dropped}
        write_json_atomically(self.out / "per_site.json", table)
        if unscored:
            self.warning(f"sites {unscored} were not scored (absent at the end)")
        self.info(f"per-site results written to {self.out / 'per_site.json'}")

    def _ask(
        self,
        tasks: dict[str, tuple[str, FLModel]],
        needed: int,
        what: str,
        optional: dict[str, tuple[str, FLModel]] | None = None,
    ) -> dict[str, FLModel]:
        """Send each site its own (task name, payload) and collect the answers, keyed by site.

        `tasks` are the ones that count: the wait ends when all have answered, or
        `wait_after_min` seconds after `needed` of them have, or at `task_timeout`. `optional`
        tasks (rejoin registrations) are collected if they answer by then and cancelled if not.
        Fewer than `needed` answers raise `SiteFailure`, which stops the run.
        """
        replies: dict[str, FLModel] = {}
        lock = threading.Lock()

        def received(result: FLModel) -> None:
            with lock:
                replies[str((result.meta or {}).get("client_name", "?"))] = result

        for site, (task, model) in {**tasks, **(optional or {})}.items():
            self.send_model(task_name=task, data=model, targets=[site], timeout=self.task_timeout, callback=received)
        enough_since = None
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                raise SiteFailure(f"the run was aborted during {what}")
            with lock:
                answered = sum(s in replies for s in tasks)
            if answered == len(tasks):
                break
            if answered >= needed:
                enough_since = enough_since or time.monotonic()
                if time.monotonic() - enough_since >= self.wait_after_min:
                    break
            time.sleep(self._task_check_period)
        self.cancel_all_tasks()  # late answers arrive as unknown tasks and are ignored
        with lock:
            replies = dict(replies)
        answered = sorted(s for s in tasks if s in replies)
        if len(answered) < needed:
            missing = sorted(set(tasks) - set(answered))
            checkpoint = self.out / CHECKPOINT_FILE if self.out else None
            resume = (
                f"; the last round's checkpoint is {checkpoint}: rerun with resume_from set to it"
                if checkpoint and checkpoint.is_file()
                else ""
            )
            raise SiteFailure(
                f"{what}: {len(answered)} of {len(tasks)} sites answered ({answered}), {needed} required; "
                f"silent: {missing} (see their logs){resume}"
            )
        return replies


class KeyGroupExecutor(Executor):
    """A site of a `KeyGroupWorkflow`; a method subclasses it.

    Hooks: `setup(config, fl_ctx) -> (modalities, num_samples)` builds the site's trainer from
    the server's config; `train_round(params, round, fl_ctx) -> (params, metrics)` trains on the
    received groups and returns what the site may send (its groups and extras);
    `evaluate(params, fl_ctx) -> metrics` scores the site's own model on its test split.
    """

    def __init__(self):
        super().__init__()
        self.modalities: tuple[str, ...] | None = None
        self.num_samples = 0

    @abstractmethod
    def setup(self, config: dict, fl_ctx: FLContext) -> tuple[tuple[str, ...], int]: ...

    @abstractmethod
    def train_round(self, params: dict, round_num: int, fl_ctx: FLContext) -> tuple[dict, dict]: ...

    @abstractmethod
    def evaluate(self, params: dict, fl_ctx: FLContext) -> dict: ...

    def run_dir(self, fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.END_RUN:
            self.modalities = None

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            incoming = FLModelUtils.from_shareable(shareable)
            meta: dict[str, Any] = {}
            params: dict = {}
            if task_name == TASK_REGISTER:
                self.modalities, self.num_samples = self.setup(dict(incoming.meta[META_CONFIG]), fl_ctx)
            elif self.modalities is None:
                raise RuntimeError(f"site {site}: {task_name} before registration (was the site process restarted?)")
            elif task_name == TASK_TRAIN:
                params, meta[META_METRICS] = self.train_round(
                    dict(incoming.params or {}), int(incoming.meta[META_ROUND]), fl_ctx
                )
            elif task_name == TASK_EVALUATE:
                meta[META_METRICS] = self.evaluate(dict(incoming.params or {}), fl_ctx)
            else:
                return make_reply(ReturnCode.TASK_UNKNOWN)
            meta.update({META_MODALITIES: list(self.modalities), META_NUM_SAMPLES: self.num_samples})
            return FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL, meta=meta))
        except Exception as e:  # the server stops the run naming this site; the trace is in this log
            self.log_exception(fl_ctx, f"site {site}: {task_name} failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
