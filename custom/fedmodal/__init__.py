"""fedmodal: federated multi-modal brain MRI learning on NVIDIA FLARE."""

from fedmodal.brats import MODALITIES  # the canonical order, re-exported for callers

__version__ = "0.1.0"

__all__ = ["MODALITIES", "__version__"]
