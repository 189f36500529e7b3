"""Partial personalisation of the fusion decoder, filter by filter (pure numpy).

A layer is a group of decoder keys with one prefix (``<layer>.weight``, ``<layer>.bias``); its
filter f is row f along dim 0 of each (the output filter of a conv or linear weight and its
bias entry). Each round, for every site and shared filter,

    s_f = (cos(server_update_f, client_update_f) + 1) / 2,

updates being weights after minus before the round. A site's `FilterCounters` start at
`start` (10), drop by 1 when s_f < 0.5, reset when s_f > 0.5; at 0 the filter is personal for
good: the site keeps it and never sends it again (`split_payload` / `merge_received`).
No counting before `warmup_rounds`.

Shared filters are aggregated over the sites still sharing them (`filter_weights`) and
blended with the server's own: ``blend_client * client_avg + (1 - blend_client) * server``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

Arrays = Mapping[str, np.ndarray]


def layer_of(key: str) -> str:
    """The layer a parameter key belongs to: the key without its last component."""
    return key.rsplit(".", 1)[0]


def filter_layers(state: Arrays) -> dict[str, list[str]]:
    """layer -> its keys (sorted), checking they agree on the filter count (dim 0)."""
    layers: dict[str, list[str]] = {}
    for key in sorted(state):
        layers.setdefault(layer_of(key), []).append(key)
    for layer, keys in layers.items():
        counts = {np.shape(state[k])[0] if np.ndim(state[k]) else None for k in keys}
        if len(counts) != 1 or None in counts:
            shapes = {k: tuple(np.shape(state[k])) for k in keys}
            raise ValueError(f"layer {layer!r} has no common output-filter dimension: {shapes}")
    return layers


def filter_counts(state: Arrays) -> dict[str, int]:
    """layer -> number of output filters."""
    return {layer: int(np.shape(state[keys[0]])[0]) for layer, keys in filter_layers(state).items()}


def filter_rows(state: Arrays, keys: Iterable[str]) -> np.ndarray:
    """(F, D) one row per output filter: the layer's keys flattened after dim 0, side by side."""
    return np.concatenate([np.asarray(state[k], dtype=np.float64).reshape(np.shape(state[k])[0], -1) for k in keys], 1)


def difference(after: Arrays, before: Arrays) -> dict[str, np.ndarray]:
    """The update ``after - before`` per key (keys of `after`)."""
    return {k: np.asarray(v, dtype=np.float64) - np.asarray(before[k], dtype=np.float64) for k, v in after.items()}


