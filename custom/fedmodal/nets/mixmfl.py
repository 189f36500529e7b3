"""MDM-MixMFL's segmentation network: modality-tailored and modality-shared encoders, the
modality decoupler (classifier behind a gradient-reversal layer, pair-wise fusion for the
entropy triplet loss) and a decoder fed by four fixed modality slots.

Parameter keys are grouped by prefix because the server aggregates by group: `enc.<modality>.`
(one tailored encoder per modality, averaged over the sites holding it), `enc.shared.`,
`fuse.`, `cls.` and `dec.` (averaged over every site). `key_group` names a key's group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetBasicBlock, UpSample
from torch import nn

from fedmodal import MODALITIES
from fedmodal.metrics import REGIONS
from fedmodal.nets.output_prior import apply_output_prior

TAILORED_PREFIX = "enc.{modality}."
SHARED_PREFIXES = ("enc.shared.", "fuse.", "cls.", "dec.")
SHARED_GROUPS = tuple(p.rstrip(".") for p in SHARED_PREFIXES)
NORM = "instance"


def tailored_group(modality: str) -> str:
    """The key group of a modality's tailored encoder, e.g. "enc.t1"."""
    return TAILORED_PREFIX.format(modality=modality).rstrip(".")


def site_groups(held: Sequence[str]) -> tuple[str, ...]:
    """The groups a site holding `held` modalities trains and may send: shared ones plus its tailored encoders."""
    return SHARED_GROUPS + tuple(tailored_group(m) for m in held)


