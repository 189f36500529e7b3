"""MDM-MixMFL's site trainer: one site's personalised `MixMFLNet`, its Adam and loss.

Reads top to bottom like a round at a site: load the global groups -> train one local epoch
(pseudo features for missing modalities retrieved from the global memory) -> cluster the
epoch's tailored vectors into prototypes -> send the groups the site holds. Knows no NVFlare
and no files beyond its own checkpoint; data come as the baselines' loaders and volumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from fedmodal import MODALITIES
from fedmodal.amp import MixedPrecision
from fedmodal.atomic import save_atomically
from fedmodal.baselines.data import region_targets, regions_to_label
from fedmodal.baselines.trainer import build_loss
from fedmodal.metrics import segmentation_scores
from fedmodal.mixmfl.config import MixMFLConfig
from fedmodal.mixmfl.memory import PrototypeMemory, cluster_prototypes
from fedmodal.nets.mixmfl import MixMFLLoss, MixMFLNet, key_group, pseudo_features, site_groups

CHECKPOINT_FORMAT = "fedmodal-mixmfl/1"


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain tensor: no metadata tracking in the network."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class MixMFLTrainer:
    """Owns a site's `MixMFLNet`, its Adam optimiser and `MixMFLLoss`.

    Args:
        config: the method's settings.
        held_modalities: what the site holds (its manifest's `modalities`), any order.
        device: torch device.
        seed: seeds the initial weights and the k-means.
    """

    def __init__(
        self, config: MixMFLConfig, held_modalities: Sequence[str], device: torch.device | str = "cpu", seed: int = 0
    ) -> None:
        unknown = [m for m in held_modalities if m not in MODALITIES]
        if unknown or not held_modalities:
            raise ValueError(
                f"held_modalities must be a non-empty subset of {MODALITIES}, got {tuple(held_modalities)}"
            )
        self.cfg = config
        self.held = tuple(m for m in MODALITIES if m in held_modalities)
        self.device = torch.device(device)
        self.seed = seed
        torch.manual_seed(seed)
        self.net = MixMFLNet(**config.net_args()).to(self.device)
        lambda_cls, lambda_triplet = config.loss_weights
        self.loss_fn = MixMFLLoss(
            build_loss("dicece"), self.net.modalities, lambda_cls, lambda_triplet, config.triplet_margin
        )
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.amp = MixedPrecision(config.precision, self.device)
        self.epochs_done = 0
        self._vectors: dict[str, np.ndarray] = {}

    @property
    def groups(self) -> tuple[str, ...]:
        """The key groups this site trains and may send: the shared groups plus `enc.<m>` for each held m."""
        return site_groups(self.held)

    # ------------------------------------------------------------------ weights

    def state_numpy(self, groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The weights as numpy arrays, only those of `groups` (default: every key)."""
        state = self.net.state_dict()
        if groups is not None:
            groups = set(groups)
            known = {key_group(k) for k in state}
            if groups - known:
                raise ValueError(f"unknown key groups {sorted(groups - known)}; the network has {sorted(known)}")
            state = {k: v for k, v in state.items() if key_group(k) in groups}
        return {k: v.detach().cpu().numpy() for k, v in state.items()}

    def load_global(self, params: Mapping[str, Any], allowed_groups: Iterable[str] | None = None) -> dict[str, Any]:
        """Load received weights of the allowed groups; every other key keeps its local value.

        Args:
            params: key -> numpy array (or tensor), any subset of the network's keys.
            allowed_groups: groups to take (default `groups`); keys of other groups are skipped.

        Returns:
            {"loaded": keys loaded, "skipped": keys of groups not allowed}.

        Raises:
            ValueError: a key the network does not have, or a shape that differs (named).
        """
        allowed = set(self.groups if allowed_groups is None else allowed_groups)
        own = self.net.state_dict()
        unknown = sorted(set(params) - set(own))
        if unknown:
            raise ValueError(
                f"received weights name keys this MixMFLNet {self.net.config()} does not have: {unknown[:5]}"
            )
        loaded, skipped = {}, []
        for key, value in params.items():
            if key_group(key) not in allowed:
                skipped.append(key)
                continue
            if tuple(np.shape(value)) != tuple(own[key].shape):
                raise ValueError(
                    f"received weight {key!r} has shape {tuple(np.shape(value))}, this network's is {tuple(own[key].shape)}; "
                    "the server's model and the site's net settings must be identical"
                )
            loaded[key] = torch.as_tensor(np.asarray(value)).to(own[key].dtype)
        self.net.load_state_dict(loaded, strict=False)
        return {"loaded": sorted(loaded), "skipped": sorted(skipped)}

    # ------------------------------------------------------------------ training

    def _memory_tensors(self, memory: PrototypeMemory | None) -> dict[str, torch.Tensor | None]:
        if memory is None or not self.cfg.use_memory:
            return {}
        return {
            m: (p.to(self.device) if p is not None else None)
            for m, p in memory.as_tensors().items()
            if m not in self.held
        }

    def _check_batch(self, avail: torch.Tensor) -> None:
        held = torch.tensor([m in self.held for m in MODALITIES])
        lacking = (~avail.bool().cpu() & held).any(dim=0)
        if lacking.any():
            names = [m for m, bad in zip(MODALITIES, lacking.tolist()) if bad]
            raise ValueError(f"a training sample lacks {names}, which this site is set to hold ({self.held})")

    def train_epoch(
        self, loader: Iterable[Mapping[str, Any]], memory: PrototypeMemory | None = None
    ) -> dict[str, float]:
        """One pass over `loader`; keeps the epoch's per-sample pooled tailored vectors for `prototypes`.

        Args:
            loader: batches with "image" (B, 4, *S), "avail" (B, 4), "label" (B, 1, *S), e.g.
                `fedmodal.baselines.data.train_loader(cases, config.loader_config(), seed)`.
            memory: the global prototype memory; with `use_memory`, missing modalities that have
                prototypes get retrieved pseudo features (others a zero slot).

        Returns:
            mean "loss", "seg", "cls", "triplet" over the epoch, "steps", "samples",
            "retrieved" (missing modalities served by the memory) and "seconds".
        """
        self.net.train()
        bank = self._memory_tensors(memory)
        vectors: dict[str, list[torch.Tensor]] = {m: [] for m in self.held}
        sums: dict[str, list[torch.Tensor]] = {"loss": [], "seg": [], "cls": [], "triplet": []}
        start, samples, retrieved = time.time(), 0, 0
        for batch in loader:
            self._check_batch(torch.as_tensor(batch["avail"]))
            image = _plain(batch["image"]).to(self.device, non_blocking=True).float()
            target = region_targets(_plain(batch["label"]).to(self.device, non_blocking=True), self.cfg.regions)
            self.optimizer.zero_grad(set_to_none=True)
            with self.amp.autocast():
                encoded = self.net.encode(image, self.held)
                pseudo = pseudo_features(encoded.tailored_vec, bank, self.cfg.retrieval_temperature) if bank else {}
                out = self.net.decode(encoded, pseudo)
            parts = self.loss_fn(out, target)
            self.amp.step(parts["loss"], self.optimizer)
            for name, value in parts.items():
                sums[name].append(value.detach())
            for m in self.held:
                vectors[m].append(out.tailored_vec[m].detach().float().cpu())
            samples += image.shape[0]
            retrieved = len(pseudo)
        self._vectors = {m: torch.cat(v).numpy() for m, v in vectors.items() if v}
        self.epochs_done += 1
        stats = {name: float(torch.stack(v).mean()) if v else math.nan for name, v in sums.items()}
        return {
            **stats,
            "steps": len(sums["loss"]),
            "samples": samples,
            "retrieved": retrieved,
            "seconds": time.time() - start,
        }

    def epoch_vectors(self) -> dict[str, np.ndarray]:
        """Held modality -> the last epoch's per-sample pooled tailored vectors (N, C). Stays at the site."""
        return dict(self._vectors)

    def prototypes(self, k: int | None = None, min_cluster_size: int | None = None) -> dict[str, np.ndarray]:
        """Held modality -> k-means prototypes (k', C), k' <= k, of the last epoch's vectors: what the site writes to the memory.

        Args:
            k: clusters (default `kmeans_k`).
            min_cluster_size: fewest samples a prototype averages (default the config's).
        """
        k = self.cfg.kmeans_k if k is None else k
        size = self.cfg.min_cluster_size if min_cluster_size is None else min_cluster_size
        channels = self.net.features[-1]
        out = {}
        for m in self.held:
            features = self.epoch_vectors().get(m, np.zeros((0, channels), dtype=np.float32))
            out[m] = cluster_prototypes(features, k, size, seed=self.seed + self.epochs_done)[0]
        return out

    # ------------------------------------------------------------------ inference

    def _segment(self, window: torch.Tensor, bank: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        encoded = self.net.encode(window, self.held)
        pseudo = pseudo_features(encoded.tailored_vec, bank, self.cfg.retrieval_temperature) if bank else {}
        return self.net.decode(encoded, pseudo, decoupler=False).logits

    @torch.no_grad()
    def predict(
        self, image: torch.Tensor, brain: torch.Tensor | None = None, memory: PrototypeMemory | None = None
    ) -> np.ndarray:
        """Canonical label map (X, Y, Z) of one volume, from the held modalities only.

        2D networks see every axial slice, 3D ones a sliding window of the patch size; windows
        smaller than the patch are padded.

        Args:
            image: (4, X, Y, Z) z-scored modalities in canonical order.
            brain: optional (X, Y, Z) mask; predictions outside it are removed.
            memory: the global memory (pseudo features for missing modalities, with `use_memory`).
        """
        self.net.eval()
        bank = self._memory_tensors(memory)
        x = _plain(image).float().to(self.device)

        def predictor(window: torch.Tensor) -> torch.Tensor:
            return self._segment(window, bank)

        roi = tuple(self.cfg.patch_size)
        with self.amp.autocast():
            if self.cfg.spatial_dims == 2:
                logits = sliding_window_inference(
                    x.permute(3, 0, 1, 2),
                    roi,
                    self.cfg.sw_batch_size,
                    predictor,
                    overlap=self.cfg.sw_overlap,
                    mode="gaussian",
                ).permute(1, 2, 3, 0)
            else:
                logits = sliding_window_inference(
                    x[None], roi, self.cfg.sw_batch_size, predictor, overlap=self.cfg.sw_overlap, mode="gaussian"
                )[0]
        masks = torch.sigmoid(logits.float()) >= self.cfg.threshold
        if brain is not None:
            masks &= brain.to(masks.device).bool()[None]
        return regions_to_label(masks, self.cfg.regions)

    def score(
        self, volumes: Sequence[Mapping[str, Any]], memory: PrototypeMemory | None = None
    ) -> list[dict[str, Any]]:
        """Per-case BraTS scores (Dice, sensitivity, specificity, HD95 per region) of the personalised model.

        Args:
            volumes: from `fedmodal.baselines.data.load_volumes` (each must hold the site's modalities).
            memory: as `predict`.

        Returns:
            one dict per case: {"case_id", "scores": region -> metric -> value, "seconds"}
            (`fedmodal.baselines.trainer.flat_metrics` summarises them).
        """
        results = []
        for volume in volumes:
            start = time.time()
            avail = dict(zip(MODALITIES, torch.as_tensor(volume["avail"]).bool().tolist()))
            lacking = [m for m in self.held if not avail[m]]
            if lacking:
                raise ValueError(f"case {volume['case_id']} lacks {lacking}, which this site's model reads")
            pred = self.predict(volume["image"], volume["brain"], memory)
            scores = segmentation_scores(
                pred, volume["label"].numpy(), volume["spacing"], et_label=3, regions=self.cfg.regions
            )
            results.append({"case_id": volume["case_id"], "scores": scores, "seconds": time.time() - start})
        return results

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
        """Write the personalised model (weights, network spec, settings, held modalities, meta) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "net": self.net.config(),
            "config": self.cfg.to_dict(),
            "held_modalities": list(self.held),
            "epochs_done": self.epochs_done,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "meta": dict(meta or {}),
        }
        save_atomically(path, lambda tmp: torch.save(payload, tmp))
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        """Load a `save`d model into this trainer (same network and modalities); returns its meta."""
        payload = _read_checkpoint(path)
        if payload["net"] != self.net.config() or tuple(payload["held_modalities"]) != self.held:
            raise ValueError(
                f"{path} holds a model of {payload['net']} for {payload['held_modalities']}; "
                f"this trainer has {self.net.config()} for {list(self.held)}"
            )
        self.net.load_state_dict(payload["state_dict"])
        self.epochs_done = int(payload.get("epochs_done", 0))
        return dict(payload.get("meta", {}))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu") -> MixMFLTrainer:
        """A trainer rebuilt from a `save`d checkpoint (settings and held modalities included)."""
        payload = _read_checkpoint(path)
        trainer = cls(MixMFLConfig.from_dict(payload["config"]), payload["held_modalities"], device=device)
        trainer.load(path)
        return trainer


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MixMFL checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a MixMFL checkpoint ({CHECKPOINT_FORMAT})")
    return payload
