"""fedmodal: federated multi-modal brain MRI learning on NVIDIA FLARE."""

__version__ = "0.1.0"

# Canonical modality order, used everywhere in the project.
MODALITIES = ("t1", "t1ce", "t2", "flair")
