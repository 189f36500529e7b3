"""Task payloads sent as direct (aux) messages, through the same filters as tasks.

NVFlare tasks reach a site only when the site polls for one. For an exchange every few hundred
milliseconds, the poll interval (and the simulator's fixed 0.5 s back-off when a task is not
ready yet) costs more than the work. A direct message is pushed from the server to the site's
job process and answered at once.

Tasks pass through the site's privacy filters (its privacy scope plus the job's filters for
that task name) and the server's job filters. A direct message passes through none of them by
itself, so both ends here run exactly the filter chains NVFlare would run for a task of the same
name: a site's policy and the payload audit see every exchange whichever transport carries it.
"""

from __future__ import annotations

from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.private.privacy_manager import Scope

# NVFlare's names of the two filter chains, as scopes and runners spell them.
TASK_DATA = Scope.TASK_DATA_FILTERS_NAME  # the server's payload to a site
TASK_RESULT = Scope.TASK_RESULT_FILTERS_NAME  # the site's reply


def _job_filters(fl_ctx: FLContext, chain: str) -> dict:
    runner = fl_ctx.get_prop(FLContextKey.RUNNER)
    if runner is None:
        raise RuntimeError("no NVFlare runner in this context: direct messages need a running job")
    # The client runner keeps its filter tables itself; the server runner in its config.
    filters = getattr(runner, chain, None)
    if filters is None:
        filters = getattr(getattr(runner, "config", None), chain, None)
    return filters or {}


def filter_like_task(chain: str, direction: str, task_name: str, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
    """Run the filters NVFlare runs for task `task_name` on `shareable`.

    Args:
        chain: TASK_DATA (server -> site) or TASK_RESULT (site -> server).
        direction: "out" where the payload leaves, "in" where it arrives (FilterKey).
        task_name: the task whose filters apply (also what an audit records).
    """
    if chain not in (TASK_DATA, TASK_RESULT) or direction not in (FilterKey.IN, FilterKey.OUT):
        raise ValueError(f"unknown filter chain {chain!r} or direction {direction!r}")
    fl_ctx.set_prop(FLContextKey.TASK_NAME, task_name, private=True, sticky=False)
    return apply_filters(chain, shareable, fl_ctx, _job_filters(fl_ctx, chain), task_name, direction)
