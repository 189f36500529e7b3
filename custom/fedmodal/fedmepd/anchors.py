"""Multimodal anchors: per-case class features pooled from the server's fused features,
clustered once, then followed by EMA.

Per case and class, the fused features of each scale are averaged inside the class (the label
resized to the scale: the one-hot label is area-averaged, so a class smaller than a coarse voxel
still counts with its share). `AnchorBank` clusters each class's case vectors with k-means on
its first collection and freezes the memberships (a case keeps its cluster); afterwards each
anchor follows the mean of its member cases' new features by EMA. A cluster with fewer than
`min_cluster_size` members is not published: an anchor is a mean over several cases, never
one case's features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class CaseFeatures:
    """One case's pooled class features.

    Args:
        features: per scale, (num_classes, C_s) class means (rows of absent classes are zero).
        present: (num_classes,) whether the class occurs in the case.
    """

    features: list[np.ndarray]
    present: np.ndarray


class ClassPooler:
    """Accumulates, for one case, the class sums of fused features over batches (slices or windows).

    Args:
        num_classes: label classes (canonical labels 0..num_classes-1).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums: list[torch.Tensor] | None = None
        self.weights: list[torch.Tensor] | None = None
        self.voxels = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, features: Sequence[torch.Tensor], label: torch.Tensor) -> None:
        """features: per scale (B, C_s, *S_s); label: (B, *S) or (B, 1, *S) canonical labels, < 0 ignored."""
        label = label.long()
        if label.ndim == features[0].ndim:
            label = label[:, 0]
        valid = (label >= 0).unsqueeze(1)  # negative labels (outside the brain, padding) join no class
        onehot = F.one_hot(label.clamp(0, self.num_classes - 1), self.num_classes).movedim(-1, 1) * valid
        onehot = onehot.float()
        self.voxels += onehot.sum(dim=tuple(d for d in range(onehot.ndim) if d != 1)).double().cpu()
        if self.sums is None:
            self.sums = [torch.zeros(self.num_classes, f.shape[1], dtype=torch.float64) for f in features]
            self.weights = [torch.zeros(self.num_classes, dtype=torch.float64) for _ in features]
        for s, feature in enumerate(features):
            soft = F.interpolate(onehot.to(feature.device), size=feature.shape[2:], mode="area")  # (B, K, *S_s)
            flat_w = soft.reshape(soft.shape[0], self.num_classes, -1).float()
            flat_f = feature.detach().reshape(feature.shape[0], feature.shape[1], -1).float()
            self.sums[s] += torch.einsum("bkx,bcx->kc", flat_w, flat_f).double().cpu()
            self.weights[s] += flat_w.sum(dim=(0, 2)).double().cpu()

    def result(self) -> CaseFeatures:
        if self.sums is None:
            raise ValueError("no features were added to this case")
        present = (self.voxels > 0).numpy()
        features = []
        for sums, weights in zip(self.sums, self.weights):
            means = sums / weights.clamp_min(1e-12)[:, None]
            means[~torch.as_tensor(present)] = 0.0
            features.append(means.float().numpy())
        return CaseFeatures(features=features, present=present)


def pool_case(features: Sequence[torch.Tensor], label: torch.Tensor, num_classes: int) -> CaseFeatures:
    """Masked average pooling of one case's fused features per class and scale.

    Args:
        features: per scale (B, C_s, *S_s), all batches of one case (e.g. its slices).
        label: (B, *S) or (B, 1, *S) canonical labels at the finest scale.
        num_classes: label classes.
    """
    pooler = ClassPooler(num_classes)
    pooler.add(features, label)
    return pooler.result()


