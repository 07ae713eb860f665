"""Label Studio webhook events: stored first, diffed afterwards.

``EventSink.receive(body)`` is what ``POST /webhook`` calls. It parses just enough to
know the action, writes the body verbatim to the correction store (one short
transaction) and answers; the diff runs later on a background thread of the same
process. Label Studio gives a webhook 1 s and never resends one, so nothing slow
happens before the answer, and nothing is lost after it: an event is in the store
before it is acknowledged, and events still ``pending`` (the process stopped, the
queue was full) are picked up again by :meth:`EventSink.start` and by a periodic
sweep. The diff is light (no GPU, a few rasterised masks) and the store is the web
process's own, so a thread beats a queue round trip; processing is idempotent, so
two processes sweeping the same store store each annotation version once.

Actions:
    ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED   diff -> corrections
    ANNOTATIONS_DELETED                                            tombstones
    TASKS_CREATED, START_TRAINING, PROJECT_UPDATED                 kept; hooks may act on them
    anything else                                                  kept, acknowledged, ignored
A body that is not a JSON object with an ``action``, or whose annotation part is
missing, is kept as ``malformed`` with its error and answered with 400.

Wiring, in the HTTP app::

    store = open_settings_store(settings)
    fetch = lambda pid: ls_client.request("GET", f"/api/predictions/{pid}/")
    sink = EventSink(store, CorrectionProcessor(store, fetch, hooks={START_TRAINING: ...})).start()

    status, reply = sink.receive(request.get_data())  # the raw bytes, before any JSON parsing
    return jsonify(reply), status
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import threading
import time
from typing import Any, Callable, Mapping

from labelassist.backend.store import (
    EVENT_DONE,
    EVENT_FAILED,
    EVENT_IGNORED,
    EVENT_MALFORMED,
    EVENT_PENDING,
    CorrectionStore,
    StoredEvent,
)
from labelassist.plugin.corrections import DEFAULT_MATCH_IOU, CorrectionError, diff_annotation

log = logging.getLogger(__name__)

ANNOTATION_CREATED = "ANNOTATION_CREATED"
ANNOTATION_UPDATED = "ANNOTATION_UPDATED"
ANNOTATIONS_CREATED = "ANNOTATIONS_CREATED"
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
TASKS_CREATED = "TASKS_CREATED"
START_TRAINING = "START_TRAINING"
PROJECT_UPDATED = "PROJECT_UPDATED"
ANNOTATION_ACTIONS = (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED)
HANDLED_ACTIONS = (*ANNOTATION_ACTIONS, ANNOTATIONS_DELETED, TASKS_CREATED, START_TRAINING, PROJECT_UPDATED)

RETRY_DELAYS_S = (2.0, 10.0, 60.0)  # a transient failure (Label Studio unreachable) is retried after these
DEFAULT_SWEEP_INTERVAL_S = 60.0  # how often an idle sink looks for pending events it does not hold
PREDICTION_CACHE_SIZE = 64  # fetched predictions kept: an annotation is often updated several times
STOP_TIMEOUT_S = 10.0

Reply = tuple[int, dict[str, Any]]
Processor = Callable[[StoredEvent], "Outcome"]
Hook = Callable[[Mapping[str, Any]], None]


class TransientError(Exception):
    """Processing failed for a reason that may pass (Label Studio down): retry later."""


class Outcome(tuple):
    """(status, error): the event status a processor reached and why, for ``mark_event``."""

    def __new__(cls, status: str, error: str | None = None) -> Outcome:
        return super().__new__(cls, (status, error))

    @property
    def status(self) -> str:
        return self[0]

    @property
    def error(self) -> str | None:
        return self[1]


class MalformedEvent(ValueError):
    """A webhook body that cannot be what Label Studio sends."""


def parse_event(raw: bytes) -> dict[str, Any]:
    """The JSON object of a webhook body, checked just enough to route it; raises MalformedEvent."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedEvent(f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MalformedEvent(f"body: expected a JSON object, got {type(payload).__name__}")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise MalformedEvent(f"action: expected a non-empty string naming the event, got {action!r}")
    if action in ANNOTATION_ACTIONS:
        anns = payload.get("annotation", payload.get("annotations"))
        anns = anns if isinstance(anns, list) else [anns]
        if not anns or not all(isinstance(a, dict) and _id_ok(a.get("id")) for a in anns):
            raise MalformedEvent(f"{action}: expected 'annotation' as an object (a list for {ANNOTATIONS_CREATED}) with an integer id")
    elif action == ANNOTATIONS_DELETED:
        anns = payload.get("annotations")
        if not isinstance(anns, list) or not all(isinstance(a, dict) and _id_ok(a.get("id")) for a in anns):
            raise MalformedEvent(f"{action}: expected 'annotations' as a list of objects with integer ids")
    return payload


