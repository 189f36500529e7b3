"""FedMEPD (and FedMEMA): federated modality-specific encoders, a full-modal server, multimodal
anchors for the clients' calibration, and a partially personalised fusion decoder.

- :mod:`.config`: every setting and default (`FedMEPDConfig`).
- :mod:`.trainer`: one participant's network, losses, epochs, features and scores.
- :mod:`.anchors`: per-case class pooling and the `AnchorBank` (k-means once, then EMA).
- :mod:`.personalisation`: per-filter similarity, counters, aggregation and payload split.
"""

from fedmodal.fedmepd.anchors import AnchorBank, CaseFeatures, pool_case
from fedmodal.fedmepd.config import FedMEPDConfig
from fedmodal.fedmepd.personalisation import (
    FilterCounters,
    aggregate_decoder,
    blend_shared,
    expand_payload,
    filter_counts,
    filter_similarity,
    filter_weights,
    merge_received,
    split_payload,
)
from fedmodal.fedmepd.trainer import FedMEPDTrainer

__all__ = [
    "AnchorBank",
    "CaseFeatures",
    "FedMEPDConfig",
    "FedMEPDTrainer",
    "FilterCounters",
    "aggregate_decoder",
    "blend_shared",
    "expand_payload",
    "filter_counts",
    "filter_similarity",
    "filter_weights",
    "merge_received",
    "pool_case",
    "split_payload",
]
