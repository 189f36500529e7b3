"""Every FedMEPD (and FedMEMA) setting and its default, for the server, the clients and the job.

Sizes are chosen for this 2-core CPU by measurement (see `FedMEPDConfig`); the paper's are
noted beside them. A GPU site raises `channels`, `patch_size` and the job's rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedmodal.amp import check_precision
from fedmodal.brats import N_LABELS, REGIONS
from fedmodal.config import Settings

PATCH_DEFAULTS = {2: (96, 96), 3: (32, 32, 32)}


@dataclass
class FedMEPDConfig(Settings):
    """FedMEPD settings: network, training, anchors, personalisation.

    Sizes measured on this 2-core CPU (torch 2.13, 1 thread a process; 3D convolutions run on
    torch's slow_conv3d path here, 2D ones on oneDNN). A: the network alone on random inputs
    (forward + backward + Adam, fused and auxiliary outputs), machine otherwise quiet (load ~2).
    B: `FedMEPDTrainer` on the fedmepd phantoms (96x96x62), the machine shared with other jobs
    (load 6-10), so 3-5x slower. "server" = 4 modalities without anchors, "client" = 2 with anchors.

    | dims | channels        | patch        | batch | A server / client s/step | B server / client s/step | B score s/case |
    |------|-----------------|--------------|-------|--------------------------|--------------------------|----------------|
    | 3D   | 8, 16, 32, 64   | 32^3         | 2     | 0.88 / 0.60              | 4.3 / 2.8                | 18.6           |
    | 3D   | 16, 32, 64, 128 | 32^3         | 2     |                          | 6.1 / 3.2                | 35.7           |
    | 3D   | 8, 16, 32, 64   | 48^3         | 1     | 4.4 / 2.7                |                          |                |
    | 3D   | 16, 32, 64, 128 | 48^3         | 1     | 3.9 / 2.6                |                          |                |
    | 3D   | 16, 32, 64, 128 | 80^3 (paper) | 1     | 18.8 / 10.1              |                          |                |
    | 2D   | 16, 32, 64, 128 | 96^2         | 8     | 1.7 / 1.25               | 10.0 / 6.9               | 13.5           |
    | 2D   | 8, 16, 32, 64   | 96^2         | 8     | 0.80 / 0.61              | 5.1 / 3.2                | 9.1            |

    The server's anchor pass over its training loader (patches, no gradient) costs 0.2 s a case
    (B, default sizes); over whole volumes tiled by patch it costs ~10 s a case, so the job
    should pool from the loader. Default job budget (A): server epoch 13 steps ~12 s, 8 clients
    x ~5 steps on 2 cores ~12 s, so ~30 s a round with NVFlare's overhead: 10 rounds took 5 min 43 s
    with the final scoring (measured), so the default job runs 20.

    Args:
        spatial_dims: 3 (patches, as in the paper) or 2 (axial slices).
        channels: encoder channels per scale (paper: 16, 32, 64, 128).
        heads: attention heads per scale (paper: 8, 8, 8, 4); each divides its channels.
        patch_size: training patch (3D) or slice crop (2D), also the inference window; a
            multiple of 8. Empty: 32^3 in 3D, 96^2 in 2D (paper: 80^3).
        batch_size: patches or slices per step (paper: 1).
        samples_per_case: patches or slices drawn from each case per epoch.
        tumour_probability: share of samples centred on / through tumour.
        augment: random flips and intensity jitter.
        lr: Adam learning rate (paper: 2e-4 over hundreds of rounds; higher for the short CPU job).
        weight_decay: Adam weight decay.
        aux_weight: weight of the auxiliary decoder's loss (mean over present modalities).
        class_weights: cross-entropy weight per class (background, necrosis, oedema, enhancing);
            empty: per batch, 1 - the class's share of the batch's voxels (RFNet's weighting).
        output_prior: the softmax heads start with background at 1 - output_prior and the
            three tumour classes sharing output_prior (0: zero bias, every class at 1/4, which
            on these few-case sites spends the short job unlearning whole-brain tumour; see
            `fedmodal.nets.output_prior`).
        use_attention: calibrate the clients' fused features with the anchors (cross-attention).
        anchors_k: clusters (anchors) per class: 4 for FedMEPD, 3 for FedMEMA.
        anchor_ema: EMA momentum of the anchors after the first clustering.
        min_cluster_size: a cluster with fewer member cases is not published.
        personalise: FedMEPD's per-filter decoder personalisation; False is FedMEMA mode
            (anchors and calibration, no per-filter counters).
        warmup_rounds: rounds (0-based) before the filter counters start counting.
        counter_start: a filter counter's start and reset value.
        blend_client: a shared filter = blend_client * sites' average + (1 - blend_client) * server's.
        sw_overlap: sliding-window overlap at inference (paper: 0.5).
        sw_batch_size: windows (3D) or slices (2D) per forward pass at inference.
        cache: keep loaded training cases in memory.
        loader_workers: training-data worker processes; -1: none on a CPU host (its cores
            train), up to 4 on a CUDA host, with pinned memory (`fedmodal.baselines.data`).
        precision: "auto" (bf16/fp16 autocast on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16"
            (`fedmodal.amp`).
    """

    settings_name = "fedmepd"

    spatial_dims: int = 3
    channels: tuple[int, ...] = (8, 16, 32, 64)
    heads: tuple[int, ...] = (8, 8, 8, 4)
    patch_size: tuple[int, ...] = ()
    batch_size: int = 2
    samples_per_case: int = 2
    tumour_probability: float = 0.67
    augment: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-5
    aux_weight: float = 1.0
    class_weights: tuple[float, ...] = ()
    output_prior: float = 0.05
    use_attention: bool = True
    anchors_k: int = 4
    anchor_ema: float = 0.999
    min_cluster_size: int = 2
    personalise: bool = True
    warmup_rounds: int = 30
    counter_start: int = 10
    blend_client: float = 0.7
    sw_overlap: float = 0.5
    sw_batch_size: int = 4
    cache: bool = True
    loader_workers: int = -1
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.spatial_dims not in PATCH_DEFAULTS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        self.patch_size = tuple(int(s) for s in (self.patch_size or PATCH_DEFAULTS[self.spatial_dims]))
        self.channels = tuple(int(c) for c in self.channels)
        self.heads = tuple(int(h) for h in self.heads)
        self.class_weights = tuple(float(w) for w in self.class_weights)
        divisor = 2 ** (len(self.channels) - 1)
        if len(self.patch_size) != self.spatial_dims or any(s % divisor for s in self.patch_size):
            raise ValueError(
                f"patch_size {self.patch_size} must have {self.spatial_dims} sizes, each a multiple of {divisor}"
            )
        if len(self.heads) != len(self.channels) or any(c % h for c, h in zip(self.channels, self.heads)):
            raise ValueError(f"heads {self.heads} must divide channels {self.channels} scale by scale")
        if self.class_weights and len(self.class_weights) != N_LABELS:
            raise ValueError(
                f"class_weights needs {N_LABELS} values (background, NCR, ED, ET), got {self.class_weights}"
            )
        if not 0.0 <= self.blend_client <= 1.0:
            raise ValueError(f"blend_client must be in [0, 1], got {self.blend_client}")
        if not 0.0 <= self.output_prior < 1.0:
            raise ValueError(f"output_prior must be in [0, 1), got {self.output_prior}")
        if not 0.0 <= self.anchor_ema < 1.0:
            raise ValueError(f"anchor_ema must be in [0, 1), got {self.anchor_ema}")

    def net_args(self) -> dict[str, Any]:
        """Arguments of `fedmodal.nets.fedmepd.FedMEPDNet` (the server and every site must agree)."""
        return {
            "spatial_dims": self.spatial_dims,
            "channels": list(self.channels),
            "num_classes": N_LABELS,
            "heads": list(self.heads),
            "use_attention": self.use_attention,
            "output_prior": self.output_prior,
        }

    def seg_config(self):
        """The baselines' `SegConfig` with this sampling, for `fedmodal.baselines.data.train_loader`."""
        from fedmodal.baselines.config import sampling_config

        return sampling_config(self, REGIONS)
