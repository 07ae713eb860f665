"""Bulk bootstrapping: pre-annotate a whole Label Studio project in the background.

``run_bootstrap`` selects every task of a project that has no prediction of the
workers' model version, turns each into the ``PredictRequest`` the web tier
builds for ``/predict`` (``LabelassistModel.task_requests``), submits it on the
``bulk`` queue under its deterministic job id, and writes finished results to
Label Studio in batches. Annotations are never touched.

Window: at most ``window`` jobs of a run are outstanding (queued, running, or
finished and not yet collected); a task's image reference is resolved only when
the task enters the window. Download headers made from a personal access token
expire after 5 minutes, so a request resolved long before a worker gets to it
would fail; a window of a few minutes of work keeps every header fresh.

Resume: a run stopped half-way (killed, cancelled, Label Studio gone) is simply
run again. Tasks whose prediction reached Label Studio are skipped; the others
get the same job ids, so jobs still queued or finished are reused, not
duplicated; and before each write the tasks are checked for a prediction of
this version, so none is written twice.

Failures never fail the run: a task whose image cannot be resolved, whose job
failed or which the worker could not read is recorded with its reason.
``worker_failed``, ``job_lost`` and ``image_unavailable`` are tried again up to
``max_retries`` times, the image reference resolved afresh (a personal access
token's download header expires after 5 minutes, and bulk jobs may wait longer
in the queue); everything else (``bad_image``, a bad reference) is final.
A failed task gets no prediction, so the next run tries it again.

Redis keys this module owns:

- ``labelassist:runs``: sorted set of run ids by start time.
- ``labelassist:run:<id>``: hash with ``project``, ``model_version``, ``status``
  (``running``, ``finished``, ``cancelled``, ``failed``), ``started_at``,
  ``finished_at``, ``updated_at`` (unix s), the counts ``selected``, ``skipped``,
  ``done``, ``failed``, ``retried``, ``replaced``, ``error`` (why the run itself
  stopped) and ``failures`` (JSON: task id -> ``{"code", "message"}``).
- ``labelassist:run:<id>:jobs``: set of the run's job ids, for ``cancel_run``.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from redis import Redis

from labelassist.backend.queue import TRANSIENT_CODES
from labelassist.backend.service import LabelassistModel, ProjectLink, Runtime
from labelassist.plugin.errors import ImageReferenceError, LabelStudioAPIError
from labelassist.workers.contract import MODEL_VERSION_KEY, QUEUE_BULK, PredictRequest, PredictResult
from labelassist.workers.errors import LabelassistError

log = logging.getLogger(__name__)

RUNS_KEY = "labelassist:runs"
RUN_KEY = "labelassist:run:{run_id}"
RUN_JOBS_KEY = "labelassist:run:{run_id}:jobs"
RUN_TTL_S = 30 * 24 * 3600  # a run's record is kept this long after it was last updated
RUNS_KEPT = 1000  # newest runs listed in labelassist:runs
STALE_RUN_S = 120.0  # a "running" run not updated for this long lost its process
DEFAULT_MAX_RETRIES = 2
DEFAULT_BATCH_SIZE = 50  # predictions written to Label Studio per import call
DEFAULT_WINDOW = 64  # jobs of one run outstanding at once; enough to keep several GPU workers busy
FLUSH_INTERVAL_S = 5.0  # finished predictions wait at most this long before they are written
POLL_INTERVAL_S = 0.5  # between two sweeps over the pending jobs
FAILURE_MESSAGE_CHARS = 500

# Set the status unless the run was cancelled meanwhile.
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2], 'updated_at', ARGV[2], 'error', ARGV[3])
return 1
"""


class BootstrapError(LabelassistError):
    """The run itself cannot proceed (no workers' version, Label Studio unreachable, bad settings)."""

    code = "bootstrap_failed"