def _id_ok(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())


def _project_id(payload: Mapping[str, Any], annotation: Mapping[str, Any], task: Mapping[str, Any] | None) -> int | None:
    for value in (payload.get("project"), annotation.get("project"), (task or {}).get("project")):
        if isinstance(value, Mapping):
            value = value.get("id")
        if _id_ok(value):
            return int(value)
    return None


def _is_transient(exc: BaseException) -> bool:
    """Network trouble and 5xx/429 answers may pass; a 4xx (the prediction is gone) will not."""
    status = getattr(exc, "status", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    # no HTTP answer at all (an API error without a status means Label Studio was not reached)
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or hasattr(exc, "status")


class CorrectionProcessor:
    """The default processor: turns one stored event into store writes.

    ``fetch_prediction(prediction_id) -> dict``: the prediction object as
    ``GET /api/predictions/<id>/`` returns it (``result``, ``model_version``...).
    ``hooks``: action -> callable(payload), run after the event's own handling
    (e.g. ``TASKS_CREATED`` to pre-annotate new tasks, ``START_TRAINING`` to enqueue
    a training job); a hook that raises fails the event, which stays in the store.
    """

    def __init__(self, store: CorrectionStore, fetch_prediction: Callable[[int], Mapping[str, Any]] | None,
                 hooks: Mapping[str, Hook] | None = None, match_iou: float = DEFAULT_MATCH_IOU):
        self.store = store
        self.fetch_prediction = fetch_prediction
        self.hooks = dict(hooks or {})
        self.match_iou = match_iou
        self._predictions: collections.OrderedDict[int, Mapping[str, Any]] = collections.OrderedDict()

    def __call__(self, event: StoredEvent) -> Outcome:
        try:
            payload = parse_event(event.body)
        except MalformedEvent as exc:
            return Outcome(EVENT_MALFORMED, str(exc))
        action = payload["action"]
        if action in ANNOTATION_ACTIONS:
            outcome = self._annotations(payload, event.id)
        elif action == ANNOTATIONS_DELETED:
            n = self.store.delete_annotations((int(a["id"]) for a in payload["annotations"]), event_id=event.id)
            outcome = Outcome(EVENT_DONE, None if n else "already recorded")
        elif action in HANDLED_ACTIONS:
            outcome = Outcome(EVENT_DONE)
        else:
            outcome = Outcome(EVENT_IGNORED)
        hook = self.hooks.get(action)
        if hook is not None and outcome.status == EVENT_DONE:
            hook(payload)
        return outcome

    def _annotations(self, payload: Mapping[str, Any], event_id: int) -> Outcome:
        anns = payload.get("annotation", payload.get("annotations"))
        anns = anns if isinstance(anns, list) else [anns]
        tasks = payload.get("task")
        tasks = tasks if isinstance(tasks, list) else [tasks]
        task_by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)}
        stored = skipped = 0
        for ann in anns:
            if ann.get("was_cancelled"):
                skipped += 1  # a skipped task: no regions to learn from
                continue
            task_ref = ann.get("task")
            task = task_by_id.get(task_ref.get("id") if isinstance(task_ref, dict) else task_ref)
            if task is None and len(task_by_id) == 1 and len(anns) == 1:
                task = next(iter(task_by_id.values()))
            prediction = self._prediction(ann.get("parent_prediction"))
            extras = self.store.region_extras(str(i.get("id")) for i in (prediction or {}).get("result") or [] if isinstance(i, dict))
            try:
                corr = diff_annotation(ann, prediction, task=task, project=_project_id(payload, ann, task), extras=extras,
                                       match_iou=self.match_iou)
            except CorrectionError as exc:
                return Outcome(EVENT_FAILED, f"annotation {ann.get('id')}: {exc}")
            stored += self.store.add_correction(corr, event_id=event_id)
        if stored == 0 and skipped == len(anns):
            return Outcome(EVENT_IGNORED, "skipped (cancelled) annotation")
        return Outcome(EVENT_DONE, None if stored else "already recorded")

    def _prediction(self, prediction_id: Any) -> Mapping[str, Any] | None:
        if isinstance(prediction_id, Mapping):
            prediction_id = prediction_id.get("id")
        if not _id_ok(prediction_id):
            return None
        pid = int(prediction_id)
        if pid in self._predictions:
            self._predictions.move_to_end(pid)
            return self._predictions[pid]
        if self.fetch_prediction is None:
            raise TransientError(f"prediction {pid}: no way to fetch it from Label Studio is configured")
        try:
            prediction = self.fetch_prediction(pid)
        except Exception as exc:  # whatever the client raises: decide whether it may pass
            if _is_transient(exc):
                raise TransientError(f"prediction {pid}: {exc}") from exc
            raise CorrectionError(f"prediction {pid} could not be fetched: {exc}") from exc
        if not isinstance(prediction, Mapping):
            raise CorrectionError(f"prediction {pid}: expected a JSON object from Label Studio, got {type(prediction).__name__}")
        self._predictions[pid] = prediction
        while len(self._predictions) > PREDICTION_CACHE_SIZE:
            self._predictions.popitem(last=False)
        return prediction


