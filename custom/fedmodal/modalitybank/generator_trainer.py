"""The server half of ModalityBank: the central generator, its bank and their optimizers.

No NVFlare here: the federated controller and the centralised benchmark drive the same class.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fedmodal.amp import MixedPrecision
from fedmodal.atomic import save_atomically
from fedmodal.modalitybank.config import GeneratorConfig
from fedmodal.nets import madafm
from fedmodal.nets.generator import ResnetGenerator

logger = logging.getLogger(__name__)

GENERATOR_FILE = "generator.pt"
BANK_DIR = "bank"
TRAINER_STATE_FILE = "trainer_state.pt"
CONDITION_CHANNELS = 2  # label map + brain contour (fedmodal.data.datasets.condition_map)


def linear_decay_factor(step: int, total: int) -> float:
    """pix2pix schedule: 1 for the first half of a phase, then linearly down to 0 at its end."""
    half = total / 2.0
    if total <= 0 or step < half:
        return 1.0
    return max(0.0, (total - step) / max(half, 1.0))


def build_generator(config: GeneratorConfig) -> torch.nn.Module:
    out_channels = len(config.target_modalities) if config.mode == "asyndgan" else 1
    return ResnetGenerator(
        spatial_dims=config.spatial_dims,
        in_channels=CONDITION_CHANNELS,
        out_channels=out_channels,
        ngf=config.ngf,
        n_blocks=config.n_blocks,
        upsample=config.upsample,
    )


@dataclass
class TrainerProgress:
    phase_index: int = 0
    step: int = 0  # steps done in the current phase
    history: list = field(default_factory=list)


class GeneratorTrainer:
    """Owns G (and the bank), produces fakes for conditioning masks and applies site gradients.

    Args:
        config: the generator's shape and schedule.
        device: torch device for G.
        precision: G's arithmetic (`fedmodal.amp`; "auto": mixed precision on CUDA only).
    """

    def __init__(self, config: GeneratorConfig, device: torch.device | str = "cpu", precision: str = "auto"):
        if not config.target_modalities:
            raise ValueError("the generator has no target modalities (resolve them from the sites first)")
        self.config = config
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.generator = build_generator(config).to(self.device)
        self.amp = MixedPrecision(
            precision, self.device, bf16_on_cpu=True
        )  # measured: benchmarks/bench_generator_settings.py
        self.progress = TrainerProgress()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._enter_phase()

    # ---------------------------------------------------------------- phases
    @property
    def phase(self) -> str:
        return self.config.phases[min(self.progress.phase_index, len(self.config.phases) - 1)][0]

    @property
    def phase_steps(self) -> int:
        return self.config.phases[min(self.progress.phase_index, len(self.config.phases) - 1)][1]

    @property
    def finished(self) -> bool:
        return self.progress.phase_index >= len(self.config.phases)

    @property
    def modulated(self) -> bool:
        return bool(madafm.modulated_convs(self.generator))

    def active_modalities(self) -> tuple[str, ...]:
        return self.config.phase_modalities(self.phase)

    def _enter_phase(self) -> None:
        """Set up the optimizer for the current phase (and freeze G when the bank phase starts).

        Phases of zero steps are skipped: `bank_steps=0` pretrains only (G stays plain), and
        `pretrain_steps=0` goes straight to the bank (after `load_pretrained`).
        """
        while not self.finished and self.phase_steps == 0:
            self.progress.phase_index += 1
        if self.finished:
            return
        if self.phase == "bank":
            if not self.modulated:
                madafm.modulate(self.generator, target=self.config.modulate)
                for modality in self.config.target_modalities:
                    madafm.add_modality(self.generator, modality)
                self.generator.to(self.device)
            trained = self.config.phase_modalities("bank")
            params = [p for m in trained for p in madafm.bank_parameters(self.generator, m)]
        else:
            params = list(self.generator.parameters())
        self.optimizer = torch.optim.Adam(params, lr=self.config.lr, betas=(self.config.beta1, 0.999))
        total = self.phase_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: linear_decay_factor(step, total)
        )

    def _advance(self) -> None:
        self.progress.step += 1
        if self.progress.step >= self.phase_steps:
            logger.info("phase %s finished after %d steps", self.phase, self.progress.step)
            self.progress.phase_index += 1
            self.progress.step = 0
            self._enter_phase()

    # ---------------------------------------------------------------- forward/backward
    def _forward(self, cond: torch.Tensor, modality: str) -> torch.Tensor:
        if self.config.mode == "asyndgan":
            channel = self.config.target_modalities.index(modality)
            return self._run(cond)[:, channel : channel + 1]
        if self.modulated:
            madafm.set_modality(self.generator, modality)
        return self._run(cond)

    def _run(self, cond: torch.Tensor) -> torch.Tensor:
        # Fakes leave as fp32 whatever G computes in: sites' losses and the wire expect it.
        with self.amp.autocast():
            return self.generator(cond).float()

    def generate(self, cond_by_modality: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fakes (with graph) for each modality's conditioning batch, for a training step."""
        self.generator.train()
        return {m: self._forward(c.to(self.device), m) for m, c in cond_by_modality.items()}

    def generate_all(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """AsynDGAN: one forward pass gives every modality's fakes (with graph) for `cond`."""
        if self.config.mode != "asyndgan":
            raise RuntimeError("generate_all needs the multi-channel AsynDGAN generator")
        self.generator.train()
        out = self._run(cond.to(self.device))
        return {m: out[:, i : i + 1] for i, m in enumerate(self.config.target_modalities)}

    def apply_gradients(self, fakes: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        """Backpropagate the sites' d(loss)/d(fake) through G and take one optimizer step."""
        names = [m for m in fakes if m in grads]
        if names:
            self.amp.step_from(
                [fakes[m] for m in names], [grads[m].to(self.device, fakes[m].dtype) for m in names], self.optimizer
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._advance()

    @torch.no_grad()
    def synthesize(self, cond: torch.Tensor, modalities: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Fakes without graph for every requested modality (default: every modality G knows)."""
        self.generator.eval()
        modalities = modalities or self.known_modalities()
        out = {m: self._forward(cond.to(self.device), m).cpu() for m in modalities}
        self.generator.train()
        return out

    def known_modalities(self) -> tuple[str, ...]:
        if self.config.mode == "asyndgan" or self.modulated:
            return self.config.target_modalities
        return (self.config.source_modality,)

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: str | os.PathLike) -> Path:
        """Write G's frozen part, each bank entry (a small file each) and the resume state.

        Files are written to temporary names and renamed, so a crash never leaves a torn one.
        """
        directory = Path(directory)
        (directory / BANK_DIR).mkdir(parents=True, exist_ok=True)
        frozen = madafm.frozen_state_dict(self.generator) if self.modulated else self.generator.state_dict()
        _atomic_save(
            {"config": asdict(self.config), "modulated": self.modulated, "state_dict": frozen},
            directory / GENERATOR_FILE,
        )
        if self.modulated:
            for modality in self.config.target_modalities:
                _atomic_save(madafm.bank_state_dict(self.generator, modality), directory / BANK_DIR / f"{modality}.pt")
        _atomic_save(
            {
                "progress": asdict(self.progress),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng": torch.get_rng_state(),
            },
            directory / TRAINER_STATE_FILE,
        )
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        return directory

    def load_pretrained(self, directory: str | os.PathLike) -> None:
        """Start from a generator pretrained elsewhere (e.g. `fedmodal pretrain-generator` on a
        dataset at the server) and skip this run's pretraining phase."""
        directory = Path(directory)
        saved = torch.load(directory / GENERATOR_FILE, map_location="cpu", weights_only=False)
        if saved["modulated"]:
            raise ValueError(f"{directory} holds a modulated generator; pretraining needs the plain one")
        shape_fields = ("spatial_dims", "ngf", "n_blocks", "upsample")
        differing = [f for f in shape_fields if saved["config"][f] != getattr(self.config, f)]
        if differing or self.config.mode != "bank":
            raise ValueError(f"cannot start this run from {directory}: it differs in {differing or ['mode']}")
        # A fresh plain G takes the weights; entering the bank phase then freezes and modulates it.
        self.generator = build_generator(self.config)
        self.generator.load_state_dict(saved["state_dict"])
        self.generator.to(self.device)
        self.progress = TrainerProgress(phase_index=1)
        self._enter_phase()
        logger.info("pretrained generator loaded from %s; pretraining skipped", directory)

    @classmethod
    def resume(
        cls, directory: str | os.PathLike, config: GeneratorConfig, device="cpu", precision: str = "auto"
    ) -> GeneratorTrainer:
        """Rebuild a trainer from `save` output; `config` must describe the same generator."""
        directory = Path(directory)
        saved = torch.load(directory / GENERATOR_FILE, map_location="cpu", weights_only=False)
        saved_config = GeneratorConfig.from_dict(saved["config"], where=str(directory / GENERATOR_FILE))
        shape_fields = (
            "mode",
            "spatial_dims",
            "image_size",
            "ngf",
            "n_blocks",
            "upsample",
            "modulate",
            "target_modalities",
        )
        differing = [f for f in shape_fields if getattr(saved_config, f) != getattr(config, f)]
        if differing:
            raise ValueError(f"cannot resume from {directory}: the checkpoint differs in {differing}")
        trainer = cls(config, device, precision)
        state = torch.load(directory / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
        progress = TrainerProgress(**state["progress"])
        saved_phases = [p for p in saved_config.phases if p[1] > 0]
        if progress.phase_index >= len(saved_config.phases) and saved_phases:
            # A finished run: continue its last phase if `config` gives that phase more steps.
            last = saved_phases[-1]
            progress = TrainerProgress(phase_index=saved_config.phases.index(last), step=last[1])
        trainer.progress = progress
        load_generator_weights(trainer.generator, directory, saved)
        trainer._enter_phase()
        if trainer.progress.step >= trainer.phase_steps and not trainer.finished:
            trainer.progress.phase_index, trainer.progress.step = trainer.progress.phase_index + 1, 0
            trainer._enter_phase()
        # The optimizer state belongs to the phase it was saved in; a later phase starts its own.
        same_phase = not trainer.finished and trainer.progress.phase_index == progress.phase_index
        if state["optimizer"] is not None and trainer.optimizer is not None and same_phase:
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        logger.info("resumed from %s at phase %s step %d", directory, trainer.phase, trainer.progress.step)
        return trainer


def load_generator_weights(generator: torch.nn.Module, directory: Path, saved: dict) -> None:
    if saved["modulated"]:
        if not madafm.modulated_convs(generator):
            madafm.modulate(generator, target=saved["config"]["modulate"])
        generator.load_state_dict(saved["state_dict"], strict=False)
        for bank_file in sorted((directory / BANK_DIR).glob("*.pt")):
            modality = bank_file.stem
            if modality not in madafm.modalities(generator):
                madafm.add_modality(generator, modality)
            madafm.load_bank_state_dict(generator, modality, torch.load(bank_file, map_location="cpu"))
    else:
        generator.load_state_dict(saved["state_dict"])


def load_trained_generator(directory: str | os.PathLike, device="cpu", precision: str = "auto") -> GeneratorTrainer:
    """A trainer holding the generator saved in `directory`, ready for `synthesize`."""
    directory = Path(directory)
    if not (directory / GENERATOR_FILE).is_file():
        raise FileNotFoundError(f"no {GENERATOR_FILE} in {directory}: is it a ModalityBank checkpoint folder?")
    saved = torch.load(directory / GENERATOR_FILE, map_location="cpu", weights_only=False)
    config = GeneratorConfig.from_dict(saved["config"], where=str(directory / GENERATOR_FILE))
    trainer = GeneratorTrainer(config, device, precision)
    load_generator_weights(trainer.generator, directory, saved)
    trainer.generator.to(trainer.device)
    if saved["modulated"]:
        trainer.progress.phase_index = len(config.phases)  # only for synthesis
    return trainer


def _atomic_save(obj, path: Path) -> None:
    save_atomically(path, lambda temp: torch.save(obj, temp))