def key_group(name: str) -> str:
    """The group of a parameter key: "enc.<modality>", "enc.shared", "fuse", "cls" or "dec"."""
    parts = name.split(".")
    if parts[0] == "enc" and len(parts) > 2:
        return f"enc.{parts[1]}"
    if parts[0] in ("fuse", "cls", "dec") and len(parts) > 1:
        return parts[0]
    raise ValueError(
        f"parameter key {name!r} belongs to no MixMFL group (enc.<modality>., {', '.join(SHARED_PREFIXES)})"
    )


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda (Ganin and Lempitsky's GRL)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambda_ * grad, None


def pooled(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N, C): the mean over the spatial grid."""
    return x.flatten(2).mean(dim=2)


class Encoder(nn.Module):
    """A one-channel convolutional encoder: a full-resolution stage, then one stride-2 stage per further level.

    Args:
        spatial_dims: 2 or 3.
        features: channels per level; the last level is the bottleneck.
    """

    def __init__(self, spatial_dims: int, features: Sequence[int]) -> None:
        super().__init__()
        ins = (1, *features[:-1])
        self.stages = nn.ModuleList(
            UnetBasicBlock(spatial_dims, i, o, kernel_size=3, stride=1 if k == 0 else 2, norm_name=NORM)
            for k, (i, o) in enumerate(zip(ins, features))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels


class Decoder(nn.Module):
    """U-Net decoder over five inputs per level: the shared mean and four modality slots.

    Args:
        spatial_dims: 2 or 3.
        features: the encoders' channels per level.
        out_channels: output channels (one logit per region).
        slots: modality slots (4).
    """

    def __init__(self, spatial_dims: int, features: Sequence[int], out_channels: int, slots: int) -> None:
        super().__init__()
        width = slots + 1
        self.bottom = UnetBasicBlock(
            spatial_dims, width * features[-1], features[-1], kernel_size=3, stride=1, norm_name=NORM
        )
        self.up = nn.ModuleList(
            UpSample(spatial_dims, features[k + 1], features[k], scale_factor=2, mode="deconv")
            for k in range(len(features) - 1)
        )
        self.blocks = nn.ModuleList(
            UnetBasicBlock(
                spatial_dims, (width + 1) * features[k], features[k], kernel_size=3, stride=1, norm_name=NORM
            )
            for k in range(len(features) - 1)
        )
        self.head = Convolution(spatial_dims, features[0], out_channels, kernel_size=1, conv_only=True)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(levels[-1])
        for k in reversed(range(len(self.up))):
            x = self.blocks[k](torch.cat([self.up[k](x), levels[k]], dim=1))
        return self.head(x)


@dataclass
class Encoded:
    """Per present modality, the tailored and shared encoders' features at every level (last = bottleneck)."""

    present: tuple[str, ...]
    tailored: dict[str, list[torch.Tensor]]
    shared: dict[str, list[torch.Tensor]]

    @property
    def tailored_vec(self) -> dict[str, torch.Tensor]:
        """Present modality -> pooled tailored bottleneck (N, C): the per-sample vectors prototypes are made of."""
        return {m: pooled(f[-1]) for m, f in self.tailored.items()}


@dataclass
class MixMFLOutput:
    """What `MixMFLNet.forward` returns.

    Args:
        logits: segmentation logits (N, len(regions), *S).
        tailored: present modality -> tailored bottleneck feature (N, C, *s).
        tailored_vec: present modality -> its pooled vector (N, C).
        shared: present modality -> shared bottleneck feature (N, C, *s).
        cls_tailored: present modality -> classifier logits (N, M) of its tailored vector.
        cls_shared: present modality -> classifier logits (N, M) of its shared vector, through the GRL.
        fused_ss: fusions of (shared_i, shared_j), i < j over present modalities.
        fused_st: fusions of (shared_i, tailored_j) over every pair of present modalities.
    """

    logits: torch.Tensor
    tailored: dict[str, torch.Tensor] = field(default_factory=dict)
    tailored_vec: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    cls_tailored: dict[str, torch.Tensor] = field(default_factory=dict)
    cls_shared: dict[str, torch.Tensor] = field(default_factory=dict)
    fused_ss: list[torch.Tensor] = field(default_factory=list)
    fused_st: list[torch.Tensor] = field(default_factory=list)


class MixMFLNet(nn.Module):
    """MDM-MixMFL's network, on MONAI blocks, for 2D slices or 3D patches.

    Every present modality goes through its own tailored encoder (`enc.<modality>`) and the
    shared encoder (`enc.shared`, the same weights for every modality). The decoder (`dec`)
    sees, at the bottleneck and at every skip level, the mean of the present modalities' shared
    features followed by four tailored slots in `modalities` order: a present modality's own
    feature; a missing one's pseudo feature (a (N, C) vector retrieved from the prototype
    memory, broadcast over the bottleneck grid; zeros without one, and zeros at skip levels).
    Fixed slots keep the decoder the same at every site, whatever it holds. The decoupler is
    a classifier (`cls`) over pooled bottleneck vectors, shared ones passing a gradient-reversal
    layer, and a pair-wise fusion layer (`fuse`) whose outputs only feed the triplet loss.

    Args:
        spatial_dims: 2 or 3.
        features: channels per level (each level after the first halves the grid); input sizes
            must be multiples of `divisor`.
        regions: output channels, a subset of ("WT", "TC", "ET") in that order.
        modalities: the slots, in canonical order; input channel k is modality k.
        grl_lambda: the gradient-reversal factor for the shared features' classification.
        output_prior: initial foreground probability of each region's sigmoid
            (`fedmodal.nets.output_prior`); 0 keeps the default initialisation.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        features: Sequence[int] = (16, 32, 64),
        regions: Sequence[str] = ("WT", "TC", "ET"),
        modalities: Sequence[str] = MODALITIES,
        grl_lambda: float = 1.0,
        output_prior: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        regions, modalities, features = tuple(regions), tuple(modalities), tuple(int(f) for f in features)
        if not regions or list(regions) != [r for r in REGIONS if r in regions]:
            raise ValueError(f"regions must be a non-empty subset of {REGIONS} in that order, got {regions}")
        if "shared" in modalities or len(set(modalities)) != len(modalities) or len(modalities) < 2:
            raise ValueError(f"modalities must be at least two distinct names other than 'shared', got {modalities}")
        if len(features) < 2:
            raise ValueError(f"features needs at least two levels, got {features}")
        self.spatial_dims, self.regions, self.modalities, self.features = spatial_dims, regions, modalities, features
        self.grl_lambda, self.output_prior = float(grl_lambda), float(output_prior)
        bottleneck = features[-1]
        self.enc = nn.ModuleDict({m: Encoder(spatial_dims, features) for m in (*modalities, "shared")})
        self.fuse = UnetBasicBlock(spatial_dims, 2 * bottleneck, bottleneck, kernel_size=3, stride=1, norm_name=NORM)
        self.cls = nn.Sequential(
            nn.Linear(bottleneck, bottleneck), nn.LeakyReLU(0.01), nn.Linear(bottleneck, len(modalities))
        )
        self.dec = Decoder(spatial_dims, features, len(regions), len(modalities))
        if self.output_prior:
            apply_output_prior(self.dec, len(regions), self.output_prior)

    @property
    def divisor(self) -> int:
        """Spatial sizes the network accepts are multiples of this."""
        return 2 ** (len(self.features) - 1)

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able): `MixMFLNet(**net.config())` rebuilds it."""
        return {
            "spatial_dims": self.spatial_dims,
            "features": list(self.features),
            "regions": list(self.regions),
            "modalities": list(self.modalities),
            "grl_lambda": self.grl_lambda,
            "output_prior": self.output_prior,
        }

    def _check_present(self, images: torch.Tensor, present: Sequence[str]) -> tuple[str, ...]:
        unknown = [m for m in present if m not in self.modalities]
        if unknown or not present:
            raise ValueError(f"present must be a non-empty subset of {self.modalities}, got {tuple(present)}")
        if images.ndim != self.spatial_dims + 2 or images.shape[1] != len(self.modalities):
            raise ValueError(
                f"images must be (N, {len(self.modalities)}, *{self.spatial_dims} spatial dims), got {tuple(images.shape)}"
            )
        return tuple(m for m in self.modalities if m in present)

    def encode(self, images: torch.Tensor, present: Sequence[str]) -> Encoded:
        """Run the tailored and shared encoders on the present modalities' channels only."""
        present = self._check_present(images, present)
        tailored, shared = {}, {}
        for m in present:
            x = images[:, self.modalities.index(m)].unsqueeze(1)
            tailored[m] = self.enc[m](x)
            shared[m] = self.enc["shared"](x)
        return Encoded(present, tailored, shared)

    def decode(
        self, encoded: Encoded, pseudo: Mapping[str, torch.Tensor] | None = None, decoupler: bool = True
    ) -> MixMFLOutput:
        """Segment from encoded features; with `decoupler`, also the classifier logits and fusions.

        Args:
            encoded: from `encode`.
            pseudo: missing modality -> (N, C) pseudo bottleneck feature (others' slots stay zero).
            decoupler: compute the decoupler's outputs (training); False gives logits only.
        """
        pseudo = dict(pseudo or {})
        extra = [m for m in pseudo if m in encoded.present or m not in self.modalities]
        if extra:
            raise ValueError(
                f"pseudo features are for missing modalities only; got {extra} with {encoded.present} present"
            )
        first = next(iter(encoded.tailored.values()))
        levels = []
        for k in range(len(self.features)):
            shared_mean = torch.stack([encoded.shared[m][k] for m in encoded.present]).mean(dim=0)
            slots = [shared_mean]
            for m in self.modalities:
                if m in encoded.tailored:
                    slots.append(encoded.tailored[m][k])
                elif k == len(self.features) - 1 and m in pseudo:
                    vector = pseudo[m].to(shared_mean.dtype)
                    slots.append(vector.reshape(*vector.shape, *(1,) * self.spatial_dims).expand_as(shared_mean))
                else:
                    slots.append(torch.zeros_like(first[k]))
            levels.append(torch.cat(slots, dim=1))
        out = MixMFLOutput(logits=self.dec(levels))
        if not decoupler:
            return out
        for m in encoded.present:
            t, s = encoded.tailored[m][-1], encoded.shared[m][-1]
            out.tailored[m], out.shared[m] = t, s
            out.tailored_vec[m] = pooled(t)
            out.cls_tailored[m] = self.cls(out.tailored_vec[m])
            out.cls_shared[m] = self.cls(GradientReversal.apply(pooled(s), self.grl_lambda))
        out.fused_ss = [
            self.fuse(torch.cat([out.shared[a], out.shared[b]], 1))
            for a, b in itertools.combinations(encoded.present, 2)
        ]
        out.fused_st = [
            self.fuse(torch.cat([out.shared[a], out.tailored[b]], 1)) for a in encoded.present for b in encoded.present
        ]
        return out

    def forward(
        self,
        images: torch.Tensor,
        present: Sequence[str],
        pseudo: Mapping[str, torch.Tensor] | None = None,
        decoupler: bool = True,
    ) -> MixMFLOutput:
        """Encode and decode.

        Args:
            images: (N, len(modalities), *S) in `modalities` order; missing channels are never read.
            present: the modalities the batch holds (the same for every sample).
            pseudo: missing modality -> (N, C) pseudo bottleneck feature (see `pseudo_features`).
            decoupler: also return the decoupler's outputs.
        """
        return self.decode(self.encode(images, present), pseudo, decoupler)


# ----------------------------------------------------------------------------- memory retrieval


def retrieve(query: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Softmax-weighted sum of prototypes, weights from cosine similarity to the query.

    Args:
        query: (N, C) query vectors.
        prototypes: (Q, C) prototypes of one modality.
        temperature: softmax temperature over the Q cosine similarities.

    Returns:
        (N, C): sum_q softmax_q(cos(query, p_q) / temperature) * p_q.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    prototypes = prototypes.to(device=query.device, dtype=query.dtype)
    similarity = F.normalize(query, dim=1) @ F.normalize(prototypes, dim=1).T
    return torch.softmax(similarity / temperature, dim=1) @ prototypes


def pseudo_features(
    tailored_vec: Mapping[str, torch.Tensor], prototypes: Mapping[str, torch.Tensor | None], temperature: float = 0.1
) -> dict[str, torch.Tensor]:
    """Pseudo features of the missing modalities that have prototypes.

    Each present modality's pooled tailored vector queries the missing modality's prototypes
    (`retrieve`) and the read-outs are averaged over the present modalities. Queries are
    detached: the memory is a read-only input, and the tailored encoders learn from their own
    outputs only.

    Args:
        tailored_vec: present modality -> (N, C) pooled tailored vectors.
        prototypes: modality -> (Q, C) prototypes or None; present modalities are skipped.
        temperature: as `retrieve`.
    """
    out = {}
    for m, bank in prototypes.items():
        if m in tailored_vec or bank is None or len(bank) == 0:
            continue
        out[m] = torch.stack([retrieve(v.detach(), bank, temperature) for v in tailored_vec.values()]).mean(dim=0)
    return out


# ----------------------------------------------------------------------------- decoupler losses


def modality_classification_loss(
    cls_tailored: Mapping[str, torch.Tensor], cls_shared: Mapping[str, torch.Tensor], modalities: Sequence[str]
) -> torch.Tensor:
    """Cross-entropy of the modality classifier over every tailored and shared representation.

    The label of a representation is its modality's index in `modalities`; shared logits come
    through the gradient-reversal layer, so minimising this makes shared features modality-invariant.
    """
    logits, labels = [], []
    for group in (cls_tailored, cls_shared):
        for m, z in group.items():
            logits.append(z)
            labels.append(torch.full((z.shape[0],), list(modalities).index(m), dtype=torch.long, device=z.device))
    if not logits:
        raise ValueError("no representation to classify")
    return F.cross_entropy(torch.cat(logits).float(), torch.cat(labels))


def gaussian_entropy(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Entropy of a representation under a diagonal Gaussian: 0.5 * sum_c log(2 pi e var_c).

    Args:
        x: (N, C, *s); the variance of channel c is taken over the samples and voxels.
        eps: added to each variance.
    """
    values = x.float().movedim(1, -1).reshape(-1, x.shape[1])
    var = values.var(dim=0, unbiased=False) + eps
    return 0.5 * torch.log(2 * math.pi * math.e * var).sum()


def entropy_triplet_loss(
    shared_set: Sequence[torch.Tensor],
    fused_ss_set: Sequence[torch.Tensor],
    fused_st_set: Sequence[torch.Tensor],
    margin: float = 1.0,
) -> torch.Tensor:
    """relu(max d(shared, fused_ss) - min d(shared, fused_st) + margin), d(a, b) = |H(a) - H(b)|.

    Pulls the entropy of (shared, shared) fusions towards the shared representations and
    pushes (shared, tailored) fusions away. Zero when a set is empty (a site with one modality).

    Args:
        shared_set: shared representations, each (N, C, *s).
        fused_ss_set: (shared, shared) fusions.
        fused_st_set: (shared, tailored) fusions.
        margin: the margin.
    """
    if not shared_set or not fused_ss_set or not fused_st_set:
        reference = next((t for t in (*shared_set, *fused_ss_set, *fused_st_set)), None)
        return torch.zeros((), device=None if reference is None else reference.device)
    h_shared = torch.stack([gaussian_entropy(a) for a in shared_set])
    h_ss = torch.stack([gaussian_entropy(b) for b in fused_ss_set])
    h_st = torch.stack([gaussian_entropy(b) for b in fused_st_set])
    positive = (h_shared[:, None] - h_ss[None, :]).abs().max()
    negative = (h_shared[:, None] - h_st[None, :]).abs().min()
    return F.relu(positive - negative + margin)


class MixMFLLoss(nn.Module):
    """Segmentation loss + lambda_cls * modality classification + lambda_triplet * entropy triplet.

    A term whose weight is 0 is not computed (the ablations switch terms off that way).

    Args:
        seg_loss: the segmentation loss on (logits, region targets), e.g. MONAI's `DiceCELoss(sigmoid=True)`.
        modalities: class order of the modality classifier.
        lambda_cls: classification weight (0.5 in the paper).
        lambda_triplet: triplet weight (1e-4 in the paper).
        margin: triplet margin.
    """

    def __init__(
        self,
        seg_loss: nn.Module,
        modalities: Sequence[str] = MODALITIES,
        lambda_cls: float = 0.5,
        lambda_triplet: float = 1e-4,
        margin: float = 1.0,
    ) -> None:
        super().__init__()
        self.seg_loss, self.modalities = seg_loss, tuple(modalities)
        self.lambda_cls, self.lambda_triplet, self.margin = float(lambda_cls), float(lambda_triplet), float(margin)

    def forward(self, out: MixMFLOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss": total, "seg", "cls", "triplet"} (unweighted terms; an unused one is 0)."""
        zero = torch.zeros((), device=target.device)
        seg = self.seg_loss(out.logits.float(), target)
        cls = (
            modality_classification_loss(out.cls_tailored, out.cls_shared, self.modalities) if self.lambda_cls else zero
        )
        triplet = (
            entropy_triplet_loss(list(out.shared.values()), out.fused_ss, out.fused_st, self.margin)
            if self.lambda_triplet
            else zero
        )
        total = seg + self.lambda_cls * cls + self.lambda_triplet * triplet
        return {"loss": total, "seg": seg, "cls": cls, "triplet": triplet}
