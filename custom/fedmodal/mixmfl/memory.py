"""MDM-MixMFL's modality memory: one FIFO queue of prototypes per modality, and the k-means
that turns a site's per-sample tailored vectors into prototypes.

The memory is global: the server holds it, sites write their epoch's cluster centres into it
and read it to stand in for the modalities they lack. A prototype is always the mean of at
least `min_cluster_size` samples, never one sample's features. Everything here is numpy so
the memory travels in NVFlare payloads and is saved by the server as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedmodal import MODALITIES


class PrototypeMemory:
    """Per modality, a first-in-first-out queue of (C,) prototypes.

    Args:
        capacity: prototypes kept per modality (200 in the paper); the oldest go first.
        modalities: the modalities with a queue.
    """

    def __init__(self, capacity: int = 200, modalities: Sequence[str] = MODALITIES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.modalities = tuple(modalities)
        self._queues: dict[str, np.ndarray | None] = {m: None for m in self.modalities}

    def _check(self, modality: str) -> None:
        if modality not in self._queues:
            raise KeyError(f"the memory has no queue for modality {modality!r}; it holds {self.modalities}")

    def write(self, modality: str, centres: np.ndarray) -> None:
        """Append `centres` (k, C) to the modality's queue in order, dropping the oldest beyond capacity."""
        self._check(modality)
        centres = np.asarray(centres, dtype=np.float32)
        if centres.ndim != 2:
            raise ValueError(f"centres for {modality} must be (k, C), got shape {centres.shape}")
        if len(centres) == 0:
            return
        queue = self._queues[modality]
        if queue is not None and queue.shape[1] != centres.shape[1]:
            raise ValueError(
                f"centres for {modality} have {centres.shape[1]} channels, the queue holds {queue.shape[1]}"
            )
        joined = centres if queue is None else np.concatenate([queue, centres])
        self._queues[modality] = joined[-self.capacity :].copy()

    def update(self, prototypes: Mapping[str, np.ndarray]) -> None:
        """Write several modalities' centres (a site's `MixMFLTrainer.prototypes()`), in `modalities` order."""
        for m in self.modalities:
            if m in prototypes:
                self.write(m, prototypes[m])
        unknown = sorted(set(prototypes) - set(self.modalities))
        if unknown:
            raise KeyError(f"the memory has no queue for modalities {unknown}; it holds {self.modalities}")

    def size(self, modality: str) -> int:
        """Prototypes held for a modality."""
        self._check(modality)
        queue = self._queues[modality]
        return 0 if queue is None else len(queue)

    def prototypes(self, modality: str) -> torch.Tensor | None:
        """The modality's prototypes (n, C), oldest first, or None when it holds none."""
        self._check(modality)
        queue = self._queues[modality]
        return None if queue is None else torch.from_numpy(queue.copy())

    def as_tensors(self) -> dict[str, torch.Tensor | None]:
        """Modality -> `prototypes(modality)`."""
        return {m: self.prototypes(m) for m in self.modalities}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Modality -> (n, C) float32 array, for the modalities holding prototypes."""
        return {m: q.copy() for m, q in self._queues.items() if q is not None}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace every queue with `state` (modalities absent from it become empty)."""
        unknown = sorted(set(state) - set(self.modalities))
        if unknown:
            raise KeyError(f"memory state names modalities {unknown}; this memory holds {self.modalities}")
        self._queues = {m: None for m in self.modalities}
        for m, values in state.items():
            self.write(m, values)

    def nbytes(self) -> int:
        """Bytes of the prototypes held."""
        return sum(q.nbytes for q in self._queues.values() if q is not None)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{m}={self.size(m)}" for m in self.modalities)
        return f"PrototypeMemory(capacity={self.capacity}, {sizes})"


def cluster_prototypes(
    features: np.ndarray, k: int, min_cluster_size: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """k-means centres of per-sample feature vectors, keeping only clusters of enough samples.

    scikit-learn's `KMeans` (10 initialisations, `random_state=seed`) runs with
    min(k, N // min_cluster_size) clusters, so that every cluster can be large enough; a
    cluster of fewer than `min_cluster_size` samples is dropped. Each returned centre is the
    mean of its members.

    Args:
        features: (N, C) per-sample vectors.
        k: clusters wanted.
        min_cluster_size: the fewest samples a centre may average.
        seed: k-means seed.

    Returns:
        (centres (k', C) float32 with k' <= k, sizes (k',) int64); (0, C) and (0,) when
        N < min_cluster_size.
    """
    from sklearn.cluster import KMeans

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, C), got shape {features.shape}")
    if k < 1 or min_cluster_size < 1:
        raise ValueError(f"k and min_cluster_size must be at least 1, got {k} and {min_cluster_size}")
    empty = np.zeros((0, features.shape[1]), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    clusters = min(k, len(features) // min_cluster_size)
    if clusters < 1:
        return empty
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of distinct clusters")  # duplicated vectors
        labels = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(features)
    sizes = np.bincount(labels, minlength=clusters)
    kept = [c for c in range(clusters) if sizes[c] >= min_cluster_size]
    if not kept:
        return empty
    centres = np.stack([features[labels == c].mean(axis=0) for c in kept]).astype(np.float32)
    return centres, sizes[kept].astype(np.int64)
