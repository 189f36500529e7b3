"""The segmentation trainer every baseline shares: local, centralised and each FedAvg site.

It knows MONAI (network, losses, sliding-window inference) and the BraTS metrics; it does not
know where data lives, and of NVFlare it uses only `PTFedProxLoss` (imported when FedProx is
on). Read top to bottom: build -> train epochs (optionally with a FedProx term towards a
reference model) -> predict a volume -> score cases -> checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceFocalLoss

from fedmodal.amp import MixedPrecision
from fedmodal.atomic import save_atomically
from fedmodal.baselines.config import SegConfig
from fedmodal.baselines.data import drop_modalities, network_input, region_targets, regions_to_label
from fedmodal.brats import MODALITIES
from fedmodal.metrics import segmentation_scores, summarise
from fedmodal.nets.segmentation import SegmentationNet

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedmodal-seg/1"


def build_loss(name: str) -> torch.nn.Module:
    """Dice + BCE ("dicece") or Dice + focal ("dicefocal") over sigmoid region channels.

    Dice is pooled over the batch (`batch=True`): 2D slices without tumour would otherwise each
    contribute an ill-defined per-sample Dice.
    """
    if name == "dicece":
        return DiceCELoss(sigmoid=True, batch=True)
    if name == "dicefocal":
        return DiceFocalLoss(sigmoid=True, batch=True)
    raise ValueError(f"unknown loss {name!r}")


class SegTrainer:
    """Owns a `SegmentationNet`, its loss and Adam optimiser, and runs epochs and inference.

    Args:
        cfg: the baseline configuration.
        device: torch device.
        seed: seeds the weights' initialisation and modality dropout.
    """

    def __init__(self, cfg: SegConfig, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.net = SegmentationNet(**cfg.net_args()).to(self.device)
        if any(size % self.net.divisor for size in cfg.patch_size):
            raise ValueError(
                f"patch_size {cfg.patch_size} must be a multiple of {self.net.divisor} for this network's depth"
            )
        self.loss_fn = build_loss(cfg.loss)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = MixedPrecision(cfg.precision, self.device)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.steps_done = 0

    # ------------------------------------------------------------------ weights

    def state_numpy(self) -> dict[str, np.ndarray]:
        """The network weights as numpy arrays (what crosses the wire: no decomposer needed)."""
        return {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}

    def load_weights(self, weights: Mapping[str, Any], source: str = "the received model") -> None:
        """Load weights (numpy arrays or tensors), refusing any mismatch with a clear message."""
        own = self.net.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        wrong = [
            f"{k}: {tuple(np.shape(weights[k]))} vs {tuple(own[k].shape)}"
            for k in own
            if k in weights and tuple(np.shape(weights[k])) != tuple(own[k].shape)
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source} does not fit this site's network {self.net.config()}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatches {wrong[:3]}. "
                "The server persistor's model args and the site's net settings must be identical."
            )
        state = {k: torch.as_tensor(v).to(own[k].dtype) for k, v in weights.items()}
        self.net.load_state_dict(state)

    # ------------------------------------------------------------------ training

    def train_epochs(
        self,
        loader: Iterable[Mapping[str, Any]],
        epochs: int,
        fedprox_mu: float = 0.0,
        should_stop: Callable[[], bool] | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ) -> dict[str, float]:
        """Train for `epochs` passes over `loader`.

        Args:
            loader: batches with "image" (B, 4, *S), "avail" (B, 4), "label" (B, 1, *S).
            epochs: passes over the loader.
            fedprox_mu: FedProx coefficient; > 0 adds mu/2 * ||w - w_start||^2 towards the
                weights held when this call started (the received global model).
            should_stop: polled between steps; True stops early (an abort).
            on_epoch: called after each epoch with (epoch index, {"loss", "steps", "seconds"}).

        Returns:
            {"loss": mean loss of the last epoch, "steps": steps taken, "seconds": wall time}.
        """
        self.net.train()
        reference = None
        if fedprox_mu > 0:
            from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

            prox = PTFedProxLoss(mu=fedprox_mu)
            reference = copy.deepcopy(self.net).eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        start, steps, last_loss = time.time(), 0, math.nan
        for epoch in range(epochs):
            epoch_start, losses = time.time(), []
            for batch in loader:
                if should_stop is not None and should_stop():
                    return {"loss": last_loss, "steps": steps, "seconds": time.time() - start, "stopped": True}
                image = batch["image"].to(self.device, non_blocking=True).float()
                avail = drop_modalities(
                    torch.as_tensor(batch["avail"]).bool(), self.cfg.modality_dropout, self.generator
                )
                x = network_input(image, avail, self.cfg.mask_channels)
                y = region_targets(batch["label"].to(self.device, non_blocking=True), self.cfg.regions)
                self.optimizer.zero_grad(set_to_none=True)
                with self.amp.autocast():
                    logits = self.net(x)
                loss = self.loss_fn(logits.float(), y)
                if reference is not None:
                    loss = loss + prox(self.net, reference)
                self.amp.step(loss, self.optimizer)
                losses.append(loss.detach())  # no per-step device sync; averaged once per epoch
                steps += 1
                self.steps_done += 1
            last_loss = float(torch.stack(losses).mean()) if losses else math.nan
            if on_epoch is not None:
                on_epoch(epoch, {"loss": last_loss, "steps": len(losses), "seconds": time.time() - epoch_start})
        return {"loss": last_loss, "steps": steps, "seconds": time.time() - start, "stopped": False}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, image: torch.Tensor, avail: torch.Tensor, brain: torch.Tensor | None = None) -> np.ndarray:
        """Canonical label map (X, Y, Z) of one volume.

        2D networks see every axial slice (sliding over the slice when it is larger than the
        training size); 3D networks slide a window of the training patch size.

        Args:
            image: (4, X, Y, Z) z-scored modalities (missing ones are zeroed here anyway).
            avail: (4,) availability used as input.
            brain: optional (X, Y, Z) mask; predictions outside it are removed.
        """
        self.net.eval()
        x = network_input(image[None].float(), avail[None], self.cfg.mask_channels)[0].to(self.device)
        roi = tuple(self.cfg.patch_size)  # smaller inputs are padded up to it
        with self.amp.autocast():
            if self.cfg.spatial_dims == 2:
                slices = x.permute(3, 0, 1, 2)  # (Z, C, X, Y): the slices are the batch
                logits = sliding_window_inference(
                    slices, roi, self.cfg.sw_batch_size, self.net, overlap=self.cfg.sw_overlap, mode="gaussian"
                )
                logits = logits.permute(1, 2, 3, 0)  # (R, X, Y, Z)
            else:
                logits = sliding_window_inference(
                    x[None], roi, self.cfg.sw_batch_size, self.net, overlap=self.cfg.sw_overlap, mode="gaussian"
                )[0]
        masks = torch.sigmoid(logits.float()) >= self.cfg.threshold
        if brain is not None:
            masks &= brain.to(masks.device).bool()[None]
        return regions_to_label(masks, self.cfg.regions)

    def score(
        self,
        volumes: Sequence[Mapping[str, Any]],
        modalities: Sequence[str] | None = None,
        keep_predictions: bool = False,
        lesion_wise=None,
    ) -> list[dict[str, Any]]:
        """Per-case BraTS scores (Dice, sensitivity, specificity, HD95 per predicted region).

        Args:
            volumes: from `fedmodal.baselines.data.load_volumes`.
            modalities: feed only these modalities (others zeroed, mask 0); default each case's own.
            keep_predictions: add the predicted label map under "prediction".
            lesion_wise: `LesionRules` of a tumour type: add the lesion-wise scores.

        Returns:
            one dict per case: {"case_id", "scores": region -> metric -> value, "seconds"}.
        """
        results = []
        for volume in volumes:
            start = time.time()
            avail = volume["avail"].clone()
            if modalities is not None:
                avail &= torch.tensor([m in modalities for m in MODALITIES])
            pred = self.predict(volume["image"], avail, volume["brain"])
            scores = segmentation_scores(
                pred,
                volume["label"].numpy(),
                volume["spacing"],
                et_label=3,
                regions=self.cfg.regions,
                lesion_wise=lesion_wise,
            )
            record = {"case_id": volume["case_id"], "scores": scores, "seconds": time.time() - start}
            if keep_predictions:
                record["prediction"] = pred
            results.append(record)
        return results


def mean_dice(results: Sequence[Mapping[str, Any]]) -> float:
    """Mean Dice over cases and regions: the model-selection metric."""
    if not results:
        return math.nan
    return float(np.mean([s["dice"] for r in results for s in r["scores"].values()]))


def flat_metrics(results: Sequence[Mapping[str, Any]], prefix: str = "") -> dict[str, float]:
    """Case means as flat scalars: {prefix}dice (mean over regions), {prefix}dice_WT, {prefix}hd95_WT, ..."""
    if not results:
        return {}
    summary = summarise([r["scores"] for r in results])
    out = {f"{prefix}dice": mean_dice(results)}
    for region, metrics in summary.items():
        for metric, stats in metrics.items():
            out[f"{prefix}{metric}_{region}"] = float(stats["mean"])
    out[f"{prefix}n_cases"] = float(len(results))
    return out


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, trainer: SegTrainer, meta: Mapping[str, Any] | None = None) -> Path:
    """Write a fedmodal segmentation checkpoint atomically: weights, network spec, settings, meta.

    `meta` should say what a reader needs, e.g. "trained_modalities", "sites", "epoch".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "net": trainer.net.config(),
        "config": trainer.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in trainer.net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return save_atomically(path, lambda temp: torch.save(payload, temp))


