"""PayloadAuditFilter: one JSON line per payload and direction, shapes and sizes, never values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext

from fedmodal.fl.audit import AUDIT_FILE, PayloadAuditFilter


def site_context(run_dir) -> FLContext:
    workspace = SimpleNamespace(get_run_dir=lambda job_id: str(run_dir))
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, SimpleNamespace(get_workspace=lambda: workspace), private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, "mb_step", private=True, sticky=False)
    return ctx


def test_each_payload_is_recorded_once_per_direction(tmp_path):
    ctx = site_context(tmp_path)
    reply = DXO(
        DataKind.COLLECTION, {"grad/t2": np.zeros((4, 1, 8, 8), np.float32), "losses": {"t2/g": 0.987654321}}
    ).to_shareable()
    # The site's privacy scope and the job both carry the filter: the second one passes it on.
    for audit in (PayloadAuditFilter("out"), PayloadAuditFilter("out")):
        reply = audit.process(reply, ctx)
    request = DXO(DataKind.COLLECTION, {"fake/t2": np.zeros((4, 1, 8, 8), np.float32)}).to_shareable()
    PayloadAuditFilter("in").process(request, ctx)

    records = [json.loads(line) for line in (tmp_path / AUDIT_FILE).read_text().splitlines()]
    assert [(r["direction"], r["task"], r["site"]) for r in records] == [
        ("out", "mb_step", "site-1"),
        ("in", "mb_step", "site-1"),
    ]
    grad = records[0]["items"]["grad/t2"]
    assert grad == {"kind": "array", "shape": [4, 1, 8, 8], "dtype": "float32", "bytes": 4 * 64 * 4}
    assert records[0]["items"]["losses"]["keys"] == ["t2/g"]
    assert "987654321" not in (tmp_path / AUDIT_FILE).read_text()  # sizes and keys, never values