class EventSink:
    """Receives webhook bodies, stores them, and has ``processor`` handle them on a thread.

    ``processor(event) -> Outcome``: usually a :class:`CorrectionProcessor`. A
    processor that raises :class:`TransientError` is retried after
    ``RETRY_DELAYS_S``; any other exception fails the event (kept, with the error).
    """

    def __init__(self, store: CorrectionStore, processor: Processor, *, sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S,
                 retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S):
        self.store = store
        self.processor = processor
        self.sweep_interval_s = sweep_interval_s
        self.retry_delays_s = tuple(retry_delays_s)
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, int, int]] = []  # (due, seq, event id, attempt)
        self._seq = itertools.count()
        self._held: set[int] = set()  # queued or being processed here
        self._busy = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the web side -----------------------------------------------------------
    def receive(self, body: bytes, received_at: float | None = None) -> Reply:
        """Store ``body`` and answer Label Studio: ``(http_status, json_object)``. Never raises."""
        received_at = time.time() if received_at is None else received_at
        try:
            payload = parse_event(body)
        except MalformedEvent as exc:
            try:
                event_id = self.store.append_event(body, received_at, status=EVENT_MALFORMED, error=str(exc))
            except Exception as store_exc:  # StoreError or a database driver's own error tree
                return self._unavailable(store_exc)
            log.warning("webhook event %d is malformed and was kept for inspection: %s", event_id, exc)
            return 400, {"error": str(exc), "code": "bad_webhook", "event_id": event_id}
        action = payload["action"]
        handled = action in HANDLED_ACTIONS
        try:
            event_id = self.store.append_event(body, received_at, action=action, status=EVENT_PENDING if handled else EVENT_IGNORED)
        except Exception as exc:  # StoreError or a database driver's own error tree
            return self._unavailable(exc)
        if not handled:
            return 200, {"status": "ignored", "action": action, "event_id": event_id}
        self._submit(event_id)
        return 200, {"status": "accepted", "action": action, "event_id": event_id}

    def _unavailable(self, exc: BaseException) -> Reply:
        log.error("webhook event could not be stored: %s", exc)
        return 503, {"error": "the correction store is unavailable; the event was not recorded", "code": "store_unavailable"}

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> EventSink:
        """Start the processing thread and queue the events left pending in the store."""
        with self._cv:
            if self._thread is not None:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="labelassist-events", daemon=True)
            self._thread.start()
        self._sweep()
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Finish the event in hand and stop; queued events stay pending in the store."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until nothing is queued for now or being processed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._busy or any(due <= time.monotonic() for due, *_ in self._heap):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def retry_failed(self) -> int:
        """Queue the events that failed (e.g. Label Studio was unreachable for long) once more."""
        failed = self.store.events(status=EVENT_FAILED)
        for event in failed:
            self.store.mark_event(event.id, EVENT_PENDING, event.error)
            self._submit(event.id)
        return len(failed)

    def _submit(self, event_id: int, attempt: int = 0, delay_s: float = 0.0) -> None:
        if self._thread is None:
            self.start()
        with self._cv:
            if event_id in self._held and attempt == 0:
                return
            self._held.add(event_id)
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), event_id, attempt))
            self._cv.notify_all()

    def _sweep(self) -> None:
        try:
            pending = self.store.pending_events()
        except Exception as exc:  # the store may be briefly unavailable; the next sweep tries again
            log.warning("could not look for pending webhook events: %s", exc)
            return
        for event in pending:
            self._submit(event.id)

    # --- the processing thread ----------------------------------------------------
    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval_s
        while True:
            with self._cv:
                while not self._stopping:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    wake = min(self._heap[0][0] if self._heap else next_sweep, next_sweep)
                    if now >= next_sweep:
                        break
                    self._cv.wait(max(0.0, wake - now))
                if self._stopping:
                    return
                item = heapq.heappop(self._heap) if self._heap and self._heap[0][0] <= time.monotonic() else None
                if item is not None:
                    self._busy += 1
            if item is None:
                next_sweep = time.monotonic() + self.sweep_interval_s
                self._sweep()
                continue
            _, _, event_id, attempt = item
            try:
                self._process(event_id, attempt)
            finally:
                with self._cv:
                    self._busy -= 1
                    if not any(e == event_id for _, _, e, _ in self._heap):
                        self._held.discard(event_id)
                    self._cv.notify_all()

    def _process(self, event_id: int, attempt: int) -> None:
        try:
            event = self.store.event(event_id)
        except Exception as exc:  # store briefly unavailable: the event stays pending for the next sweep
            log.warning("webhook event %d could not be read: %s", event_id, exc)
            return
        if event is None or event.status != EVENT_PENDING:
            return  # processed elsewhere meanwhile
        try:
            outcome = self.processor(event)
        except TransientError as exc:
            if attempt < len(self.retry_delays_s):
                log.info("webhook event %d: %s; retrying in %.0f s", event_id, exc, self.retry_delays_s[attempt])
                self._submit(event_id, attempt + 1, self.retry_delays_s[attempt])
                return
            outcome = Outcome(EVENT_FAILED, f"gave up after {attempt + 1} attempts: {exc}")
        except Exception as exc:  # a processor bug must not kill the thread; the event keeps its error
            log.exception("webhook event %d could not be processed", event_id)
            outcome = Outcome(EVENT_FAILED, f"{type(exc).__name__}: {exc}")
        if not isinstance(outcome, tuple) or len(outcome) != 2:
            outcome = Outcome(EVENT_FAILED, f"processor returned {outcome!r}, expected (status, error)")
        try:
            self.store.mark_event(event_id, outcome[0], outcome[1])
        except Exception as exc:  # stays pending; idempotent processing makes a second pass harmless
            log.warning("webhook event %d: status not recorded: %s", event_id, exc)
        if outcome[0] == EVENT_FAILED:
            log.warning("webhook event %d failed: %s", event_id, outcome[1])
