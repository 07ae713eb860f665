"""Webhook events: stored before the answer, diffed on a thread, nothing lost.

Predictions come from a tiny real HTTP server speaking Label Studio's
``GET /api/predictions/<id>/``; payloads have the shape Label Studio 1.23 sends.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from labelassist.backend import events as ev
from labelassist.backend import store as st
from labelassist.plugin.corrections import RegionExtras, prediction_meta
from test_corrections import brush, poly, rect, square
from test_store_support import pg_url, store_url  # noqa: F401  (fixtures)

PRED_ID = 41
PREDICTION = {
    "id": PRED_ID, "task": 7, "project": 3, "model_version": "labelassist-v1", "score": 0.8,
    "result": [poly("p-cat", square(2, 2, 6, 6), label="cat", score=0.9, meta=prediction_meta([0.5, 0.5])),
               rect("p-dog", 12, 1, 4, 4, label="dog", score=0.3),
               brush("p-sky", 0, 0, 20, 1, label="sky", score=0.6)],
}
PROJECT = {"id": 3, "title": "Pets", "label_config": "<View/>", "model_version": "labelassist-v1"}
TASK = {"id": 7, "data": {"image": "/data/upload/3/pets.png"}, "project": 3}


def annotation(aid=17, updated="2025-05-02T10:01:05.123456Z", result=None, **kw):
    result = result if result is not None else [
        poly("p-cat", square(2, 2, 6, 6), label="cat", origin="prediction"),
        brush("p-sky", 0, 0, 20, 2, label="sky", origin="prediction-changed"),
        poly("m-new", square(10, 6, 14, 9), label="dog", origin="manual"),
    ]
    return {"id": aid, "task": 7, "project": 3, "completed_by": 1, "result": result, "was_cancelled": False,
            "ground_truth": False, "created_at": "2025-05-02T10:00:00.000000Z", "updated_at": updated,
            "lead_time": 42.5, "parent_prediction": PRED_ID, "last_action": None, **kw}


def body(action, **payload):
    return json.dumps({"action": action, **payload}).encode()


def created(**kw):
    return body("ANNOTATION_CREATED", annotation=annotation(**kw), task=TASK, project=PROJECT)


class _PredictionAPI(BaseHTTPRequestHandler):
    predictions: dict[int, dict] = {}
    calls: list[str] = []

    def do_GET(self):
        self.calls.append(self.path)
        parts = self.path.strip("/").split("/")
        pred = self.predictions.get(int(parts[2])) if len(parts) == 3 and parts[:2] == ["api", "predictions"] else None
        data = json.dumps(pred if pred else {"detail": "Not found."}).encode()
        self.send_response(200 if pred else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def label_studio():
    """A tiny real HTTP server answering GET /api/predictions/<id>/; yields fetch_prediction."""
    _PredictionAPI.predictions = {PRED_ID: PREDICTION}
    _PredictionAPI.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PredictionAPI)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def fetch_prediction(prediction_id: int) -> dict:
        with urllib.request.urlopen(f"{base}/api/predictions/{prediction_id}/", timeout=5) as resp:
            return json.load(resp)

    fetch_prediction.calls = _PredictionAPI.calls
    yield fetch_prediction
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path):
    s = st.open_store(None, tmp_path / "corrections.sqlite3")
    yield s
    s.close()


@pytest.fixture
def hooks():
    return {"seen": []}


@pytest.fixture
def sink(store, label_studio, hooks):
    record = lambda payload: hooks["seen"].append(payload["action"])  # noqa: E731
    processor = ev.CorrectionProcessor(store, label_studio, hooks={"TASKS_CREATED": record, "START_TRAINING": record})
    s = ev.EventSink(store, processor, retry_delays_s=(0.05, 0.05))
    yield s
    s.stop()


# (case, body, http status, reply status or error fragment, stored status after processing)
RECEIVE_CASES = [
    ("annotation created", created(), 200, "accepted", "done"),
    ("annotation updated", body("ANNOTATION_UPDATED", annotation=annotation(), task=TASK, project=PROJECT), 200, "accepted", "done"),
    ("annotations created (bulk)", body("ANNOTATIONS_CREATED", annotation=[annotation(1), annotation(2)], task=[TASK], project=PROJECT),
     200, "accepted", "done"),
    ("annotations deleted", body("ANNOTATIONS_DELETED", annotations=[{"id": 17}], project=PROJECT), 200, "accepted", "done"),
    ("tasks created", body("TASKS_CREATED", tasks=[TASK], project=PROJECT), 200, "accepted", "done"),
    ("start training", body("START_TRAINING", project=PROJECT), 200, "accepted", "done"),
    ("cancelled annotation", created(was_cancelled=True, result=[]), 200, "accepted", "ignored"),
    ("unknown action", body("LABEL_LINK_CREATED", label_link=[{"id": 1}]), 200, "ignored", "ignored"),
    ("not JSON", b"{'action': 'ANNOTATION_CREATED'", 400, "body is not JSON", "malformed"),
    ("not UTF-8", b"\xff\xfe\x00", 400, "body is not JSON", "malformed"),
    ("a JSON array", b"[1, 2]", 400, "expected a JSON object", "malformed"),
    ("no action", b'{"annotation": {"id": 1}}', 400, "action: expected", "malformed"),
    ("annotation missing", body("ANNOTATION_CREATED", project=PROJECT), 400, "expected 'annotation'", "malformed"),
    ("annotation without id", body("ANNOTATION_UPDATED", annotation={"result": []}), 400, "integer id", "malformed"),
    ("deleted without ids", body("ANNOTATIONS_DELETED", annotations={"id": 1}), 400, "list of objects", "malformed"),
    ("annotation that cannot be diffed", created(result=[{"id": "x", "type": "polygonlabels", "value": {}}]), 200, "accepted", "failed"),
]


@pytest.mark.parametrize("case,raw,code,reply,stored", RECEIVE_CASES, ids=[c[0] for c in RECEIVE_CASES])
def test_receive(sink, store, case, raw, code, reply, stored):
    status, answer = sink.receive(raw)
    assert status == code
    if code == 200:
        assert answer["status"] == reply
    else:
        assert reply in answer["error"] and answer["code"] == "bad_webhook"
    assert sink.drain(10)
    event = store.event(answer["event_id"])
    assert event.body == raw  # kept verbatim, malformed or not
    assert event.status == stored, event.error


def test_annotation_becomes_a_correction(sink, store):
    store.put_region_extras("labelassist-v1", {"p-dog": RegionExtras(0.3, (0.0, 1.0))})
    status, _ = sink.receive(created())
    assert status == 200 and sink.drain(10)
    [corr] = list(store.corrections(project=3))
    assert (corr.annotation_id, corr.task_id, corr.prediction_id, corr.model_version) == (17, 7, PRED_ID, "labelassist-v1")
    assert corr.lead_time == 42.5 and corr.image == "/data/upload/3/pets.png"
    kinds = {(r.pred_region_id, r.final_region_id): r.kind for r in corr.regions}
    assert kinds == {("p-cat", "p-cat"): "accepted", ("p-dog", None): "deleted", ("p-sky", "p-sky"): "edited", (None, "m-new"): "added"}
    by_pred = {r.pred_region_id: r for r in corr.regions}
    assert by_pred["p-cat"].pred_embedding == pytest.approx((0.5, 0.5), abs=1e-3)  # from the item's meta
    assert by_pred["p-dog"].pred_embedding == (0.0, 1.0)  # from the side table
    assert by_pred["p-sky"].iou == pytest.approx(0.5)


def test_versions_duplicates_and_deletion(sink, store, label_studio):
    for raw in (created(), created(), body("ANNOTATION_UPDATED", annotation=annotation(updated="2025-05-02T11:00:00Z", result=[]),
                                           task=TASK, project=PROJECT)):
        assert sink.receive(raw)[0] == 200
    assert sink.drain(10)
    assert [e.status for e in store.events()] == ["done", "done", "done"]
    assert [e.error for e in store.events()][1] == "already recorded"
    assert len(list(store.corrections(latest_only=False))) == 2
    [latest] = list(store.corrections())
    assert [r.kind for r in latest.regions] == ["deleted", "deleted", "deleted"]
    assert len(label_studio.calls) == 1  # the prediction was fetched once
    sink.receive(body("ANNOTATIONS_DELETED", annotations=[{"id": 17}], project=PROJECT))
    assert sink.drain(10)
    assert list(store.corrections()) == []


def test_bulk_annotations(sink, store):
    sink.receive(body("ANNOTATIONS_CREATED", annotation=[annotation(1), annotation(2, parent_prediction=None)], task=[TASK], project=PROJECT))
    assert sink.drain(10)
    got = {c.annotation_id: c for c in store.corrections()}
    assert sorted(got) == [1, 2]
    assert got[2].prediction_id is None and {r.kind for r in got[2].regions} == {"added"}


def test_hooks_see_task_and_training_events(sink, hooks):
    sink.receive(body("TASKS_CREATED", tasks=[TASK], project=PROJECT))
    sink.receive(body("START_TRAINING", project=PROJECT))
    assert sink.drain(10)
    assert hooks["seen"] == ["TASKS_CREATED", "START_TRAINING"]


def test_missing_prediction_fails_the_event_with_a_reason(sink, store):
    _, answer = sink.receive(created(parent_prediction=999))
    assert sink.drain(10)
    event = store.event(answer["event_id"])
    assert event.status == "failed" and "prediction 999" in event.error and "404" in event.error


def test_transient_failures_are_retried(store):
    calls = []

    def flaky(prediction_id):
        calls.append(prediction_id)
        if len(calls) < 3:
            raise ConnectionError("Label Studio is restarting")
        return PREDICTION

    sink = ev.EventSink(store, ev.CorrectionProcessor(store, flaky), retry_delays_s=(0.05, 0.05, 0.05))
    try:
        _, answer = sink.receive(created())
        deadline = time.monotonic() + 10
        while store.event(answer["event_id"]).status == "pending" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.event(answer["event_id"]).status == "done"
        assert len(calls) == 3
    finally:
        sink.stop()


def test_retries_give_up_then_can_be_retried(store):
    down = {"on": True}

    def fetch(prediction_id):
        if down["on"]:
            raise ConnectionError("refused")
        return PREDICTION

    sink = ev.EventSink(store, ev.CorrectionProcessor(store, fetch), retry_delays_s=(0.01,))
    try:
        _, answer = sink.receive(created())
        deadline = time.monotonic() + 10
        while store.event(answer["event_id"]).status == "pending" and time.monotonic() < deadline:
            time.sleep(0.02)
        event = store.event(answer["event_id"])
        assert event.status == "failed" and "gave up after 2 attempts" in event.error
        down["on"] = False
        assert sink.retry_failed() == 1
        assert sink.drain(10)
        assert store.event(answer["event_id"]).status == "done"
        assert len(list(store.corrections())) == 1
    finally:
        sink.stop()


def test_pending_events_are_picked_up_at_start(store, label_studio):
    # stored before a crash, never processed
    ids = [store.append_event(created(aid=aid), action="ANNOTATION_CREATED") for aid in (1, 2)]
    sink = ev.EventSink(store, ev.CorrectionProcessor(store, label_studio)).start()
    try:
        assert sink.drain(10)
        assert [store.event(i).status for i in ids] == ["done", "done"]
        assert sorted(c.annotation_id for c in store.corrections()) == [1, 2]
    finally:
        sink.stop()


def test_a_processor_bug_fails_one_event_and_the_thread_lives_on(store):
    def processor(event):
        if b'"id": 1,' in event.body:
            raise KeyError("boom")
        return ev.Outcome("done")

    sink = ev.EventSink(store, processor)
    try:
        _, a1 = sink.receive(created(aid=1))
        _, a2 = sink.receive(created(aid=2))
        assert sink.drain(10)
        assert (store.event(a1["event_id"]).status, store.event(a2["event_id"]).status) == ("failed", "done")
        assert "KeyError" in store.event(a1["event_id"]).error
    finally:
        sink.stop()


def test_receive_answers_fast_under_a_slow_processor(store):
    def slow(event):
        time.sleep(3.0)
        return ev.Outcome("done")

    sink = ev.EventSink(store, slow)
    try:
        worst = 0.0
        for aid in range(5):
            t0 = time.perf_counter()
            status, _ = sink.receive(created(aid=aid))
            worst = max(worst, time.perf_counter() - t0)
            assert status == 200
        assert worst < 0.5, f"receive took {worst:.3f} s with a processor that takes 3 s per event"
        assert len(store.events()) == 5
    finally:
        sink.stop(timeout_s=0.1)


def test_store_down_answers_503(tmp_path):
    store = st.open_store(None, tmp_path / "c.sqlite3")
    sink = ev.EventSink(store, lambda e: ev.Outcome("done"))
    store.close()
    status, answer = sink.receive(created())
    assert status == 503 and answer["code"] == "store_unavailable"
    status, answer = sink.receive(b"not json")
    assert status == 503
    sink.stop()


def test_end_to_end_on_each_store(store_url, tmp_path, label_studio):
    store = st.open_store(store_url, tmp_path / "x")
    sink = ev.EventSink(store, ev.CorrectionProcessor(store, label_studio))
    try:
        assert sink.receive(created())[0] == 200
        assert sink.receive(b"garbage")[0] == 400
        assert sink.drain(10)
        assert [e.status for e in store.events()] == ["done", "malformed"]
        [corr] = list(store.corrections())
        assert corr.count("accepted") == 1 and corr.count("added") == 1
    finally:
        sink.stop()
        store.close()


def _api_error(status):
    from labelassist.plugin.errors import LabelStudioAPIError

    return LabelStudioAPIError("GET /api/predictions/1/: ...", status=status)


# (error a fetch raised, retried?)
TRANSIENT_CASES = [
    (ConnectionError("refused"), True),
    (TimeoutError("slow"), True),
    (OSError("network unreachable"), True),
    (_api_error(None), True),  # Label Studio not reached
    (_api_error(502), True),
    (_api_error(429), True),
    (_api_error(404), False),  # the prediction is gone
    (_api_error(403), False),
    (ValueError("bad JSON"), False),
]


@pytest.mark.parametrize("exc,transient", TRANSIENT_CASES, ids=[f"{type(e).__name__}-{getattr(e, 'status', '')}" for e, _ in TRANSIENT_CASES])
def test_which_fetch_failures_are_retried(exc, transient):
    assert ev._is_transient(exc) is transient
