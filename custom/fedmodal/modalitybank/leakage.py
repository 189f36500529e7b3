"""What a curious ModalityBank server can learn from the sites' gradients, and a site's bound on it.

A site returns d(GAN + lambda_l1 * L1)/d(fake) for every fake. The L1 part is
lambda_l1 / pixels * sign(fake - real) at every pixel, so each returned row tells the server, pixel
by pixel, whether the real image lies below or above the fake it sent. The audit half of this
module plays a server that keeps every (fake, gradient row) pair of a sample key and only uses
what the protocol gives it (`probe` builds ordinary step payloads):

- `SignBisection`: an active server sends crafted fakes (it controls G's output) and halves each
  pixel's interval from the sign of the returned row (the GAN part is smaller than the L1 part
  at the default lambda_l1 = 100, so the sign is the L1 sign).
- `fit_to_signs`: the image whose simulated L1 gradient best matches the observed rows, by
  least squares, solved exactly per pixel on a grid of values; works with any fakes (random
  probes, or the honest fakes of a training run) and averages DP noise over visits.

The site half: `VisitBudget` bounds how often any one (sample key, modality) may be sent back to
a site, and `BudgetedWorker` enforces it in front of a `SiteWorker`; `dp_epsilon` is the formal
(epsilon, delta) of the sites' Gaussian mechanism after a number of visits of one key.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmodal.atomic import write_json_atomically
from fedmodal.modalitybank import protocol as P


# ---------------------------------------------------------------------------- the audit
def probe(worker, keys: list[str], modality: str, fakes: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Send one step payload (identity augmentation, the server's choice) and return the rows.

    The site divides its per-sample gradients by the batch size; the server knows it and undoes
    it, so row i is the site's (clipped, noised) d(loss_i)/d(fake_i) of shape (1, *spatial).
    """
    payload = {
        P.PHASE: "audit",
        P.STEP: step,
        P.PHASE_STEPS: 0,  # no decay: the discriminator learns at its full rate throughout
        P.KEYS: list(keys),
        P.AUGMENT: P.AugmentParams.identity(len(keys), fakes.ndim - 2).table,
        P.CHECKPOINT: None,
        P.FAKE_PREFIX + modality: fakes.detach().cpu().numpy().astype(np.float32),
    }
    reply = worker.step(payload)
    return torch.as_tensor(reply[P.GRAD_PREFIX + modality]) * len(keys)


class SignBisection:
    """Per-pixel bisection of the real image in [-1, 1] from the sign of each returned row.

    sign(row) = sign(fake - real) wherever the L1 part outweighs the GAN part: then the real
    value is below the probe where the row is positive and above it where it is negative.
    """

    def __init__(self, shape):
        self.low = torch.full(tuple(shape), -1.0)
        self.high = torch.full(tuple(shape), 1.0)

    def fakes(self) -> torch.Tensor:
        return (self.low + self.high) / 2

    def update(self, fakes: torch.Tensor, rows: torch.Tensor) -> None:
        above = rows >= 0  # fake >= real: the real value is at most the probe
        self.high = torch.where(above, fakes, self.high)
        self.low = torch.where(above, self.low, fakes)

    def estimate(self) -> torch.Tensor:
        return (self.low + self.high) / 2


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, 1, H, W) maps (a smoothness prior on the per-pixel scores)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def fit_to_signs(fakes: torch.Tensor, rows: torch.Tensor, levels: int = 129, smooth: float = 0.0) -> torch.Tensor:
    """The image x whose simulated L1 gradient k_v * sign(fake_v - x) best fits the rows.

    Least squares over the visits v: with every row scaled to unit norm (clipping and the
    L1 weight only scale a row), minimising sum_v |y_v - k sign(f_v - x)|^2 per pixel is
    maximising the score sum_v y_v sign(f_v - x), done exactly on `levels` values of x in
    [-1, 1]; the estimate is the mean of the maximisers. `smooth` > 0 blurs the score maps
    (a prior that neighbouring pixels are alike, worth it when DP noise dominates the rows).

    Args:
        fakes, rows: (visits, N, 1, H, W): what the server sent and got back, per visit.
    """
    y = rows / rows.flatten(2).norm(dim=2).clamp_min(1e-30)[..., None, None, None]
    grid = torch.linspace(-1.0, 1.0, levels)
    scores = torch.stack([(y * torch.sign(fakes - value)).sum(0) for value in grid])  # (levels, N, 1, H, W)
    if smooth > 0:
        scores = torch.stack([_blur(s, smooth) for s in scores])
    best = scores >= scores.max(dim=0, keepdim=True).values - 1e-6 * scores.abs().amax().clamp_min(1e-30)
    weights = best.float()
    return (weights * grid.view(-1, 1, 1, 1, 1)).sum(0) / weights.sum(0)


