"""Every default of MDM-MixMFL's site training, in one settings dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedmodal.amp import check_precision
from fedmodal.baselines.config import SegConfig, sampling_config
from fedmodal.config import Settings

# CPU-sized defaults per dimensionality (see `MixMFLConfig` for the measurements behind them).
DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"features": (16, 32, 64), "patch_size": (64, 64), "batch_size": 8, "samples_per_case": 4},
    3: {"features": (8, 16, 32), "patch_size": (48, 48, 32), "batch_size": 2, "samples_per_case": 1},
}


@dataclass
class MixMFLConfig(Settings):
    """MDM-MixMFL site training settings (the paper's values where it gives them).

    The CPU default is 2D. Measured on this 2-core machine (one torch thread, the default
    96x96x62 "mixmfl" phantoms, site-1 holding t1 + t1ce, 9 training cases, pseudo features
    retrieved for t2 and flair), seconds per training step (forward, backward, Adam):

    - 2D 96x96, features (16, 32, 64), batch 8 (2 cases x 4 slices): 0.79 s; 4.0 s an epoch
      of 5 steps; 0.79 M parameters.
    - 2D 64x64, features (16, 32, 64), batch 8: 0.37 s. The default: six sites share two
      cores in the simulator, and the default job (25 rounds x 4 local epochs) must finish
      within 20 minutes; at 96x96 and one epoch per round, 10 rounds took 3 min 21 s and
      reached only 0.1 WT Dice (40 steps per site).
    - 2D 96x96, features (8, 16, 32), batch 8: 0.37 s.
    - 2D 96x96, features (16, 32, 64, 128), batch 8: 0.88 s (3.2 M parameters).
    - 3D 48x48x32, features (8, 16, 32), batch 2 patches: 1.11 s; 5.6 s an epoch.
    - 3D 64x64x48, features (8, 16, 32), batch 2 patches: 2.70 s; 13.5 s an epoch.

    Scoring one 96x96x62 volume slice by slice took 2.3 s. Six sites sharing two cores thus
    spend about 12 s of wall time training a round, about 20 s with one validation case each:
    some 25 rounds in 10 minutes. 3D patches that fit that budget see far less of a case per
    step than the 2D batch. The paper trains 3D 128^3 crops of TransBTS on GPUs: set
    spatial_dims=3 and larger features / patch_size on a GPU site.

    Args:
        spatial_dims: 2 (axial slices; volumes scored slice by slice) or 3 (patches, sliding window).
        features: encoder channels per level (the last is the bottleneck, the prototype size).
        regions: predicted BraTS regions, one sigmoid channel each.
        patch_size: training slice (2D) or patch (3D), also the inference window; a multiple
            of 2 ** (len(features) - 1).
        batch_size: slices or patches per step (4 in the paper).
        samples_per_case: slices or patches drawn from a case per epoch; must be smaller than
            `min_cluster_size`, so a prototype always averages samples of several cases.
        tumour_probability: share of samples through / centred on tumour.
        augment: random flips and intensity jitter.
        cache: keep loaded, normalised cases in memory.
        loader_workers: training-data worker processes; -1: none on a CPU host (its cores
            train), up to 4 on a CUDA host, with pinned memory (`fedmodal.baselines.data`).
        lr: Adam learning rate (4e-4 in the paper).
        weight_decay: Adam weight decay.
        lambda_cls: weight of the modality classification loss (0.5 in the paper).
        lambda_triplet: weight of the entropy triplet loss (1e-4 in the paper).
        triplet_margin: the triplet loss's margin (in nats of entropy).
        grl_lambda: gradient-reversal factor on the shared features' classification.
        output_prior: initial foreground probability of each region's sigmoid (0: the layers'
            default). Measured on mixmfl site-1 trained alone: mDice 0.05 after 30 epochs with
            0, 0.59 after 10 with 0.05 (`fedmodal.nets.output_prior`).
        kmeans_k: cluster centres written per modality and local epoch.
        min_cluster_size: fewest samples a prototype may average; smaller clusters are dropped.
        memory_capacity: prototypes kept per modality (200 in the paper).
        retrieval_temperature: softmax temperature over cosine similarities at retrieval.
        threshold: sigmoid threshold of a region at inference.
        sw_overlap: sliding-window overlap at inference.
        sw_batch_size: windows per forward pass at inference.
        precision: "auto", "fp32", "bf16" or "fp16" (`fedmodal.amp`).
        tailored_updating: Table 3 switch, used by the server: False averages every tailored
            encoder over all sites like the shared groups.
        use_memory: Table 3 switch: retrieve pseudo features for missing modalities.
        use_triplet: Table 3 switch: the entropy triplet loss.
        use_classification: Table 3 switch: the modality classification loss.
    """

    settings_name = "mixmfl"

    spatial_dims: int = 2
    features: tuple[int, ...] = ()
    regions: tuple[str, ...] = ("WT", "TC", "ET")
    patch_size: tuple[int, ...] = ()
    batch_size: int = 0
    samples_per_case: int = 0
    tumour_probability: float = 0.67
    augment: bool = True
    cache: bool = True
    loader_workers: int = -1
    lr: float = 4e-4
    weight_decay: float = 0.0
    lambda_cls: float = 0.5
    lambda_triplet: float = 1e-4
    triplet_margin: float = 1.0
    grl_lambda: float = 1.0
    output_prior: float = 0.05
    kmeans_k: int = 4
    min_cluster_size: int = 5
    memory_capacity: int = 200
    retrieval_temperature: float = 0.1
    threshold: float = 0.5
    sw_overlap: float = 0.25
    sw_batch_size: int = 8
    precision: str = "auto"
    tailored_updating: bool = True
    use_memory: bool = True
    use_triplet: bool = True
    use_classification: bool = True

    def __post_init__(self) -> None:
        if self.spatial_dims not in DEFAULTS:
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        defaults = DEFAULTS[self.spatial_dims]
        for name in ("features", "patch_size", "batch_size", "samples_per_case"):
            if not getattr(self, name):
                setattr(self, name, defaults[name])
        self.features = tuple(int(f) for f in self.features)
        self.patch_size = tuple(int(s) for s in self.patch_size)
        self.regions = tuple(str(r).upper() for r in self.regions)
        divisor = 2 ** (len(self.features) - 1)
        if len(self.patch_size) != self.spatial_dims or any(s % divisor for s in self.patch_size):
            raise ValueError(
                f"patch_size {self.patch_size} must have {self.spatial_dims} sizes, each a multiple of {divisor}"
            )
        check_precision(self.precision)
        if self.samples_per_case >= self.min_cluster_size:
            raise ValueError(
                f"samples_per_case ({self.samples_per_case}) must be smaller than min_cluster_size ({self.min_cluster_size}): "
                "a prototype must average samples of more than one case"
            )
        if self.kmeans_k < 1 or self.memory_capacity < 1 or self.retrieval_temperature <= 0:
            raise ValueError("kmeans_k and memory_capacity must be at least 1 and retrieval_temperature positive")

    def net_args(self) -> dict[str, Any]:
        """Arguments of `fedmodal.nets.mixmfl.MixMFLNet` (what the server's model must match)."""
        return {
            "spatial_dims": self.spatial_dims,
            "features": list(self.features),
            "regions": list(self.regions),
            "grl_lambda": self.grl_lambda,
            "output_prior": self.output_prior,
        }

    def loader_config(self) -> SegConfig:
        """The sampling settings in the form `fedmodal.baselines.data.train_loader` reads."""
        return sampling_config(self, self.regions)

    @property
    def loss_weights(self) -> tuple[float, float]:
        """(lambda_cls, lambda_triplet) after the ablation switches (a switched-off term weighs 0)."""
        return (self.lambda_cls if self.use_classification else 0.0, self.lambda_triplet if self.use_triplet else 0.0)
