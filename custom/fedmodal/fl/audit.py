"""A filter that records every payload crossing a site's boundary, for privacy audits.

Put it in a client's `task_result_filters` (what leaves) and `task_data_filters` (what
arrives). Each payload becomes one JSON line: direction, task, and per item its key, kind,
shape, dtype and bytes. Values are never written.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

AUDIT_FILE = "payload_audit.jsonl"
AUDITED_HEADER = "fedmodal.audited"


def describe(value) -> dict:
    """Kind, shape, dtype and size of one payload item, without its content."""
    if isinstance(value, np.ndarray):
        return {"kind": "array", "shape": list(value.shape), "dtype": str(value.dtype), "bytes": int(value.nbytes)}
    if hasattr(value, "detach") and hasattr(value, "shape"):  # a torch tensor
        return {
            "kind": "tensor",
            "shape": list(value.shape),
            "dtype": str(value.dtype),
            "bytes": int(value.numel() * value.element_size()),
        }
    if isinstance(value, (bool, int, float)) or value is None:
        return {"kind": "scalar", "bytes": 8}
    if isinstance(value, str):
        return {"kind": "string", "bytes": len(value.encode())}
    if isinstance(value, dict):
        return {"kind": "dict", "keys": sorted(map(str, value)), "bytes": len(json.dumps(value, default=str))}
    if isinstance(value, (list, tuple)):
        return {"kind": "list", "length": len(value), "bytes": len(json.dumps(list(value), default=str))}
    return {"kind": type(value).__name__, "bytes": None}


class PayloadAuditFilter(Filter):
    """Records what a site sends ("out") or receives ("in") to `<run dir>/payload_audit.jsonl`.

    Args:
        direction: "out" in task_result_filters, "in" in task_data_filters.
    """

    _lock = threading.Lock()
    _always_serialize_args = ("direction",)  # NVFlare's job export writes it even at its default

    def __init__(self, direction: str = "out"):
        super().__init__()
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
        self.direction = direction

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        # A deployed site audits through its privacy scope and the job may carry the filter as
        # well (for the simulator, which has no privacy scopes): record each payload once.
        marker = f"{AUDITED_HEADER}.{self.direction}"
        if shareable.get_header(marker):
            return shareable
        shareable.set_header(marker, True)
        try:
            dxo = from_shareable(shareable)
            items = dxo.data if isinstance(dxo.data, dict) else {"data": dxo.data}
            meta = {"data_kind": str(dxo.data_kind)}
        except ValueError:  # not a DXO: record the shareable's own items
            items = {k: v for k, v in shareable.items() if k != ReservedHeaderKey.HEADERS}
            meta = {"data_kind": None}
        record = {
            "time": time.time(),
            "site": fl_ctx.get_identity_name(),
            "direction": self.direction,
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME) or shareable.get_header(ReservedKey.TASK_NAME),
            **meta,
            "items": {str(k): describe(v) for k, v in items.items()},
        }
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        with self._lock, open(os.path.join(run_dir, AUDIT_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
        return shareable