def dp_epsilon(visits: int, noise: float, delta: float = 1e-5) -> float:
    """(epsilon, delta) of `visits` releases of one key's clipped row with noise multiplier `noise`.

    Replace-one adjacency (the key's row exists either way, so two real images give rows at most
    2C apart): each release is rho = (2C)^2 / (2 (noise C)^2) = 2 / noise^2 zero-concentrated DP,
    rho adds up over visits, and rho-zCDP gives epsilon = rho + 2 sqrt(rho ln(1/delta)).
    """
    if noise <= 0:
        return math.inf
    rho = 2.0 * visits / noise**2
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


# ---------------------------------------------------------------------------- the site's bound
class VisitBudgetExceeded(PermissionError):
    """The server asked for a gradient about a (key, modality) more often than the site allows."""


class VisitBudget:
    """At most `max_visits` gradient rows per (sample key, modality), over every run it remembers.

    A step that would exceed the budget for any row is refused whole, before anything is
    counted, so the refused step leaves no trace in the counts. With `path`, the counts persist
    (written atomically after every admitted step) so that a new job cannot reset them.
    """

    def __init__(self, max_visits: int, path: str | Path | None = None):
        if max_visits < 1:
            raise ValueError(f"max_visits must be at least 1, got {max_visits}")
        self.max_visits = int(max_visits)
        self.path = Path(path) if path is not None else None
        self.counts: Counter = Counter()
        if self.path is not None and self.path.is_file():
            self.counts.update({tuple(k.split("\t")): v for k, v in json.loads(self.path.read_text()).items()})

    def admit(self, keys: list[str], modalities) -> None:
        """Count one visit of every (key, modality) of a step, or raise without counting any."""
        asked = Counter((key, m) for key in keys for m in modalities)
        over = [
            (k, m, self.counts[(k, m)] + n) for (k, m), n in asked.items() if self.counts[(k, m)] + n > self.max_visits
        ]
        if over:
            key, modality, total = over[0]
            raise VisitBudgetExceeded(
                f"step refused: {len(over)} rows would exceed the site's budget of {self.max_visits} gradients per "
                f"sample and modality (first: {key!r} {modality}, visit {total})"
            )
        self.counts.update(asked)
        if self.path is not None:
            write_json_atomically(self.path, {"\t".join(k): v for k, v in self.counts.items()})

    def visits(self, key: str, modality: str) -> int:
        return self.counts[(key, modality)]


class BudgetedWorker:
    """A `SiteWorker` whose steps pass a `VisitBudget` first; everything else is the worker's."""

    def __init__(self, worker, budget: VisitBudget):
        self.worker = worker
        self.budget = budget

    def step(self, payload: dict) -> dict:
        modalities = [key[len(P.FAKE_PREFIX) :] for key in payload if key.startswith(P.FAKE_PREFIX)]
        self.budget.admit(list(payload[P.KEYS]), modalities)
        return self.worker.step(payload)

    def __getattr__(self, name):
        return getattr(self.worker, name)