def _persistor_spec(path: Path) -> dict[str, Any] | None:
    """The `SegmentationNet` args an NVFlare server persistor was configured with, read from the
    app's `config/config_fed_server.json` beside (or above) the checkpoint."""
    import json

    for folder in (path.parent, *path.parents[:3]):
        config = folder / "config" / "config_fed_server.json"
        if not config.is_file():
            continue
        components = json.loads(config.read_text()).get("components", [])
        for component in components:
            model = component.get("args", {}).get("model")
            if not isinstance(model, dict):
                continue
            path_name, args = str(model.get("path", "")), dict(model.get("args", {}))
            if path_name.endswith("NamedSegmentationNet"):
                from fedmodal.nets.segmentation import NamedSegmentationNet, preset_net_args

                return preset_net_args(args.get("preset", NamedSegmentationNet.DEFAULT_PRESET))
            if path_name.endswith("SegmentationNet"):
                return args
    return None


def load_checkpoint(path: str | Path, net_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a segmentation checkpoint: a fedmodal one (`save_checkpoint`) or an NVFlare server
    persistor file (`FL_global_model.pt`, `best_FL_global_model.pt`).

    For NVFlare files the network spec comes from `net_args`, else from the persistor's model
    args in the server app's `config/config_fed_server.json`.

    Returns:
        {"net": SegmentationNet args, "config": settings dict or None, "state_dict", "meta"}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        return {
            "net": dict(net_args or payload["net"]),
            "config": payload.get("config"),
            "state_dict": payload["state_dict"],
            "meta": dict(payload.get("meta", {})),
        }
    if isinstance(payload, dict) and "model" in payload and isinstance(payload["model"], dict):
        spec = dict(net_args) if net_args else _persistor_spec(path)
        if spec is None:
            raise ValueError(
                f"{path} is an NVFlare model file without a network spec: pass --net-config (the "
                "SegmentationNet args of the job's persistor), or keep it in its app folder beside config/"
            )
        return {"net": spec, "config": None, "state_dict": payload["model"], "meta": {"source": "nvflare-persistor"}}
    raise ValueError(f"{path} is neither a fedmodal segmentation checkpoint nor an NVFlare PyTorch model file")


def trainer_from_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", net_args: Mapping[str, Any] | None = None, **overrides: Any
) -> tuple[SegTrainer, dict[str, Any]]:
    """A `SegTrainer` holding a checkpoint's weights (for scoring), and the checkpoint's meta.

    `overrides` change inference settings (e.g. `sw_overlap`, `threshold`, `precision`);
    precision is "auto" for the inference device unless given, whatever training used."""
    overrides = {"precision": "auto", **overrides}
    loaded = load_checkpoint(path, net_args)
    if loaded["config"]:
        settings = {**loaded["config"], **overrides}
        cfg = SegConfig.from_dict({**settings, **_net_to_cfg(loaded["net"])})
    else:
        cfg = SegConfig.from_net_args(loaded["net"], **overrides)
    trainer = SegTrainer(cfg, device=device)
    trainer.load_weights(loaded["state_dict"], source=str(path))
    return trainer, loaded["meta"]


def _net_to_cfg(net_args: Mapping[str, Any]) -> dict[str, Any]:
    cfg = SegConfig.from_net_args(net_args)
    return {
        k: getattr(cfg, k)
        for k in (
            "spatial_dims",
            "regions",
            "arch",
            "channels",
            "num_res_units",
            "dropout",
            "mask_channels",
            "patch_size",
        )
    }
