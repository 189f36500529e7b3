"""fedmodal.fl.direct: a direct message meets the filters a task of the same name would meet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.private.privacy_manager import Scope

from fedmodal.fl.direct import TASK_DATA, TASK_RESULT, direct_handler, filter_like_task


class Stamp(Filter):
    """Appends its label to the payload's "trail" and notes the task name it saw."""

    def __init__(self, label: str, seen: list):
        super().__init__()
        self.label, self.seen = label, seen

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        self.seen.append((self.label, fl_ctx.get_prop(FLContextKey.TASK_NAME)))
        dxo = from_shareable(shareable)
        dxo.data["trail"] = dxo.data.get("trail", []) + [self.label]
        return dxo.to_shareable()


class Refuse(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        raise ValueError("the site's policy refuses this payload")


def site_context(scope: Scope | None, job_filters: dict) -> FLContext:
    ctx = FLContext()
    # The client runner keeps its filter tables as attributes; NVFlare keys them "<task>/<direction>".
    ctx.set_prop(FLContextKey.RUNNER, SimpleNamespace(**job_filters), private=True, sticky=False)
    if scope is not None:
        ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)
    return ctx


def payload() -> Shareable:
    return DXO(DataKind.COLLECTION, {"grad/t2": [0.0]}).to_shareable()


def test_site_scope_then_job_filters_run_on_the_reply():
    seen: list = []
    scope = Scope()
    scope.add_task_result_filter(Stamp("privacy scope", seen), FilterKey.OUT)
    job = {
        TASK_RESULT: {"mb_step/out": [Stamp("job", seen)], "mb_register/out": [Stamp("other task", seen)]},
        TASK_DATA: {"mb_step/in": [Stamp("wrong chain", seen)]},
    }
    out = filter_like_task(TASK_RESULT, FilterKey.OUT, "mb_step", payload(), site_context(scope, job))
    assert from_shareable(out).data["trail"] == ["privacy scope", "job"]
    assert seen == [("privacy scope", "mb_step"), ("job", "mb_step")]


def test_incoming_data_meets_the_data_chain_only():
    seen: list = []
    job = {TASK_DATA: {"mb_step/in": [Stamp("data in", seen)]}, TASK_RESULT: {"mb_step/out": [Stamp("result", seen)]}}
    out = filter_like_task(TASK_DATA, FilterKey.IN, "mb_step", payload(), site_context(None, job))
    assert from_shareable(out).data["trail"] == ["data in"]


def test_server_runner_keeps_its_filters_in_its_config():
    seen: list = []
    runner_config = SimpleNamespace(task_data_filters={"mb_step/out": [Stamp("server", seen)]}, task_result_filters={})
    ctx = FLContext()
    ctx.set_prop(FLContextKey.RUNNER, SimpleNamespace(config=runner_config), private=True, sticky=False)
    out = filter_like_task(TASK_DATA, FilterKey.OUT, "mb_step", payload(), ctx)
    assert from_shareable(out).data["trail"] == ["server"]


def test_a_refusing_filter_stops_the_payload():
    job = {TASK_RESULT: {"mb_step/out": [Refuse()]}}
    with pytest.raises(ValueError, match="refuses"):
        filter_like_task(TASK_RESULT, FilterKey.OUT, "mb_step", payload(), site_context(None, job))


def test_bad_use_is_named():
    with pytest.raises(ValueError, match="filter chain"):
        filter_like_task("task_filters", FilterKey.OUT, "mb_step", payload(), site_context(None, {}))
    with pytest.raises(RuntimeError, match="no NVFlare runner"):
        filter_like_task(TASK_DATA, FilterKey.IN, "mb_step", payload(), FLContext())


def test_site_executor_refuses_a_step_its_filters_refuse():
    """A direct step whose data or result a site filter refuses comes back as a filter error,
    which the server reports naming the site; nothing else leaves."""
    from nvflare.apis.fl_constant import ReturnCode

    from fedmodal.modalitybank import protocol as P
    from fedmodal.modalitybank.executor import ModalityBankExecutor

    step = direct_handler(ModalityBankExecutor().execute)
    refuse_data = site_context(None, {TASK_DATA: {f"{P.TASK_STEP}/in": [Refuse()]}, TASK_RESULT: {}})
    reply = step(P.TASK_STEP, payload(), refuse_data)
    assert reply.get_return_code() == ReturnCode.TASK_DATA_FILTER_ERROR

    refuse_result = site_context(None, {TASK_DATA: {}, TASK_RESULT: {f"{P.TASK_STEP}/out": [Refuse()]}})
    reply = step(P.TASK_STEP, payload(), refuse_result)
    assert reply.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "grad/t2" not in reply  # the refused payload is not passed on


def test_site_executor_answers_a_step_before_registration_with_an_error():
    from nvflare.apis.fl_constant import ReturnCode

    from fedmodal.modalitybank import protocol as P
    from fedmodal.modalitybank.executor import ModalityBankExecutor

    reply = direct_handler(ModalityBankExecutor().execute)(
        P.TASK_STEP, payload(), site_context(None, {TASK_DATA: {}, TASK_RESULT: {}})
    )
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
