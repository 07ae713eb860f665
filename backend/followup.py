"""The durable follow-up: predictions that missed ``/predict``'s budget reach Label Studio later.

When ``/predict`` answers before a task's job is done, it records a
``PendingPush`` in Redis and answers ``[]`` for that task (no prediction). A
``Pusher`` thread in the web process watches the pending jobs and, when one
finishes, writes its prediction with Label Studio's API. Everything it needs
lives in Redis, so a restarted web process picks up where the last one stopped.

Redis keys (hashes, field = job id, value = JSON):

- ``labelassist:push:pending``: ``PendingPush`` records waiting for their job.
- ``labelassist:push:inflight``: ``{"claimed_at": unix_s, "entry": <PendingPush JSON>}``
  while one pusher writes it. A claim older than ``STALE_CLAIM_S`` (its pusher
  died) goes back to pending.

Exactly one prediction per task and version: a finished job is claimed
atomically, either by a ``/predict`` reply (``claim_for_reply``) or by a pusher
(``claim_for_push``), never both; and a pusher checks Label Studio for a
prediction of the same version before it creates one, so a push repeated after
a crash does not duplicate it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from redis import Redis
from redis.exceptions import RedisError

from labelassist.backend.queue import TRANSIENT_CODES
from labelassist.workers.errors import LabelassistError

log = logging.getLogger(__name__)

PENDING_KEY = "labelassist:push:pending"
INFLIGHT_KEY = "labelassist:push:inflight"
STALE_CLAIM_S = 300.0  # an inflight claim older than this belongs to a pusher that died
MAX_BACKOFF_S = 300.0  # longest wait between two tries of a push Label Studio refused
GIVE_UP_AFTER_S = 24 * 3600.0  # a push still failing after this long is dropped, with an error logged
MAX_RESUBMITS = 3  # times a job that was lost or failed for a passing reason is submitted again
SCAN_COUNT = 200  # pending records read per Redis round trip

# Reply side: take the record if pending (the reply delivers it); refuse when a
# pusher holds it; otherwise nobody follows the job up and the reply may deliver.
_CLAIM_FOR_REPLY = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
return 1
"""
# Push side: move the record from pending to inflight, stamped with the claim time.
_CLAIM_FOR_PUSH = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({claimed_at = tonumber(ARGV[2]), entry = v}))
return v
"""
# Back to pending (a failed push to retry, or a stale claim), unless a newer record is there.
_RELEASE = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class PendingPush:
    """A job whose prediction Label Studio has not received yet.

    ``request`` is the job's ``PredictRequest`` JSON, kept so a job the queue
    lost can be submitted again; ``task_data`` the task's data, to resolve its
    image afresh when a job failed for a reason that may pass (download tokens
    expire); ``label_config`` formats the result.
    """

    job_id: str
    task_id: int
    project_id: int
    model_version: str
    label_config: str
    request: dict[str, Any]
    queue: str
    task_data: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    attempts: int = 0
    resubmits: int = 0
    next_try_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PendingPush:
        return cls(**json.loads(raw))


class PendingPushes:
    """The Redis side of the follow-up: records, and the claims that keep pushes single."""

    def __init__(self, connection: Redis):
        self.connection = connection
        self._claim_reply = connection.register_script(_CLAIM_FOR_REPLY)
        self._claim_push = connection.register_script(_CLAIM_FOR_PUSH)
        self._release = connection.register_script(_RELEASE)

    def add(self, push: PendingPush) -> None:
        # HSETNX: a second /predict for the same job keeps the first record (and its age).
        self.connection.hsetnx(PENDING_KEY, push.job_id, push.to_json())

    def claim_for_reply(self, job_id: str) -> bool:
        """True when a ``/predict`` reply may deliver this finished job's prediction."""
        return bool(self._claim_reply(keys=[PENDING_KEY, INFLIGHT_KEY], args=[job_id]))

    def claim_for_push(self, job_id: str) -> PendingPush | None:
        raw = self._claim_push(keys=[PENDING_KEY, INFLIGHT_KEY], args=[job_id, f"{time.time():.3f}"])
        return PendingPush.from_json(raw) if raw else None

    def done(self, job_id: str) -> None:
        self.connection.hdel(INFLIGHT_KEY, job_id)

    def release(self, push: PendingPush) -> None:
        self._release(keys=[PENDING_KEY, INFLIGHT_KEY], args=[push.job_id, push.to_json()])

    def update(self, push: PendingPush, previous_job_id: str | None = None) -> None:
        """Rewrite ``push``'s record; with ``previous_job_id``, the record moves to the push's new job."""
        pipe = self.connection.pipeline()
        if previous_job_id and previous_job_id != push.job_id:
            pipe.hdel(PENDING_KEY, previous_job_id)
        pipe.hset(PENDING_KEY, push.job_id, push.to_json())
        pipe.execute()

    def pending(self) -> list[PendingPush]:
        out = []
        for _, raw in self.connection.hscan_iter(PENDING_KEY, count=SCAN_COUNT):
            try:
                out.append(PendingPush.from_json(raw))
            except (ValueError, TypeError) as exc:
                log.error("dropping an unreadable pending push record: %s", exc)
        return out

    def counts(self) -> dict[str, int]:
        return {"pending": self.connection.hlen(PENDING_KEY), "inflight": self.connection.hlen(INFLIGHT_KEY)}

    def recover_stale(self, now: float | None = None) -> int:
        """Put claims older than ``STALE_CLAIM_S`` back to pending; return how many."""
        now = time.time() if now is None else now
        moved = 0
        for job_id, raw in self.connection.hscan_iter(INFLIGHT_KEY, count=SCAN_COUNT):
            claim = json.loads(raw)
            if now - float(claim["claimed_at"]) >= STALE_CLAIM_S:
                self._release(keys=[PENDING_KEY, INFLIGHT_KEY], args=[job_id, claim["entry"]])
                moved += 1
        return moved


