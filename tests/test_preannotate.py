"""Pre-annotation of new tasks on TASKS_CREATED: the hook, the event path, the follow-up's writes; real Redis and RQ.

Payloads have the shape Label Studio 1.23 sends (``tasks`` serialized with
``TaskWebhookSerializer``, ``project`` with ``ProjectWebhookSerializer``). Jobs
run through RQ's ``SimpleWorker`` with the stand-in pipeline of
tests/test_bootstrap.py; predictions reach the in-memory Label Studio of that
module through the real follow-up (``Pusher`` + ``LabelStudioDelivery``).
"""

from __future__ import annotations

import json
import logging

import pytest
from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from labelassist.backend.events import TASKS_CREATED, CorrectionProcessor, EventSink
from labelassist.backend.followup import Pusher
from labelassist.backend.hooks import event_hooks
from labelassist.backend.preannotate import NewTasks, PreannotateError, PreannotateNewTasks
from labelassist.backend.queue import JobOptions, QueueClient
from labelassist.backend.service import LabelStudioDelivery, Runtime
from labelassist.backend.settings import Settings
from labelassist.backend.store import EVENT_DONE, EVENT_FAILED, open_store
from labelassist.workers import jobs
from labelassist.workers.contract import MODEL_VERSION_KEY, QUEUE_BULK
from test_bootstrap import CONFIG, VERSION, FakeLabelStudio, FakePipeline

PROJECT = {"id": 1, "title": "new tasks", "label_config": CONFIG, "model_version": VERSION, "task_number": 3}


class LabelStudio(FakeLabelStudio):
    """The in-memory Label Studio, also as the runtime's client: download headers from a legacy token."""

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Token legacy-token-123"}


def tasks_created(ls: LabelStudio, task_ids) -> dict:
    return {"action": TASKS_CREATED, "project": PROJECT,
            "tasks": [{**ls.tasks[t], "project": 1, "meta": {}, "is_labeled": False, "overlap": 1} for t in task_ids]}


@pytest.fixture
def connection(redis_url):
    conn = Redis.from_url(redis_url)
    conn.set(MODEL_VERSION_KEY, VERSION)
    return conn


def runtime_for(connection, ls: LabelStudio, **settings) -> Runtime:
    settings = Settings(redis_url="redis://unused", ls_url="http://ls.test", ls_token="legacy-token-123",
                        allowed_image_hosts="img.test", **settings)
    return Runtime.build(settings, QueueClient(connection, JobOptions(60, 3600, 3600)), client_factory=lambda url, token: ls)


def work_bulk(connection) -> None:
    SimpleWorker([Queue(QUEUE_BULK, connection=connection, serializer=JSONSerializer)], connection=connection,
                 serializer=JSONSerializer).work(burst=True, logging_level="WARNING")


def test_new_tasks_get_one_prediction_each_through_the_follow_up(connection, caplog):
    ls = LabelStudio(["http://img.test/ok0.png", "http://ls.test/data/upload/1/ok1.png", "http://elsewhere.test/x.png",
                      "http://img.test/bad3.png"])
    runtime = runtime_for(connection, ls, preannotate_new_tasks=True)
    hook = PreannotateNewTasks(runtime)
    with caplog.at_level(logging.WARNING, logger="labelassist.backend.preannotate"):
        assert hook(tasks_created(ls, [1, 2, 3, 4])) == 3
    # The unresolvable task is logged with its reason, not dropped without a word.
    assert any("task 3: not pre-annotated" in r.getMessage() and "elsewhere.test" in r.getMessage() for r in caplog.records)
    assert Queue(QUEUE_BULK, connection=connection, serializer=JSONSerializer).count == 3
    pending = {p.task_id: p for p in runtime.pushes.pending()}
    assert sorted(pending) == [1, 2, 4] and {p.queue for p in pending.values()} == {QUEUE_BULK}
    assert pending[2].request["image"]["headers"] == {"Authorization": "Token legacy-token-123"}
    assert all(p.model_version == VERSION and p.label_config == CONFIG for p in pending.values())

    pusher = Pusher(runtime.pushes, runtime.queue, LabelStudioDelivery(runtime), interval_s=1.0)
    assert pusher.run_once() == 0  # nothing finished yet: nothing written
    assert ls.predictions == []
    jobs.install(FakePipeline())
    work_bulk(connection)
    assert pusher.run_once() == 3
    assert [len(ls.of(t, VERSION)) for t in (1, 2, 3, 4)] == [1, 1, 0, 1]  # the bad image gets the failed (empty) prediction
    assert runtime.pushes.counts() == {"pending": 0, "inflight": 0}

    # Label Studio delivering the event twice, or a second backend process handling it: still one each.
    assert hook(tasks_created(ls, [1, 2, 4])) == 3
    work_bulk(connection)
    pusher.run_once()
    assert [len(ls.of(t, VERSION)) for t in (1, 2, 3, 4)] == [1, 1, 0, 1]


