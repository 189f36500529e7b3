"""The site half of ModalityBank: one discriminator per modality the site holds.

Given fakes from the server, it takes one discriminator step per modality and returns only
d(generator loss)/d(fake), optionally clipped per sample and noised for differential privacy.
No NVFlare here: the site executor and the centralised benchmark drive the same class.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fedmodal.amp import MixedPrecision
from fedmodal.atomic import save_atomically
from fedmodal.modalitybank.config import AdversaryConfig
from fedmodal.modalitybank.generator_trainer import CONDITION_CHANNELS, linear_decay_factor
from fedmodal.nets.discriminator import ConditionalPatchDiscriminator


class SiteAdversary:
    """Discriminators of one site, created lazily per modality the server asks about.

    Args:
        held_modalities: the modalities this site holds; asking for another one is an error.
        spatial_dims: 2 or 3.
        config: training settings.
        device: torch device.
        seed: seed of the discriminators' initialisation and the DP noise (the site's seed).
    """

    def __init__(self, held_modalities, spatial_dims: int, config: AdversaryConfig, device="cpu", seed: int = 0):
        self.held = tuple(held_modalities)
        self.spatial_dims = spatial_dims
        self.config = config
        self.device = torch.device(device)
        self.discriminators: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.amps: dict[str, MixedPrecision] = {}
        self.seed = int(seed)
        self.noise = torch.Generator().manual_seed(self.seed + 7919)

    def _discriminator(self, modality: str) -> torch.nn.Module:
        if modality not in self.held:
            raise ValueError(
                f"asked to train a discriminator for {modality!r}, which this site does not hold {self.held}"
            )
        if modality not in self.discriminators:
            torch.manual_seed(self.seed + 1 + self.held.index(modality))
            net = ConditionalPatchDiscriminator(
                spatial_dims=self.spatial_dims,
                in_channels=CONDITION_CHANNELS + 1,
                ndf=self.config.ndf,
                n_layers=self.config.n_layers,
            ).to(self.device)
            self.discriminators[modality] = net
            self.optimizers[modality] = torch.optim.Adam(
                net.parameters(), lr=self.config.lr, betas=(self.config.beta1, 0.999)
            )
            self.amps[modality] = MixedPrecision(self.config.precision, self.device, bf16_on_cpu=True)
        return self.discriminators[modality]

    def _set_lr(self, modality: str, step: int, total: int) -> None:
        for group in self.optimizers[modality].param_groups:
            group["lr"] = self.config.lr * linear_decay_factor(step, total)

    def step(
        self,
        cond: torch.Tensor,
        real: dict[str, torch.Tensor],
        fake: dict[str, torch.Tensor],
        brain: torch.Tensor | None = None,
        step: int = 0,
        total_steps: int = 0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One discriminator step per modality, then the generator's gradient w.r.t. each fake.

        Args:
            cond: conditioning maps (N, 2, *spatial), already augmented like `real`.
            real: modality -> real images (N, 1, *spatial), augmented.
            fake: modality -> the server's fakes (N, 1, *spatial).
            brain: optional brain mask (N, 1, *spatial) for the masked L1 variant.
            step, total_steps: position in the phase, for the learning-rate schedule.

        Returns:
            (modality -> d(loss)/d(fake) shaped like the fake, loss scalars keyed "<modality>/<name>").
        """
        cond = cond.to(self.device)
        grads, losses = {}, {}
        for modality, fake_images in fake.items():
            disc = self._discriminator(modality)
            optimizer = self.optimizers[modality]
            self._set_lr(modality, step, total_steps)
            real_images = real[modality].to(self.device)
            fake_images = fake_images.to(self.device)

            # Discriminator: (mask, real) -> 1, (mask, fake) -> 0.
            amp = self.amps[modality]
            optimizer.zero_grad(set_to_none=True)
            with amp.autocast():
                logits_real = disc(torch.cat([cond, real_images], dim=1)).float()
                logits_fake = disc(torch.cat([cond, fake_images.detach()], dim=1)).float()
            d_real = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
            d_fake = F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
            amp.step(0.5 * (d_real + d_fake), optimizer)

            # Generator loss against this site's real images; only its gradient leaves.
            fake_leaf = fake_images.detach().requires_grad_(True)
            with amp.autocast():
                logits = disc(torch.cat([cond, fake_leaf], dim=1)).float()
            per_sample_gan = (
                F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none").flatten(1).mean(1)
            )
            diff = (fake_leaf - real_images).abs()
            if self.config.l1_in_brain and brain is not None:
                weight = brain.to(self.device, diff.dtype)
                per_sample_l1 = (diff * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)
            else:
                per_sample_l1 = diff.flatten(1).mean(1)
            per_sample = per_sample_gan + self.config.lambda_l1 * per_sample_l1
            # Gradient of the per-sample losses: row i is d(loss_i)/d(fake_i), clipped one by one.
            grad = amp.grad(per_sample.sum(), fake_leaf)
            disc.zero_grad(set_to_none=True)
            grads[modality] = self._privatise(grad) / grad.shape[0]
            losses[f"{modality}/d_real"] = d_real.item()
            losses[f"{modality}/d_fake"] = d_fake.item()
            losses[f"{modality}/g_gan"] = per_sample_gan.mean().item()
            losses[f"{modality}/g_l1"] = per_sample_l1.mean().item()
        return grads, losses

    def _privatise(self, grad: torch.Tensor) -> torch.Tensor:
        clip, sigma = self.config.dp_clip, self.config.dp_noise
        if clip <= 0:
            return grad
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = (clip / norms).clamp(max=1.0).view(-1, *([1] * (grad.ndim - 1)))
        grad = grad * scale
        if sigma > 0:
            noise = torch.randn(grad.shape, generator=self.noise) * (sigma * clip)
            grad = grad + noise.to(grad.device, grad.dtype)
        return grad

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            m: {"net": self.discriminators[m].state_dict(), "opt": self.optimizers[m].state_dict()}
            for m in self.discriminators
        }

    def load_state_dict(self, state: dict) -> None:
        for modality, entry in state.items():
            self._discriminator(modality).load_state_dict(entry["net"])
            self.optimizers[modality].load_state_dict(entry["opt"])

    def save(self, path: str | os.PathLike, **meta) -> None:
        """Write every discriminator and optimizer (plus `meta`, e.g. the step) atomically."""
        save_atomically(path, lambda temp: torch.save({**meta, "discriminators": self.state_dict()}, temp))

    @staticmethod
    def read(path: str | os.PathLike, device="cpu") -> dict:
        """What `save` wrote: {"discriminators": state, **meta}."""
        return torch.load(path, map_location=device, weights_only=True)