class Pusher:
    """Writes finished jobs of pending pushes to Label Studio; run it as a thread of the web process.

    ``deliver(push, result)`` creates the prediction (see ``LabelStudioDelivery``);
    it raises ``LabelassistError`` (or ``OSError``) when Label Studio refuses or
    cannot be reached, and the push is tried again with backoff. A job that
    failed for a reason that may pass (``TRANSIENT_CODES``) is submitted again,
    up to ``MAX_RESUBMITS`` times, with the request ``deliver.refresh(push)``
    makes (the image resolved afresh) when ``deliver`` has one.
    """

    def __init__(self, pushes: PendingPushes, queue, deliver: Callable[[PendingPush, Any], None], interval_s: float):
        self.pushes = pushes
        self.queue = queue
        self.deliver = deliver
        self.refresh = getattr(deliver, "refresh", None)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="labelassist-pusher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        log.info("follow-up pusher started (every %.1f s)", self.interval_s)
        while not self._stop.is_set():
            try:
                self.run_once()
            except RedisError as exc:
                log.warning("follow-up pusher: Redis unavailable (%s); retrying", exc)
            except Exception:  # the thread must outlive any one bad record
                log.exception("follow-up pusher: unexpected error; continuing")
            self._stop.wait(self.interval_s)

    def run_once(self, now: float | None = None) -> int:
        """One pass over the pending pushes; return how many were delivered."""
        now = time.time() if now is None else now
        if self.pushes.recover_stale(now):
            log.warning("follow-up: took back pushes whose pusher stopped mid-way")
        delivered = 0
        for push in self.pushes.pending():
            if push.next_try_at > now:
                continue
            result = self.queue.result(push.job_id)
            if result is None:
                continue  # still queued or running
            if result.error is not None and result.error.code in TRANSIENT_CODES and push.resubmits < MAX_RESUBMITS:
                self._resubmit(push, result.error)
                continue
            claimed = self.pushes.claim_for_push(push.job_id)
            if claimed is None:
                continue  # a /predict reply or another pusher took it
            try:
                self.deliver(claimed, result)
            except (LabelassistError, OSError) as exc:
                self._retry_later(claimed, exc, now)
                continue
            self.pushes.done(claimed.job_id)
            delivered += 1
        return delivered

    def _resubmit(self, push: PendingPush, error) -> None:
        from labelassist.workers.contract import PredictRequest

        request = PredictRequest.from_json(push.request)
        if self.refresh is not None and error.code != "job_lost":
            try:
                request = self.refresh(push)
            except (LabelassistError, OSError) as exc:  # keep the old request: the next failure says why
                log.warning("follow-up: task %s: image not resolved again (%s); retrying as it was", push.task_id, exc)
        log.warning("follow-up: task %s of project %s: %s (%s); submitting it again (%d of %d)", push.task_id,
                    push.project_id, error.code, error.message, push.resubmits + 1, MAX_RESUBMITS)
        self.queue.forget(push.job_id)  # a failed result is kept under the job id; the same id must run again
        job_id = self.queue.submit(request, queue=push.queue)
        self.pushes.update(_replace(push, job_id=job_id, request=request.to_json(), resubmits=push.resubmits + 1), push.job_id)

    def _retry_later(self, push: PendingPush, exc: Exception, now: float) -> None:
        if now - push.created_at > GIVE_UP_AFTER_S:
            log.error("follow-up: giving up on task %s of project %s after %d tries: %s",
                      push.task_id, push.project_id, push.attempts + 1, exc)
            self.pushes.done(push.job_id)
            return
        delay = min(MAX_BACKOFF_S, 2.0 ** min(push.attempts, 16))
        log.warning("follow-up: task %s of project %s not written to Label Studio (%s); next try in %.0f s",
                    push.task_id, push.project_id, exc, delay)
        self.pushes.release(_replace(push, attempts=push.attempts + 1, next_try_at=now + delay))


def _replace(push: PendingPush, **changes: Any) -> PendingPush:
    return PendingPush(**{**asdict(push), **changes})
