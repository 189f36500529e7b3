"""Scanner profiles: how each site renders tissue (contrast curve, bias, noise, blur, scale)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from fedmodal.brats import MODALITIES
from fedmodal.data.phantoms.streams import PROFILE_STREAM, stream
from fedmodal.data.phantoms.tumour import TUMOUR_SIZES_MM


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanners render tissue.

    Args:
        gamma: modality -> exponent of the contrast curve applied to relative intensities.
        scale: modality -> stored value of relative intensity 1.
        bias: standard deviation of the log of the smooth multiplicative bias field.
        noise: Rician noise sigma, relative to intensity 1.
        blur_mm: Gaussian point-spread sigma in mm.
        tumour_mix: probabilities of small, medium and large tumours.
    """

    gamma: dict[str, float]
    scale: dict[str, float]
    bias: float
    noise: float
    blur_mm: float
    tumour_mix: tuple[float, float, float]

    def to_json(self) -> dict:
        out = asdict(self)
        out["tumour_mix"] = dict(zip(TUMOUR_SIZES_MM, self.tumour_mix))
        return json.loads(json.dumps(out))


def site_profile(seed: int, site: str) -> ScannerProfile:
    """The scanner profile of ``site`` under ``seed`` (the same in every preset)."""
    rng = stream(seed, PROFILE_STREAM, site)
    gamma = {m: round(float(rng.uniform(0.8, 1.25)), 4) for m in MODALITIES}
    scale = {m: round(float(rng.uniform(400.0, 2500.0)), 1) for m in MODALITIES}
    bias = round(float(rng.uniform(0.03, 0.15)), 4)
    noise = round(float(rng.uniform(0.015, 0.05)), 4)
    blur = round(float(rng.uniform(0.0, 1.4)), 3)
    mix = rng.dirichlet([1.5, 1.5, 1.5])
    return ScannerProfile(gamma, scale, bias, noise, blur, tuple(round(float(p), 4) for p in mix))


def scan(
    img: np.ndarray,
    brain: np.ndarray,
    profile: ScannerProfile,
    modality: str,
    spacing,
    bias_field: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Contrast curve, blur, bias field, Rician noise, scale, skull-strip: int16 like BraTS."""
    img = np.maximum(img, 0.0) ** np.float32(profile.gamma[modality]) * brain
    if profile.blur_mm > 0:
        img = ndimage.gaussian_filter(img, [profile.blur_mm / s for s in spacing])
    img *= np.exp(np.float32(profile.bias) * bias_field)
    sigma = np.float32(profile.noise)
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt(real**2 + imag**2) * np.float32(profile.scale[modality])
    stored = np.clip(np.rint(img), 1, np.iinfo(np.int16).max).astype(np.int16)
    stored[~brain] = 0
    return stored