class AnchorBank:
    """Class anchors from the cases' pooled features: k-means once, then frozen memberships and EMA.

    Args:
        num_classes: label classes (anchors are per class).
        k: clusters per class (4 in FedMEPD, 3 in FedMEMA); fewer if a class has fewer cases.
        momentum: EMA momentum (anchor = momentum * anchor + (1 - momentum) * new member mean).
        min_cluster_size: clusters with fewer member cases are not published.
        seed: k-means seed.
    """

    def __init__(
        self, num_classes: int, k: int = 4, momentum: float = 0.999, min_cluster_size: int = 2, seed: int = 0
    ) -> None:
        if k < 1 or min_cluster_size < 1:
            raise ValueError(f"k ({k}) and min_cluster_size ({min_cluster_size}) must be at least 1")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes, self.k, self.momentum = int(num_classes), int(k), float(momentum)
        self.min_cluster_size, self.seed = int(min_cluster_size), int(seed)
        self.members: dict[str, np.ndarray] = {}  # case id -> (num_classes,) cluster, -1 where absent
        self.centres: list[np.ndarray] = []  # per scale (num_classes * k, C_s), NaN where no cluster
        self.collections = 0

    @property
    def initialised(self) -> bool:
        return bool(self.centres)

    def sizes(self) -> np.ndarray:
        """(num_classes, k) member cases per cluster."""
        sizes = np.zeros((self.num_classes, self.k), dtype=np.int64)
        for clusters in self.members.values():
            for c, j in enumerate(clusters):
                if j >= 0:
                    sizes[c, j] += 1
        return sizes

    def update(self, cases: Mapping[str, CaseFeatures]) -> None:
        """Take a collection of pooled case features: cluster on the first, EMA afterwards.

        Cases unseen at the first collection have no cluster and are ignored afterwards.
        """
        if not cases:
            raise ValueError("no case features to build anchors from")
        if not self.initialised:
            self._cluster(cases)
        else:
            self._follow(cases)
        self.collections += 1

    def _cluster(self, cases: Mapping[str, CaseFeatures]) -> None:
        from sklearn.cluster import KMeans

        ids = sorted(cases)
        n_scales = len(cases[ids[0]].features)
        self.centres = [np.full((self.num_classes * self.k, f.shape[1]), np.nan) for f in cases[ids[0]].features]
        self.members = {case: np.full(self.num_classes, -1, dtype=np.int64) for case in ids}
        for c in range(self.num_classes):
            holders = [case for case in ids if cases[case].present[c]]
            if not holders:
                continue
            # One membership for all scales: cluster the scales' vectors, each L2-normalised, side by side.
            blocks = [np.stack([cases[case].features[s][c] for case in holders]) for s in range(n_scales)]
            joined = np.concatenate([b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-12) for b in blocks], axis=1)
            n_clusters = min(self.k, len(holders))
            labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=self.seed).fit_predict(joined)
            for case, j in zip(holders, labels):
                self.members[case][c] = int(j)
            for j in range(n_clusters):
                for s in range(n_scales):
                    self.centres[s][c * self.k + j] = blocks[s][labels == j].mean(axis=0)

    def _follow(self, cases: Mapping[str, CaseFeatures]) -> None:
        for c in range(self.num_classes):
            for j in range(self.k):
                ids = [
                    case
                    for case, clusters in sorted(self.members.items())
                    if clusters[c] == j and case in cases and cases[case].present[c]
                ]
                if not ids:
                    continue
                for s, centres in enumerate(self.centres):
                    new = np.mean([cases[case].features[s][c] for case in ids], axis=0)
                    centres[c * self.k + j] = self.momentum * centres[c * self.k + j] + (1 - self.momentum) * new

    def published(self) -> np.ndarray:
        """(num_classes * k,) which anchor rows are published (clusters of at least `min_cluster_size` cases)."""
        return (self.sizes() >= self.min_cluster_size).reshape(-1)

    def anchors(self) -> list[np.ndarray]:
        """Per scale (A, C_s) float32 published anchors, class-major (A <= num_classes * k).

        Raises:
            ValueError: before the first collection.
        """
        if not self.initialised:
            raise ValueError("no anchors yet: the bank has not seen a collection")
        keep = self.published()
        return [centres[keep].astype(np.float32) for centres in self.centres]

    def anchor_classes(self) -> np.ndarray:
        """(A,) the class of each published anchor row."""
        return np.repeat(np.arange(self.num_classes), self.k)[self.published()]

    def summary(self) -> dict[str, Any]:
        """Cluster sizes per class and how many anchors are published."""
        return {
            "collections": self.collections,
            "sizes": self.sizes().tolist(),
            "published": int(self.published().sum()),
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """numpy arrays only (for the server's checkpoint)."""
        ids = sorted(self.members)
        state = {
            "config": np.array([self.num_classes, self.k, self.min_cluster_size, self.seed], dtype=np.int64),
            "momentum": np.array(self.momentum),
            "collections": np.array(self.collections, dtype=np.int64),
            "case_ids": np.array(ids, dtype=np.str_),
            "members": np.stack([self.members[c] for c in ids]) if ids else np.zeros((0, self.num_classes), np.int64),
        }
        for s, centres in enumerate(self.centres):
            state[f"centres.{s}"] = centres.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        config = [int(v) for v in np.asarray(state["config"])]
        if config[:2] != [self.num_classes, self.k]:
            raise ValueError(
                f"anchor state for {config[0]} classes x k={config[1]} does not fit this bank "
                f"({self.num_classes} classes x k={self.k})"
            )
        self.min_cluster_size, self.seed = config[2], config[3]
        self.momentum = float(np.asarray(state["momentum"]))
        self.collections = int(np.asarray(state["collections"]))
        ids = [str(c) for c in np.asarray(state["case_ids"])]
        members = np.asarray(state["members"], dtype=np.int64)
        self.members = {case: members[i].copy() for i, case in enumerate(ids)}
        n_scales = len([k for k in state if k.startswith("centres.")])
        self.centres = [np.asarray(state[f"centres.{s}"], dtype=np.float64).copy() for s in range(n_scales)]
