"""A federation's spec: the one definition of its parameters, defaults and validation."""

from __future__ import annotations

from fedmodal.brats import RELEASES
from fedmodal.data.phantoms.grid import DEFAULT_SHAPE
from fedmodal.data.phantoms.presets import DEFAULT_PRESET, PRESETS, Preset, scaled_case_counts, scaled_sites

GENERATOR_VERSION = 3  # bump when the same spec would give different voxels or files
DEFAULT_LAYOUT = "brats2021"


def spec_sites(spec: dict) -> dict[str, tuple[str, ...]]:
    """Site name -> modalities of a federation spec (the preset's, scaled to `num_sites`)."""
    return scaled_sites(PRESETS[spec["preset"]], spec.get("num_sites"))


def _resolve_counts(preset: Preset, num_sites, cases_per_site, test_cases) -> tuple[dict[str, int], int]:
    sites = scaled_sites(preset, num_sites)
    defaults = scaled_case_counts(preset, num_sites)
    if cases_per_site is None:
        counts = defaults
    elif isinstance(cases_per_site, dict):
        unknown = set(cases_per_site) - set(sites)
        if unknown:
            raise ValueError(f"preset {preset.name!r} has no site(s) {sorted(unknown)}; sites: {list(sites)}")
        counts = {s: int(cases_per_site.get(s, defaults[s])) for s in sites}
    else:
        counts = {s: int(cases_per_site) for s in sites}
    n_test = preset.test_cases if test_cases is None else int(test_cases)
    if any(n < 1 for n in counts.values()) or n_test < 0:
        raise ValueError(f"every site needs at least 1 case and the test set 0 or more, got {counts}, test={n_test}")
    return counts, n_test


def federation_spec(
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
    shape=DEFAULT_SHAPE,
    layout: str = DEFAULT_LAYOUT,
    cases_per_site: int | dict[str, int] | None = None,
    test_cases: int | None = None,
    num_sites: int | None = None,
) -> dict:
    """The validated spec of a federation: the one definition of its parameters and defaults.

    `num_sites` repeats the preset's hospitals in turn (`presets.scaled_sites`); it enters the
    spec only when it changes the preset, so the preset's own federations keep their identity.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    if layout not in RELEASES:
        raise ValueError(f"unknown layout {layout!r}; expected one of {RELEASES}")
    shape = [int(s) for s in shape]
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes of at least 8 voxels, got {shape}")
    counts, n_test = _resolve_counts(PRESETS[preset], num_sites, cases_per_site, test_cases)
    spec = {
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": int(seed),
        "shape": shape,
        "layout": layout,
        "cases_per_site": counts,
        "test_cases": n_test,
    }
    if scaled_sites(PRESETS[preset], num_sites) != PRESETS[preset].sites:
        spec["num_sites"] = int(num_sites)
    return spec
