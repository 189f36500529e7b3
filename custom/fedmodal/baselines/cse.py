"""Cross-site evaluation as a table: every model (server global best/last, each site's best
local model) scored on every site's test split.

A server widget beside NVFlare's `CrossSiteModelEval`: it copies each validation result as
it arrives (NVFlare 2.9's `ValidationJsonGenerator` keeps references to result payloads that
are emptied after processing, so its JSON comes out as `{}` per entry) and writes, at the end
of the run, `cross_site_val/cross_site_table.md` and `cross_site_table.json`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from fedmodal.atomic import write_text_atomically

TABLE_MD = "cross_site_table.md"
TABLE_JSON = "cross_site_table.json"


def cross_site_markdown(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str] | None = None
) -> str:
    """Markdown tables (one per metric): rows = models, columns = the sites whose test split scored them.

    Args:
        results: data site -> model name -> metrics dict.
        metrics: metric keys to show (default: every "dice_*" then "hd95_*" key found).
    """
    sites = sorted(results)
    models = sorted({m for per_site in results.values() for m in per_site}, key=lambda m: (not m.startswith("SRV_"), m))
    found = sorted({k for per_site in results.values() for v in per_site.values() for k in v})
    if metrics is None:
        order = {"WT": 0, "TC": 1, "ET": 2}
        metrics = sorted((k for k in found if k.startswith("dice_")), key=lambda k: order.get(k[5:], 9))
        metrics += sorted((k for k in found if k.startswith("hd95_")), key=lambda k: order.get(k[5:], 9))
    parts = []
    for metric in metrics:
        percent = metric.startswith(("dice", "sensitivity", "specificity"))
        head = f"| {metric}{' (%)' if percent else ' (mm)'} | " + " | ".join(sites) + " | mean |"
        lines = [head, "|" + "---|" * (len(sites) + 2)]
        for model in models:
            values = [results[s].get(model, {}).get(metric) for s in sites]
            shown = [v for v in values if v is not None]
            cells = ["-" if v is None else f"{v * 100:.1f}" if percent else f"{v:.2f}" for v in values]
            mean = sum(shown) / len(shown) if shown else None
            cells.append("-" if mean is None else f"{mean * 100:.1f}" if percent else f"{mean:.2f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


class CrossSiteTable(Widget):
    """Collects cross-site validation metrics and writes them as Markdown and JSON at the end.

    Args:
        results_dir: folder under the run directory (NVFlare's cross-site folder by default).
        metrics: metric keys to tabulate (default: every dice_* and hd95_* key).
    """

    def __init__(self, results_dir: str = AppConstants.CROSS_VAL_DIR, metrics: list[str] | None = None):
        super().__init__()
        self.results_dir = results_dir
        self.metrics = metrics
        self.results: dict[str, dict[str, dict[str, Any]]] = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.results = {}
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            self._collect(fl_ctx)
        elif event_type == EventType.END_RUN and self.results:
            self._write(fl_ctx)

    def _collect(self, fl_ctx: FLContext) -> None:
        owner = fl_ctx.get_prop(AppConstants.MODEL_OWNER)
        site = fl_ctx.get_prop(AppConstants.DATA_CLIENT)
        result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
        if not owner or not site or result is None:
            return
        try:
            dxo = from_shareable(result)
        except ValueError:
            return
        if dxo.data_kind == DataKind.METRICS and dxo.data:
            self.results.setdefault(site, {})[owner] = {k: float(v) for k, v in copy.deepcopy(dxo.data).items()}

    def _write(self, fl_ctx: FLContext) -> None:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        folder = os.path.join(run_dir, self.results_dir)
        os.makedirs(folder, exist_ok=True)
        table = cross_site_markdown(self.results, self.metrics)
        text = (
            "# Cross-site evaluation (rows: models; columns: the site whose test split scored them)\n\n" + table + "\n"
        )
        for name, content in ((TABLE_MD, text), (TABLE_JSON, json.dumps(self.results, indent=2))):
            write_text_atomically(os.path.join(folder, name), content)
        self.log_info(fl_ctx, f"cross-site evaluation:\n{table}")
