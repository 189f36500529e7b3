"""The server's side of one ModalityBank exchange, independent of how messages travel.

`StepCoordinator` turns the sites' registrations into per-step payloads (each site its own
fakes and augmentation) and the sites' replies into one generator step. The NVFlare controller
moves these payloads as tasks; the centralised benchmark hands them to in-process site workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedmodal import MODALITIES
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.config import GeneratorConfig
from fedmodal.modalitybank.generator_trainer import GeneratorTrainer


@dataclass
class SiteState:
    """What the server knows of one site: keys, masks if shared, modalities held, sample count."""

    name: str
    modalities: tuple[str, ...]
    num_samples: int
    keys: list[str]
    shares_masks: bool
    masks: torch.Tensor | None = None  # (N, 2, *spatial) conditioning maps, sharing sites only
    pending_keys: list[str] = field(default_factory=list)  # non-sharing sites: their next batch
    pending_masks: torch.Tensor | None = None

    @staticmethod
    def from_registration(name: str, reply: dict) -> SiteState:
        masks = P.decode_masks(reply[P.MASK_CODES]) if reply.get(P.MASK_CODES) is not None else None
        shares = bool(reply[P.SHARES_MASKS])
        unknown = sorted(set(reply[P.SITE_MODALITIES]) - set(MODALITIES))
        if unknown:
            raise ValueError(f"site {name} registered unknown modalities {unknown}")
        state = SiteState(
            name=name,
            modalities=tuple(reply[P.SITE_MODALITIES]),
            num_samples=int(reply[P.NUM_SAMPLES]),
            keys=list(reply.get(P.SAMPLE_KEYS) or []),
            shares_masks=shares,
            masks=masks if shares else None,
        )
        if shares and (masks is None or masks.shape[0] != state.num_samples or len(state.keys) != state.num_samples):
            raise ValueError(
                f"site {name} registered {state.num_samples} samples but sent a different number of masks or keys"
            )
        if not shares:
            state.pending_keys, state.pending_masks = list(reply[P.NEXT_KEYS]), masks
        return state

    def describe(self) -> str:
        return (
            f"site {self.name}: {self.num_samples} samples, modalities {list(self.modalities)}, "
            f"{'shares' if self.shares_masks else 'keeps'} its masks"
        )


def resolve_config(generator: GeneratorConfig, sites: list[SiteState]) -> GeneratorConfig:
    """The generator config, with empty target modalities resolved to every modality some site holds."""
    held = {m for s in sites for m in s.modalities}
    targets = generator.target_modalities or tuple(m for m in MODALITIES if m in held)
    missing = [m for m in targets if m not in held]
    if missing:
        raise ValueError(f"target modalities {missing} are held by no site; sites hold {sorted(held)}")
    if generator.mode == "bank" and generator.source_modality not in held:
        raise ValueError(f"source modality {generator.source_modality!r} is held by no site; sites hold {sorted(held)}")
    return generator.with_values(target_modalities=targets)


@dataclass
class _Plan:
    batches: dict  # site -> (modalities, keys, augmented masks, AugmentParams)
    members: dict  # modality -> sites in the order their fakes are stacked
    fakes: dict  # modality -> fakes with graph


class StepCoordinator:
    """Plans each exchange and applies its results to the trainer.

    Args:
        trainer: the generator trainer (G, bank, optimizers).
        sites: registered sites, sorted by name so results combine in a fixed order.
        rng: the server's random generator (mask sampling, augmentation).
        wire_precision: "float32" or "float16" for fakes and gradients (`protocol.pack`).
    """

    def __init__(
        self,
        trainer: GeneratorTrainer,
        sites: list[SiteState],
        rng: np.random.Generator,
        wire_precision: str = "float32",
    ):
        if wire_precision not in P.WIRE_PRECISIONS:
            raise ValueError(f"wire_precision must be one of {P.WIRE_PRECISIONS}, got {wire_precision!r}")
        self.wire_precision = wire_precision
        self.trainer = trainer
        self.sites = {s.name: s for s in sorted(sites, key=lambda s: s.name)}  # the live sites
        self.away: dict[str, SiteState] = {}  # dropped sites, until they register again
        self.rng = rng
        self._plan: _Plan | None = None

    # ---------------------------------------------------------------- membership
    def drop(self, name: str) -> None:
        """Take a site out of the next steps (it did not answer); it may `rejoin` later."""
        self.away[name] = self.sites.pop(name)

    def rejoin(self, state: SiteState) -> None:
        """Bring a site back with a fresh registration (its keys and masks may have changed)."""
        self.away.pop(state.name, None)
        self.sites = dict(sorted({**self.sites, state.name: state}.items()))

    def cannot_continue(self, min_sites: int) -> str | None:
        """Why the live sites cannot carry the current phase, or None when they can."""
        if self.trainer.finished:
            return None
        held = {m for s in self.sites.values() for m in s.modalities}
        missing = [m for m in self.trainer.active_modalities() if m not in held]
        problems = []
        if len(self.sites) < min_sites:
            problems.append(f"{len(self.sites)} live sites ({sorted(self.sites)}), fewer than min_sites {min_sites}")
        if missing:
            problems.append(f"no live site holds {missing} (away: {sorted(self.away)})")
        return "; ".join(problems) or None

    def step_payloads(self, checkpoint_step: int | None = None) -> dict[str, dict]:
        """Per site: its keys, augmentation table and fakes of the modalities it holds.

        `checkpoint_step`: the server checkpoints after this step, at this global step; the sites
        then save their discriminators under it.
        """
        trainer, config = self.trainer, self.trainer.config
        active = trainer.active_modalities()
        batches = {}
        for name, site in self.sites.items():
            modalities = [m for m in active if m in site.modalities]
            if not modalities:
                continue
            if site.shares_masks:
                index = self.rng.choice(
                    site.num_samples, size=config.batch_size, replace=site.num_samples < config.batch_size
                )
                keys, masks = [site.keys[i] for i in index], site.masks[torch.as_tensor(index)]
            else:
                keys, masks = site.pending_keys, site.pending_masks
            augment = P.AugmentParams.draw(self.rng, len(keys), config.spatial_dims, config.max_shift)
            batches[name] = (modalities, keys, P.apply_augment(masks, augment, fill=-1.0), augment)
        members = {m: [n for n, b in batches.items() if m in b[0]] for m in active}
        if config.mode == "asyndgan":
            # One pass over every site's masks yields all modalities; each modality keeps the
            # rows of the sites that hold it (views of the same graph, so backward is one pass too).
            every = trainer.generate_all(torch.cat([b[2] for b in batches.values()]))
            rows, start = {}, 0
            for name, batch in batches.items():
                rows[name] = slice(start, start + len(batch[1]))
                start += len(batch[1])
            fakes = {m: torch.cat([every[m][rows[n]] for n in members[m]]) for m in active if members[m]}
        else:
            fakes = {
                m: trainer.generate({m: torch.cat([batches[n][2] for n in members[m]])})[m]
                for m in active
                if members[m]
            }
        self._plan = _Plan(batches, members, fakes)
        payloads = {}
        for name, (modalities, keys, _, augment) in batches.items():
            payload = {
                P.PHASE: trainer.phase,
                P.STEP: trainer.progress.step,
                P.PHASE_STEPS: trainer.phase_steps,
                P.KEYS: list(keys),
                P.AUGMENT: augment.table,
                P.CHECKPOINT: checkpoint_step,
            }
            if self.wire_precision != "float32":
                payload[P.WIRE] = self.wire_precision
            for modality in modalities:
                payload.update(P.pack(P.FAKE_PREFIX + modality, self._fake_slice(modality, name), self.wire_precision))
            payloads[name] = payload
        return payloads

    def state(self, name: str) -> SiteState:
        """A site's state, live or away."""
        return self.sites[name] if name in self.sites else self.away[name]

    def _fake_slice(self, modality: str, name: str) -> torch.Tensor:
        start = 0
        for member in self._plan.members[modality]:
            size = len(self._plan.batches[member][1])
            if member == name:
                return self._plan.fakes[modality][start : start + size]
            start += size
        raise KeyError(f"site {name} got no {modality} fakes this step")

    def finish_step(self, replies: dict[str, dict], dropped=()) -> dict[str, dict]:
        """Weight each site's gradient by its data share, step G; returns losses per site.

        `dropped`: sites that got this step's fakes but did not answer. Their fakes get no
        gradient and the others' shares are renormalised over the sites that answered.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("finish_step without step_payloads")
        absent = sorted(set(plan.batches) - set(replies) - set(dropped))
        if absent:
            raise ValueError(f"no step result from sites {absent}")
        grads = {}
        for modality, names in plan.members.items():
            answered = [n for n in names if n in replies]
            if not answered:
                if names:
                    raise ValueError(f"no site that holds {modality} answered this step (dropped: {sorted(dropped)})")
                continue
            total = sum(self.state(n).num_samples for n in answered)
            parts = []
            for name in names:
                if name not in replies:
                    parts.append(torch.zeros(self._fake_slice(modality, name).shape))
                    continue
                key = P.GRAD_PREFIX + modality
                if key not in replies[name]:
                    raise ValueError(f"site {name} returned no {modality} gradient")
                grad = P.unpack(replies[name], key)
                expected = tuple(self._fake_slice(modality, name).shape)
                if tuple(grad.shape) != expected:
                    raise ValueError(
                        f"site {name} returned a {modality} gradient of shape {tuple(grad.shape)}, expected {expected}"
                    )
                if not torch.isfinite(grad).all():
                    raise ValueError(f"site {name} returned a non-finite {modality} gradient")
                parts.append(grad * (self.state(name).num_samples / total))
            grads[modality] = torch.cat(parts)
        losses = {}
        for name in sorted(replies):
            reply = replies[name]
            losses[name] = dict(reply.get(P.LOSSES, {}))
            site = self.state(name)
            if not site.shares_masks:
                site.pending_keys = list(reply[P.NEXT_KEYS])
                site.pending_masks = P.decode_masks(reply[P.MASK_CODES])
        self.trainer.apply_gradients(plan.fakes, grads)
        self._plan = None
        return losses

    def preview_payloads(self, count: int) -> dict[str, dict]:
        """Per site: synthetic images of every modality G knows, for a few of the site's masks."""
        payloads = {}
        for name, site in self.sites.items():
            if site.masks is not None:
                keys, masks = site.keys[:count], site.masks[:count]
            else:
                keys, masks = site.pending_keys[:count], site.pending_masks[:count]
            fakes = self.trainer.synthesize(masks)
            payloads[name] = {P.KEYS: list(keys), **{P.FAKE_PREFIX + m: f.numpy() for m, f in fakes.items()}}
        return payloads

    def sample_masks(self, per_site: int = 2) -> torch.Tensor:
        """A fixed set of masks for the server's sample grids, spread over each site's slices."""
        picks = []
        for site in self.sites.values():
            masks = site.masks if site.masks is not None else site.pending_masks
            stride = max(1, masks.shape[0] // per_site)
            picks.append(masks[::stride][:per_site])
        return torch.cat(picks)
