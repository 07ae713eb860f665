"""End to end: ``labelassist bootstrap`` against Label Studio 1.23.2 and a real tiny-random worker.

The project has ``N_TASKS`` (200) tasks with small images, ``BROKEN`` of them
broken (two uploads that are not images, one reference to an upload that does
not exist). Each task is a real SAM + CLIP job on two tiny-random CPU workers.

A first run with a window of ``WINDOW`` jobs is killed mid-way (SIGKILL, as a
crashed or interrupted run) while its jobs are watched: never more than the
window are queued or running. The second run resumes it, a third finds nothing
to write. Every good task ends with exactly one prediction of the workers'
version; the broken ones are recorded failures with their reasons and get none.

Random weights keep no region on their own: the job settings of
tests/e2e/test_label_studio.py (``EXTRA_PARAMS``, with a coarser point grid)
are passed with ``--proposals``/``--scoring``.

(Not named test_bootstrap.py: tests/test_bootstrap.py has that basename, and
pytest's default import mode needs unique basenames in directories without
``__init__.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from redis import Redis

from processes import running_worker
from test_label_studio import CONFIG, EXTRA_PARAMS, png

pytestmark = pytest.mark.e2e

N_TASKS = 200
BROKEN = 3
WINDOW = 16
KILL_AFTER = 80  # predictions written before run 1 is killed
RUN_TIMEOUT_S = 300
UPLOAD_CHUNK = 50
# A 4x4 point grid: ~0.4 s per job on one CPU thread instead of ~2 s at 8x8 (image size hardly matters,
# SAM resizes every image to its input size), so 200 jobs fit in a minute or two on two workers.
PROPOSALS = {**EXTRA_PARAMS["proposals"], "points_per_side": 4}


def make_bulk_project(ls) -> dict:
    r = ls.api("POST", "/api/projects/", json={"title": "labelassist bootstrap", "label_config": CONFIG})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    good = N_TASKS - BROKEN
    files = [(f"file{i}", (f"img{i}.png", png((32 + i % 5 * 4, 24 + i % 3 * 4), i), "image/png")) for i in range(good)]
    files += [(f"broken{i}", (f"broken{i}.png", b"this is not an image " * (i + 1), "image/png")) for i in range(BROKEN - 1)]
    for start in range(0, len(files), UPLOAD_CHUNK):  # Django refuses more than 100 files per request
        r = ls.api("POST", f"/api/projects/{pid}/import", files=files[start:start + UPLOAD_CHUNK])
        assert r.status_code == 201, r.text
    r = ls.api("POST", f"/api/projects/{pid}/import", json=[{"image": f"/data/upload/{pid}/missing-file.png"}])
    assert r.status_code == 201, r.text
    tasks = ls.api("GET", "/api/tasks/", params={"project": pid, "fields": "all", "resolve_uri": "false", "page_size": N_TASKS * 2}).json()["tasks"]
    assert len(tasks) == N_TASKS
    broken = sorted(t["id"] for t in tasks if "broken" in t["data"]["image"] or "missing-file" in t["data"]["image"])
    assert len(broken) == BROKEN, [t["data"]["image"] for t in tasks]
    return {"id": pid, "task_ids": sorted(t["id"] for t in tasks), "broken": broken}


def bootstrap_cmd(ls, pid: int, redis_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "labelassist.backend.cli", "bootstrap", "--ls-url", ls.url, "--token", ls.token,
            "--project", str(pid), "--redis-url", redis_url, "--proposals", json.dumps(PROPOSALS),
            "--scoring", json.dumps(EXTRA_PARAMS["scoring"]), "--max-retries", "1", "--batch-size", "5", *extra]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LABELASSIST_")}


def queued_and_running(connection: Redis) -> int:
    """Bulk jobs waiting in the queue plus those a worker is running, read in one snapshot."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    queue = Queue("bulk", connection=connection)
    pipe = connection.pipeline(transaction=True)
    pipe.llen(queue.key)
    pipe.zcard(StartedJobRegistry(queue=queue).key)
    queued, running = pipe.execute()
    return queued + running


