"""What the queue is doing: queues and their depths, workers and what they run, pending pushes, bootstrap runs.

Everything is read from the Redis the workers and web tiers share; nothing here
imports torch or talks to Label Studio.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from labelassist.backend.bootstrap import RunStore, format_runs
from labelassist.backend.followup import PendingPushes
from labelassist.workers.contract import INFERENCE_QUEUES, MODEL_VERSION_KEY, QUEUE_TRAIN, WORKER_MODELS_KEY


def collect_status(connection: Redis) -> dict[str, Any]:
    """A JSON-ready snapshot of queues, workers and the follow-up."""
    queues = []
    for name in (*INFERENCE_QUEUES, QUEUE_TRAIN):
        q = Queue(name, connection=connection, serializer=JSONSerializer)
        queues.append({
            "name": name,
            "queued": q.count,
            "started": q.started_job_registry.count,
            "finished": q.finished_job_registry.count,
            "failed": q.failed_job_registry.count,
            "scheduled": q.scheduled_job_registry.count,
        })
    workers = []
    for w in Worker.all(connection=connection, serializer=JSONSerializer):
        raw = connection.get(WORKER_MODELS_KEY.format(name=w.name))
        models = json.loads(raw) if raw else {}
        job_id = w.get_current_job_id()
        workers.append({
            "name": w.name,
            "state": str(w.get_state()),
            "queues": w.queue_names(),
            "current_job": job_id.decode() if isinstance(job_id, bytes) else job_id,
            "model_version": models.get("model_version", ""),
            "device": models.get("device", ""),
            "random_weights": bool(models.get("random_weights", False)),
            "jobs_done": w.successful_job_count,
            "jobs_failed": w.failed_job_count,
            "last_heartbeat": w.last_heartbeat.isoformat() if w.last_heartbeat else None,
        })
    version = connection.get(MODEL_VERSION_KEY)
    return {
        "model_version": version.decode() if version else None,
        "queues": queues,
        "workers": sorted(workers, key=lambda w: w["name"]),
        "followup": PendingPushes(connection).counts(),
        "runs": RunStore(connection).list(),
    }


def format_status(status: dict[str, Any]) -> str:
    lines = [f"model version: {status['model_version'] or '(no worker has started)'}", "",
             f"{'queue':<12} {'queued':>7} {'started':>8} {'finished':>9} {'failed':>7} {'scheduled':>10}"]
    for q in status["queues"]:
        lines.append(f"{q['name']:<12} {q['queued']:>7} {q['started']:>8} {q['finished']:>9} {q['failed']:>7} {q['scheduled']:>10}")
    lines += ["", f"workers: {len(status['workers'])}"]
    for w in status["workers"]:
        doing = f"running {w['current_job']}" if w["current_job"] else w["state"]
        random = " RANDOM WEIGHTS" if w["random_weights"] else ""
        lines.append(f"  {w['name']}  {doing}  queues={','.join(w['queues'])}  {w['model_version']} on {w['device'] or '?'}{random}"
                     f"  done={w['jobs_done']} failed={w['jobs_failed']}")
    f = status["followup"]
    lines += ["", f"predictions waiting to be written to Label Studio: {f.get('pending', 0)} pending, {f.get('inflight', 0)} in flight"]
    if "runs" in status:
        lines += ["", format_runs(status["runs"])]
    return "\n".join(lines)
