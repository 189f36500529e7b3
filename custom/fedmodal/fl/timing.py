"""How often the federation looks for work, and how long it waits for a late site: one default
for every job.

NVFlare's own defaults suit long rounds: a site with nothing to do asks the server again after
`task_request_interval` (2 s) and a workflow checks its tasks every `task_check_period` (0.5 s).
A segmentation round here lasts a few seconds, so those waits were a sixth of it
(`benchmarks/bench_fedavg.py`). A poll every 50 ms costs a small message per site, nothing
compared with a model.
"""

from __future__ import annotations

TASK_POLL_SECONDS = 0.05  # a site's next task request after "no task"; a workflow's task check
WAIT_AFTER_MIN_SECONDS = 60  # what the other sites get once the minimum have answered
HEARTBEAT_TIMEOUT_SECONDS = 600  # a busy site (long local epoch on CPU) is not taken for dead


def server_params(task_request_interval: float = TASK_POLL_SECONDS) -> dict:
    """The server section every job's config_fed_server.json carries."""
    return {"server": {"heart_beat_timeout": HEARTBEAT_TIMEOUT_SECONDS, "task_request_interval": task_request_interval}}
