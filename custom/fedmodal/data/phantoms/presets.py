"""The federation splits: which sites hold which modalities, and how many cases each gets."""

from __future__ import annotations

from dataclasses import dataclass

from fedmodal.brats import MODALITIES, ordered_modalities

DEFAULT_PRESET = "modalitybank-missing"


@dataclass(frozen=True)
class Preset:
    """A federation split: which sites hold which modalities, and how many cases by default.

    Args:
        name: the preset's name (``PRESETS`` key).
        description: one line for ``--help`` and ``federation.json``.
        sites: site name -> modalities it holds (canonical order).
        cases_per_site: site name -> default number of training cases.
        test_cases: default size of the held-out full-modal test set.
        client_split: (train, test) shares of each `site-N`'s own cases, for methods scored per
            client on the client's own test split (written to the site's `fedmodal_site.json`
            as an explicit list, so every client gets exactly its share); None leaves the
            manifest's hashed default.
    """

    name: str
    description: str
    sites: dict[str, tuple[str, ...]]
    cases_per_site: dict[str, int]
    test_cases: int = 10
    client_split: tuple[float, float] | None = None


def _fedmepd_sites() -> dict[str, tuple[str, ...]]:
    # FedMEPD's client masks, in the paper's order (flair, t1ce, t1, t2).
    order = ("flair", "t1ce", "t1", "t2")
    masks = ("1111", "1110", "1011", "1100", "0011", "0100", "0001", "1111")
    sites = {"server": MODALITIES}
    for k, mask in enumerate(masks, start=1):
        sites[f"site-{k}"] = ordered_modalities(m for m, bit in zip(order, mask) if bit == "1")
    return sites


def _mixmfl_sites() -> dict[str, tuple[str, ...]]:
    pairs = [(a, b) for i, a in enumerate(MODALITIES) for b in MODALITIES[i + 1 :]]
    return {f"site-{k}": pair for k, pair in enumerate(pairs, start=1)}


def _make_presets() -> dict[str, Preset]:
    missing = {
        "site-1": ("t1", "t2", "flair"),  # lacks t1ce
        "site-2": ("t1", "t1ce", "flair"),  # lacks t2
        "site-3": ("t1", "t1ce", "t2"),  # lacks flair
    }
    full = {f"site-{k}": ("t1", "t2", "flair") for k in (1, 2, 3)}
    fedmepd = _fedmepd_sites()
    mixmfl = _mixmfl_sites()
    presets = [
        Preset(
            "modalitybank-missing",
            "ModalityBank completion: 3 sites, each lacking one of T1c/T2/FLAIR (all hold T1)",
            missing,
            {s: 16 for s in missing},
        ),
        Preset(
            "modalitybank-full",
            "ModalityBank heterogeneous centres: 3 sites with T1, T2 and FLAIR",
            full,
            {s: 16 for s in full},
        ),
        Preset(
            "fedmepd",
            "FedMEPD: full-modal server site + 8 clients with the paper's modality masks",
            fedmepd,
            {s: (16 if s == "server" else 8) for s in fedmepd},
            client_split=(0.6, 0.4),  # the reference splits: 60/40 train/test per client
        ),
        Preset(
            "mixmfl",
            "MDM-MixMFL: 6 clients, each holding a different pair of the 4 modalities",
            mixmfl,
            {s: 10 for s in mixmfl},
            client_split=(0.7, 0.3),  # the paper: 7:3 train/test per client
        ),
    ]
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _make_presets()


def _model_sites(preset: Preset, num_sites: int | None) -> dict[str, str]:
    """Site name -> the preset site it copies: its `site-N` hospitals repeated in turn up to
    `num_sites` (site-4 copies site-1, ...); other sites (a FedMEPD server) copy themselves.
    None keeps the preset's own."""
    hospitals = [s for s in preset.sites if s.startswith("site-")]
    if num_sites is None or num_sites == len(hospitals):
        return {s: s for s in preset.sites}
    if not hospitals:
        raise ValueError(f"preset {preset.name!r} has no site-N hospitals to repeat")
    if int(num_sites) < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    others = {s: s for s in preset.sites if s not in hospitals}
    return {**others, **{f"site-{k}": hospitals[(k - 1) % len(hospitals)] for k in range(1, int(num_sites) + 1)}}


def scaled_sites(preset: Preset, num_sites: int | None) -> dict[str, tuple[str, ...]]:
    """The preset's sites scaled to `num_sites` hospitals (`_model_sites`): name -> modalities."""
    return {site: preset.sites[model] for site, model in _model_sites(preset, num_sites).items()}


def scaled_case_counts(preset: Preset, num_sites: int | None) -> dict[str, int]:
    """Default training cases per site of `scaled_sites` (a repeated site takes its model's count)."""
    return {site: preset.cases_per_site[model] for site, model in _model_sites(preset, num_sites).items()}
