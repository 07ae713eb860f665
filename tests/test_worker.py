"""A real ``labelassist worker`` process on a real Redis: jobs in, valid results out, bad jobs never kill it."""

from __future__ import annotations

import time

import pytest
from PIL import Image
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from labelassist.backend.queue import JobOptions, QueueClient
from labelassist.workers import geometry
from labelassist.workers.contract import (
    PREDICT_JOB, QUEUE_INTERACTIVE, Concept, ImageSource, PredictRequest, PredictResult, Prompt, ProposalSettings,
    ScoringSettings,
)

from processes import running_worker
from scenes import synthetic_scene

pytestmark = pytest.mark.slow

RESULT_TIMEOUT_S = 120
PROPOSALS = ProposalSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.95)
KEEP_ALL = ScoringSettings(label_threshold=0.0, min_margin=0.0, keep_unlabeled=True)


@pytest.fixture(scope="module")
def worker(redis_proc, tmp_path_factory):
    """(redis url, worker process): a tiny-random worker on db 3 of the session's server."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/3"
    with running_worker(url, "--device", "cpu", env={"LABELASSIST_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}) as proc:
        yield url, proc


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(synthetic_scene((96, 128), seed=3)).save(path)
    return path


def _client(url: str) -> QueueClient:
    return QueueClient(Redis.from_url(url), JobOptions(timeout_s=300, result_ttl_s=600, failure_ttl_s=600))


def _request(path, task_id=1, **kw) -> PredictRequest:
    kw = {"proposals": PROPOSALS, "scoring": KEEP_ALL, **kw}
    return PredictRequest(task_id=task_id, image=ImageSource(str(path)), concepts=(Concept("cat"), Concept("dog")), **kw)


def test_worker_serves_predictions_with_resident_models(worker, image_path):
    url, proc = worker
    client = _client(url)
    version = Redis.from_url(url).get("labelassist:model_version").decode()
    ids = [client.submit(_request(image_path, task_id=i)) for i in (1, 2)]
    assert client.submit(_request(image_path, task_id=1)) == ids[0]  # idempotent re-submission
    done = client.wait(ids, RESULT_TIMEOUT_S)
    assert set(done) == set(ids)
    for result in done.values():
        assert result.ok and result.model_version == version and "random" in version
        assert len(result.regions) > 0
        mask = geometry.rle_to_mask(result.regions[0].rle)
        assert mask.shape == (96, 128)
    # The second image job hit the embedding cache of the first: models and cache are resident.
    second = done[ids[1]]
    assert second.provenance["embedding_cache"]["hits"] >= 1
    assert proc.poll() is None


def test_bad_jobs_fail_per_task_and_the_worker_lives_on(worker, image_path, tmp_path):
    url, proc = worker
    client = _client(url)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really")
    bad_image = client.submit(_request(garbage, task_id=10))
    missing = client.submit(_request(tmp_path / "nope.png", task_id=11))
    malformed = Queue("predict", connection=Redis.from_url(url), serializer=JSONSerializer).enqueue(
        PREDICT_JOB, {"task_id": 12, "image": {"uri": str(image_path)}, "concepts": [], "nonsense": True}, job_id="malformed-12")
    good = client.submit(_request(image_path, task_id=13))
    done = client.wait([bad_image, missing, malformed.id, good], RESULT_TIMEOUT_S)
    assert done[bad_image].error.code == "bad_image"
    assert done[missing].error.code == "image_unavailable" and "nope.png" in done[missing].error.message
    assert done[malformed.id].error.code == "bad_request" and "nonsense" in done[malformed.id].error.message
    assert done[good].ok
    assert proc.poll() is None


def test_interactive_queue_first(worker, image_path):
    url, _ = worker
    client = _client(url)
    req = _request(image_path, task_id=20, prompt=Prompt(points_xy_px=((30, 40),), point_labels=(1,)), prompt_label="cat")
    job = client.submit(req, queue=QUEUE_INTERACTIVE)
    result = client.wait([job], RESULT_TIMEOUT_S)[job]
    assert isinstance(result, PredictResult) and result.ok
    assert [r.label for r in result.regions] == ["cat"]


def test_a_killed_workers_job_runs_again_on_another_worker(redis_proc, tmp_path):
    """SIGKILL a worker mid-job: RQ's maintenance finds the job abandoned and our retry puts it back."""
    import os
    import signal

    from rq.job import Job, JobStatus
    from rq.registry import StartedJobRegistry

    url = f"redis://{redis_proc.host}:{redis_proc.port}/4"
    path = tmp_path / "slow.png"
    Image.fromarray(synthetic_scene((256, 256), seed=4)).save(path)
    # 256 prompts decoded eagerly on one thread: seconds of work, so the kill lands mid-job.
    slow = ProposalSettings(points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.95)
    client = _client(url)
    connection = Redis.from_url(url)
    with running_worker(url, "--device", "cpu") as first:
        job_id = client.submit(_request(path, task_id=30, proposals=slow))
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while Job.fetch(job_id, connection=connection, serializer=JSONSerializer).get_status() != JobStatus.STARTED:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        assert client.result(job_id) is None  # not lost, not failed: waiting for its worker
        # What any worker's maintenance does once the dead worker's heartbeat has lapsed
        # (up to ~90 s, then within MAINTENANCE_INTERVAL_S); here the clock is moved on instead of waited out.
        registry = StartedJobRegistry("predict", connection=connection, serializer=JSONSerializer)
        registry.cleanup(timestamp=time.time() + 3600)
        assert Job.fetch(job_id, connection=connection, serializer=JSONSerializer).get_status() == JobStatus.QUEUED
        with running_worker(url, "--device", "cpu"):
            result = client.wait([job_id], RESULT_TIMEOUT_S)[job_id]
    assert result.ok and result.task_id == "30" and len(result.regions) > 0