def predictions_by_task(ls, project: dict) -> dict[int, list]:
    predictions = ls.api("GET", "/api/predictions/", params={"project": project["id"]}).json()
    return {t: [p for p in predictions if p["task"] == t] for t in project["task_ids"]}


def test_bootstrap_killed_midway_resumes_with_one_prediction_per_good_task(label_studio, redis_url, tmp_path):
    ls = label_studio
    project = make_bulk_project(ls)
    connection = Redis.from_url(redis_url)
    with running_worker(redis_url, "--device", "cpu"), running_worker(redis_url, "--device", "cpu"):
        version = connection.get("labelassist:model_version").decode()

        # Run 1: a window of WINDOW jobs, killed once KILL_AFTER predictions are written.
        log1 = tmp_path / "run1.log"
        with open(log1, "wb") as log:
            proc = subprocess.Popen(bootstrap_cmd(ls, project["id"], redis_url, "--window", str(WINDOW)), env=clean_env(),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        outstanding = []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            outstanding.append(queued_and_running(connection))
            runs = connection.zrange("labelassist:runs", 0, -1)
            done = int(connection.hget(b"labelassist:run:" + runs[0], "done") or 0) if runs else 0
            if done >= KILL_AFTER:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(30)
        assert done >= KILL_AFTER, (done, log1.read_text()[-3000:])
        assert 0 < max(outstanding) <= WINDOW, max(outstanding)
        by_task = predictions_by_task(ls, project)
        written = sum(len(p) for p in by_task.values())
        assert KILL_AFTER <= written < N_TASKS - BROKEN and all(len(p) <= 1 for p in by_task.values()), (written, log1.read_text()[-3000:])

        # Run 2: resumes; the jobs of run 1 are reused, nothing is written twice.
        out = subprocess.run(bootstrap_cmd(ls, project["id"], redis_url, "--json"), env=clean_env(), capture_output=True,
                             text=True, timeout=RUN_TIMEOUT_S)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["status"] == "finished" and summary["model_version"] == version
        assert summary["skipped"] == written and summary["selected"] == N_TASKS - written, summary
        assert summary["done"] + written == N_TASKS - BROKEN and summary["failed"] == BROKEN, summary
        codes = sorted(f["code"] for f in summary["failures"].values())
        assert codes == ["bad_image", "bad_image", "image_unavailable"], summary["failures"]
        assert sorted(int(t) for t in summary["failures"]) == project["broken"]
        assert "images/s" not in out.stdout and summary["images_per_s"] > 0
        assert "img/s" in out.stderr or "it/s" in out.stderr or "s/img" in out.stderr, out.stderr[-2000:]  # tqdm's rate

        by_task = predictions_by_task(ls, project)
        for task_id, preds in by_task.items():
            if task_id in project["broken"]:
                assert preds == [], (task_id, preds)
                continue
            assert len(preds) == 1 and preds[0]["model_version"] == version, (task_id, preds)
            assert any(item["type"] == "polygonlabels" for item in preds[0]["result"]), (task_id, preds[0])

        # Run 3: only the broken tasks are left; they fail again, nothing is written.
        out = subprocess.run(bootstrap_cmd(ls, project["id"], redis_url, "--json", "--no-progress"), env=clean_env(),
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert out.returncode == 0, out.stderr[-3000:]
        third = json.loads(out.stdout.strip().splitlines()[-1])
        assert (third["selected"], third["done"], third["failed"]) == (BROKEN, 0, BROKEN), third
        ids = {t: [p["id"] for p in preds] for t, preds in by_task.items()}
        assert {t: [p["id"] for p in preds] for t, preds in predictions_by_task(ls, project).items()} == ids

        # status lists the three runs.
        out = subprocess.run([sys.executable, "-m", "labelassist.backend.cli", "status", "--redis-url", redis_url, "--json"],
                             env=clean_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        runs = json.loads(out.stdout)["runs"]
        assert len(runs) == 3 and runs[0]["run_id"] == third["run_id"] and runs[1]["run_id"] == summary["run_id"]
        assert runs[1]["status"] == "finished" and runs[1]["done"] == summary["done"]
