"""The queue client: the only place on the web side that knows RQ's API.

Jobs are enqueued by dotted path with RQ's JSON serializer and deterministic ids
(see ``PredictRequest.job_id``), so submitting the same task twice is one job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from labelassist.workers.contract import (
    PREDICT_JOB,
    QUEUE_PREDICT,
    JobFailure,
    PredictRequest,
    PredictResult,
)

JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_FINISHED = "finished"
JOB_FAILED = "failed"
JOB_MISSING = "missing"
# Job failures that may pass: a worker died, the queue lost the job, the image could not be fetched
# (a host down, a download token expired). A job that ended so is worth running again.
TRANSIENT_CODES = frozenset({"worker_failed", "job_lost", "image_unavailable"})

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.02  # how often wait() looks at job states
JOB_RETRIES = 2  # a job whose worker died or raised is run again this many times
# No delay between tries: a delayed retry waits for RQ's scheduler, and a job whose
# worker was killed should run again as soon as another worker is free. Retries go
# to the front of the queue: their task has already waited once.


@dataclass(frozen=True)
class JobOutcome:
    """Where a job stands: ``status`` is one of the JOB_* names; ``value`` its return value when finished,
    ``error`` the last line of its failure when failed."""

    status: str
    value: Any = None
    error: str = ""


@dataclass(frozen=True)
class JobOptions:
    timeout_s: int
    result_ttl_s: int
    failure_ttl_s: int

    @classmethod
    def from_settings(cls, settings) -> JobOptions:
        return cls(settings.job_timeout_s, settings.result_ttl_s, settings.failure_ttl_s)


class QueueClient:
    """Submit predict jobs and collect their results."""

    def __init__(self, connection: Redis, options: JobOptions):
        self.connection = connection
        self.options = options
        self._queues: dict[str, Queue] = {}

    def queue(self, name: str) -> Queue:
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.connection, serializer=JSONSerializer)
        return self._queues[name]

    def submit(self, request: PredictRequest, queue: str = QUEUE_PREDICT, timeout_s: int | None = None) -> str:
        """Enqueue ``request`` unless a live or finished job with its id exists; return the job id."""
        return self.enqueue(PREDICT_JOB, request.to_json(), request.job_id(), queue, timeout_s, f"task {request.task_id}")

    def enqueue(self, function: str, payload: dict[str, Any], job_id: str, queue: str, timeout_s: int | None = None,
                description: str = "", retries: int = JOB_RETRIES) -> str:
        """Enqueue ``function(payload)`` as ``job_id`` unless a live or finished job with that id exists."""
        existing = self._fetch(job_id)
        if existing is not None:
            status = existing.get_status(refresh=False)
            if status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                return job_id
            existing.delete()
        self.queue(queue).enqueue(
            function,
            payload,
            job_id=job_id,
            job_timeout=timeout_s or self.options.timeout_s,
            result_ttl=self.options.result_ttl_s,
            failure_ttl=self.options.failure_ttl_s,
            retry=Retry(max=retries, enqueue_at_front=True) if retries else None,
            description=description or job_id,
        )
        return job_id

    def forget(self, job_id: str) -> None:
        """Delete a job and its result, so submitting its request again runs it again."""
        job = self._fetch(job_id)
        if job is not None:
            job.delete()

    def outcome(self, job_id: str) -> JobOutcome:
        """Any job's state and, when done, its return value or failure reason."""
        job = self._fetch(job_id)
        if job is None:
            return JobOutcome(JOB_MISSING, error="the job is unknown to the queue (expired or deleted)")
        status = job.get_status(refresh=False)
        if status == JobStatus.FINISHED:
            return JobOutcome(JOB_FINISHED, value=job.return_value(refresh=False))
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            if status == JobStatus.FAILED and job.retries_left:
                return JobOutcome(JOB_QUEUED)  # RQ will run it again
            return JobOutcome(JOB_FAILED, error=_failure_reason(job, status))
        return JobOutcome(JOB_RUNNING if status == JobStatus.STARTED else JOB_QUEUED)

    def result(self, job_id: str) -> PredictResult | None:
        """The job's result; None while it is queued or running.

        A job that failed for good (retries spent) or vanished yields a result
        whose ``error`` says so, so no task is silently dropped.
        """
        outcome = self.outcome(job_id)
        if outcome.status == JOB_MISSING:
            return _failure(job_id, "job_lost", f"{outcome.error}; submit the task again")
        if outcome.status == JOB_FINISHED:
            return PredictResult.from_json(outcome.value)
        if outcome.status == JOB_FAILED:
            return _failure(job_id, "worker_failed", f"the worker could not process this task: {outcome.error}")
        return None

    def wait(self, job_ids: Iterable[str], timeout_s: float) -> dict[str, PredictResult]:
        """Wait up to ``timeout_s`` for the jobs; return those that finished (either way)."""
        pending = list(dict.fromkeys(job_ids))
        done: dict[str, PredictResult] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            for job_id in list(pending):
                res = self.result(job_id)
                if res is not None:
                    done[job_id] = res
                    pending.remove(job_id)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        return done

    def _fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return None


def _failure_reason(job: Job, status) -> str:
    """The last line of the job's latest exception (``ModuleError: why``), else its status."""
    latest = job.latest_result()
    exc_string = getattr(latest, "exc_string", None) or ""
    lines = exc_string.strip().splitlines()
    return lines[-1] if lines else str(status)


def _failure(job_id: str, code: str, message: str) -> PredictResult:
    task_id = job_id.split("-")[2] if job_id.count("-") >= 3 else job_id
    return PredictResult(task_id=task_id, model_version="", error=JobFailure(code, message))
