"""End to end: Label Studio 1.23.2 <-> labelassist serve (private Redis, one tiny-random worker).

The project is connected with ``labelassist connect`` and predictions are
retrieved the way the Data Manager's "Retrieve predictions" does it
(``POST /api/dm/actions?id=retrieve_tasks_predictions``). Images come both as
uploads (fetched from Label Studio with its token) and as local files (read
from disk under ``--local-files-root``).

Tiny random weights score nothing confidently, so the project's settings let
every mask through: the control tag's ``threshold="0"`` and ``min_margin="0"``,
and ``extra_params`` (set by ``connect --extra-params``) that switch off the
proposal filters, weaken the background class and use a coarse point grid.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from processes import stop_process_group
from PIL import Image, ImageDraw
from redis import Redis
from redis.exceptions import RedisError


pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image" threshold="0" min_margin="0">
    <Label value="circle"/><Label value="square"/>
  </PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="circle"/></KeyPointLabels>
</View>"""
# Random weights: let every proposal and every label through (see the module docstring). A random text
# tower scores short texts high, so the one background prompt is a long sentence that loses to the labels
# (an empty background list would be the honest setting, but the scorer needs at least one prompt).
EXTRA_PARAMS = {
    "proposals": {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.9},
    "scoring": {"label_threshold": 0.0, "min_margin": 0.0, "background_prompts": ["a photo of a square"]},
}
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_START_TIMEOUT_S = 240  # the worker imports torch and builds the tiny models
PREDICTIONS_TIMEOUT_S = 180