def row_similarity(server_rows: np.ndarray, client_rows: np.ndarray) -> np.ndarray:
    """(F,) s_f = (cos + 1) / 2 of two (F, D) update matrices, row by row; 0.5 where a row is zero."""
    a, b = np.asarray(server_rows, dtype=np.float64), np.asarray(client_rows, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide((a * b).sum(axis=1), norms, out=np.zeros(len(a)), where=norms > 0)
    return (np.clip(cos, -1.0, 1.0) + 1.0) / 2.0


def filter_similarity(server_update: Arrays, client_update: Arrays) -> dict[str, np.ndarray]:
    """Per layer, (F,) s_f = (cos(server_update_f, client_update_f) + 1) / 2.

    A filter where either update is zero has no direction: s_f = 0.5 (neither drop nor reset).
    """
    return {
        layer: row_similarity(filter_rows(server_update, keys), filter_rows(client_update, keys))
        for layer, keys in filter_layers(client_update).items()
    }


class FilterCounters:
    """One site's per-filter counters and personal mask over the decoder's layers.

    Args:
        filters: layer -> number of output filters (`filter_counts`).
        start: the counter's start and reset value.
        warmup_rounds: rounds (0-based numbers below this) in which nothing is counted.
    """

    def __init__(self, filters: Mapping[str, int], start: int = 10, warmup_rounds: int = 30) -> None:
        if start < 1:
            raise ValueError(f"counter start must be at least 1, got {start}")
        self.start, self.warmup_rounds = int(start), int(warmup_rounds)
        self.counters = {layer: np.full(int(n), self.start, dtype=np.int64) for layer, n in filters.items()}
        self.personal = {layer: np.zeros(int(n), dtype=bool) for layer, n in filters.items()}

    def update(self, similarity: Mapping[str, np.ndarray], round_num: int) -> dict[str, np.ndarray]:
        """Count one round's s_f (NaN: the filter was not sent). Returns layer -> newly personal (bool)."""
        newly = {layer: np.zeros_like(p) for layer, p in self.personal.items()}
        if round_num < self.warmup_rounds:
            return newly
        unknown = sorted(set(similarity) - set(self.counters))
        if unknown:
            raise ValueError(f"similarities for layers these counters do not track: {unknown[:3]}")
        for layer, s in similarity.items():
            s = np.asarray(s, dtype=np.float64)
            if s.shape != self.counters[layer].shape:
                raise ValueError(f"layer {layer!r}: {s.shape} similarities for {self.counters[layer].shape} filters")
            active = ~self.personal[layer] & ~np.isnan(s)
            counter = self.counters[layer]
            counter[active & (s < 0.5)] -= 1
            counter[active & (s > 0.5)] = self.start
            newly[layer] = active & (counter <= 0)
            counter[newly[layer]] = 0
            self.personal[layer] |= newly[layer]
        return newly

    def mask(self) -> dict[str, np.ndarray]:
        """layer -> (F,) bool, True where the filter is personal (a copy)."""
        return {layer: p.copy() for layer, p in self.personal.items()}

    def summary(self) -> dict[str, Any]:
        """Personal filters per layer and in total."""
        per_layer = {layer: int(p.sum()) for layer, p in self.personal.items()}
        return {
            "personal": per_layer,
            "personal_total": sum(per_layer.values()),
            "filters_total": sum(p.size for p in self.personal.values()),
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"config": np.array([self.start, self.warmup_rounds], dtype=np.int64)}
        for layer in self.counters:
            state[f"counter.{layer}"] = self.counters[layer].copy()
            state[f"personal.{layer}"] = self.personal[layer].copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        layers = {k[len("counter.") :] for k in state if k.startswith("counter.")}
        if layers != set(self.counters):
            raise ValueError(
                f"counter state for layers {sorted(layers)[:3]}... does not fit {sorted(self.counters)[:3]}..."
            )
        self.start, self.warmup_rounds = (int(v) for v in np.asarray(state["config"]))
        for layer in layers:
            self.counters[layer] = np.asarray(state[f"counter.{layer}"], dtype=np.int64).copy()
            self.personal[layer] = np.asarray(state[f"personal.{layer}"], dtype=bool).copy()


def blend_shared(client_avg: np.ndarray, server: np.ndarray, client_weight: float = 0.7) -> np.ndarray:
    """A shared filter's new value: ``client_weight * client_avg + (1 - client_weight) * server``."""
    return client_weight * np.asarray(client_avg) + (1.0 - client_weight) * np.asarray(server)


def filter_weights(update_norms: np.ndarray, num_samples: np.ndarray, sharing: np.ndarray) -> np.ndarray:
    """Per-filter aggregation weights over the sites still sharing each filter.

    w[c, f] = n_c * u[c, f] / sum_{c' sharing f} n_c' * u[c', f]: data share times update-norm
    ratio, renormalised over the sharers. If every sharer's update of f is zero, w[c, f] =
    n_c / sum n_c' (data shares). Non-sharers get 0; a column no site shares is all 0.

    Args:
        update_norms: (S, F) L2 norm of each site's update of each filter (weight row + bias).
        num_samples: (S,) training cases (or samples) per site.
        sharing: (S, F) bool, the site sent the filter (it is not personal there).

    Returns:
        (S, F) weights; each shared column sums to 1.
    """
    norms = np.asarray(update_norms, dtype=np.float64)
    n = np.asarray(num_samples, dtype=np.float64)[:, None]
    sharing = np.asarray(sharing, dtype=bool)
    if np.any(n <= 0):
        raise ValueError(f"sample counts must be positive, got {n.ravel().tolist()}")
    by_norm = np.where(sharing, n * norms, 0.0)
    by_data = np.where(sharing, n, 0.0)
    norm_total, data_total = by_norm.sum(axis=0), by_data.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = np.where(norm_total > 0, by_norm / norm_total, by_data / data_total)
    return np.nan_to_num(weights, nan=0.0)


# ----------------------------------------------------------------------------- payloads


def split_payload(decoder_state: Arrays, personal: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """What a site sends of its decoder: the shared rows only, and which rows they are.

    Args:
        decoder_state: the site's decoder parameters (key -> array).
        personal: layer -> (F,) bool personal mask (layers not in it are wholly shared).

    Returns:
        (shared, present): shared[key] holds only the rows of filters that are not personal
        (personal values are removed, not zeroed); present[layer] is the (F,) bool row mask.
    """
    shared, present = {}, {}
    for layer, keys in filter_layers(decoder_state).items():
        n = np.shape(decoder_state[keys[0]])[0]
        rows = ~np.asarray(personal.get(layer, np.zeros(n, dtype=bool)), dtype=bool)
        if rows.shape != (n,):
            raise ValueError(f"layer {layer!r}: personal mask of shape {rows.shape} for {n} filters")
        present[layer] = rows
        for key in keys:
            shared[key] = np.asarray(decoder_state[key])[rows].copy()
    return shared, present


def expand_payload(shared: Arrays, present: Mapping[str, np.ndarray], template: Arrays) -> dict[str, np.ndarray]:
    """A site's compact payload back at full shape, NaN in the rows it did not send (server side)."""
    full = {}
    for key, value in template.items():
        layer = layer_of(key)
        if key not in shared or layer not in present:
            raise ValueError(f"the payload lacks {key!r} (or the row mask of {layer!r})")
        rows = np.asarray(present[layer], dtype=bool)
        out = np.full(np.shape(value), np.nan, dtype=np.float64)
        if np.shape(shared[key])[0] != rows.sum() or np.shape(shared[key])[1:] != np.shape(value)[1:]:
            raise ValueError(f"{key!r}: {np.shape(shared[key])} sent for {int(rows.sum())} rows of {np.shape(value)}")
        out[rows] = shared[key]
        full[key] = out
    return full


def merge_received(local_state: Arrays, received_shared: Arrays, personal: Mapping[str, np.ndarray]) -> dict:
    """The site's decoder after receiving: personal rows stay local, the rest come from the server.

    `received_shared` may hold full arrays or only the shared rows (as `split_payload` gives).
    """
    merged = {}
    for key, local in local_state.items():
        local = np.asarray(local)
        if key not in received_shared:
            raise ValueError(f"the received decoder lacks {key!r}")
        received = np.asarray(received_shared[key])
        rows = np.asarray(personal.get(layer_of(key), np.zeros(local.shape[0], dtype=bool)), dtype=bool)
        out = local.copy()
        if received.shape == local.shape:
            out[~rows] = received[~rows]
        elif received.shape[0] == (~rows).sum() and received.shape[1:] == local.shape[1:]:
            out[~rows] = received
        else:
            raise ValueError(
                f"received {key!r} of shape {received.shape} fits neither {local.shape} nor its shared rows"
            )
        merged[key] = out.astype(local.dtype)
    return merged


def aggregate_decoder(
    global_state: Arrays,
    server_state: Arrays,
    site_states: Mapping[str, Arrays],
    num_samples: Mapping[str, float],
    blend_client: float = 0.7,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The round's new global decoder and each site's s_f.

    Args:
        global_state: the decoder sent at the round's start (the sites' and server's "before").
        server_state: the server's decoder after its own epoch.
        site_states: site -> its decoder after training, full shape with NaN in personal rows
            (`expand_payload`).
        num_samples: site -> training cases.
        blend_client: weight of the sites' average in the blend with the server's filter.

    Returns:
        (new global decoder (float32), site -> layer -> (F,) s_f, NaN where the site did not send).
    """
    sites = sorted(site_states)
    new, similarity = {}, {site: {} for site in sites}
    for layer, keys in filter_layers(global_state).items():
        before = filter_rows(global_state, keys)
        server_rows = filter_rows(server_state, keys)
        rows = server_rows
        if sites:
            updates = np.stack([filter_rows(site_states[s], keys) for s in sites]) - before  # (S, F, D)
            sharing = ~np.isnan(updates).any(axis=2)
            updates = np.nan_to_num(updates, nan=0.0)
            counts = np.array([num_samples[s] for s in sites])
            weights = filter_weights(np.linalg.norm(updates, axis=2), counts, sharing)
            client_avg = before + np.einsum("sf,sfd->fd", weights, updates)
            shared = sharing.any(axis=0)[:, None]
            rows = np.where(shared, blend_shared(client_avg, server_rows, blend_client), server_rows)
            for i, site in enumerate(sites):
                s_f = row_similarity(server_rows - before, updates[i])
                similarity[site][layer] = np.where(sharing[i], s_f, np.nan)
        offset = 0
        for key in keys:
            shape = np.shape(global_state[key])
            width = int(np.prod(shape[1:], dtype=np.int64))
            new[key] = rows[:, offset : offset + width].reshape(shape).astype(np.float32)
            offset += width
    return new, similarity
