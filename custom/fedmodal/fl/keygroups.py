"""Parameters grouped by key prefix, each group averaged over the sites allowed to send it.

A modality-tailored encoder (`enc.<modality>.`) is trained only where that modality exists, so
it is averaged only over the sites that hold it; shared parts (`enc.shared.`, `dec.` ...) are
averaged over every site. A site that sends a key outside the groups its modalities allow is
refused with an error that names the site and the key: nothing from it is averaged.

`KeyGroupAggregator` is the NVFlare component (a `ModelAggregator`) any workflow can use;
`aggregate` is the same rule without NVFlare.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedmodal import MODALITIES

# What a site's result says about itself (FLModel meta), for the aggregator's rules.
META_SITE = "client_name"  # set by NVFlare's model controller on every result
META_MODALITIES = "fedmodal.modalities"
META_NUM_SAMPLES = "fedmodal.num_samples"


class KeyGroupError(ValueError):
    """A site sent a key its modalities do not allow, or shapes that do not match."""


@dataclass(frozen=True)
class KeyGroups:
    """Which parameter keys form which group, and who may send each.

    Args:
        per_modality: the prefix of a modality's own group, with "{modality}" in it.
        shared: prefixes of the groups every site trains and sends.
        modalities: the modality names a per-modality group can take.
    """

    per_modality: str = "enc.{modality}."
    shared: tuple[str, ...] = ("enc.shared.", "fuse.", "cls.", "dec.")
    modalities: tuple[str, ...] = MODALITIES

    def group(self, key: str) -> str | None:
        """The group of `key`: a modality name, a shared prefix, or None if it is in none."""
        for modality in self.modalities:
            if key.startswith(self.per_modality.format(modality=modality)):
                return modality
        for prefix in self.shared:
            if key.startswith(prefix):
                return prefix
        return None

    def allowed(self, key: str, held: Iterable[str], over_holders_only: bool = True) -> bool:
        """Whether a site holding `held` may send `key`."""
        group = self.group(key)
        if group is None:
            return False
        if group in self.shared or not over_holders_only:
            return True
        return group in set(held)

    def select(self, params: Mapping[str, np.ndarray], held: Iterable[str], over_holders_only: bool = True) -> dict:
        """The part of `params` a site holding `held` receives and sends."""
        held = tuple(held)
        return {k: v for k, v in params.items() if self.allowed(k, held, over_holders_only)}


@dataclass
class Contribution:
    """One site's parameters for a round, its weight (sample count) and the modalities it holds."""

    site: str
    params: Mapping[str, np.ndarray]
    weight: float
    modalities: tuple[str, ...] = field(default_factory=tuple)


def aggregate(
    contributions: Sequence[Contribution], groups: KeyGroups, over_holders_only: bool = True
) -> dict[str, np.ndarray]:
    """Each key averaged over the sites that sent it, weighted by their sample counts.

    Args:
        contributions: the round's site results (any order: they are sorted by site).
        groups: the key-group rules.
        over_holders_only: False is the "no tailored updating" ablation: every key, per-modality
            ones included, is averaged over every site that sent it.

    Raises:
        KeyGroupError: a site sent a key outside its groups, or a shape differing from another site's.
    """
    totals: dict[str, np.ndarray] = {}
    weights: dict[str, float] = {}
    for c in sorted(contributions, key=lambda c: c.site):
        if c.weight <= 0:
            raise KeyGroupError(f"site {c.site} sent weight {c.weight}; a sample count must be positive")
        for key, value in sorted(c.params.items()):
            if not groups.allowed(key, c.modalities, over_holders_only):
                group = groups.group(key)
                why = "is in no key group" if group is None else f"belongs to {group}, which it does not hold"
                raise KeyGroupError(
                    f"site {c.site} (holding {list(c.modalities)}) sent {key!r}, which {why}: its update is refused"
                )
            value = np.asarray(value, dtype=np.float64)
            if key in totals and totals[key].shape != value.shape:
                raise KeyGroupError(f"site {c.site} sent {key!r} of shape {value.shape}, others {totals[key].shape}")
            totals[key] = totals.get(key, 0.0) + c.weight * value
            weights[key] = weights.get(key, 0.0) + c.weight
    return {key: (totals[key] / weights[key]).astype(np.float32) for key in totals}


class KeyGroupAggregator(ModelAggregator):
    """NVFlare's `ModelAggregator` with the key-group rule: accept each site's `FLModel`, then
    `aggregate_model()` gives the averaged groups. A site's result carries its modalities and
    sample count in its meta (`META_MODALITIES`, `META_NUM_SAMPLES`).

    Args:
        per_modality: prefix of a modality's own group, with "{modality}".
        shared: prefixes of the groups every site sends.
        over_holders_only: False averages per-modality groups over every site (an ablation).
    """

    def __init__(
        self,
        per_modality: str = KeyGroups.per_modality,
        shared: Sequence[str] = KeyGroups.shared,
        over_holders_only: bool = True,
    ):
        super().__init__()
        self.per_modality = per_modality
        self.shared = list(shared)
        self.over_holders_only = over_holders_only
        self.groups = KeyGroups(per_modality=per_modality, shared=tuple(shared))
        self.contributions: list[Contribution] = []

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = str(meta.get(META_SITE, "?"))
        if any(c.site == site for c in self.contributions):
            raise KeyGroupError(f"site {site} sent two results in one round")
        self.contributions.append(
            Contribution(
                site=site,
                params=model.params or {},
                weight=float(meta.get(META_NUM_SAMPLES, 0)),
                modalities=tuple(meta.get(META_MODALITIES, ())),
            )
        )

    def aggregate_model(self) -> FLModel:
        params = aggregate(self.contributions, self.groups, self.over_holders_only)
        sites = sorted(c.site for c in self.contributions)
        self.reset_stats()
        return FLModel(params=params, params_type=ParamsType.FULL, meta={"aggregated_sites": sites})

    def reset_stats(self) -> None:
        self.contributions = []
