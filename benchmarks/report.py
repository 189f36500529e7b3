"""Shared by the benchmarks: print a result table and, with --out, keep it beside its numbers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def publish(table: str, results, out: str | None) -> None:
    """Print `table`; with `out` (a path without suffix) also write `out`.md and `out`.json."""
    print(table)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(results, indent=2))
        path.with_suffix(".md").write_text(table)


def median_run(runs: list[dict], key: Callable[[dict], float]) -> dict:
    """The run whose `key` is the median (the lower middle one of an even count): a whole run,
    so that its other figures stay consistent with the figure it was chosen by."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]
