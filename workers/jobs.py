"""RQ job functions, enqueued by dotted path (``labelassist.workers.jobs.predict``).

The worker process installs its resident pipeline with ``install`` before it
takes jobs; a job that runs in a process without one (a plain ``rq worker``)
builds it once from the environment and keeps it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from labelassist.workers.contract import JobFailure, PredictRequest, PredictResult
from labelassist.workers.errors import ContractError

log = logging.getLogger(__name__)

_pipeline = None
_lock = threading.Lock()


def install(pipeline) -> None:
    """Make ``pipeline`` the one every job in this process uses."""
    global _pipeline
    _pipeline = pipeline


def current_pipeline():
    global _pipeline
    with _lock:
        if _pipeline is None:
            from labelassist.workers.worker import WorkerConfig, build_pipeline

            _pipeline = build_pipeline(WorkerConfig.from_env())
        return _pipeline


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    """PredictRequest JSON in, PredictResult JSON out; a malformed payload is a failed result, not a crash."""
    pipeline = current_pipeline()
    try:
        request = PredictRequest.from_json(payload)
    except ContractError as exc:
        task_id = str(payload.get("task_id", "")) if isinstance(payload, dict) else ""
        log.warning("rejected job payload for task %r: %s", task_id, exc)
        return PredictResult(task_id=task_id or "?", model_version=pipeline.version,
                             error=JobFailure(exc.code, str(exc))).to_json()
    return pipeline.run(request).to_json()
