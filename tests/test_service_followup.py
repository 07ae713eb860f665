"""The durable follow-up on a real Redis: claims, retries, stale claims, lost jobs, Label Studio delivery.

The queue is a small stand-in with fixed results (what a finished, running or
lost job looks like to ``QueueClient.result``); Label Studio is ``requests_mock``
behind a real ``LabelStudioClient``.
"""

from __future__ import annotations

import json

import pytest
import requests
import requests_mock
from redis import Redis

from labelassist.backend.followup import INFLIGHT_KEY, PENDING_KEY, STALE_CLAIM_S, PendingPush, Pusher
from labelassist.backend.queue import JobOptions, QueueClient
from labelassist.backend.service import LabelStudioDelivery, ProjectLink, Runtime
from labelassist.backend.settings import Settings
from labelassist.plugin.errors import LabelStudioAPIError
from labelassist.plugin.ls_client import LabelStudioClient
from labelassist.workers.contract import Concept, ImageSource, JobFailure, PredictRequest, PredictResult, Region

CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="label" toName="image"><Label value="cat"/></PolygonLabels></View>"""
LS = "http://ls.test:8080"
VERSION = "la-test-version"


class FixedQueue:
    """``result(job_id)`` from a table; records ``submit`` calls."""

    def __init__(self, results: dict):
        self.results = results
        self.submitted: list[PredictRequest] = []

    def result(self, job_id):
        return self.results.get(job_id)

    def submit(self, request, queue="predict", timeout_s=None):
        self.submitted.append(request)
        return request.job_id()

    def forget(self, job_id):
        self.results.pop(job_id, None)


def region() -> Region:
    return Region(id="r" * 20, label="cat", score=0.9, margin=0.5, polygons_pct=(((10.0, 10.0), (50.0, 10.0), (30.0, 40.0)),),
                  rle={"size": [10, 10], "counts": [100]}, bbox_xywh_px=(1, 1, 4, 3), area_px=6, predicted_iou=0.9,
                  stability_score=0.9, polygon_iou=0.9)


def push(job_id: str = "job-1", task_id: int = 11, **kw) -> PendingPush:
    request = PredictRequest(task_id=str(task_id), image=ImageSource("http://ls.test:8080/data/upload/1/a.png"),
                             concepts=(Concept("cat"),), model_version=VERSION)
    return PendingPush(job_id=job_id, task_id=task_id, project_id=1, model_version=VERSION, label_config=CONFIG,
                       request=request.to_json(), queue="predict", **kw)


@pytest.fixture
def connection(redis_url):
    return Redis.from_url(redis_url)


@pytest.fixture
def ls():
    session = requests.Session()
    with requests_mock.Mocker(session=session) as mock:
        mock.created = []

        def create(request, context):
            mock.created.append(request.json())
            context.status_code = 201
            return {"id": len(mock.created), **request.json()}

        mock.post(f"{LS}/api/predictions/", json=create)
        mock.get(f"{LS}/api/predictions/", json=lambda request, context: [
            {"id": i + 1, **p} for i, p in enumerate(mock.created) if str(p["task"]) == request.qs["task"][0]])
        mock.session = session
        yield mock


@pytest.fixture
def runtime(connection, ls):
    settings = Settings(redis_url="redis://unused")
    queue = QueueClient(connection, JobOptions(60, 60, 60))
    rt = Runtime.build(settings, queue, client_factory=lambda url, token: LabelStudioClient(url, token, session=ls.session))
    rt.projects.save(ProjectLink(1, LS, "legacy-token-1", {}))
    return rt


def test_a_finished_job_is_pushed_once(runtime, ls):
    finished = PredictResult(task_id="11", model_version=VERSION, size_wh=(100, 80), regions=(region(),), score=0.7)
    queue = FixedQueue({"job-1": finished})
    pusher = Pusher(runtime.pushes, queue, LabelStudioDelivery(runtime), interval_s=1)
    runtime.pushes.add(push())
    assert pusher.run_once() == 1
    [created] = ls.created
    assert created["task"] == 11 and created["model_version"] == VERSION and created["score"] == 0.7
    assert created["result"][0]["type"] == "polygonlabels" and created["result"][0]["value"]["polygonlabels"] == ["cat"]
    assert ls.request_history[-1].headers["Authorization"] == "Token legacy-token-1"
    assert runtime.pushes.counts() == {"pending": 0, "inflight": 0}
    assert pusher.run_once() == 0


def test_a_push_repeated_after_a_crash_does_not_duplicate(runtime, ls):
    """The pusher died after creating the prediction, before clearing its claim: the retry finds it there."""
    finished = PredictResult(task_id="11", model_version=VERSION, size_wh=(100, 80), regions=(region(),), score=0.7)
    pusher = Pusher(runtime.pushes, FixedQueue({"job-1": finished}), LabelStudioDelivery(runtime), interval_s=1)
    runtime.pushes.add(push())
    claimed = runtime.pushes.claim_for_push("job-1")
    LabelStudioDelivery(runtime)(claimed, finished)  # delivered, then "crash": the claim stays
    assert runtime.pushes.counts() == {"pending": 0, "inflight": 1}
    import time

    assert pusher.run_once(now=time.time() + STALE_CLAIM_S + 1) == 1  # stale claim back to pending, then done
    assert len(ls.created) == 1
    assert runtime.pushes.counts() == {"pending": 0, "inflight": 0}


def test_running_jobs_wait_and_failed_jobs_push_an_empty_prediction(runtime, ls):
    failed = PredictResult(task_id="12", model_version=VERSION, error=JobFailure("bad_image", "not an image"))
    pusher = Pusher(runtime.pushes, FixedQueue({"job-2": failed}), LabelStudioDelivery(runtime), interval_s=1)
    runtime.pushes.add(push("job-1", 11))  # still running: result None
    runtime.pushes.add(push("job-2", 12))
    assert pusher.run_once() == 1
    assert ls.created == [{"task": 12, "result": [], "score": 0.0, "model_version": VERSION}]
    assert runtime.pushes.counts() == {"pending": 1, "inflight": 0}


def test_label_studio_down_is_retried_with_backoff(runtime, ls, connection):
    finished = PredictResult(task_id="11", model_version=VERSION, size_wh=(100, 80), regions=(region(),), score=0.7)
    ls.post(f"{LS}/api/predictions/", status_code=503, json={"detail": "maintenance"})
    pusher = Pusher(runtime.pushes, FixedQueue({"job-1": finished}), LabelStudioDelivery(runtime), interval_s=1)
    runtime.pushes.add(push())
    assert pusher.run_once(now=1000.0) == 0
    [again] = runtime.pushes.pending()
    assert again.attempts == 1 and again.next_try_at == 1001.0
    assert pusher.run_once(now=1000.5) == 0 and len(ls.request_history) == 2  # not due yet: no new call
    assert connection.hlen(INFLIGHT_KEY) == 0


def test_no_credentials_is_retried_not_dropped(runtime, connection):
    runtime.projects.connection.delete("labelassist:project:1")
    finished = PredictResult(task_id="11", model_version=VERSION, size_wh=(100, 80), regions=(region(),), score=0.7)
    pusher = Pusher(runtime.pushes, FixedQueue({"job-1": finished}), LabelStudioDelivery(runtime), interval_s=1)
    runtime.pushes.add(push())
    assert pusher.run_once() == 0
    assert connection.hlen(PENDING_KEY) == 1


def test_a_job_the_queue_lost_is_submitted_again(runtime):
    lost = PredictResult(task_id="11", model_version="", error=JobFailure("job_lost", "gone"))
    queue = FixedQueue({"job-1": lost})
    pusher = Pusher(runtime.pushes, queue, LabelStudioDelivery(runtime), interval_s=1)
    runtime.pushes.add(push())
    assert pusher.run_once() == 0
    assert [r.task_id for r in queue.submitted] == ["11"]
    [again] = runtime.pushes.pending()
    assert again.resubmits == 1


def test_a_job_whose_image_was_unavailable_runs_again_with_the_image_resolved_afresh(runtime, ls):
    """Download tokens expire in the queue: the retry carries a fresh one, and the push follows the new job."""
    failed = PredictResult(task_id="11", model_version=VERSION, error=JobFailure("image_unavailable", "HTTP 401"))
    queue = FixedQueue({"job-1": failed})
    pusher = Pusher(runtime.pushes, queue, LabelStudioDelivery(runtime), interval_s=1)
    runtime.pushes.add(push(task_data={"image": "/data/upload/1/a.png"}))
    assert pusher.run_once() == 0 and ls.created == []
    [fresh] = queue.submitted
    assert fresh.image.uri == f"{LS}/data/upload/1/a.png" and fresh.image.headers == {"Authorization": "Token legacy-token-1"}
    [moved] = runtime.pushes.pending()
    assert moved.job_id == fresh.job_id() and moved.resubmits == 1 and moved.request == fresh.to_json()
    # Once the retries are spent, the failure is written as an empty prediction: the task is not left hanging.
    queue.results[moved.job_id] = failed
    for _ in range(3):
        pusher.run_once()
        queue.results[runtime.pushes.pending()[0].job_id if runtime.pushes.pending() else "none"] = failed
    assert len(queue.submitted) == 3 and len(ls.created) == 1 and ls.created[0]["result"] == []


def test_pending_records_are_json_round_trips():
    p = push(attempts=2)
    assert PendingPush.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["request"]["image"]["uri"].endswith("a.png")


def test_delivery_raises_label_studio_errors(runtime, ls):
    ls.get(f"{LS}/api/predictions/", status_code=401, json={"detail": "Invalid token."})
    finished = PredictResult(task_id="11", model_version=VERSION)
    with pytest.raises(LabelStudioAPIError):
        LabelStudioDelivery(runtime)(push(), finished)
