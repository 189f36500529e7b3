"""ModalityBank's server workflow: G and its bank stay here; each step every site gets its fakes.

Protocol (METHODS.md section 1): register once (masks + keys, or keys only for sites that
keep their masks), then per step: sample a batch of masks per site, draw augmentation, run G
per modality over the masks of the sites holding it, send each site its own fakes, wait for
every site's d(loss)/d(fake), weight by data share and step G.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FilterKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import ReturnCode, Shareable, make_reply
from nvflare.apis.signal import Signal

from fedmodal.fl.direct import TASK_DATA, TASK_RESULT, filter_like_task
from fedmodal.fl.site import select_device
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.coordinator import SiteState, StepCoordinator, resolve_config
from fedmodal.modalitybank.generator_trainer import GeneratorConfig, GeneratorTrainer
from fedmodal.modalitybank.grids import grid_array, mask_picture, save_grid

logger = logging.getLogger(__name__)

OUTPUT_DIR = "modalitybank"
RUN_FILE = "run.json"  # in a checkpoint: the run's id and global step, for the sites' state on resume
STEP_TRANSPORTS = ("direct", "task")
# Return codes a site sets itself (its log says why); anything else means the message got no answer.
SITE_REPORTED = (
    ReturnCode.EXECUTION_EXCEPTION,
    ReturnCode.TASK_DATA_FILTER_ERROR,
    ReturnCode.TASK_RESULT_FILTER_ERROR,
    ReturnCode.TASK_UNKNOWN,
    ReturnCode.TOPIC_UNKNOWN,
)


class ModalityBankController(Controller):
    """Server side of ModalityBank (and of its AsynDGAN baseline with `mode="asyndgan"`).

    Args:
        mode: "bank" or "asyndgan" (see GeneratorConfig).
        image_size: side of the synthesised slices; sites resample their data to it.
        ngf: generator width; 64 in the paper.
        n_blocks: residual blocks; 9 in the paper.
        modulate: "resblocks" or "all" convs under the bank.
        source_modality: modality of the pretraining phase.
        target_modalities: modalities to learn; empty means every modality some site holds.
        pretrain_steps: G steps of the pretraining phase.
        bank_steps: G steps of the bank phase.
        batch_size: masks per site per step.
        lr: Adam learning rate of G and of the sites' discriminators.
        max_shift: augmentation shift in voxels.
        slices: which axial slices sites train on: "tumour" or "brain".
        seed: run seed; sites derive theirs from it and their names.
        min_sites: sites required to start.
        step_timeout: seconds to wait for every site's step result before stopping the run.
        log_every: steps between progress lines.
        sample_every: steps between sample grids (PNG + TensorBoard).
        checkpoint_every: steps between checkpoints (always at phase ends and at the end).
        preview_count: masks per site in the final real-vs-synthetic grids drawn at the sites.
        resume_from: checkpoint folder of an earlier run to continue from.
        pretrained_generator: checkpoint folder of a plain generator pretrained elsewhere (e.g.
            `fedmodal pretrain-generator` on a dataset the server holds); skips pretraining.
        device: "auto", "cpu" or "cuda[:i]".
        num_threads: torch CPU threads at the server (0 keeps torch's default).
        task_check_period: how often the workflow checks for finished tasks (seconds).
        step_transport: how step payloads travel. "direct" pushes them to the sites as NVFlare
            aux messages through the same filters as tasks (one round trip per step); "task"
            sends NVFlare tasks, which wait for each site's next poll.
    """

    def __init__(
        self,
        mode: str = "bank",
        image_size: int = 64,
        ngf: int = 32,
        n_blocks: int = 4,
        modulate: str = "resblocks",
        source_modality: str = "t1",
        target_modalities: list[str] | None = None,
        pretrain_steps: int = 200,
        bank_steps: int = 300,
        batch_size: int = 4,
        lr: float = 2e-4,
        max_shift: int = 4,
        slices: str = "tumour",
        seed: int = 0,
        min_sites: int = 2,
        step_timeout: float = 600.0,
        log_every: int = 20,
        sample_every: int = 100,
        checkpoint_every: int = 200,
        preview_count: int = 4,
        resume_from: str = "",
        pretrained_generator: str = "",
        device: str = "auto",
        num_threads: int = 0,
        task_check_period: float = 0.05,
        step_transport: str = "direct",
    ):
        super().__init__(task_check_period=task_check_period)
        if step_transport not in STEP_TRANSPORTS:
            raise ValueError(f"step_transport must be one of {STEP_TRANSPORTS}, got {step_transport!r}")
        self.step_transport = step_transport
        self.requested_targets = tuple(target_modalities or ())
        self.config_args = dict(
            mode=mode,
            spatial_dims=2,
            image_size=image_size,
            ngf=ngf,
            n_blocks=n_blocks,
            modulate=modulate,
            source_modality=source_modality,
            pretrain_steps=pretrain_steps,
            bank_steps=bank_steps,
            batch_size=batch_size,
            lr=lr,
            max_shift=max_shift,
            seed=seed,
        )
        self.slices = slices
        self.min_sites = min_sites
        self.step_timeout = step_timeout
        self.log_every = max(1, log_every)
        self.sample_every = sample_every
        self.checkpoint_every = checkpoint_every
        self.preview_count = preview_count
        self.resume_from = resume_from
        self.pretrained_generator = pretrained_generator
        self.device_name = device
        self.num_threads = num_threads
        self.out_dir: Path | None = None
        self.writer = None
        self.senders: ThreadPoolExecutor | None = None  # direct transport: one request per site at once

    # ------------------------------------------------------------------ lifecycle
    def start_controller(self, fl_ctx: FLContext):
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self.out_dir = Path(run_dir) / OUTPUT_DIR
        self.out_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out_dir / "tb"))
        self.device = select_device(self.device_name, self.num_threads)
        self.log_info(fl_ctx, f"ModalityBank outputs go to {self.out_dir}")

    def stop_controller(self, fl_ctx: FLContext):
        if self.writer is not None:
            self.writer.close()
        if self.senders is not None:
            self.senders.shutdown(wait=False, cancel_futures=True)

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
        config = resolve_config(self.config_args, self.requested_targets, sites)
        trainer = (
            GeneratorTrainer.resume(self.resume_from, config, self.device)
            if self.resume_from
            else GeneratorTrainer(config, self.device)
        )
        if self.pretrained_generator and not self.resume_from:
            trainer.load_pretrained(self.pretrained_generator)
        coordinator = StepCoordinator(trainer, sites, np.random.default_rng(config.seed))
        sample_masks = coordinator.sample_masks()
        timings: dict[str, list[float]] = {}  # seconds per step, by phase
        waits: dict[str, list[float]] = {}  # of which waiting for the sites (transport + site compute)
        total_steps = sum(n for _, n in config.phases)
        global_step = sum(n for _, n in config.phases[: trainer.progress.phase_index]) + trainer.progress.step
        while not trainer.finished:
            phase, step, phase_steps = trainer.phase, trainer.progress.step, trainer.phase_steps
            phase_ends = step + 1 >= phase_steps
            # Checkpoints at phase ends and every checkpoint_every steps; the sites save with them.
            saves = phase_ends or bool(self.checkpoint_every and (global_step + 1) % self.checkpoint_every == 0)
            started = time.perf_counter()
            payloads = coordinator.step_payloads(checkpoint_step=global_step + 1 if saves else None)
            sent = time.perf_counter()
            if self.step_transport == "direct":
                replies = self._exchange_direct(P.TASK_STEP, payloads, fl_ctx)
            else:
                replies = self._exchange(P.TASK_STEP, payloads, abort_signal, fl_ctx)
            if replies is None:
                return
            received = time.perf_counter()
            losses = coordinator.finish_step(replies)
            finished = time.perf_counter()
            timings.setdefault(phase, []).append(finished - started)
            waits.setdefault(phase, []).append(received - sent)
            global_step += 1
            self._record_losses(losses, global_step)
            if (step + 1) % self.log_every == 0 or phase_ends:
                recent = timings[phase][-self.log_every :]
                rate = len(recent) / max(sum(recent), 1e-9)
                record = {
                    "phase": phase,
                    "step": step + 1,
                    "of": phase_steps,
                    "steps_per_s": round(rate, 3),
                    "eta_s": round((total_steps - global_step) / max(rate, 1e-9)),
                    "losses": _mean_by_name(losses),
                }
                self.log_info(fl_ctx, "progress " + json.dumps(record))
                self.writer.add_scalar("speed/steps_per_s", rate, global_step)
            if self.sample_every and (global_step % self.sample_every == 0 or trainer.finished):
                self._save_samples(trainer, sample_masks, global_step)
            if saves:
                trainer.save(self.out_dir / "checkpoint")
                run_file = self.out_dir / "checkpoint" / RUN_FILE
                run_file.write_text(json.dumps({"run_id": run_id, "global_step": global_step}))
        previews = coordinator.preview_payloads(self.preview_count)
        if self._exchange(P.TASK_PREVIEW, previews, abort_signal, fl_ctx) is None:
            return
        self._write_summary(config, sites, timings, waits)
        self.log_info(fl_ctx, f"ModalityBank finished; checkpoint in {self.out_dir / 'checkpoint'}")

    def _run_identity(self, fl_ctx: FLContext) -> tuple[str, int | None]:
        """The run's id and, when resuming, the global step of the checkpoint resumed from."""
        if not self.resume_from:
            return uuid.uuid4().hex[:12], None
        run_file = Path(self.resume_from) / RUN_FILE
        if not run_file.is_file():  # a checkpoint written before runs had ids
            self.log_warning(fl_ctx, f"{run_file} missing: the sites' discriminators start afresh")
            return uuid.uuid4().hex[:12], None
        run = json.loads(run_file.read_text())
        return str(run["run_id"]), int(run["global_step"])

    def _register(
        self, abort_signal: Signal, fl_ctx: FLContext, run_id: str, resume_step: int | None
    ) -> list[SiteState] | None:
        """Ask every site for its keys (and masks, where the site shares them)."""
        site_config = {
            "image_size": self.config_args["image_size"],
            "slices": self.slices,
            "seed": self.config_args["seed"],
            "batch_size": self.config_args["batch_size"],
            P.RUN_ID: run_id,
            P.RESUME_STEP: resume_step,
        }
        task = Task(
            name=P.TASK_REGISTER,
            data=DXO(DataKind.COLLECTION, {P.CONFIG: site_config}).to_shareable(),
            timeout=int(self.step_timeout),
        )
        clients = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        if len(clients) < self.min_sites:
            self.system_panic(f"{len(clients)} sites connected ({clients}); {self.min_sites} required", fl_ctx)
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
        if len(sites) < self.min_sites:
            self.system_panic(f"only {len(sites)} sites registered; {self.min_sites} required", fl_ctx)
            return None
        return sites

    def _exchange(self, task_name: str, payloads: dict[str, dict], abort_signal: Signal, fl_ctx: FLContext):
        """Send each site its own payload at once, wait for all replies (site -> reply data).

        Results are collected by the task's callback, which wakes this thread when the last one
        arrives: no polling between the server's compute and the next exchange.
        """
        replies: dict[str, Shareable] = {}
        all_in = threading.Event()
        lock = threading.Lock()

        def received(client_task: ClientTask, fl_ctx: FLContext) -> None:
            with lock:
                replies[client_task.client.name] = client_task.result
                if len(replies) == len(payloads):
                    all_in.set()

        for name, payload in payloads.items():
            data = DXO(DataKind.COLLECTION, payload).to_shareable()
            task = Task(name=task_name, data=data, timeout=int(self.step_timeout), result_received_cb=received)
            self.send(task, fl_ctx, targets=[name])
        deadline = time.monotonic() + self.step_timeout
        while not all_in.wait(timeout=0.5):
            if abort_signal.triggered:
                return None
            if time.monotonic() > deadline:
                with lock:
                    late = sorted(set(payloads) - set(replies))
                self.system_panic(
                    f"sites {late} sent no {task_name} result within {self.step_timeout}s. In the simulator, run "
                    f"with as many threads as sites (-t), so every site takes part in each synchronous step",
                    fl_ctx,
                )
                return None
        return self._reply_data(task_name, replies, fl_ctx)

    def _exchange_direct(self, task_name: str, payloads: dict[str, dict], fl_ctx: FLContext):
        """Like `_exchange`, but pushed as aux messages (fedmodal.fl.direct): no poll to wait for."""
        engine = fl_ctx.get_engine()

        def send(name: str) -> Shareable | None:
            # One request per site, in parallel (NVFlare 2.9's multicast_aux_requests fails on a
            # keyword its cell does not take). Each in its own context: the filters mark the
            # context with the task's name, which must not stick to the workflow's.
            with engine.new_context() as ctx:
                try:
                    request = DXO(DataKind.COLLECTION, payloads[name]).to_shareable()
                    request = filter_like_task(TASK_DATA, FilterKey.OUT, task_name, request, ctx)
                    reply = (engine.send_aux_request([name], task_name, request, float(self.step_timeout), ctx) or {}).get(name)
                    if reply is not None and reply.get_return_code() == ReturnCode.OK:
                        reply = filter_like_task(TASK_RESULT, FilterKey.IN, task_name, reply, ctx)
                    return reply
                except Exception as e:  # a server-side filter refused: the run stops naming the site
                    self.log_exception(ctx, f"{task_name} with site {name} failed at the server: {e}")
                    return make_reply(ReturnCode.EXECUTION_EXCEPTION)

        if self.senders is None:
            self.senders = ThreadPoolExecutor(max_workers=len(payloads), thread_name_prefix="mb-direct")
        replies = dict(zip(payloads, self.senders.map(send, list(payloads))))
        if fl_ctx.get_run_abort_signal() and fl_ctx.get_run_abort_signal().triggered:
            return None
        return self._reply_data(task_name, replies, fl_ctx)

    def _reply_data(self, task_name: str, replies: dict[str, Shareable | None], fl_ctx: FLContext) -> dict | None:
        """Each site's reply data, in site order; the run stops at the first site that failed."""
        out = {}
        for name in sorted(replies):
            result = replies[name]
            code = None if result is None else result.get_return_code()
            if code != ReturnCode.OK:
                if code in SITE_REPORTED:
                    reason = "see its log"
                else:  # the message got no answer: the site's process is gone, hung or unreachable
                    reason = (
                        f"no answer within {self.step_timeout}s or the site is unreachable. In the simulator, run "
                        f"with as many threads as sites (-t), so no site process is recycled during the run"
                    )
                self.system_panic(f"site {name} failed {task_name} (return code {code}): {reason}", fl_ctx)
                return None
            out[name] = from_shareable(result).data
        return out

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
