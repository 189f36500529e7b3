"""One site's side of every ModalityBank exchange, independent of how messages travel.

`SiteWorker` holds the site's slices (stacked, so a step only indexes them) and its
discriminators; it answers registration, step and preview payloads with plain dicts. The NVFlare
executor wraps it; the centralised benchmark calls it in-process with the same payloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedmodal.brats import MODALITIES
from fedmodal.modalitybank import protocol as P
from fedmodal.modalitybank.config import AdversaryConfig
from fedmodal.modalitybank.grids import mask_picture, save_grid
from fedmodal.modalitybank.site_trainer import SiteAdversary

STATE_FILE = "discriminators.pt"  # the final discriminators, in the run's output folder
STATE_PATTERN = "discriminators_step*.pt"  # kept at each server checkpoint, for a resume
KEPT_STATES = 3  # checkpoints' worth of discriminators a site keeps


def state_file(global_step: int) -> str:
    return f"discriminators_step{global_step:08d}.pt"


class SiteWorker:
    """Answers the server's payloads for one site.

    Args:
        site_name: the site's name (for messages and grid titles).
        dataset: a `fedmodal.data.datasets.SynthesisSlices` of the site's cases.
        modalities: the modalities the site holds and uses (canonical names).
        adversary_config: discriminator settings, DP included.
        batch_size: batch the site draws itself when it keeps its masks.
        shares_masks: send every mask at registration (else one batch at a time).
        seed: the site's seed.
        out_dir: where local grids and the final discriminators go.
        device: torch device.
        state_dir: where this site keeps its discriminators at the server's checkpoints, so a
            resumed run continues with them; None keeps nothing.
    """

    def __init__(
        self,
        site_name: str,
        dataset,
        modalities,
        adversary_config: AdversaryConfig,
        batch_size: int,
        shares_masks: bool,
        seed: int,
        out_dir: str | Path,
        device="cpu",
        state_dir: str | Path | None = None,
    ):
        if len(dataset) == 0:
            raise ValueError(f"site {site_name}: no slice to train on")
        self.site_name = site_name
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.batch_size = batch_size
        self.shares_masks = shares_masks
        self.out_dir = Path(out_dir)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.rng = np.random.default_rng(seed)
        items = [dataset[i] for i in range(len(dataset))]
        self.keys = [item["key"] for item in items]
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.cond = torch.stack([torch.as_tensor(item["cond"]) for item in items]).float()
        self.images = torch.stack([torch.as_tensor(item["image"]) for item in items]).float()
        self.brain = torch.stack([torch.as_tensor(item["brain"]) for item in items]).float()
        self.adversary = SiteAdversary(
            self.modalities, spatial_dims=self.cond.ndim - 2, config=adversary_config, device=device, seed=seed
        )

    def registration(self) -> dict:
        reply = {
            P.SITE_MODALITIES: list(self.modalities),
            P.NUM_SAMPLES: len(self.keys),
            P.SHARES_MASKS: self.shares_masks,
        }
        if self.shares_masks:
            reply[P.SAMPLE_KEYS] = list(self.keys)
            reply[P.MASK_CODES] = P.encode_masks(self.cond)
        else:
            reply.update(self._next_batch())
        return reply

    def _next_batch(self) -> dict:
        """For a site that keeps its masks: the batch it chose for the next step, masks included."""
        index = self.rng.choice(len(self.keys), size=self.batch_size, replace=len(self.keys) < self.batch_size)
        return {
            P.NEXT_KEYS: [self.keys[i] for i in index],
            P.MASK_CODES: P.encode_masks(self.cond[torch.as_tensor(index)]),
        }

    def _lookup(self, keys: list[str]) -> torch.Tensor:
        unknown = [k for k in keys if k not in self.index]
        if unknown:
            raise KeyError(f"site {self.site_name}: the server asked for unknown sample keys {unknown[:3]}")
        return torch.as_tensor([self.index[k] for k in keys])

    @staticmethod
    def _fakes(payload: dict) -> dict[str, torch.Tensor]:
        return {key[len(P.FAKE_PREFIX) :]: P.unpack(payload, key) for key in payload if key.startswith(P.FAKE_PREFIX)}

    def step(self, payload: dict) -> dict:
        """Augment the real batch like the server did, train D, return gradients and losses."""
        index = self._lookup(payload[P.KEYS])
        augment = P.AugmentParams(np.asarray(payload[P.AUGMENT]))
        cond = P.apply_augment(self.cond[index], augment, fill=-1.0)
        images = P.apply_augment(self.images[index], augment, fill=-1.0)
        brain = P.apply_augment(self.brain[index], augment, fill=0.0)
        fakes = self._fakes(payload)
        for modality, fake in fakes.items():
            if tuple(fake.shape[:1]) != (len(index),) or tuple(fake.shape[2:]) != tuple(cond.shape[2:]):
                raise ValueError(
                    f"site {self.site_name}: {modality} fakes of shape {tuple(fake.shape)} for masks {tuple(cond.shape)}"
                )
        real = {m: images[:, MODALITIES.index(m)].unsqueeze(1) for m in fakes}
        grads, losses = self.adversary.step(
            cond, real, fakes, brain, step=int(payload[P.STEP]), total_steps=int(payload[P.PHASE_STEPS])
        )
        precision = payload.get(P.WIRE, "float32")  # reply in the precision the fakes came in
        reply = {}
        for m, g in grads.items():
            reply.update(P.pack(P.GRAD_PREFIX + m, g, precision))
        reply[P.LOSSES] = losses
        if not self.shares_masks:
            reply.update(self._next_batch())
        if payload.get(P.CHECKPOINT) is not None and self.state_dir is not None:
            self.save_state(int(payload[P.CHECKPOINT]))
        return reply

    def save_state(self, global_step: int) -> Path:
        """Keep the discriminators (and their optimizers) as of the server's checkpoint at
        `global_step`, with the previous ones: a server killed after this step's save here but
        before its own resumes from an earlier checkpoint, whose state must still be at hand."""
        path = self.state_dir / state_file(global_step)
        self.adversary.save(path, global_step=global_step)
        kept = sorted(self.state_dir.glob(STATE_PATTERN))
        for old in kept[:-KEPT_STATES]:
            old.unlink(missing_ok=True)
        return path

    def load_state(self, global_step: int) -> str:
        """Load the discriminators saved at `global_step`; returns what happened, for the log."""
        path = self.state_dir / state_file(global_step) if self.state_dir is not None else None
        if path is None or not path.is_file():
            saved = sorted(p.name for p in self.state_dir.glob(STATE_PATTERN)) if self.state_dir is not None else []
            return (
                f"site {self.site_name}: no discriminators saved at step {global_step} in {self.state_dir} "
                f"(it holds {saved or 'none'}); they start afresh"
            )
        state = SiteAdversary.read(path, self.adversary.device)
        self.adversary.load_state_dict(state["discriminators"])
        return f"site {self.site_name}: discriminators resumed from {path} (step {global_step})"

    def preview(self, payload: dict, name: str = "final.png") -> Path:
        """Draw mask | synthetic m | real m for every modality ("n/a" where the site has none)."""
        index = self._lookup(payload[P.KEYS])
        fakes = self._fakes(payload)
        modalities = [m for m in MODALITIES if m in fakes or m in self.modalities]
        titles = ["mask"]
        for m in modalities:
            titles += [f"synthetic {m}", f"real {m}"]
        rows = []
        for i, sample in enumerate(index.tolist()):
            row = [mask_picture(self.cond[sample])]
            for m in modalities:
                row.append(fakes[m][i, 0].numpy() if m in fakes else None)
                row.append(self.images[sample, MODALITIES.index(m)].numpy() if m in self.modalities else None)
            rows.append(row)
        return save_grid(rows, titles, self.out_dir / "grids" / name, f"{self.site_name}: synthetic vs real")

    def save(self) -> None:
        self.adversary.save(self.out_dir / STATE_FILE)


def build_site_worker(
    site,
    site_config,
    adversary: AdversaryConfig,
    registration: dict,
    out_dir: str | Path,
    state_dir: str | Path | None = None,
    visit_ledger: str | Path | None = None,
) -> SiteWorker:
    """A site's worker from its prepared data and the server's registration settings.

    The site's `fedmodal_site.json` policy applies here, wherever the site runs: "share_masks":
    false wins over the job, its `dp_clip` / `dp_noise` raise the job's, and its
    "max_visits_per_key" bounds the gradients returned per (sample key, modality) over every
    run that shares `visit_ledger` (`fedmodal.modalitybank.leakage.VisitBudget`); a step over
    the bound is refused.

    Args:
        site: a `fedmodal.fl.site.PreparedSite`.
        site_config: the site's `BankSiteConfig` (split, mask sharing).
        adversary: the job's discriminator settings.
        registration: what the server sends at registration: image_size, slices, batch_size.
        out_dir: where local grids and the final discriminators go.
        state_dir: where discriminators are kept at checkpoints (None keeps nothing).
    """
    from fedmodal.data.datasets import SynthesisSlices

    manifest, split = site.manifest, site_config.split
    cases = manifest.cases if split == "all" else manifest.cases_in(split)
    if not cases:
        raise ValueError(f"site {site.name}: no usable case in split {split!r} of {site.root}")
    dataset = SynthesisSlices(
        cases, size=int(registration["image_size"]), slices=registration["slices"], et_label=manifest.et_label
    )
    dp_clip, dp_noise = site.dp(adversary.dp_clip, adversary.dp_noise)
    worker = SiteWorker(
        site.name,
        dataset,
        manifest.modalities,
        adversary.with_values(dp_clip=dp_clip, dp_noise=dp_noise),
        batch_size=int(registration["batch_size"]),
        shares_masks=site.shares_masks(site_config.share_masks),
        seed=site.seed,
        out_dir=out_dir,
        device=site.device,
        state_dir=state_dir,
    )
    if site.policy.get("max_visits_per_key"):
        from fedmodal.modalitybank.leakage import BudgetedWorker, VisitBudget

        return BudgetedWorker(worker, VisitBudget(int(site.policy["max_visits_per_key"]), path=visit_ledger))
    return worker
