"""The ML-backend protocol over a Flask test client, with payloads shaped as Label Studio 1.23 sends them.

A real Redis (conftest) and no worker: jobs stay queued, which is what the
"not finished within the budget" path needs.
"""

from __future__ import annotations

import base64
import json

import pytest
from redis import Redis

from labelassist.backend.app import create_app
from labelassist.backend.followup import PENDING_KEY, PendingPushes
from labelassist.backend.queue import JobOptions, QueueClient
from labelassist.backend.service import EVENTS_STREAM, MODEL_VERSION_KEY, PROJECT_KEY, fallback_model_version
from labelassist.backend.settings import Settings

POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>"""
TEXT_CONFIG = """<View><Text name="text" value="$text"/><Choices name="c" toName="text"><Choice value="a"/></Choices></View>"""
LS_URL = "http://ls.example:8080"


def task(task_id: int, image: str) -> dict:
    """A task as /predict carries it (TaskSimpleSerializer): data unresolved."""
    return {"id": task_id, "data": {"image": image}, "meta": {}, "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z", "is_labeled": False, "overlap": 1, "inner_id": task_id,
            "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0, "annotations": [],
            "predictions": [], "file_upload": None, "project": 7}


def setup_body(schema: str = POLYGON_CONFIG, **extra) -> dict:
    return {"project": "7.1767225600", "schema": schema, "hostname": LS_URL, "access_token": "legacy-token-123",
            "extra_params": None, **extra}


def predict_body(tasks: list[dict], context=None) -> dict:
    return {"tasks": tasks, "project": "7.1767225600", "label_config": POLYGON_CONFIG,
            "params": {"login": None, "password": None, "context": context}}


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def make_client(redis_url):
    def make(**overrides):
        settings = Settings(redis_url=redis_url, predict_wait_s=0.2, interactive_wait_s=0.2, **overrides)
        connection = Redis.from_url(redis_url)
        queue = QueueClient(connection, JobOptions(timeout_s=60, result_ttl_s=60, failure_ttl_s=60))
        app = create_app(settings, queue)
        return app.test_client(), connection

    return make


@pytest.fixture
def client(make_client):
    return make_client()[0]


def assert_json_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.data
    body = response.get_json()
    assert set(body) == {"error", "code"}, body
    assert fragment.lower() in body["error"].lower(), body
    assert "Traceback" not in response.get_data(as_text=True)


def test_health_is_fast_and_reports_queue(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "UP" and body["model_class"] == "LabelassistModel"
    assert body["queue"] == {"reachable": True, "workers": 0}
    assert body["model_version_source"] == "settings"


def test_health_with_queue_down_still_answers():
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    queue = QueueClient(Redis.from_url(settings.redis_url), JobOptions(60, 60, 60))
    r = create_app(settings, queue).test_client().get("/health")
    assert r.status_code == 200
    assert r.get_json()["queue"]["reachable"] is False


def test_model_version_published_by_workers_wins(make_client):
    client, connection = make_client()
    assert client.post("/setup", json=setup_body()).get_json()["model_version"] == fallback_model_version(Settings())
    connection.set(MODEL_VERSION_KEY, "sam-vit_b+ViT-B-32@abc123")
    client2, _ = make_client()  # a fresh app: no cached read
    assert client2.post("/setup", json=setup_body()).get_json() == {"model_version": "sam-vit_b+ViT-B-32@abc123"}
    assert client2.get("/versions").get_json() == {"versions": ["sam-vit_b+ViT-B-32@abc123"]}
    assert client2.get("/health").get_json()["model_version_source"] == "workers"


def test_setup_stores_the_project_link(make_client):
    client, connection = make_client()
    r = client.post("/setup", json=setup_body(extra_params={"scoring": {"min_margin": 0.0}}))
    assert r.status_code == 200 and "model_version" in r.get_json()
    stored = json.loads(connection.get(PROJECT_KEY.format(project_id=7)))
    assert stored == {"project_id": 7, "hostname": LS_URL, "access_token": "legacy-token-123",
                      "extra_params": {"scoring": {"min_margin": 0.0}}, "label_config": setup_body()["schema"]}


@pytest.mark.parametrize("body, status, fragment", [
    (setup_body(schema=TEXT_CONFIG), 422, "PolygonLabels"),
    (setup_body(schema="<View><Image"), 422, "not valid XML"),
    (setup_body(schema='<!DOCTYPE x [<!ENTITY a "b">]><View/>'), 422, "entity"),
    ({"project": "7.1"}, 400, "schema: missing"),
    (setup_body(project="seven"), 400, "project"),
    (setup_body(extra_params=[1]), 400, "extra_params"),
])
def test_setup_rejects_bad_input(client, body, status, fragment):
    assert_json_error(client.post("/setup", json=body), status, fragment)


@pytest.mark.parametrize("data, content_type, status, fragment", [
    (b"{not json", "application/json", 400, "malformed JSON"),
    (b"", "application/json", 400, "empty body"),
    (b"[1, 2]", "application/json", 400, "expected a JSON object"),
    (json.dumps({"project": "7.1", "label_config": POLYGON_CONFIG}).encode(), "application/json", 400, "tasks: missing"),
    (json.dumps({"tasks": {"id": 1}}).encode(), "application/json", 400, "tasks: expected list"),
    (json.dumps(predict_body([{"id": 1}])).encode(), "application/json", 400, "tasks[0]"),
    (json.dumps(predict_body([{"id": "x", "data": {}}])).encode(), "application/json", 400, "tasks[0]"),
    (json.dumps({**predict_body([task(1, "/data/upload/7/a.png")]), "label_config": None}).encode(), "application/json", 400, "label_config"),
    (json.dumps({**predict_body([task(1, "/data/upload/7/a.png")]), "label_config": TEXT_CONFIG}).encode(), "application/json", 422, "PolygonLabels"),
    (json.dumps({**predict_body([task(1, "/data/upload/7/a.png")]), "params": []}).encode(), "application/json", 400, "params"),
    (json.dumps(predict_body([task(1, "/data/upload/7/a.png")], context="x")).encode(), "application/json", 400, "context"),
])
def test_predict_rejects_bad_input(client, data, content_type, status, fragment):
    assert_json_error(client.post("/predict", data=data, content_type=content_type), status, fragment)


def test_oversized_body_is_413_json(make_client):
    client, _ = make_client(max_request_bytes=1024)
    big = predict_body([task(i, "/data/upload/7/a.png") for i in range(50)])
    assert_json_error(client.post("/predict", json=big), 413, "too large")


def test_unknown_route_and_method_are_json(client):
    assert_json_error(client.get("/nope"), 404, "not found")
    assert_json_error(client.get("/predict"), 405, "method")


def test_predict_bad_image_among_good_ones(make_client):
    """The bad reference gets a failed prediction; the others, unfinished, get no prediction now and a follow-up."""
    client, connection = make_client(ls_url=LS_URL, ls_token="legacy-token-123")
    tasks = [task(1, "/data/upload/7/a.png"), task(2, "file:///etc/passwd"), task(3, "/data/upload/7/c.png")]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200, r.data
    results = r.get_json()["results"]
    version = fallback_model_version(Settings())
    assert results == [[], {"result": [], "score": 0.0, "model_version": version}, []]
    pending = {p.task_id: p for p in PendingPushes(connection).pending()}
    assert sorted(pending) == [1, 3]
    assert pending[1].model_version == version and pending[1].project_id == 7
    assert pending[1].request["image"]["headers"] == {"Authorization": "Token legacy-token-123"}

    # Asked again while the jobs still wait: same jobs (deterministic ids), no second record.
    assert client.post("/predict", json=predict_body(tasks)).get_json()["results"] == results
    assert connection.hlen(PENDING_KEY) == 2
    assert len(connection.keys("rq:job:*")) == 2


def test_predict_with_no_tasks(client):
    assert client.post("/predict", json=predict_body([])).get_json() == {"results": []}


def test_interactive_bad_context_is_400(client):
    context = {"result": [{"type": "keypointlabels", "value": "nope", "original_width": 10, "original_height": 10}]}
    assert_json_error(client.post("/predict", json=predict_body([task(1, "/data/upload/7/a.png")], context)), 400, "value")


def test_interactive_timeout_answers_an_empty_result(make_client):
    client, connection = make_client(ls_url=LS_URL, ls_token="legacy-token-123")
    context = {"result": [{"type": "keypointlabels", "to_name": "image", "from_name": "kp", "original_width": 100,
                           "original_height": 80, "is_positive": True,
                           "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["cat"]}}]}
    r = client.post("/predict", json=predict_body([task(1, "/data/upload/7/a.png")], context))
    assert r.status_code == 200
    [item] = r.get_json()["results"]
    assert item["result"] == []
    assert connection.hlen(PENDING_KEY) == 0  # interactive results are never pushed
    assert connection.llen("rq:queue:interactive") == 1


AUTH = {"basic_auth_user": "ls", "basic_auth_pass": "s3cret"}


@pytest.mark.parametrize("path, method, headers, status", [
    ("/health", "get", {}, 401),
    ("/health", "get", basic("ls", "wrong"), 401),
    ("/health", "get", {"Authorization": "Basic !!!"}, 401),
    ("/health", "get", basic("ls", "s3cret"), 200),
    ("/setup", "post", {}, 401),
    ("/webhook", "post", {}, 401),
    ("/webhook-url", "get", {}, 401),
    ("/webhook-url", "get", basic("ls", "s3cret"), 200),
])
def test_basic_auth(make_client, path, method, headers, status):
    client, _ = make_client(**AUTH)
    r = getattr(client, method)(path, headers=headers, json=setup_body() if method == "post" else None)
    assert r.status_code == status, r.data
    if status == 401:
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert "basic auth" in r.get_json()["error"]


def test_auth_off_lets_everything_through(client):
    assert client.get("/health").status_code == 200
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}}).status_code == 200


ANNOTATION_CREATED = {
    "action": "ANNOTATION_CREATED",
    "annotation": {"id": 11, "result": [], "parent_prediction": 5, "task": 1, "project": 7},
    "project": {"id": 7, "label_config": POLYGON_CONFIG, "title": "p"},
    "task": {"id": 1, "data": {"image": "/data/upload/7/a.png"}},
}


def test_webhook_secret_path_needs_no_auth(make_client):
    client, connection = make_client(**AUTH, webhook_secret="hook-secret-123")
    assert client.get("/webhook-url", headers=basic("ls", "s3cret")).get_json() == {"path": "/webhook/hook-secret-123"}
    r = client.post("/webhook/hook-secret-123", json=ANNOTATION_CREATED)
    assert r.status_code == 200 and r.get_json()["event"] == "ANNOTATION_CREATED"
    assert_json_error(client.post("/webhook/wrong", json=ANNOTATION_CREATED), 404, "no such")
    [(_, fields)] = connection.xrange(EVENTS_STREAM)
    assert fields[b"action"] == b"ANNOTATION_CREATED" and fields[b"project"] == b"7"
    assert json.loads(fields[b"body"]) == ANNOTATION_CREATED


def test_webhook_secret_is_generated_once_and_kept(make_client):
    client, connection = make_client()
    path = client.get("/webhook-url").get_json()["path"]
    client2, _ = make_client()
    assert client2.get("/webhook-url").get_json()["path"] == path and len(path) > len("/webhook/") + 20


@pytest.mark.parametrize("body, status, fragment", [
    ({"project": {"id": 7}}, 400, "action: missing"),
    ({"action": "START_TRAINING", "project": {"id": "x"}}, 400, "project"),
])
def test_webhook_rejects_bad_events(client, body, status, fragment):
    assert_json_error(client.post("/webhook", json=body), status, fragment)


def test_webhook_keeps_events_of_unsupported_projects(make_client):
    client, connection = make_client()
    body = {"action": "PROJECT_UPDATED", "project": {"id": 9, "label_config": TEXT_CONFIG}}
    assert client.post("/webhook", json=body).status_code == 200
    assert connection.xlen(EVENTS_STREAM) == 1


def test_pending_claims_are_exclusive(redis_url):
    from labelassist.backend.followup import PendingPush

    pushes = PendingPushes(Redis.from_url(redis_url))
    push = PendingPush(job_id="j1", task_id=1, project_id=7, model_version="v", label_config=POLYGON_CONFIG, request={}, queue="predict")
    assert pushes.claim_for_reply("j1")  # nobody follows j1 up: a reply may deliver it
    pushes.add(push)
    assert pushes.claim_for_push("j1") == push
    assert not pushes.claim_for_reply("j1")  # a pusher holds it
    assert pushes.claim_for_push("j1") is None
    pushes.done("j1")
    pushes.add(push)
    assert pushes.claim_for_reply("j1") and pushes.counts() == {"pending": 0, "inflight": 0}
