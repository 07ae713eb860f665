"""RQ job functions, enqueued by dotted path (``labelassist.workers.jobs.predict``,
``labelassist.workers.jobs.train_head``).

The worker process installs its resident pipeline with ``install`` before it
takes jobs; a job that runs in a process without one (a plain ``rq worker``)
builds it once from the environment and keeps it. Concept heads are read from
Redis by id when a request names one, and kept: a head never changes under its id.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from labelassist.workers.contract import JobFailure, PredictRequest, PredictResult
from labelassist.workers.errors import ContractError
from labelassist.workers.heads import ConceptHead, HeadError, HeadStore, versioned

log = logging.getLogger(__name__)

HEAD_CACHE_SIZE = 16  # concept heads kept per worker

_pipeline = None
_connection = None
_heads: OrderedDict[str, ConceptHead] = OrderedDict()
_lock = threading.Lock()


def install(pipeline, connection=None) -> None:
    """Make ``pipeline`` the one every job in this process uses; ``connection``: the Redis heads are read from
    (default: the running job's)."""
    global _pipeline, _connection
    _pipeline = pipeline
    _connection = connection


def _redis():
    if _connection is not None:
        return _connection
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise HeadError("no Redis connection to read concept heads from (not running as a queued job)")
    return job.connection


def concept_head(head_id: str) -> ConceptHead:
    """The head ``head_id``, from this process's cache or Redis."""
    with _lock:
        if head_id in _heads:
            _heads.move_to_end(head_id)
            return _heads[head_id]
    head = HeadStore(_redis()).get(head_id)
    with _lock:
        _heads[head_id] = head
        while len(_heads) > HEAD_CACHE_SIZE:
            _heads.popitem(last=False)
    return head


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
    head = None
    if request.head:
        try:
            head = concept_head(request.head)
        except HeadError as exc:
            log.warning("task %s: %s", request.task_id, exc)
            return PredictResult(task_id=request.task_id, model_version=versioned(pipeline.version, request.head),
                                 error=JobFailure(exc.code, str(exc))).to_json()
    return pipeline.run(request, head).to_json()


def train_head(payload: dict[str, Any]) -> dict[str, Any]:
    """Train a project's concept head from the examples the payload points at (the ``train`` queue's job).

    Raises on bad input: the job fails with the reason, which ``labelassist train`` reports.
    """
    from labelassist.workers.training import run_training_job

    return run_training_job(payload, current_pipeline(), _redis())