def png(size_wh: tuple[int, int], seed: int) -> bytes:
    """A picture with a few flat shapes: something for SAM to segment."""
    w, h = size_wh
    img = Image.new("RGB", size_wh, (30 + 40 * seed % 200, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((w * 0.1, h * 0.2, w * 0.5, h * 0.7), fill=(240, 200, 40))
    draw.rectangle((w * 0.55, h * 0.3, w * 0.9, h * 0.85), fill=(20, 160, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_project(ls, title: str, local_dir: str) -> dict:
    """A polygon project with two uploaded images and one local file."""
    r = ls.api("POST", "/api/projects/", json={"title": title, "label_config": CONFIG})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    # Uploads: one form field per file (Label Studio keeps one file per field name).
    files = [(f"file{i}", (f"upload{i}.png", png((96, 64), i), "image/png")) for i in range(2)]
    r = ls.api("POST", f"/api/projects/{pid}/import", files=files)
    assert r.status_code == 201, r.text
    # A local file: a local-files storage grants access to its directory; the task references it.
    images = ls.files_root / local_dir
    images.mkdir()
    (images / "local0.png").write_bytes(png((80, 60), 5))
    r = ls.api("POST", "/api/storages/localfiles/", json={"project": pid, "path": str(images), "title": "local",
                                                           "use_blob_urls": True})
    assert r.status_code == 201, r.text
    ref = f"/data/local-files/?d={local_dir}/local0.png"
    r = ls.api("POST", f"/api/projects/{pid}/import", json=[{"image": ref}])
    assert r.status_code == 201, r.text
    tasks = ls.api("GET", "/api/tasks/", params={"project": pid, "fields": "all", "resolve_uri": "false"}).json()["tasks"]
    refs = [t["data"]["image"] for t in tasks]
    uploads = [r for r in refs if r.startswith(f"/data/upload/{pid}/")]
    assert len(refs) == 3 and len(uploads) == 2 and ref in refs, refs
    return {"id": pid, "task_ids": sorted(t["id"] for t in tasks)}


def start_serve(args: list[str], log_path: Path, auth: tuple[str, str] | None = None):
    """``labelassist serve ARGS`` on a free port; returns (process, url, health) once its workers are ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELASSIST_")}
    env.update(HF_HUB_OFFLINE="1", LABELASSIST_TORCH_THREADS="1")
    cmd = [sys.executable, "-m", "labelassist.backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            health = requests.get(url + "/health", timeout=2, auth=auth).json()
            if health["model_version_source"] == "workers":
                return proc, url, health
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_process_group(proc)
            raise AssertionError("no worker published its model version:\n" + log_path.read_text()[-4000:])
        time.sleep(1)


def connect(ls, project: dict, backend_url: str, auth: tuple[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "labelassist.backend.cli", "connect", "--ls-url", ls.url, "--project",
           str(project["id"]), "--backend-url", backend_url, "--extra-params", json.dumps(EXTRA_PARAMS), "--wait", "30"]
    env = {**os.environ, "LABELASSIST_LS_TOKEN": ls.token}  # the token through its environment variable
    if auth:
        env.update(LABELASSIST_BASIC_AUTH_USER=auth[0], LABELASSIST_BASIC_AUTH_PASS=auth[1])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [ml] = ls.api("GET", "/api/ml/", params={"project": project["id"]}).json()
    return ml


def retrieve_predictions(ls, pid: int) -> None:
    """What the Data Manager's "Retrieve predictions" sends for all tasks: one synchronous /predict."""
    r = ls.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
               json={"selectedItems": {"all": True, "excluded": []}}, timeout=150)
    assert r.status_code == 200, r.text


def wait_for_predictions(ls, project: dict, timeout_s: float = PREDICTIONS_TIMEOUT_S) -> dict[int, list]:
    deadline = time.monotonic() + timeout_s
    while True:
        predictions = ls.api("GET", "/api/predictions/", params={"project": project["id"]}).json()
        by_task = {t: [p for p in predictions if p["task"] == t] for t in project["task_ids"]}
        if all(by_task.values()) or time.monotonic() > deadline:
            return by_task
        time.sleep(1)


def assert_one_polygon_prediction_each(by_task: dict[int, list], version: str, log_path: Path) -> None:
    for task_id, preds in by_task.items():
        assert len(preds) == 1, (task_id, preds, log_path.read_text()[-3000:])
        [pred] = preds
        assert pred["model_version"] == version
        assert isinstance(pred["score"], float)
        polygons = [item for item in pred["result"] if item["type"] == "polygonlabels"]
        assert polygons, (task_id, pred, log_path.read_text()[-3000:])
        for item in polygons:
            assert item["from_name"] == "label" and item["to_name"] == "image"
            assert item["value"]["polygonlabels"][0] in ("circle", "square")
            assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in item["value"]["points"])


@pytest.fixture(scope="module")
def project(label_studio) -> dict:
    return make_project(label_studio, "labelassist e2e", "images")


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    """``labelassist serve --models tiny-random``: its own Redis and worker, Label Studio credentials from /setup."""
    tmp = tmp_path_factory.mktemp("serve")
    log_path = tmp / "serve.log"
    proc, url, health = start_serve(["--models", "tiny-random", "--cache-dir", str(tmp / "cache"), "--data-dir", str(tmp / "data"),
                                     "--local-files-root", str(label_studio.files_root), "--predict-wait", "60"], log_path)
    redis_url = re.search(r"private Redis on (redis://\S+)", log_path.read_text()).group(1)
    try:
        yield {"url": url, "version": health["model_version"], "log": log_path, "redis_url": redis_url,
               "data_dir": tmp / "data"}
    finally:
        stop_process_group(proc)
    log_text = log_path.read_text()
    assert "RANDOM WEIGHTS" in log_text and "listening on" in log_text and "stopped" in log_text
    with pytest.raises(RedisError):  # the private Redis went with it
        Redis.from_url(redis_url, socket_connect_timeout=1).ping()


@pytest.fixture(scope="module")
def connected(label_studio, project: dict, backend: dict) -> dict:
    ml = connect(label_studio, project, backend["url"])
    assert ml["is_interactive"] and ml["model_version"] == backend["version"], ml
    return {"ml_backend": ml}


def test_connect_sets_version_and_secret_webhook(label_studio, project, backend, connected):
    p = label_studio.api("GET", f"/api/projects/{project['id']}/").json()
    assert p["model_version"] == backend["version"]
    hooks = [h["url"] for h in label_studio.api("GET", "/api/webhooks/", params={"project": project["id"]}).json()
             if h.get("project") == project["id"]]
    assert len(hooks) == 1 and hooks[0].startswith(backend["url"] + "/webhook/"), hooks


def test_retrieve_predictions_stores_one_polygon_prediction_per_task(label_studio, project, backend, connected):
    ls, pid = label_studio, project["id"]
    retrieve_predictions(ls, pid)
    by_task = wait_for_predictions(ls, project, timeout_s=5)  # answered within --predict-wait: stored at once
    assert_one_polygon_prediction_each(by_task, backend["version"], backend["log"])
    # Asking again changes nothing: every task holds a prediction of the current version.
    retrieve_predictions(ls, pid)
    assert len(ls.api("GET", "/api/predictions/", params={"project": pid}).json()) == len(project["task_ids"])
    # The score column works: the project's version is ours.
    tasks = ls.api("GET", "/api/tasks/", params={"project": pid, "fields": "all"}).json()["tasks"]
    assert all(t.get("predictions_score") is not None for t in tasks), [t.get("predictions_score") for t in tasks]


def test_rank_lists_every_task_least_certain_first(label_studio, project, backend, connected):
    import json as jsonlib

    from click.testing import CliRunner

    from labelassist.backend.cli import cli

    retrieve_predictions(label_studio, project["id"])
    wait_for_predictions(label_studio, project, timeout_s=60)
    out = CliRunner().invoke(cli, ["rank", "--ls-url", label_studio.url, "--token", label_studio.token,
                                   "--project", str(project["id"]), "--include-annotated", "--json"])
    assert out.exit_code == 0, out.output
    rows = [jsonlib.loads(line) for line in out.output.splitlines() if line.startswith("{")]
    assert sorted(r["task_id"] for r in rows) == sorted(project["task_ids"])
    scores = [r["score"] for r in rows]
    assert None not in scores and scores == sorted(scores)


def test_late_predictions_arrive_through_the_follow_up(label_studio, backend, tmp_path):
    """A second web tier on the same Redis and worker, behind basic auth, with a budget shorter than one job:
    /predict answers with no prediction for every task, and the follow-up writes each one to Label Studio, once."""
    ls = label_studio
    project = make_project(ls, "labelassist e2e follow-up", "images-late")
    log_path = tmp_path / "serve-web.log"
    auth = ("label-studio", "backend-pass-123")
    proc, url, health = start_serve(["--redis-url", backend["redis_url"], "--predict-wait", "0.2", "--data-dir",
                                     str(tmp_path / "data"), "--basic-auth-user", auth[0], "--basic-auth-pass", auth[1]],
                                    log_path, auth=auth)
    try:
        assert health["model_version"] == backend["version"]
        assert requests.get(url + "/health", timeout=5).status_code == 401
        ml = connect(ls, project, url, auth=auth)
        assert ml["auth_method"] == "BASIC_AUTH" and ml["state"] == "CO", ml
        retrieve_predictions(ls, project["id"])
        assert ls.api("GET", "/api/predictions/", params={"project": project["id"]}).json() == []
        by_task = wait_for_predictions(ls, project)
        assert_one_polygon_prediction_each(by_task, backend["version"], log_path)
        # Either web tier's pusher may deliver (they share the Redis); together, once per task. A pusher
        # logs the write after Label Studio answers it, so the last line may trail the prediction a little.
        deadline = time.monotonic() + 10
        while True:
            wrote = [line for path in (log_path, backend["log"]) for line in path.read_text().splitlines()
                     if "follow-up: wrote the prediction" in line and f"(project {project['id']})" in line]
            if len(wrote) >= len(project["task_ids"]) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(wrote) == len(project["task_ids"]), wrote
        retrieve_predictions(ls, project["id"])  # nothing left to predict
        assert len(ls.api("GET", "/api/predictions/", params={"project": project["id"]}).json()) == len(project["task_ids"])
    finally:
        stop_process_group(proc)


def test_interactive_keypoint_returns_a_polygon(label_studio, project, backend, connected):
    ml_id = connected["ml_backend"]["id"]
    context = {"result": [{
        "original_width": 96, "original_height": 64, "image_rotation": 0, "from_name": "kp", "to_name": "image",
        "type": "keypointlabels", "origin": "manual", "is_positive": True,
        "value": {"x": 30.0, "y": 45.0, "width": 0.5, "keypointlabels": ["circle"]},
    }]}
    task_id = project["task_ids"][0]
    r = label_studio.api("POST", f"/api/ml/{ml_id}/interactive-annotating", json={"task": task_id, "context": context},
                         timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "errors" not in body, body
    items = body["data"]["result"]
    assert items and items[0]["type"] == "polygonlabels" and items[0]["value"]["polygonlabels"] == ["circle"], body
    assert body["data"]["model_version"] == backend["version"]


def test_annotations_reach_the_correction_log(label_studio, project, backend, connected):
    """An annotation made in Label Studio reaches /webhook/<secret> (sent without auth) and becomes a correction."""
    from labelassist.backend.store import DEFAULT_DB_FILENAME, open_store

    task_id = project["task_ids"][1]
    [pred] = label_studio.api("GET", "/api/predictions/", params={"task": task_id}).json()
    r = label_studio.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": pred["result"], "parent_prediction": pred["id"]})
    assert r.status_code == 201, r.text
    store = open_store(None, backend["data_dir"] / DEFAULT_DB_FILENAME)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            corrections = list(store.corrections(project=project["id"]))
            if corrections:
                break
            time.sleep(0.5)
        assert [e.action for e in store.events(action="ANNOTATION_CREATED")] == ["ANNOTATION_CREATED"]
        [corr] = corrections
        assert corr.task_id == task_id and corr.model_version == backend["version"], corr
        # The annotation kept every predicted region, and Label Studio kept each item's meta,
        # so the log has the CLIP embedding the model saw for each of them.
        assert corr.regions and all(r.kind == "accepted" for r in corr.regions), corr.regions
        assert all(len(r.pred_embedding) > 0 for r in corr.regions)
    finally:
        store.close()


def test_train_button_trains_a_head_and_the_project_predicts_with_it(label_studio, project, backend, connected):
    """Label Studio's Train (POST /api/ml/<id>/train) sends START_TRAINING to the backend; the training
    worker fits a head on the correction log, Label Studio is told the new version, and new predictions
    are made with the head by the same, unrestarted inference worker."""
    ls, pid = label_studio, project["id"]
    assert any(e["kind"] == "accepted" for e in _corrections_of(backend, pid)), "needs the annotation test's correction"
    r = ls.api("POST", f"/api/ml/{connected['ml_backend']['id']}/train", json={})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while True:
        version = ls.api("GET", f"/api/projects/{pid}/").json()["model_version"]
        if version != backend["version"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert re.fullmatch(re.escape(backend["version"]) + r"\+h[0-9a-f]{12}", version), (version, backend["log"].read_text()[-3000:])
    setup = requests.post(backend["url"] + "/setup", json={"project": f"{pid}.0", "schema": CONFIG}, timeout=10).json()
    assert setup["model_version"] == version
    # The task without an annotation gets a prediction of the new version on the next retrieval.
    task_id = project["task_ids"][0]
    r = ls.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
               json={"selectedItems": {"all": False, "included": [task_id]}}, timeout=150)
    assert r.status_code == 200, r.text
    preds = ls.api("GET", "/api/predictions/", params={"task": task_id}).json()
    assert sorted(p["model_version"] for p in preds) == sorted([backend["version"], version]), preds
    assert "worker started" in backend["log"].read_text() and "queues train" in backend["log"].read_text()


def _corrections_of(backend, project_id: int) -> list[dict]:
    from labelassist.backend.store import DEFAULT_DB_FILENAME, open_store

    store = open_store(None, backend["data_dir"] / DEFAULT_DB_FILENAME)
    try:
        return [{"kind": r.kind} for c in store.corrections(project=project_id) for r in c.regions]
    finally:
        store.close()
