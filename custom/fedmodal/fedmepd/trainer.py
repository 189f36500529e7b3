"""The FedMEPD trainer of one participant: the full-modal server or a client with some modalities.

It knows the network, the losses, inference and the metrics; not files beyond its own
checkpoint, and not NVFlare. Read top to bottom: build -> weights by key group -> train an
epoch (optionally calibrated by anchors) -> fused features for the anchors -> predict and
score -> checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss

from fedmodal.amp import MixedPrecision
from fedmodal.atomic import save_atomically
from fedmodal.brats import MODALITIES, REGIONS, ordered_modalities
from fedmodal.fedmepd.anchors import CaseFeatures, ClassPooler
from fedmodal.fedmepd.config import FedMEPDConfig
from fedmodal.metrics import segmentation_scores
from fedmodal.nets.fedmepd import FedMEPDNet

CHECKPOINT_FORMAT = "fedmodal-fedmepd/1"
IGNORE = -1  # label of voxels outside the brain or in padding: pooled into no class


class SegmentationLoss(torch.nn.Module):
    """Weighted cross-entropy + Dice over softmax classes (Dice over the tumour classes, batch-pooled).

    CE = sum over voxels of w[class] * -log p[class], divided by the voxel count.

    Args:
        num_classes: softmax classes.
        class_weights: fixed CE weights; empty: 1 - each class's share of the batch (RFNet).
    """

    def __init__(self, num_classes: int, class_weights: Sequence[float] = ()) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_weights = tuple(class_weights)
        self.dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """logits (B, K, *S); label (B, 1, *S) canonical labels."""
        target = label[:, 0].long()
        if self.class_weights:
            weight = torch.tensor(self.class_weights, device=logits.device, dtype=logits.dtype)
        else:
            share = torch.bincount(target.flatten(), minlength=self.num_classes).to(logits.dtype) / target.numel()
            weight = 1.0 - share
        # Weighted voxel mean (not normalised by the weights): finite when one class fills the batch.
        ce = F.cross_entropy(logits, target, weight=weight, reduction="sum") / target.numel()
        return ce + self.dice(logits, label)


class FedMEPDTrainer:
    """Owns a `FedMEPDNet`, its loss and Adam optimiser, for the server or one client.

    Args:
        config: the FedMEPD settings.
        held_modalities: the modalities this participant trains with (the server: all four).
        device: torch device.
        seed: seeds the weights' initialisation.
    """

    def __init__(
        self,
        config: FedMEPDConfig,
        held_modalities: Sequence[str] = MODALITIES,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.config = config
        self.held = ordered_modalities(held_modalities)
        unknown = sorted(set(held_modalities) - set(MODALITIES))
        if unknown or not self.held:
            raise ValueError(f"held modalities {list(held_modalities)}: need some of {list(MODALITIES)}")
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.net = FedMEPDNet(**config.net_args()).to(self.device)
        self.loss_fn = SegmentationLoss(self.net.num_classes, config.class_weights)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.amp = MixedPrecision(config.precision, self.device)
        self.held_mask = torch.tensor([m in self.held for m in MODALITIES])
        self.steps_done = 0

    # ------------------------------------------------------------------ weights by key group

    def state_numpy(self, groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The weights whose keys start with one of `groups` (e.g. "enc.t1.", "dec."), all if None."""
        prefixes = None if groups is None else tuple(groups)
        return {
            k: v.detach().cpu().numpy().copy()
            for k, v in self.net.state_dict().items()
            if prefixes is None or k.startswith(prefixes)
        }

    def load_groups(self, params: Mapping[str, Any], groups: Iterable[str] | None = None) -> None:
        """Load received weights (numpy or tensors) into the network.

        Args:
            params: key -> array; every key must be this network's, with its shape.
            groups: if given, the keys must start with one of them and each group must be complete.

        Raises:
            ValueError: naming the unknown, missing, foreign or mis-shaped keys.
        """
        own = self.net.state_dict()
        prefixes = None if groups is None else tuple(groups)
        unknown = sorted(k for k in params if k not in own)
        foreign = sorted(k for k in params if prefixes is not None and not k.startswith(prefixes))
        missing = [] if prefixes is None else sorted(k for k in own if k.startswith(prefixes) and k not in params)
        wrong = [
            f"{k}: received {tuple(np.shape(v))}, network has {tuple(own[k].shape)}"
            for k, v in sorted(params.items())
            if k in own and tuple(np.shape(v)) != tuple(own[k].shape)
        ]
        if unknown or foreign or missing or wrong:
            raise ValueError(
                f"received weights do not fit the FedMEPD network {self.net.config()}: unknown keys {unknown[:3]}, "
                f"keys outside groups {list(prefixes or ())} {foreign[:3]}, missing {missing[:3]}, shapes {wrong[:3]}"
            )
        state = {k: torch.as_tensor(np.asarray(v)).to(own[k].dtype) for k, v in params.items()}
        self.net.load_state_dict(state, strict=False)

    def _anchors(self, anchors: Sequence[Any] | None) -> list[torch.Tensor | None] | None:
        if anchors is None:
            return None
        return [None if a is None else torch.as_tensor(np.asarray(a)).float().to(self.device) for a in anchors]

    # ------------------------------------------------------------------ training

    def train_epoch(self, loader: Iterable[Mapping[str, Any]], anchors: Sequence[Any] | None = None) -> dict:
        """One pass over `loader` (batches with "image" (B, 4, *S), "avail" (B, 4), "label" (B, 1, *S)).

        Args:
            loader: e.g. `fedmodal.baselines.data.train_loader(cases, config.seg_config(), seed)`.
            anchors: per scale (A_s, C_s) anchors (a client's calibration); None: the server.

        Returns:
            {"loss", "loss_fused", "loss_aux" (means over the epoch), "steps", "seconds"}.
        """
        self.net.train()
        anchors_t = self._anchors(anchors)
        start, totals, steps = time.time(), [], 0
        for batch in loader:
            image = batch["image"].to(self.device, non_blocking=True).float()
            present = torch.as_tensor(batch["avail"]).bool() & self.held_mask
            present = present.to(self.device)
            label = batch["label"].to(self.device, non_blocking=True).long()
            with self.amp.autocast():
                out = self.net(image, present, anchors_t)
            fused = self.loss_fn(out.logits.float(), label)
            aux_losses = [
                self.loss_fn(logits[present[:, MODALITIES.index(m)]].float(), label[present[:, MODALITIES.index(m)]])
                for m, logits in out.aux.items()
            ]
            aux = torch.stack(aux_losses).mean() if aux_losses else torch.zeros((), device=self.device)
            loss = fused + self.config.aux_weight * aux
            self.optimizer.zero_grad(set_to_none=True)
            self.amp.step(loss, self.optimizer)
            totals.append(torch.stack([loss.detach(), fused.detach(), aux.detach()]))
            steps += 1
        self.steps_done += steps
        means = torch.stack(totals).mean(0).tolist() if totals else [math.nan] * 3
        return {
            "loss": means[0],
            "loss_fused": means[1],
            "loss_aux": means[2],
            "steps": steps,
            "seconds": time.time() - start,
        }

    # ------------------------------------------------------------------ features for the anchors

    def _tiles(self, volume: Mapping[str, Any]):
        """A volume cropped to its brain and padded to whole patches -> (image, label) tiles."""
        brain = volume["brain"].bool()
        label = torch.where(brain, volume["label"].long(), torch.full_like(volume["label"].long(), IGNORE))
        coords = torch.nonzero(brain)
        lo, hi = coords.min(0).values, coords.max(0).values + 1
        image = volume["image"][:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].float()
        label = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        if self.config.spatial_dims == 2:  # axial slices, each a batch of one
            image, label = image.permute(3, 0, 1, 2), label.permute(2, 0, 1)
        else:
            image, label = image[None], label[None]
        patch = self.config.patch_size
        pad = []
        for size, p in zip(reversed(image.shape[2:]), reversed(patch)):
            pad += [0, -size % p]
        image, label = F.pad(image, pad), F.pad(label, pad, value=IGNORE)
        grids = [range(0, size, p) for size, p in zip(image.shape[2:], patch)]
        for corner in np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, len(patch)):
            window = tuple(slice(int(c), int(c) + p) for c, p in zip(corner, patch))
            yield image[(slice(None), slice(None), *window)], label[(slice(None), *window)]

    @torch.no_grad()
    def fused_features(
        self, data: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]]
    ) -> dict[str, CaseFeatures]:
        """Per case, the class means of the fused features at each scale (for the `AnchorBank`).

        Args:
            data: loader batches with "case_id", "image", "avail", "label" (`train_loader`'s
                patches: cheap, tumour-biased), or whole volumes (`load_volumes`; tiled by patch
                over the brain: every voxel, ~50x the cost on a CPU).

        Returns:
            case id -> `CaseFeatures` (per scale (num_classes, C_s), and which classes occur).
        """
        self.net.eval()
        poolers: dict[str, ClassPooler] = {}
        for item in data:
            if item["image"].ndim == self.config.spatial_dims + 1:  # one whole volume
                pooler = poolers.setdefault(item["case_id"], ClassPooler(self.net.num_classes))
                present = tuple(m for m, a in zip(MODALITIES, item["avail"].tolist()) if a and m in self.held)
                for image, label in self._tiles(item):
                    pooler.add(self.net(image.to(self.device), present, with_aux=False).features, label)
                continue
            present = (torch.as_tensor(item["avail"]).bool() & self.held_mask).to(self.device)
            features = self.net(item["image"].to(self.device).float(), present, with_aux=False).features
            for b, case in enumerate(item["case_id"]):
                pooler = poolers.setdefault(case, ClassPooler(self.net.num_classes))
                pooler.add([f[b : b + 1] for f in features], item["label"][b : b + 1])
        return {case: pooler.result() for case, pooler in poolers.items()}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(
        self, image: torch.Tensor, present: Sequence[str], anchors: Sequence[Any] | None = None, brain=None
    ) -> np.ndarray:
        """Canonical label map (X, Y, Z) of one volume (4, X, Y, Z): sliding windows of the patch size
        (2D: over each axial slice), argmax over the classes, nothing outside `brain`."""
        self.net.eval()
        anchors_t = self._anchors(anchors)

        def logits(x: torch.Tensor) -> torch.Tensor:
            with self.amp.autocast():
                return self.net(x, present, anchors_t, with_aux=False).logits.float()

        x = image.float().to(self.device)
        roi = tuple(self.config.patch_size)
        args = {"sw_batch_size": self.config.sw_batch_size, "overlap": self.config.sw_overlap, "mode": "gaussian"}
        if self.config.spatial_dims == 2:
            out = sliding_window_inference(x.permute(3, 0, 1, 2), roi, predictor=logits, **args).permute(1, 2, 3, 0)
        else:
            out = sliding_window_inference(x[None], roi, predictor=logits, **args)[0]
        label = out.argmax(0)
        if brain is not None:
            label = label * brain.to(label.device).bool()
        return label.cpu().numpy().astype(np.int64)

    def score(
        self,
        volumes: Sequence[Mapping[str, Any]],
        anchors: Sequence[Any] | None = None,
        modalities: Sequence[str] | None = None,
        keep_predictions: bool = False,
    ) -> list[dict[str, Any]]:
        """Per-case BraTS scores (Dice, sensitivity, specificity, HD95 for WT, TC, ET).

        Args:
            volumes: from `fedmodal.baselines.data.load_volumes`.
            anchors: per scale anchors (a client's calibrated model); None: no calibration.
            modalities: feed only these (default: each case's modalities among the held ones).
            keep_predictions: add the predicted label map under "prediction".

        Returns:
            one dict per case: {"case_id", "scores": region -> metric -> value, "seconds"}, as
            `fedmodal.baselines.trainer.SegTrainer.score` (so `flat_metrics` summarises both).
        """
        results = []
        for volume in volumes:
            start = time.time()
            wanted = set(self.held if modalities is None else modalities) & set(self.held)
            present = tuple(m for m, a in zip(MODALITIES, volume["avail"].tolist()) if a and m in wanted)
            if not present:
                raise ValueError(f"case {volume['case_id']}: none of {sorted(wanted)} is available to score with")
            pred = self.predict(volume["image"], present, anchors, volume["brain"])
            scores = segmentation_scores(pred, volume["label"].numpy(), volume["spacing"], et_label=3, regions=REGIONS)
            record = {"case_id": volume["case_id"], "scores": scores, "seconds": time.time() - start}
            if keep_predictions:
                record["prediction"] = pred
            results.append(record)
        return results

    # ------------------------------------------------------------------ checkpoint

    def save(
        self, path: str | Path, extras: Mapping[str, np.ndarray] | None = None, meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the personalised model atomically: weights, network spec, settings, held modalities,
        `extras` (numpy: e.g. the anchors, the personal-filter mask) and `meta`."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "net": self.net.config(),
            "config": self.config.to_dict(),
            "held_modalities": list(self.held),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "extras": {k: np.asarray(v) for k, v in (extras or {}).items()},
            "meta": dict(meta or {}),
        }
        return save_atomically(path, lambda temp: torch.save(payload, temp))

    def load(self, path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Load a checkpoint written by `save` into this trainer; returns (extras, meta)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no FedMEPD checkpoint at {path}")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a FedMEPD checkpoint ({CHECKPOINT_FORMAT})")
        if payload["net"] != self.net.config():
            raise ValueError(f"{path} holds network {payload['net']}, this trainer has {self.net.config()}")
        self.load_groups(payload["state_dict"])
        return dict(payload["extras"]), dict(payload["meta"])
