"""What crosses the wire between the ModalityBank server and a site, and how both read it.

The server never sees a real image and a site never sees a generator weight. Everything that
moves is listed here, so the privacy audit (tests/test_modalitybank_sim.py) can hold the
implementation to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmodal.modalitybank.config import WIRE_PRECISIONS

# Task names.
TASK_REGISTER = "mb_register"  # once: site -> server masks (or not, by policy), keys, counts
TASK_STEP = "mb_step"  # every step: server -> fakes; site -> gradients w.r.t. fakes, losses
TASK_PREVIEW = "mb_preview"  # at intervals: server -> fakes for fixed keys; site draws real | fake

# Keys of the server's task data.
CONFIG = "config"
PHASE = "phase"
STEP = "step"
PHASE_STEPS = "phase_steps"
KEYS = "keys"
AUGMENT = "augment"
FAKE_PREFIX = "fake/"
WIRE = "wire"  # step payloads in float16 only: "float16" (the site replies in kind)
CHECKPOINT = "checkpoint"  # the global step the server checkpoints after this step (or None)
# Keys of the registration config (besides image size, slices, seed, batch size).
RUN_ID = "run_id"  # names a training run across restarts; sites keep their state under it
RESUME_STEP = "resume_step"  # global step a resumed run continues from (None for a fresh run)

# Keys of a site's results.
SAMPLE_KEYS = "sample_keys"  # register: opaque sample keys, in the site's order
MASK_CODES = "mask_codes"  # register (sharing sites) or step (non-sharing sites): uint8 masks
NUM_SAMPLES = "num_samples"
SITE_MODALITIES = "modalities"
SHARES_MASKS = "shares_masks"
GRAD_PREFIX = "grad/"
SCALE_PREFIX = "scale/"  # float16 on the wire: "scale/<key>" is the scale (a number) of array <key>
LOSSES = "losses"
NEXT_KEYS = "next_keys"  # non-sharing sites: the keys of the batch they chose for the next step


CONTOUR_BIT = 4  # mask code = canonical label (0..3) + 4 if the voxel is on the brain's edge


def encode_masks(cond: torch.Tensor) -> np.ndarray:
    """Pack conditioning maps (N, 2, H, W[, D]) in [-1, 1] into uint8 codes (N, H, W[, D]).

    Channel 0 is the canonical label scaled by label / 3 * 2 - 1, channel 1 the brain contour
    (+1 on the edge). One byte per voxel is a quarter of float32 on the wire.
    """
    labels = torch.round((cond[:, 0] + 1.0) * 1.5).clamp(0, 3).to(torch.uint8)
    contour = (cond[:, 1] > 0).to(torch.uint8) * CONTOUR_BIT
    return (labels + contour).cpu().numpy()


def decode_masks(codes: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`encode_masks`: uint8 codes -> float32 conditioning maps in [-1, 1]."""
    codes_t = torch.as_tensor(np.asarray(codes), dtype=torch.uint8)
    labels = (codes_t % CONTOUR_BIT).float() / 3.0 * 2.0 - 1.0
    contour = torch.where(codes_t >= CONTOUR_BIT, 1.0, -1.0)
    return torch.stack([labels, contour], dim=1)


def pack(key: str, tensor: torch.Tensor, precision: str = "float32") -> dict[str, np.ndarray]:
    """`{key: array}` for the wire, float32 or float16 (half the bytes).

    A float16 array is sent divided by its largest magnitude, with that scale as a number
    under `SCALE_PREFIX + key`, so small values keep float16's 11 significant bits instead of
    falling into its subnormal range (below 6e-5). The gradients w.r.t. the fakes measured
    about 6e-3 at the default job's settings, but a smaller loss weight or a larger image
    shrinks them.
    """
    if precision not in WIRE_PRECISIONS:
        raise ValueError(f"wire precision must be one of {WIRE_PRECISIONS}, got {precision!r}")
    array = tensor.detach().float().cpu().numpy()
    if precision == "float32":
        return {key: array}
    scale = float(np.abs(array).max()) if array.size else 0.0
    scale = scale if scale > 0 and np.isfinite(scale) else 1.0
    return {key: (array / scale).astype(np.float16), SCALE_PREFIX + key: scale}


def unpack(payload: dict, key: str) -> torch.Tensor:
    """The float32 tensor `pack` sent under `key` (scaled back when it travelled as float16)."""
    array = np.asarray(payload[key])
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(f"{key} arrived as {array.dtype}; the protocol sends float32 or float16")
    tensor = torch.as_tensor(array.astype(np.float32))
    scale = payload.get(SCALE_PREFIX + key)
    return tensor * float(scale) if scale is not None else tensor


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample flips and shifts, drawn by the server and applied identically on both sides.

    Stored as an int array (N, 1 + spatial_dims): column 0 flips the first spatial axis
    (left-right after RAS orientation), the rest are integer shifts in voxels.
    """

    table: np.ndarray

    @staticmethod
    def draw(rng: np.random.Generator, n: int, spatial_dims: int, max_shift: int) -> AugmentParams:
        flips = rng.integers(0, 2, size=(n, 1))
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n, spatial_dims))
        return AugmentParams(np.concatenate([flips, shifts], axis=1).astype(np.int16))

    @staticmethod
    def identity(n: int, spatial_dims: int) -> AugmentParams:
        return AugmentParams(np.zeros((n, 1 + spatial_dims), dtype=np.int16))


def apply_augment(batch: torch.Tensor, params: AugmentParams, fill: float) -> torch.Tensor:
    """Flip and shift every sample of `batch` (N, C, *spatial) by its row of `params`.

    Shifted-in voxels take `fill` (the background value), so the brain never wraps around.
    """
    table = np.asarray(params.table)
    if table.shape[0] != batch.shape[0]:
        raise ValueError(f"augmentation table has {table.shape[0]} rows for a batch of {batch.shape[0]}")
    spatial_dims = batch.ndim - 2
    out = torch.empty_like(batch)
    for i, row in enumerate(table):
        sample = batch[i]
        if row[0]:
            sample = torch.flip(sample, dims=(1,))
        shifted = torch.full_like(sample, fill)
        src, dst = [slice(None)], [slice(None)]
        for axis in range(spatial_dims):
            shift, size = int(row[1 + axis]), sample.shape[1 + axis]
            if shift >= 0:
                src.append(slice(0, size - shift))
                dst.append(slice(shift, size))
            else:
                src.append(slice(-shift, size))
                dst.append(slice(0, size + shift))
        shifted[tuple(dst)] = sample[tuple(src)]
        out[i] = shifted
    return out