@dataclass
class Summary:
    run_id: str
    project_id: int
    model_version: str
    status: str
    selected: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    replaced: int = 0
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "project": self.project_id, "model_version": self.model_version, "status": self.status,
                "selected": self.selected, "skipped": self.skipped, "done": self.done, "failed": self.failed,
                "retried": self.retried, "replaced": self.replaced, "failures": self.failures,
                "elapsed_s": round(self.elapsed_s, 3), "images_per_s": round(self.images_per_s, 3)}


def format_summary(s: Summary) -> str:
    lines = [f"run {s.run_id} ({s.status}): project {s.project_id}, model version {s.model_version}",
             f"  done {s.done}, failed {s.failed}, skipped {s.skipped} (already predicted), retried {s.retried}"
             + (f", replaced {s.replaced} old predictions" if s.replaced else ""),
             f"  {s.elapsed_s:.1f} s, {s.images_per_s:.2f} images/s"]
    reasons: dict[str, int] = {}
    for failure in s.failures.values():
        reasons[failure["code"]] = reasons.get(failure["code"], 0) + 1
    for code, n in sorted(reasons.items()):
        lines.append(f"  failed {n}: {code}")
    for task_id, failure in sorted(s.failures.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        lines.append(f"    task {task_id}: {failure['code']}: {failure['message']}")
    return "\n".join(lines)


# -- selection ----------------------------------------------------------------


def parse_task_filter(value: str | None) -> set[int] | None:
    """``--filter``: task ids and inclusive ranges, comma-separated (``"1,4,10-20"``); None: every task."""
    if value is None or not value.strip():
        return None
    ids: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                ids.update(range(a, b + 1))
            else:
                ids.add(int(part))
        except ValueError:
            raise BootstrapError(f"--filter: expected task ids and ranges like '1,4,10-20', got {part!r}") from None
    return ids


def has_version(task: dict[str, Any], version: str) -> bool:
    return any(isinstance(p, dict) and p.get("model_version") == version for p in task.get("predictions") or [])


def select_tasks(tasks: Iterable[dict[str, Any]], version: str, task_ids: set[int] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Tasks (with their ``predictions``) that lack a prediction of ``version``; and how many were skipped for having one."""
    selected, skipped = [], 0
    for task in tasks:
        if task_ids is not None and int(task["id"]) not in task_ids:
            continue
        if has_version(task, version):
            skipped += 1
        else:
            selected.append(task)
    return selected, skipped


# -- runs in Redis --------------------------------------------------------------


class RunStore:
    """Run records: what ``labelassist status`` lists and ``labelassist cancel`` changes."""

    def __init__(self, connection: Redis):
        self.connection = connection
        self._finish = connection.register_script(_FINISH)

    def create(self, project_id: int, version: str) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        now = f"{time.time():.3f}"
        key = RUN_KEY.format(run_id=run_id)
        pipe = self.connection.pipeline()
        pipe.hset(key, mapping={"run_id": run_id, "project": project_id, "model_version": version, "status": "running",
                                "started_at": now, "updated_at": now, "finished_at": "", "error": "", "failures": "{}",
                                "selected": 0, "skipped": 0, "done": 0, "failed": 0, "retried": 0, "replaced": 0})
        pipe.expire(key, RUN_TTL_S)
        pipe.zadd(RUNS_KEY, {run_id: float(now)})
        pipe.zremrangebyrank(RUNS_KEY, 0, -RUNS_KEPT - 1)
        pipe.execute()
        return run_id

    def update(self, run_id: str, summary: Summary) -> None:
        key = RUN_KEY.format(run_id=run_id)
        pipe = self.connection.pipeline()
        pipe.hset(key, mapping={"selected": summary.selected, "skipped": summary.skipped, "done": summary.done,
                                "failed": summary.failed, "retried": summary.retried, "replaced": summary.replaced,
                                "failures": json.dumps(summary.failures), "updated_at": f"{time.time():.3f}"})
        pipe.expire(key, RUN_TTL_S)
        pipe.execute()

    def add_jobs(self, run_id: str, job_ids: Iterable[str]) -> None:
        job_ids = list(job_ids)
        if job_ids:
            key = RUN_JOBS_KEY.format(run_id=run_id)
            self.connection.sadd(key, *job_ids)
            self.connection.expire(key, RUN_TTL_S)

    def finish(self, run_id: str, status: str, error: str = "") -> bool:
        """Set the final status; False when the run had been cancelled (the status stays ``cancelled``)."""
        return bool(self._finish(keys=[RUN_KEY.format(run_id=run_id)], args=[status, f"{time.time():.3f}", error]))

    def status(self, run_id: str) -> str | None:
        raw = self.connection.hget(RUN_KEY.format(run_id=run_id), "status")
        return raw.decode() if isinstance(raw, bytes) else raw

    def get(self, run_id: str) -> dict[str, Any] | None:
        raw = self.connection.hgetall(RUN_KEY.format(run_id=run_id))
        if not raw:
            return None
        run = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        for name in ("project", "selected", "skipped", "done", "failed", "retried", "replaced"):
            run[name] = int(run.get(name) or 0)
        for name in ("started_at", "updated_at", "finished_at"):
            run[name] = float(run[name]) if run.get(name) else None
        run["failures"] = json.loads(run.get("failures") or "{}")
        if run["status"] == "running" and run["updated_at"] and time.time() - run["updated_at"] > STALE_RUN_S:
            run["status"] = "stopped"  # its process ended without saying so (killed); run it again to resume
        return run

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        runs = []
        for raw in self.connection.zrevrange(RUNS_KEY, 0, limit - 1):
            run = self.get(raw.decode() if isinstance(raw, bytes) else raw)
            if run is not None:
                runs.append(run)
        return runs

    def cancel(self, run_id: str) -> int | None:
        """Mark the run cancelled and cancel its jobs still waiting in the queue; None for an unknown run."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus
        from rq.serializers import JSONSerializer

        key = RUN_KEY.format(run_id=run_id)
        if not self.connection.exists(key):
            return None
        now = f"{time.time():.3f}"
        self.connection.hset(key, mapping={"status": "cancelled", "finished_at": now, "updated_at": now})
        cancelled = 0
        for raw in self.connection.smembers(RUN_JOBS_KEY.format(run_id=run_id)):
            job_id = raw.decode() if isinstance(raw, bytes) else raw
            try:
                job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            # Only jobs still waiting in the bulk queue: a running job finishes, and a job
            # with this id on another queue belongs to /predict.
            if job.origin == QUEUE_BULK and job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
                job.cancel()
                cancelled += 1
        return cancelled


def format_runs(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "bootstrap runs: none"
    lines = ["bootstrap runs (newest first):",
             f"  {'run':<22} {'project':>7} {'status':<10} {'progress':>15} {'failed':>6} {'skipped':>7}  started (UTC)"]
    for r in runs:
        finished = r["done"] + r["failed"]
        pct = f"{100 * finished / r['selected']:.0f}%" if r["selected"] else "-"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["started_at"])) if r["started_at"] else "?"
        progress = f"{finished}/{r['selected']} {pct}"
        lines.append(f"  {r['run_id']:<22} {r['project']:>7} {r['status']:<10} {progress:>15} {r['failed']:>6} {r['skipped']:>7}  {started}")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------


def workers_version(connection: Redis) -> str:
    """The version the workers serve (``labelassist:model_version``); BootstrapError when none has started."""
    raw = connection.get(MODEL_VERSION_KEY)
    version = raw.decode() if isinstance(raw, bytes) else raw
    if not version:
        raise BootstrapError(f"no worker has published its model version ({MODEL_VERSION_KEY} is unset in this Redis); "
                             "start `labelassist worker` on it first")
    return version


def project_link(runtime: Runtime, client, project_id: int) -> ProjectLink:
    """What ``/setup`` stored for the project; else the ``extra_params`` of the project's ML backend in Label Studio."""
    link = runtime.projects.get(project_id)
    if link is not None:
        return link
    extra: dict[str, Any] = {}
    for backend in client.list_ml_backends(project_id):
        params = backend.get("extra_params")
        if isinstance(params, str) and params.strip():
            try:
                params = json.loads(params)
            except ValueError:
                params = None
        if isinstance(params, dict) and params:
            extra = params
            break
    return ProjectLink(project_id, extra_params=extra)


@dataclass
class _Entry:
    task: dict[str, Any]
    request: PredictRequest
    attempts: int = 0

    @property
    def task_id(self) -> int:
        return int(self.task["id"])


class Bootstrap:
    """One bootstrap run of one project; ``run()`` returns its ``Summary``.

    ``client`` is a ``LabelStudioClient``; ``runtime`` carries the settings, the
    queue and the project store (its settings' ``ls_url``/``ls_token`` are the
    ones images are fetched with).
    """

    def __init__(self, runtime: Runtime, client, project_id: int, *, task_ids: set[int] | None = None, replace: bool = False,
                 max_retries: int = DEFAULT_MAX_RETRIES, batch_size: int = DEFAULT_BATCH_SIZE, limit: int | None = None,
                 window: int = DEFAULT_WINDOW, progress: bool = True, poll_s: float = POLL_INTERVAL_S):
        if max_retries < 0:
            raise BootstrapError(f"--max-retries: expected 0 or more, got {max_retries}")
        if batch_size < 1:
            raise BootstrapError(f"--batch-size: expected 1 or more, got {batch_size}")
        if limit is not None and limit < 0:
            raise BootstrapError(f"--limit: expected 0 or more, got {limit}")
        if window < 1:
            raise BootstrapError(f"--window: expected 1 or more jobs, got {window}")
        self.runtime = runtime
        self.client = client
        self.project_id = int(project_id)
        self.task_ids = task_ids
        self.replace = replace
        self.max_retries = max_retries
        self.batch_size = batch_size
        self.limit = limit
        self.window = window
        self.progress = progress
        self.poll_s = poll_s
        self.queue = runtime.queue
        self.runs = RunStore(runtime.queue.connection)
        self.run_id: str | None = None

    def run(self) -> Summary:
        from tqdm import tqdm

        workers_version(self.queue.connection)  # fails plainly when no worker has started
        # The project's version: the workers' models plus its concept head, when one is trained.
        version = self.runtime.versions.for_project(self.project_id)
        try:
            project = self.client.get_project(self.project_id)
            model = LabelassistModel(self.project_id, project.get("label_config") or "", self.runtime)
            link = project_link(self.runtime, self.client, self.project_id)
            tasks = list(self.client.list_tasks(self.project_id))
        except LabelStudioAPIError as exc:
            raise BootstrapError(f"project {self.project_id}: {exc}") from None
        except (LabelassistError, ValueError) as exc:
            raise BootstrapError(f"project {self.project_id}: its label config cannot be pre-annotated: {exc}") from None
        selected, skipped = select_tasks(tasks, version, self.task_ids)
        if self.limit is not None:
            selected = selected[:self.limit]
        self.run_id = run_id = self.runs.create(self.project_id, version)
        summary = Summary(run_id, self.project_id, version, "running", selected=len(selected), skipped=skipped)
        log.info("run %s: project %s, model version %s: %d tasks to pre-annotate, %d already have a prediction",
                 run_id, self.project_id, version, len(selected), skipped)
        started = time.monotonic()
        bar = tqdm(total=len(selected), desc=f"project {self.project_id}", unit="img", file=sys.stderr, disable=not self.progress,
                   dynamic_ncols=True)
        try:
            self.runs.update(run_id, summary)
            if self.replace:
                summary.replaced = self._delete_other_versions(selected, version)
            self._follow(selected, model, link, version, summary, bar)
        except (LabelStudioAPIError, BootstrapError) as exc:
            summary.elapsed_s = time.monotonic() - started
            self.runs.update(run_id, summary)
            self.runs.finish(run_id, "failed", str(exc))
            raise BootstrapError(f"run {run_id} stopped: {exc}; run the same command again to resume") from None
        except BaseException as exc:  # interrupted (Ctrl-C) or a bug: the record must not say "running"
            summary.elapsed_s = time.monotonic() - started
            self.runs.update(run_id, summary)
            self.runs.finish(run_id, "stopped", f"{type(exc).__name__}: {exc}"[:FAILURE_MESSAGE_CHARS])
            raise
        finally:
            bar.close()
        summary.elapsed_s = time.monotonic() - started
        self.runs.update(run_id, summary)
        summary.status = "finished" if self.runs.finish(run_id, "finished") else "cancelled"
        return summary

    # -- steps ------------------------------------------------------------------

    def _delete_other_versions(self, tasks: list[dict[str, Any]], version: str) -> int:
        """Delete the predictions of other model versions on ``tasks`` (never annotations)."""
        deleted = 0
        for task in tasks:
            for p in task.get("predictions") or []:
                if isinstance(p, dict) and p.get("model_version") != version and p.get("id") is not None:
                    self.client.request("DELETE", f"/api/predictions/{int(p['id'])}/", ok_statuses=(404,))
                    deleted += 1
        if deleted:
            log.info("run %s: deleted %d predictions of other model versions", self.run_id, deleted)
        return deleted

    def _submit(self, waiting: collections.deque, pending: dict[str, _Entry], model: LabelassistModel, link: ProjectLink,
                version: str, summary: Summary, bar) -> None:
        """Move tasks from ``waiting`` into the window until ``window`` jobs are pending or none wait.

        Each task is resolved here, as it enters the window, so its download
        headers are as fresh as they can be when a worker gets to it.
        """
        while waiting and len(pending) < self.window:
            chunk = [waiting.popleft() for _ in range(min(len(waiting), self.window - len(pending)))]
            try:
                requests = model.task_requests(chunk, version, link)
            except LabelassistError as exc:  # job settings that break the contract: no task can run
                raise BootstrapError(str(exc)) from None
            job_ids = []
            for task, request in zip(chunk, requests):
                if isinstance(request, PredictRequest):
                    job_id = self.queue.submit(request, queue=QUEUE_BULK)
                    pending[job_id] = _Entry(task, request)
                    job_ids.append(job_id)
                else:
                    code = "bad_image" if isinstance(request, ImageReferenceError) else "image_unavailable"
                    self._fail(summary, int(task["id"]), code, str(request), bar)
            self.runs.add_jobs(self.run_id, job_ids)

    def _follow(self, tasks: list[dict[str, Any]], model: LabelassistModel, link: ProjectLink, version: str, summary: Summary,
                bar) -> None:
        """Submit ``tasks`` through the window, collect results, retry, and write predictions in batches."""
        from labelassist.plugin.regions import prediction_from_result

        waiting = collections.deque(tasks)
        pending: dict[str, _Entry] = {}
        ready: list[tuple[int, dict[str, Any]]] = []
        last_flush = time.monotonic()
        while True:
            cancelled = self.runs.status(self.run_id) == "cancelled"
            if cancelled:
                log.warning("run %s was cancelled; writing what is finished and stopping", self.run_id)
            else:
                self._submit(waiting, pending, model, link, version, summary, bar)
            collected = 0
            for job_id in list(pending):
                result: PredictResult | None = self.queue.result(job_id)
                if result is None:
                    continue
                if not result.ok and (cancelled or self.runs.status(self.run_id) == "cancelled"):
                    cancelled = True  # its job was cancelled with the run: not a failure of the task
                    continue
                entry = pending.pop(job_id)
                collected += 1
                if result.ok:
                    try:
                        ready.append((entry.task_id, prediction_from_result(result, model.config, version, model.value_key)))
                    except LabelassistError as exc:
                        self._fail(summary, entry.task_id, "bad_result", str(exc), bar)
                    if len(ready) >= self.batch_size:
                        self._write(ready, version, summary, bar)
                        ready, last_flush = [], time.monotonic()
                    continue
                code, message = result.error.code, result.error.message
                if code in TRANSIENT_CODES and entry.attempts < self.max_retries:
                    entry.attempts += 1
                    summary.retried += 1
                    log.info("task %s: %s (%s); trying again (%d of %d)", entry.task_id, code, message, entry.attempts, self.max_retries)
                    # Resolved again: download headers may carry an access token that expired in the queue.
                    fresh = model.task_requests([entry.task], version, link)[0]
                    if isinstance(fresh, PredictRequest):
                        entry.request = fresh
                    self.queue.forget(job_id)
                    retry_id = self.queue.submit(entry.request, queue=QUEUE_BULK)
                    pending[retry_id] = entry  # keeps the slot it had: the window stays bounded
                    self.runs.add_jobs(self.run_id, [retry_id])
                    continue
                self._fail(summary, entry.task_id, code, message, bar)
            finished = not pending and not waiting
            now = time.monotonic()
            if ready and (finished or cancelled or now - last_flush >= FLUSH_INTERVAL_S):
                self._write(ready, version, summary, bar)
                ready, last_flush = [], now
            self.runs.update(self.run_id, summary)
            if finished or cancelled:
                return
            if not collected:  # slots freed this sweep are filled at once; otherwise wait for the workers
                time.sleep(self.poll_s)

    def _write(self, ready: list[tuple[int, dict[str, Any]]], version: str, summary: Summary, bar) -> None:
        """Write finished predictions to Label Studio, in one import call, skipping tasks that already hold this version."""
        items = []
        for task_id, prediction in ready:
            if self._has_version(task_id, version):
                summary.done += 1  # written by an earlier run or by the web tier meanwhile
                bar.update(1)
                continue
            items.append({"task": task_id, "result": prediction["result"], "score": prediction["score"], "model_version": version})
        if not items:
            return
        try:
            self.client.request("POST", f"/api/projects/{self.project_id}/import/predictions", json=items)
        except LabelStudioAPIError as exc:
            if exc.status is None or exc.status >= 500 or exc.status in (401, 403):
                raise  # Label Studio is gone or refuses us: the run cannot go on
            log.warning("run %s: Label Studio refused a batch of %d predictions (%s); writing them one by one",
                        self.run_id, len(items), exc)
            for item in items:
                try:
                    self.client.create_prediction(item["task"], item["result"], item["score"], version)
                except LabelStudioAPIError as one:
                    if one.status is None or one.status >= 500 or one.status in (401, 403):
                        raise
                    self._fail(summary, item["task"], "write_failed", str(one), bar)
                    continue
                summary.done += 1
                bar.update(1)
            return
        summary.done += len(items)
        bar.update(len(items))

    def _has_version(self, task_id: int, version: str) -> bool:
        items = self.client.request("GET", "/api/predictions/", params={"task": task_id})
        items = items.get("results", []) if isinstance(items, dict) else (items or [])
        return any(p.get("model_version") == version and p.get("task") == task_id for p in items)

    def _fail(self, summary: Summary, task_id: int, code: str, message: str, bar) -> None:
        summary.failures[str(task_id)] = {"code": code, "message": message[:FAILURE_MESSAGE_CHARS]}
        summary.failed += 1
        bar.update(1)
        bar.set_postfix(failed=summary.failed, refresh=False)
        log.warning("task %s: %s: %s", task_id, code, message)
