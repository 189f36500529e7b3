"""ModalityBank's server workflow: G and its bank stay here; each step every site gets its fakes.

Protocol (METHODS.md section 1): register once (masks + keys, or keys only for sites that
keep their masks), then per step: sample a batch of masks per site, draw augmentation, run G
per modality over the masks of the sites holding it, send each site its own fakes, wait for
every site's d(loss)/d(fake), weight by data share and step G.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import ReturnCode, Shareable
from nvflare.apis.signal import Signal

from fedmodal.fl.direct import DirectSender, ExchangeError, exchange_by_tasks
from fedmodal.fl.simulator import guard_simulator_client_names
from fedmodal.fl.site import peak_gpu_memory, select_device
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.config import ControllerConfig, GeneratorConfig
from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
from fedmodal.modalitybank.generator_trainer import GeneratorTrainer
from fedmodal.modalitybank.grids import grid_array, mask_picture, save_grid

logger = logging.getLogger(__name__)

OUTPUT_DIR = "modalitybank"
RUN_FILE = "run.json"  # in a checkpoint: the run's id and global step, for the sites' state on resume


class ModalityBankController(Controller):
    """Server side of ModalityBank (and of its AsynDGAN baseline with generator mode "asyndgan").

    Args:
        generator: `fedmodal.modalitybank.config.GeneratorConfig` fields (the generator's shape
            and schedule); missing fields take their defaults, unknown ones are refused.
        server: `fedmodal.modalitybank.config.ControllerConfig` fields (how the run goes:
            timeouts, checkpoints, resume, device, transport).
    """

    def __init__(self, generator: dict | None = None, server: dict | None = None):
        # Kept as given (NVFlare's job export reads constructor arguments back from attributes).
        self.generator = dict(generator or {})
        self.server = dict(server or {})
        self.generator_config = GeneratorConfig.from_dict(self.generator, where="the controller's generator")
        self.run_config = ControllerConfig.from_dict(self.server, where="the controller's server settings")
        super().__init__(task_check_period=self.run_config.task_poll)
        guard_simulator_client_names()  # before the simulator starts its clients
        self.out_dir: Path | None = None
        self.writer = None
        self.sender = DirectSender()
        self.membership: list[dict] = []
        self._returning: dict[str, SiteState] = {}  # re-registered sites, admitted before the next step
        self._offered: set[str] = set()  # away sites with a registration task outstanding

    # ------------------------------------------------------------------ lifecycle
    def start_controller(self, fl_ctx: FLContext):
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self.out_dir = Path(run_dir) / OUTPUT_DIR
        self.out_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out_dir / "tb"))
        self.device = select_device(self.run_config.device, self.run_config.num_threads)
        self.log_info(
            fl_ctx,
            f"ModalityBank outputs go to {self.out_dir}; server on {self.device}, "
            f"{torch.get_num_threads()} CPU thread(s) (num_threads {self.run_config.num_threads})",
        )

    def stop_controller(self, fl_ctx: FLContext):
        if self.writer is not None:
            self.writer.close()
        self.sender.close()

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext
    ):
        self.log_warning(fl_ctx, f"ignoring late result of {task_name} from {client.name}")

    # ------------------------------------------------------------------ workflow
    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        run_id, resume_step = self._run_identity(fl_ctx)
        sites = self._register(abort_signal, fl_ctx, run_id, resume_step)
        if sites is None:
            return
        config = resolve_config(self.generator_config, sites)
        run = self.run_config
        trainer = (
            GeneratorTrainer.resume(run.resume_from, config, self.device, run.precision)
            if run.resume_from
            else GeneratorTrainer(config, self.device, run.precision)
        )
        if run.pretrained_generator and not run.resume_from:
            trainer.load_pretrained(run.pretrained_generator)
        self.log_info(fl_ctx, f"generator arithmetic: {trainer.amp.describe()}")
        coordinator = StepCoordinator(trainer, sites, np.random.default_rng(config.seed), run.wire_precision)
        sample_masks = coordinator.sample_masks()
        timings: dict[str, list[float]] = {}  # seconds per step, by phase
        waits: dict[str, list[float]] = {}  # of which waiting for the sites (transport + site compute)
        total_steps = sum(n for _, n in config.phases)
        global_step = sum(n for _, n in config.phases[: trainer.progress.phase_index]) + trainer.progress.step
        last_checkpoint = resume_step
        while not trainer.finished:
            phase, step, phase_steps = trainer.phase, trainer.progress.step, trainer.phase_steps
            phase_ends = step + 1 >= phase_steps
            self._admit_rejoined(coordinator, global_step, fl_ctx)
            if coordinator.away and global_step % max(1, run.rejoin_every) == 0:
                self._offer_registration(coordinator, run_id, last_checkpoint, fl_ctx)
            # Checkpoints at phase ends and every checkpoint_every steps; the sites save with them.
            saves = phase_ends or bool(run.checkpoint_every and (global_step + 1) % run.checkpoint_every == 0)
            started = time.perf_counter()
            payloads = coordinator.step_payloads(checkpoint_step=global_step + 1 if saves else None)
            sent = time.perf_counter()
            # The first step of a run also builds the sites' discriminators and warms torch up.
            timeout = run.register_timeout if not timings else run.step_timeout
            exchanged = self._exchange(
                P.TASK_STEP,
                payloads,
                abort_signal,
                fl_ctx,
                run.step_transport == "direct",
                partial=True,
                timeout=timeout,
            )
            if exchanged is None:
                return
            replies, failures = exchanged
            received = time.perf_counter()
            for name, reason in failures.items():
                coordinator.drop(name)
                self._note_membership("dropped", name, global_step + 1, reason, coordinator, fl_ctx)
            problem = coordinator.cannot_continue(run.min_sites) if failures else None
            if problem:
                self._stop_for_sites(problem, trainer, run_id, global_step, fl_ctx)
                return
            losses = coordinator.finish_step(replies, dropped=failures)
            finished = time.perf_counter()
            timings.setdefault(phase, []).append(finished - started)
            waits.setdefault(phase, []).append(received - sent)
            global_step += 1
            self._record_losses(losses, global_step)
            self.writer.add_scalar("sites/live", len(coordinator.sites), global_step)
            if (step + 1) % run.log_every == 0 or phase_ends:
                recent = timings[phase][-run.log_every :]
                rate = len(recent) / max(sum(recent), 1e-9)
                record = {
                    "phase": phase,
                    "step": step + 1,
                    "of": phase_steps,
                    "steps_per_s": round(rate, 3),
                    "eta_s": round((total_steps - global_step) / max(rate, 1e-9)),
                    "live_sites": sorted(coordinator.sites),
                    "losses": _mean_by_name(losses),
                }
                self.log_info(fl_ctx, "progress " + json.dumps(record))
                self.writer.add_scalar("speed/steps_per_s", rate, global_step)
            if run.sample_every and (global_step % run.sample_every == 0 or trainer.finished):
                self._save_samples(trainer, sample_masks, global_step)
            if saves:
                self._save_checkpoint(trainer, run_id, global_step)
                last_checkpoint = global_step
        previews = coordinator.preview_payloads(run.preview_count)
        if self._exchange(P.TASK_PREVIEW, previews, abort_signal, fl_ctx, direct=False) is None:
            return
        self._write_summary(config, [coordinator.state(s.name) for s in sites], timings, waits)
        self.log_info(fl_ctx, f"ModalityBank finished; checkpoint in {self.out_dir / 'checkpoint'}")

    def _run_identity(self, fl_ctx: FLContext) -> tuple[str, int | None]:
        """The run's id and, when resuming, the global step of the checkpoint resumed from."""
        resume_from = self.run_config.resume_from
        if not resume_from:
            return uuid.uuid4().hex[:12], None
        run_file = Path(resume_from) / RUN_FILE
        if not run_file.is_file():  # a checkpoint written before runs had ids
            self.log_warning(fl_ctx, f"{run_file} missing: the sites' discriminators start afresh")
            return uuid.uuid4().hex[:12], None
        run = json.loads(run_file.read_text())
        return str(run["run_id"]), int(run["global_step"])

    def _site_config(self, run_id: str, resume_step: int | None) -> dict:
        """What a site needs to build its worker; `resume_step` makes it reload its discriminators."""
        return {
            "image_size": self.generator_config.image_size,
            "slices": self.run_config.slices,
            "seed": self.generator_config.seed,
            "batch_size": self.generator_config.batch_size,
            P.RUN_ID: run_id,
            P.RESUME_STEP: resume_step,
        }

    def _register(
        self, abort_signal: Signal, fl_ctx: FLContext, run_id: str, resume_step: int | None
    ) -> list[SiteState] | None:
        """Ask every site for its keys (and masks, where the site shares them)."""
        task = Task(
            name=P.TASK_REGISTER,
            data=DXO(DataKind.COLLECTION, {P.CONFIG: self._site_config(run_id, resume_step)}).to_shareable(),
            timeout=int(self.run_config.register_timeout),
        )
        clients = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        min_sites = self.run_config.min_sites
        if len(clients) < min_sites:
            self.system_panic(f"{len(clients)} sites connected ({clients}); {min_sites} required", fl_ctx)
            return None
        # Every connected site takes part: the protocol is synchronous over all of them.
        self.broadcast_and_wait(task, fl_ctx, targets=clients, min_responses=len(clients), abort_signal=abort_signal)
        sites = []
        for client_task in sorted(task.client_tasks, key=lambda ct: ct.client.name):
            name, result = client_task.client.name, client_task.result
            if result is None or result.get_return_code() != ReturnCode.OK:
                code = None if result is None else result.get_return_code()
                self.system_panic(f"site {name} failed to register (return code {code}); see its log", fl_ctx)
                return None
            sites.append(SiteState.from_registration(name, from_shareable(result).data))
            self.log_info(fl_ctx, sites[-1].describe())
        if len(sites) < min_sites:
            self.system_panic(f"only {len(sites)} sites registered; {min_sites} required", fl_ctx)
            return None
        return sites

    def _exchange(
        self,
        task_name: str,
        payloads: dict[str, dict],
        abort_signal: Signal,
        fl_ctx: FLContext,
        direct: bool,
        partial: bool = False,
        timeout: float | None = None,
    ):
        """Every site's reply data, or None after stopping the run (aborted, or a site failed).

        With `partial`, (data of the sites that answered, site -> why it failed). `timeout`
        defaults to `step_timeout`.
        """
        timeout = timeout or self.run_config.step_timeout
        try:
            if direct:
                return self.sender.exchange(task_name, payloads, timeout, fl_ctx, partial=partial)
            return exchange_by_tasks(self, task_name, payloads, timeout, abort_signal, fl_ctx, partial=partial)
        except ExchangeError as e:
            self.system_panic(str(e), fl_ctx)
            return None

    # ------------------------------------------------------------------ sites that leave and return
    def _note_membership(self, event: str, name: str, step: int, reason: str, coordinator, fl_ctx: FLContext):
        self.membership.append({"event": event, "site": name, "step": step, "reason": reason})
        self.writer.add_text("sites/membership", f"step {step}: {name} {event}: {reason}", step)
        message = f"site {name} {event} at step {step}: {reason}; live sites {sorted(coordinator.sites)}"
        (self.log_warning if event == "dropped" else self.log_info)(fl_ctx, message)

    def _offer_registration(self, coordinator, run_id: str, checkpoint_step: int | None, fl_ctx: FLContext):
        """Send each away site a registration task (not waited for); its answer brings it back."""
        connected = {c.name for c in fl_ctx.get_engine().get_clients()}
        for name in sorted(set(coordinator.away) - self._offered):
            if name not in connected:
                continue

            def received(client_task, fl_ctx, name=name):
                self._offered.discard(name)
                result = client_task.result
                if result is not None and result.get_return_code() == ReturnCode.OK:
                    self._returning[name] = SiteState.from_registration(name, from_shareable(result).data)

            self._offered.add(name)
            task = Task(
                name=P.TASK_REGISTER,
                data=DXO(DataKind.COLLECTION, {P.CONFIG: self._site_config(run_id, checkpoint_step)}).to_shareable(),
                timeout=int(self.run_config.register_timeout),
                result_received_cb=received,
            )
            self.send(task, fl_ctx, targets=[name])

    def _admit_rejoined(self, coordinator, global_step: int, fl_ctx: FLContext) -> None:
        for name in sorted(self._returning):
            state = self._returning.pop(name)
            if name in coordinator.away:
                coordinator.rejoin(state)
                self._note_membership("rejoined", name, global_step + 1, state.describe(), coordinator, fl_ctx)

    def _save_checkpoint(self, trainer: GeneratorTrainer, run_id: str, global_step: int) -> Path:
        folder = trainer.save(self.out_dir / "checkpoint")
        (folder / RUN_FILE).write_text(json.dumps({"run_id": run_id, "global_step": global_step}))
        return folder

    def _stop_for_sites(self, problem: str, trainer: GeneratorTrainer, run_id: str, global_step: int, fl_ctx):
        folder = self._save_checkpoint(trainer, run_id, global_step)
        self.system_panic(
            f"ModalityBank cannot go on at step {global_step}: {problem}. A checkpoint of step {global_step} is in "
            f"{folder}: copy it out and rerun with server.resume_from set to it once the sites are back",
            fl_ctx,
        )

    # ------------------------------------------------------------------ outputs
    def _record_losses(self, losses: dict, global_step: int) -> None:
        for site, values in sorted(losses.items()):
            for name, value in values.items():
                self.writer.add_scalar(f"loss/{name}/{site}", value, global_step)

    def _save_samples(self, trainer: GeneratorTrainer, masks: torch.Tensor, global_step: int) -> None:
        fakes = trainer.synthesize(masks)
        titles = ["mask"] + [f"synthetic {m}" for m in fakes]
        rows = [[mask_picture(masks[i])] + [fakes[m][i, 0].numpy() for m in fakes] for i in range(masks.shape[0])]
        path = save_grid(rows, titles, self.out_dir / "samples" / f"step_{global_step:06d}.png", f"step {global_step}")
        self.writer.add_image("samples", grid_array(path), global_step, dataformats="HWC")

    def _write_summary(self, config: GeneratorConfig, sites: list[SiteState], timings: dict, waits: dict) -> None:
        summary = {
            "config": asdict(config),
            "sites": {
                s.name: {"modalities": list(s.modalities), "num_samples": s.num_samples, "shares_masks": s.shares_masks}
                for s in sites
            },
            "steps": {phase: len(t) for phase, t in timings.items()},
            "steps_per_second": {phase: len(t) / sum(t) for phase, t in timings.items() if t},
            "median_step_seconds": {phase: float(np.median(t)) for phase, t in timings.items() if t},
            "median_wait_seconds": {phase: float(np.median(t)) for phase, t in waits.items() if t},
            # Every step's time, and of it the wait for the sites: for benchmarks and regressions.
            "step_seconds": {phase: [round(x, 5) for x in t] for phase, t in timings.items()},
            # Sites dropped (no answer within step_timeout) and rejoined, by global step.
            "membership": self.membership,
            "peak_gpu_memory_bytes": peak_gpu_memory(self.device),
            "wait_seconds": {phase: [round(x, 5) for x in t] for phase, t in waits.items()},
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _mean_by_name(losses: dict) -> dict:
    """Loss scalars averaged over sites, keyed "<modality>/<name>", rounded for the log line."""
    collected: dict[str, list[float]] = {}
    for values in losses.values():
        for name, value in values.items():
            collected.setdefault(name, []).append(value)
    return {name: round(float(np.mean(v)), 4) for name, v in sorted(collected.items())}
