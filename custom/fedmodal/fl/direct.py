"""One synchronous exchange with every site: each gets its own payload, all replies come back.

Two transports, the same payloads and filters: NVFlare tasks (`exchange_by_tasks`) or direct
aux messages (`DirectSender` at the server, `serve_direct` at the site).

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

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReturnCode, Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.task_utils import apply_filters
from nvflare.private.privacy_manager import Scope

logger = logging.getLogger(__name__)

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


# Return codes a site sets itself (its log says why); anything else means the message got no answer.
SITE_REPORTED = (
    ReturnCode.EXECUTION_EXCEPTION,
    ReturnCode.TASK_DATA_FILTER_ERROR,
    ReturnCode.TASK_RESULT_FILTER_ERROR,
    ReturnCode.TASK_UNKNOWN,
    ReturnCode.TOPIC_UNKNOWN,
)
SIMULATOR_HINT = (
    "In the simulator, run with as many threads as sites (-t), so no site process is recycled during the run"
)


class ExchangeError(RuntimeError):
    """A site failed or did not answer an exchange; the message names it and says why."""


def split_replies(
    task_name: str, replies: dict[str, Shareable | None], timeout: float
) -> tuple[dict[str, dict], dict[str, str]]:
    """Each answering site's reply data, and for each failed site why (both in site order)."""
    data, failures = {}, {}
    for name in sorted(replies):
        result = replies[name]
        code = None if result is None else result.get_return_code()
        if code == ReturnCode.OK:
            data[name] = from_shareable(result).data
        elif code in SITE_REPORTED:
            failures[name] = f"site {name} failed {task_name} (return code {code}): see its log"
        else:  # the message got no answer: the site's process is gone, hung or unreachable
            failures[name] = (
                f"site {name} failed {task_name} (return code {code}): no answer within {timeout}s or the site is "
                f"unreachable. {SIMULATOR_HINT}"
            )
    return data, failures


def reply_data(task_name: str, replies: dict[str, Shareable | None], timeout: float) -> dict[str, dict]:
    """Each site's reply data, in site order.

    Raises:
        ExchangeError: naming the first site (by name) whose reply is missing or not OK.
    """
    data, failures = split_replies(task_name, replies, timeout)
    if failures:
        raise ExchangeError(next(iter(failures.values())))
    return data


def exchange_by_tasks(
    controller,
    task_name: str,
    payloads: dict[str, dict],
    timeout: float,
    abort_signal: Signal,
    fl_ctx: FLContext,
    partial: bool = False,
):
    """Send each site its own payload as an NVFlare task and wait for every reply.

    Results are collected by the task's callback, which wakes this thread when the last one
    arrives: no polling between the server's compute and the next exchange. Returns None when
    the run is aborted.

    Args:
        controller: the NVFlare `Controller` whose `send` carries the tasks.
        partial: return (data of the sites that answered, site -> why it failed) instead of
            raising at the first failure.
    """
    replies: dict[str, Shareable] = {}
    all_in = threading.Event()
    lock = threading.Lock()

    def received(client_task: ClientTask, fl_ctx: FLContext) -> None:
        with lock:
            replies[client_task.client.name] = client_task.result
            if len(replies) == len(payloads):
                all_in.set()

    for name, payload in payloads.items():
        data = DXO(DataKind.COLLECTION, payload).to_shareable()
        task = Task(name=task_name, data=data, timeout=int(timeout), result_received_cb=received)
        controller.send(task, fl_ctx, targets=[name])
    deadline = time.monotonic() + timeout
    while not all_in.wait(timeout=0.5):
        if abort_signal.triggered:
            return None
        if time.monotonic() > deadline:
            with lock:
                late = sorted(set(payloads) - set(replies))
            if not partial:
                raise ExchangeError(f"sites {late} sent no {task_name} result within {timeout}s. {SIMULATOR_HINT}")
            replies.update({name: None for name in late})
            break
    with lock:
        answered = dict(replies)
    return split_replies(task_name, answered, timeout) if partial else reply_data(task_name, answered, timeout)


class DirectSender:
    """The server's end of direct exchanges: one aux request per site, in parallel, filtered
    like a task of the same name. NVFlare 2.9's `multicast_aux_requests` fails on a keyword its
    cell does not take, so requests go one per site from a thread pool."""

    def __init__(self):
        self.pool: ThreadPoolExecutor | None = None

    def exchange(self, task_name: str, payloads: dict[str, dict], timeout: float, fl_ctx: FLContext, partial=False):
        """Every site's reply data (site -> dict), or None when the run is aborted.

        With `partial`, (data of the sites that answered, site -> why it failed) instead.

        Raises:
            ExchangeError: without `partial`, a site failed, refused or did not answer.
        """
        engine = fl_ctx.get_engine()

        def send(name: str) -> Shareable | None:
            # Each request in its own context: the filters mark the context with the task's
            # name, which must not stick to the workflow's.
            with engine.new_context() as ctx:
                try:
                    request = DXO(DataKind.COLLECTION, payloads[name]).to_shareable()
                    request = filter_like_task(TASK_DATA, FilterKey.OUT, task_name, request, ctx)
                    reply = (engine.send_aux_request([name], task_name, request, float(timeout), ctx) or {}).get(name)
                    if reply is not None and reply.get_return_code() == ReturnCode.OK:
                        reply = filter_like_task(TASK_RESULT, FilterKey.IN, task_name, reply, ctx)
                    return reply
                except Exception as e:  # a server-side filter refused: the run stops naming the site
                    logger.exception("%s with site %s failed at the server: %s", task_name, name, e)
                    return make_reply(ReturnCode.EXECUTION_EXCEPTION)

        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=len(payloads), thread_name_prefix="fedmodal-direct")
        replies = dict(zip(payloads, self.pool.map(send, list(payloads))))
        abort = fl_ctx.get_run_abort_signal()
        if abort is not None and abort.triggered:
            return None
        return split_replies(task_name, replies, timeout) if partial else reply_data(task_name, replies, timeout)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def direct_handler(execute: Callable[[str, Shareable, FLContext, Signal], Shareable]):
    """A site's aux-message handler that answers with `execute`, filtered as a task of the topic's name.

    A filter that refuses the request or the reply yields a filter error code (the server names
    the site); the refused payload is never passed on.
    """

    def handle(topic: str, request: Shareable, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            request = filter_like_task(TASK_DATA, FilterKey.IN, topic, request, fl_ctx)
        except Exception as e:
            logger.exception("site %s: a filter refused %s: %s", site, topic, e)
            return make_reply(ReturnCode.TASK_DATA_FILTER_ERROR)
        reply = execute(topic, request, fl_ctx, Signal())
        try:
            return filter_like_task(TASK_RESULT, FilterKey.OUT, topic, reply, fl_ctx)
        except Exception as e:
            logger.exception("site %s: a filter refused the %s result: %s", site, topic, e)
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)

    return handle


def serve_direct(
    topic: str, execute: Callable[[str, Shareable, FLContext, Signal], Shareable], fl_ctx: FLContext
) -> None:
    """At a site: answer direct messages on `topic` with `execute` (see `direct_handler`)."""
    fl_ctx.get_engine().register_aux_message_handler(topic, direct_handler(execute))