def test_the_hook_runs_on_stored_tasks_created_events_only_when_switched_on(connection, tmp_path):
    ls = LabelStudio(["http://img.test/ok0.png", "http://img.test/ok1.png"])
    store = open_store(None, tmp_path / "events.sqlite3")
    try:
        off = runtime_for(connection, ls)
        assert TASKS_CREATED not in event_hooks(off, store)
        runtime = runtime_for(connection, ls, preannotate_new_tasks=True)
        sink = EventSink(store, CorrectionProcessor(store, None, hooks=event_hooks(runtime, store))).start()
        try:
            status, reply = sink.receive(json.dumps(tasks_created(ls, [1, 2])).encode())
            assert status == 200 and reply["status"] == "accepted", reply
            # A payload the hook cannot act on fails its event, which keeps the reason.
            status, bad = sink.receive(json.dumps({"action": TASKS_CREATED, "project": PROJECT}).encode())
            assert status == 200
            assert sink.drain(10)
        finally:
            sink.stop()
        assert store.event(reply["event_id"]).status == EVENT_DONE
        failed = store.event(bad["event_id"])
        assert failed.status == EVENT_FAILED and "expected 'tasks' as a list" in failed.error, failed
        assert sorted(p.task_id for p in runtime.pushes.pending()) == [1, 2]
    finally:
        store.close()


@pytest.mark.parametrize("payload, message", [
    ({"project": PROJECT}, "expected 'tasks' as a list of task objects, got NoneType"),
    ({"tasks": [{"id": 1}], "project": PROJECT}, "expected every task with an integer 'id' and a 'data' object"),
    ({"tasks": [{"id": "x", "data": {}}], "project": PROJECT}, "expected every task with an integer 'id'"),
    ({"tasks": [], "project": 3}, "expected 'project' as the project object, got int"),
    ({"tasks": [], "project": {"id": 0, "label_config": CONFIG}}, "project: expected '<id>.<created>' or an integer id"),
    ({"tasks": [], "project": {"id": 1}}, "project 1 came without its 'label_config'"),
])
def test_payloads_the_hook_cannot_act_on_say_why(payload, message):
    with pytest.raises(PreannotateError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        NewTasks.from_payload({"action": TASKS_CREATED, **payload})


def test_a_project_the_hook_cannot_serve_fails_with_the_reason(connection):
    ls = LabelStudio(["http://img.test/ok0.png"])
    text_project = {**PROJECT, "label_config": '<View><Text name="t" value="$text"/><Choices name="c" toName="t">'
                                                '<Choice value="a"/></Choices></View>'}
    with pytest.raises(PreannotateError, match="label config cannot be pre-annotated"):
        PreannotateNewTasks(runtime_for(connection, ls))({**tasks_created(ls, [1]), "project": text_project})
    no_credentials = Runtime.build(Settings(redis_url="redis://unused"), QueueClient(connection, JobOptions(60, 3600, 3600)))
    with pytest.raises(PreannotateError, match="no Label Studio URL and token"):
        PreannotateNewTasks(no_credentials)(tasks_created(ls, [1]))
    assert Queue(QUEUE_BULK, connection=connection, serializer=JSONSerializer).count == 0


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False),
                                           ("false", False), ("no", False), ("OFF", False), ("", False), ("maybe", ValueError)])
def test_preannotate_setting_reads_booleans_from_the_environment(raw, expected):
    environ = {"LABELASSIST_PREANNOTATE_NEW_TASKS": raw}
    if expected is ValueError:
        with pytest.raises(ValueError, match="LABELASSIST_PREANNOTATE_NEW_TASKS: expected one of 1, true"):
            Settings.from_env(environ)
    else:
        assert Settings.from_env(environ).preannotate_new_tasks is expected


def test_serve_has_the_switch_with_its_environment_variable():
    from click.testing import CliRunner

    from labelassist.backend.cli import cli

    out = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    assert out.exit_code == 0 and "--preannotate-new-tasks / --no-preannotate-new-tasks" in out.output, out.output
    assert "LABELASSIST_PREANNOTATE_NEW_TASKS" in out.output