def test_status_shows_queues_and_the_worker_with_its_models(worker, image_path):
    import json

    from click.testing import CliRunner

    from labelassist.backend.cli import cli

    url, _ = worker
    client = _client(url)
    client.wait([client.submit(_request(image_path, task_id=40))], RESULT_TIMEOUT_S)
    out = CliRunner().invoke(cli, ["status", "--redis-url", url, "--json"])
    assert out.exit_code == 0, out.output
    snapshot = json.loads(out.output)
    assert [q["name"] for q in snapshot["queues"]] == ["interactive", "predict", "bulk", "train"]
    predict = next(q for q in snapshot["queues"] if q["name"] == "predict")
    assert predict["finished"] >= 1 and predict["queued"] == 0
    [w] = snapshot["workers"]
    assert w["model_version"] == snapshot["model_version"] and w["random_weights"] and w["device"] == "cpu"
    assert w["queues"] == ["interactive", "predict", "bulk"] and w["jobs_done"] >= 1
    table = CliRunner().invoke(cli, ["status", "--redis-url", url])
    assert table.exit_code == 0 and "RANDOM WEIGHTS" in table.output and "predict" in table.output
    unreachable = CliRunner().invoke(cli, ["status", "--redis-url", "redis://127.0.0.1:1/0"])
    assert unreachable.exit_code != 0 and "cannot read the queue" in unreachable.output


@pytest.mark.parametrize("args, message", [
    (["--sam-model", "vit_q"], "unknown SAM variant 'vit_q'"),
    (["--sam-model", "tiny-random", "--sam-weights", "/nonexistent/sam.pth"], "/nonexistent/sam.pth"),
    (["--device", "tpu"], "tpu"),
], ids=["unknown-variant", "missing-weights", "bad-device"])
def test_worker_start_errors_are_one_clear_line(args, message, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from labelassist.backend.cli import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = CliRunner().invoke(cli, ["worker", "--redis-url", "redis://127.0.0.1:1/0", "--cache-dir", str(tmp_path), *args])
    assert out.exit_code == 1 and message in out.output and "Traceback" not in out.output, out.output


def test_a_job_that_raises_is_reported_with_its_reason(worker):
    url, proc = worker
    # A job function that raises stands for an unexpected fault inside a worker.
    job = Queue("predict", connection=Redis.from_url(url), serializer=JSONSerializer).enqueue("json.loads", "not json")
    result = _client(url).wait([job.id], RESULT_TIMEOUT_S)[job.id]
    assert result.error.code == "worker_failed" and "JSONDecodeError" in result.error.message
    assert "Traceback" not in result.error.message and proc.poll() is None
