"""Every ModalityBank default, once: the generator, the server's run, the site's adversary.

The job's controller takes `generator` (GeneratorConfig) and `server` (ControllerConfig); the
site executor takes `site` (BankSiteConfig) and `adversary` (AdversaryConfig). The recipes in
`fedmodal.jobs`, `fedmodal pretrain-generator` and the benchmarks build the same dataclasses,
so a default changed here changes everywhere. The site learns the image size, slice choice,
batch and run seed from the server at registration: they are set once, on the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmodal import MODALITIES
from fedmodal.amp import check_precision
from fedmodal.config import Settings
from fedmodal.fl.site import SiteConfig
from fedmodal.fl.timing import TASK_POLL_SECONDS
from fedmodal.nets.generator import UPSAMPLING

MODES = ("bank", "asyndgan")
STEP_TRANSPORTS = ("direct", "task")
WIRE_PRECISIONS = ("float32", "float16")  # fedmodal.modalitybank.protocol.pack
SLICE_CHOICES = ("tumour", "brain")
SPLITS = ("train", "val", "test", "all")


@dataclass
class GeneratorConfig(Settings):
    """Everything that fixes the generator's shape and its training schedule.

    Args:
        mode: "bank" (pretrain unmodulated on the source modality, freeze, then one mAdaFM bank
            entry per target modality) or "asyndgan" (one output channel per modality, no bank).
        spatial_dims: 2 (slices, as in the paper) or 3 (volumes).
        image_size: side of the square (cubic) images G produces; sites resample to it.
        ngf: generator width (64 in the paper).
        n_blocks: residual blocks (9 in the paper).
        upsample: "transpose" (pix2pix's transposed convolutions, the paper's) or "resize"
            (nearest-neighbour x2 + convolution; no checkerboard stripes).
        modulate: which convs the bank modulates: "resblocks" (reference code) or "all" (paper text).
        source_modality: the modality G is pretrained on.
        target_modalities: the modalities G learns to synthesise (canonical order is kept);
            empty means every modality some site holds, resolved when the sites register.
        train_source_bank: in "bank" mode, also train the source modality's bank entry. By
            default it stays at its initial value, which reproduces the pretrained generator
            exactly, so the source modality costs no bank-phase compute.
        pretrain_steps: G steps of the pretraining phase ("bank" mode).
        bank_steps: G steps of the bank phase; in "asyndgan" mode the single phase gets
            pretrain_steps + bank_steps, the same budget.
        batch_size: samples per site per step.
        lr: Adam learning rate, constant for half a phase then linearly decayed to 0; the
            sites' discriminators follow the same schedule.
        beta1: Adam's first beta.
        max_shift: largest augmentation shift in voxels (0 disables shifts; flips stay).
        seed: run seed; each site derives its own from it and its name.
    """

    mode: str = "bank"
    spatial_dims: int = 2
    image_size: int = 64
    ngf: int = 32
    n_blocks: int = 4
    upsample: str = "resize"
    modulate: str = "resblocks"
    source_modality: str = "t1"
    target_modalities: tuple[str, ...] = ()
    train_source_bank: bool = False
    pretrain_steps: int = 1200
    bank_steps: int = 800
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.5
    max_shift: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {self.upsample!r}")
        unknown = [m for m in (self.source_modality, *self.target_modalities) if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; expected names from {MODALITIES}")
        self.target_modalities = tuple(m for m in MODALITIES if m in self.target_modalities)

    @property
    def phases(self) -> list[tuple[str, int]]:
        if self.mode == "asyndgan":
            return [("asyndgan", self.pretrain_steps + self.bank_steps)]
        return [("pretrain", self.pretrain_steps), ("bank", self.bank_steps)]

    def phase_modalities(self, phase: str) -> tuple[str, ...]:
        """The modalities whose fakes are trained in `phase`."""
        if phase == "pretrain":
            return (self.source_modality,)
        if phase == "bank" and not self.train_source_bank:
            return tuple(m for m in self.target_modalities if m != self.source_modality)
        return self.target_modalities


@dataclass
class ControllerConfig(Settings):
    """How the server runs the federation (nothing here changes the generator's weights).

    Args:
        slices: which axial slices sites train on: "tumour" or "brain".
        min_sites: sites required to start, and to go on: a site that does not answer a step
            within `step_timeout` is dropped from the run while at least `min_sites` sites are
            left and every modality of the phase is still held by one of them; it rejoins when
            it answers a new registration (sent to it every `rejoin_every` steps).
        step_timeout: seconds a site gets to answer one step (a step takes 0.3-0.6 s on this
            2-core CPU at the default size; raise it for far larger images or slow links). The
            first step, which also builds the discriminators, gets `register_timeout`.
        register_timeout: seconds the sites get to register: they read and prepare their data
            first (building the phantoms on a first run, minutes for a hospital's BraTS folder).
        rejoin_every: steps between registration offers to dropped sites.
        log_every: steps between progress lines.
        sample_every: steps between sample grids (PNG + TensorBoard).
        checkpoint_every: steps between checkpoints (always at phase ends and at the end).
        preview_count: masks per site in the final real-vs-synthetic grids drawn at the sites.
        resume_from: checkpoint folder of an earlier run to continue from.
        pretrained_generator: checkpoint folder of a plain generator pretrained elsewhere (e.g.
            `fedmodal pretrain-generator` on a dataset the server holds); skips pretraining.
        device: "auto", "cpu" or "cuda[:i]".
        num_threads: torch CPU threads at the server (0 keeps torch's default: every core).
        task_poll: seconds between the workflow's checks for finished tasks, and between an
            idle site's task requests (registration and previews are tasks).
        step_transport: how step payloads travel. "direct" pushes them to the sites as NVFlare
            aux messages through the same filters as tasks (one round trip per step); "task"
            sends NVFlare tasks, which wait for each site's next poll.
        wire_precision: "float32" or "float16" for the fakes and the gradients a step carries;
            float16 halves a step's bytes (for wide-area links), the arrays scaled per tensor so
            the small gradients keep their digits (`fedmodal.modalitybank.protocol.pack`).
        precision: the generator's arithmetic: "auto" (bf16 on a CUDA device with native bf16,
            else fp16 with a gradient scaler; bf16 on a CPU with native bf16 (AMX, AVX512-BF16),
            else fp32), "fp32", "bf16" or "fp16" (`fedmodal.amp`).
    """

    slices: str = "tumour"
    min_sites: int = 2
    step_timeout: float = 30.0
    register_timeout: float = 1800.0
    rejoin_every: int = 10
    log_every: int = 20
    sample_every: int = 100
    checkpoint_every: int = 200
    preview_count: int = 4
    resume_from: str = ""
    pretrained_generator: str = ""
    device: str = "auto"
    num_threads: int = 0
    task_poll: float = TASK_POLL_SECONDS
    step_transport: str = "direct"
    wire_precision: str = "float32"
    precision: str = "auto"

    def __post_init__(self):
        check_precision(self.precision, "server precision")
        if self.wire_precision not in WIRE_PRECISIONS:
            raise ValueError(f"wire_precision must be one of {WIRE_PRECISIONS}, got {self.wire_precision!r}")
        if self.step_transport not in STEP_TRANSPORTS:
            raise ValueError(f"step_transport must be one of {STEP_TRANSPORTS}, got {self.step_transport!r}")
        if self.slices not in SLICE_CHOICES:
            raise ValueError(f"slices must be one of {SLICE_CHOICES}, got {self.slices!r}")
        self.log_every = max(1, int(self.log_every))


@dataclass
class AdversaryConfig(Settings):
    """How a site's discriminators train and what it returns.

    Args:
        ndf: discriminator width (64 in the paper).
        n_layers: PatchGAN depth (3 gives the 70x70 receptive field).
        lr: Adam learning rate (decayed on the server's schedule).
        beta1: Adam's first beta.
        lambda_l1: weight of the L1 term to the real image (100 in pix2pix/AsynDGAN).
        l1_in_brain: restrict the L1 term to the brain mask (the default: the background is
            fixed at -1 anyway, and the L1 over it only pulls the brain's grey levels down).
        dp_clip: per-sample L2 bound C on the returned gradient (0 = no clipping); a site's
            `fedmodal_site.json` may raise it (the stricter value wins).
        dp_noise: noise multiplier sigma; Gaussian noise N(0, (sigma*C)^2) per sample; the site
            file may raise it too.
        precision: the discriminators' arithmetic at each site, as the server's `precision`;
            the gradient that leaves is an fp32 array (computed through the discriminator's precision).
    """

    ndf: int = 32
    n_layers: int = 3
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_l1: float = 100.0
    l1_in_brain: bool = True
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    precision: str = "auto"

    def __post_init__(self):
        check_precision(self.precision, "adversary precision")
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise ValueError(
                f"dp_noise {self.dp_noise} needs dp_clip > 0: the noise is dp_noise x dp_clip per sample, so without "
                "a clip the site would add none and its gradients would leave as they are (set dp_clip too)"
            )


@dataclass
class BankSiteConfig(SiteConfig):
    """A ModalityBank site: the common site settings plus what this protocol adds.

    Args:
        split: the manifest split to train on ("train", "val", "test" or "all").
        share_masks: send the label maps once at registration (the paper's protocol). A
            `fedmodal_site.json` in the data root may say "share_masks": false, which wins.
        state_dir: where the site keeps its discriminators at each server checkpoint (per site
            and run), so that a run resumed with the controller's `resume_from` continues with
            them. Empty means `modalitybank_state/` in the site's NVFlare workspace, which lasts
            across jobs in a deployment; the simulator wipes its workspace on every run, so
            point this elsewhere there.
    """

    split: str = "train"
    share_masks: bool = True
    state_dir: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
