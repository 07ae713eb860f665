"""The web tier with a real Redis and a real ``labelassist worker --models tiny-random`` process.

Tiny random weights score nothing confidently, so the service's job settings let
every proposal and label through (``--proposals`` / ``--scoring`` as settings),
and the one background prompt is a long sentence a random text tower ranks low.
"""

from __future__ import annotations

import time

import pytest
import requests
import requests_mock
from PIL import Image, ImageDraw
from redis import Redis

from labelassist.backend.app import create_app
from labelassist.backend.followup import Pusher
from labelassist.backend.queue import JobOptions, QueueClient
from labelassist.backend.service import LabelStudioDelivery, Runtime
from labelassist.backend.settings import Settings
from labelassist.plugin.ls_client import LabelStudioClient

from processes import running_worker

pytestmark = pytest.mark.slow

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image"><Label value="circle"/><Label value="square"/></PolygonLabels>
</View>"""
PROPOSALS = '{"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.9}'
SCORING = '{"label_threshold": 0.0, "min_margin": 0.0, "background_prompts": ["a photo of a square"]}'
LS = "http://ls.test:8080"


def write_png(path, size_wh=(96, 64)) -> None:
    w, h = size_wh
    img = Image.new("RGB", size_wh, (40, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((w * 0.1, h * 0.2, w * 0.5, h * 0.7), fill=(240, 200, 40))
    draw.rectangle((w * 0.55, h * 0.3, w * 0.9, h * 0.85), fill=(20, 160, 60))
    img.save(path)


@pytest.fixture(scope="module")
def worker_redis(redis_proc):
    """Redis db 2 of the session's server with one long-running tiny-random worker on it."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/2"
    with running_worker(url):
        yield url


@pytest.fixture(scope="module")
def files_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "images").mkdir()
    for name in ("a.png", "b.png"):
        write_png(root / "images" / name)
    return root


def make_app(url: str, files_root, **overrides):
    options = {"predict_wait_s": 60, "interactive_wait_s": 60, **overrides}
    settings = Settings(redis_url=url, local_files_root=str(files_root), proposals=PROPOSALS, scoring=SCORING, **options)
    queue = QueueClient(Redis.from_url(url), JobOptions(120, 600, 600))
    runtime = Runtime.build(settings, queue)
    return create_app(settings, queue, runtime).test_client(), runtime


def local_task(task_id: int, name: str) -> dict:
    return {"id": task_id, "data": {"image": f"/data/local-files/?d=images/{name}"}, "project": 3, "annotations": [], "predictions": []}


def test_predict_round_trip_returns_polygons_with_the_workers_version(worker_redis, files_root):
    client, runtime = make_app(worker_redis, files_root)
    version = Redis.from_url(worker_redis).get("labelassist:model_version").decode()
    tasks = [local_task(1, "a.png"), {"id": 2, "data": {"image": "/data/local-files/?d=../../etc/passwd"}}, local_task(3, "b.png")]
    r = client.post("/predict", json={"tasks": tasks, "project": "3.1767225600", "label_config": CONFIG,
                                      "params": {"login": None, "password": None, "context": None}})
    assert r.status_code == 200, r.data
    first, bad, third = r.get_json()["results"]
    assert bad == {"result": [], "score": 0.0, "model_version": version}
    for item in (first, third):
        assert item["model_version"] == version and isinstance(item["score"], float)
        assert item["result"] and {i["type"] for i in item["result"]} == {"polygonlabels"}
        assert all(i["original_width"] == 96 and i["original_height"] == 64 for i in item["result"])
    assert runtime.pushes.counts() == {"pending": 0, "inflight": 0}


def test_interactive_keypoint_returns_a_polygon(worker_redis, files_root):
    client, _ = make_app(worker_redis, files_root)
    context = {"result": [{"original_width": 96, "original_height": 64, "image_rotation": 0, "from_name": "kp",
                           "to_name": "image", "type": "keypointlabels", "is_positive": True,
                           "value": {"x": 30.0, "y": 45.0, "width": 0.5, "keypointlabels": ["circle"]}}]}
    r = client.post("/predict", json={"tasks": [local_task(5, "a.png")], "project": "3.1767225600", "label_config": CONFIG,
                                      "params": {"context": context}})
    assert r.status_code == 200, r.data
    [item] = r.get_json()["results"]
    assert item["result"] and item["result"][0]["type"] == "polygonlabels"
    assert item["result"][0]["value"]["polygonlabels"] == ["circle"]


def test_tasks_over_budget_are_pushed_when_their_jobs_finish(worker_redis, files_root):
    """A budget shorter than one job: /predict answers [] for the task, the pusher writes it to Label Studio."""
    session = requests.Session()
    with requests_mock.Mocker(session=session) as ls:
        created = []
        ls.get(f"{LS}/api/predictions/", json=[])
        ls.post(f"{LS}/api/predictions/", json=lambda req, ctx: created.append(req.json()) or {"id": 1}, status_code=201)
        client, runtime = make_app(worker_redis, files_root, predict_wait_s=0.01, ls_url=LS, ls_token="legacy-1")
        runtime.client_factory = lambda url, token: LabelStudioClient(url, token, session=session)
        r = client.post("/predict", json={"tasks": [local_task(7, "b.png")], "project": "3.1767225600", "label_config": CONFIG})
        assert r.get_json()["results"] == [[]]
        pusher = Pusher(runtime.pushes, runtime.queue, LabelStudioDelivery(runtime), interval_s=0.1)
        deadline = time.monotonic() + 120
        while not created and time.monotonic() < deadline:
            pusher.run_once()
            time.sleep(0.2)
        [prediction] = created
        assert prediction["task"] == 7 and prediction["model_version"] == runtime.versions.current()
        assert prediction["result"] and prediction["result"][0]["type"] == "polygonlabels"
        assert runtime.pushes.counts() == {"pending": 0, "inflight": 0}
