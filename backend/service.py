"""The model behind the ML-backend protocol: Label Studio tasks in, predictions out.

``LabelassistModel`` keeps the shape Label Studio users know from
``label-studio-ml`` (``predict(tasks, context)`` and ``fit(event, data)``); it
holds no weights. Each task becomes a ``PredictRequest`` on the queue; the
workers own the models. What does not finish within the request's budget is
handed to the follow-up (``labelassist.backend.followup``), which writes it to
Label Studio through its API when the job is done.

Redis keys this module owns (other parts may read them):

- ``labelassist:model_version``: the version string the workers serve. Workers
  publish it once their models are loaded; until then the web tier answers with
  ``fallback_model_version(settings)``.
- ``labelassist:project:<id>``: JSON of what ``/setup`` said about a project
  (Label Studio's host name, the token, ``extra_params``).
- ``labelassist:events``: a stream of raw webhook events, one entry per delivery,
  fields ``action``, ``project``, ``received_at`` (unix s) and ``body`` (JSON).
- ``labelassist:webhook_secret``: the secret path segment of ``/webhook/<secret>``
  when ``LABELASSIST_WEBHOOK_SECRET`` is unset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any, Callable

from redis import Redis
from redis.exceptions import RedisError

from labelassist.backend.followup import PendingPush, PendingPushes
from labelassist.backend.queue import QueueClient
from labelassist.backend.settings import Settings, json_object_setting
from labelassist.plugin.config import ControlTag, ProjectConfig, parse_label_config
from labelassist.plugin.errors import ContextError, ImageReferenceError, LabelStudioAPIError
from labelassist.workers.contract import (
    MODEL_VERSION_KEY,
    QUEUE_INTERACTIVE,
    QUEUE_PREDICT,
    ImageSource,
    PredictRequest,
    PredictResult,
    ProposalSettings,
    ScoringSettings,
)
from labelassist.workers.errors import ContractError, LabelassistError
from labelassist.workers.heads import HeadStore, split_version, versioned

log = logging.getLogger(__name__)

PROJECT_KEY = "labelassist:project:{project_id}"
EVENTS_STREAM = "labelassist:events"
EVENTS_MAXLEN = 1_000_000  # approximate cap on kept webhook events; the correction store keeps the rest
WEBHOOK_SECRET_KEY = "labelassist:webhook_secret"
VERSION_CACHE_S = 2.0  # how long a read of the published version is reused
WEBHOOK_SECRET_BYTES = 24  # -> 32 URL-safe characters
CLIENT_CACHE_SIZE = 32  # Label Studio clients kept, one per (URL, token)


class RequestError(LabelassistError, ValueError):
    """A request the client must change: ``status`` is the HTTP status to answer with."""

    code = "bad_request"

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def fallback_model_version(settings: Settings) -> str:
    """The version the web tier reports until the workers publish theirs.

    Built from what selects the weights (preset and overrides), so two services
    started with different models never share a version string.
    """
    try:
        ours = package_version("labelassist")
    except PackageNotFoundError:
        ours = "0"
    parts = [settings.models]
    overrides = [settings.sam_model, settings.sam_weights, settings.clip_model, settings.clip_pretrained]
    if any(overrides):
        parts.append(hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8])
    return f"labelassist-{ours}-" + "-".join(parts)


class VersionSource:
    """The model version: the workers' published one, else ``fallback_model_version``; per project,
    with the project's active concept head appended (``labelassist.workers.heads``)."""

    def __init__(self, connection: Redis, settings: Settings):
        self.connection = connection
        self.fallback = fallback_model_version(settings)
        self.heads = HeadStore(connection)
        self._cached: tuple[float, str | None] = (0.0, None)
        self._active: dict[int, tuple[float, tuple[str, str] | None]] = {}
        self._lock = threading.Lock()

    def published(self) -> str | None:
        now = time.monotonic()
        with self._lock:
            at, value = self._cached
            if value is not None and now - at < VERSION_CACHE_S:
                return value
        try:
            raw = self.connection.get(MODEL_VERSION_KEY)
        except RedisError as exc:
            log.warning("cannot read %s: %s", MODEL_VERSION_KEY, exc)
            return None
        value = raw.decode() if isinstance(raw, bytes) else raw
        with self._lock:
            self._cached = (now, value)
        return value or None

    def current(self) -> str:
        return self.published() or self.fallback

    def forget(self, project_id: int) -> None:
        """Drop the cached read of the project's head: it just changed."""
        with self._lock:
            self._active.pop(project_id, None)

    def for_project(self, project_id: int) -> str:
        """The project's model version: the base, plus its active head when that head was trained on these models."""
        base = self.current()
        now = time.monotonic()
        with self._lock:
            at, active = self._active.get(project_id, (0.0, None))
            fresh = now - at < VERSION_CACHE_S
        if not fresh:
            try:
                active = self.heads.active(project_id)
            except RedisError as exc:
                log.warning("cannot read project %s's concept head: %s", project_id, exc)
                return base
            with self._lock:
                self._active[project_id] = (now, active)
        if active is None:
            return base
        head_id, head_base = active
        if head_base != base:
            log.warning("project %s: concept head %s was trained for models %s, the workers serve %s; "
                        "predicting zero-shot until it is trained again", project_id, head_id, head_base, base)
            return base
        return versioned(base, head_id)


@dataclass(frozen=True)
class ProjectLink:
    """What ``/setup`` told us about a Label Studio project."""

    project_id: int
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] = field(default_factory=dict)
    label_config: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "hostname": self.hostname, "access_token": self.access_token,
                "extra_params": self.extra_params, "label_config": self.label_config}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProjectLink:
        return cls(int(data["project_id"]), data.get("hostname"), data.get("access_token"), dict(data.get("extra_params") or {}),
                   data.get("label_config"))


class ProjectStore:
    """Per-project links in Redis, so a restarted web process and the follow-up find them."""

    def __init__(self, connection: Redis):
        self.connection = connection

    def save(self, link: ProjectLink) -> None:
        self.connection.set(PROJECT_KEY.format(project_id=link.project_id), json.dumps(link.to_json()))

    def get(self, project_id: int) -> ProjectLink | None:
        raw = self.connection.get(PROJECT_KEY.format(project_id=project_id))
        return ProjectLink.from_json(json.loads(raw)) if raw else None


def parse_project_id(value: Any) -> int:
    """Label Studio's project reference: ``"<id>.<created_unix>"`` in the protocol, an integer in tasks."""
    if isinstance(value, bool):
        raise RequestError(f"project: expected '<id>.<created>' or an integer id, got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        if head.isdigit() and int(head) > 0:
            return int(head)
    raise RequestError(f"project: expected '<id>.<created>' or an integer id, got {value!r}")


def webhook_secret(settings: Settings, connection: Redis) -> str:
    """The secret path segment of ``/webhook/<secret>``: from settings, else one kept in Redis."""
    if settings.webhook_secret:
        return settings.webhook_secret
    fresh = secrets.token_urlsafe(WEBHOOK_SECRET_BYTES)
    connection.set(WEBHOOK_SECRET_KEY, fresh, nx=True)
    raw = connection.get(WEBHOOK_SECRET_KEY)
    return raw.decode() if isinstance(raw, bytes) else raw


def record_event(connection: Redis, project_id: int, action: str, body: dict[str, Any]) -> dict[str, Any]:
    """Append a raw webhook event to ``labelassist:events``; return its stream id."""
    entry_id = connection.xadd(
        EVENTS_STREAM,
        {"action": action, "project": str(project_id), "received_at": f"{time.time():.3f}", "body": json.dumps(body)},
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
    return {"event": action, "id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id}


ClientFactory = Callable[[str, str], Any]


def default_client_factory(url: str, token: str):
    from labelassist.plugin.ls_client import LabelStudioClient

    return LabelStudioClient(url, token)


@dataclass
class Runtime:
    """The collaborators every model shares: settings, queue, stores, the Label Studio client factory."""

    settings: Settings
    queue: QueueClient
    projects: ProjectStore
    pushes: PendingPushes
    versions: VersionSource
    client_factory: ClientFactory = default_client_factory
    _clients: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _clients_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(cls, settings: Settings, queue: QueueClient, client_factory: ClientFactory | None = None) -> Runtime:
        connection = queue.connection
        return cls(settings, queue, ProjectStore(connection), PendingPushes(connection), VersionSource(connection, settings),
                   client_factory or default_client_factory)

    def credentials(self, link: ProjectLink | None) -> tuple[str | None, str | None]:
        """Label Studio's URL and token: settings first, else what ``/setup`` sent."""
        url = self.settings.ls_url or (link.hostname if link else None)
        token = self.settings.ls_token or (link.access_token if link else None)
        return (url.rstrip("/") if url else None), token

    def client(self, link: ProjectLink | None):
        """A Label Studio client, one per (URL, token): a personal access token is exchanged once, not per call."""
        url, token = self.credentials(link)
        if not (url and token):
            return None
        with self._clients_lock:
            client = self._clients.get((url, token))
            if client is None:
                client = self._clients[(url, token)] = self.client_factory(url, token)
                while len(self._clients) > CLIENT_CACHE_SIZE:
                    self._clients.pop(next(iter(self._clients)))
            return client

    def any_client(self):
        """A client for calls not tied to a known project: settings, else any project's /setup credentials."""
        if self.settings.ls_url and self.settings.ls_token:
            return self.client(None)
        for key in self.projects.connection.scan_iter(match=PROJECT_KEY.format(project_id="*"), count=100):
            raw = self.projects.connection.get(key)
            client = self.client(ProjectLink.from_json(json.loads(raw))) if raw else None
            if client is not None:
                return client
        return None

    def fetch_prediction(self, prediction_id: int) -> dict[str, Any]:
        """``GET /api/predictions/<id>/`` (the correction processor's ``fetch_prediction``)."""
        client = self.any_client()
        if client is None:
            raise LabelStudioAPIError("no Label Studio URL and token known yet to fetch predictions with; set "
                                      "LABELASSIST_LS_URL and LABELASSIST_LS_TOKEN or let Label Studio call /setup")
        return client.request("GET", f"/api/predictions/{int(prediction_id)}/")


class LabelassistModel:
    """SAM + OpenCLIP pre-annotation for one project, in ``label-studio-ml``'s shape.

    Light: it holds the parsed labeling config and the shared ``Runtime``; the
    models live in the workers. ``predict`` returns one item per task, in order.
    """

    def __init__(self, project_id: int, label_config: str, runtime: Runtime):
        self.project_id = project_id
        self.label_config = label_config
        self.config: ProjectConfig = parse_label_config(label_config)
        # The image pre-annotation runs on; a config with several images gets the first one's.
        self.value_key = self.config.value_keys()[0]
        self.runtime = runtime

    @property
    def model_version(self) -> str:
        """This project's version: the workers' models, plus the project's concept head once trained."""
        return self.runtime.versions.for_project(self.project_id)

    # -- the protocol -------------------------------------------------------

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None) -> list[Any]:
        if context and context.get("result"):
            return [self._predict_interactive(tasks, context)]
        return self._predict_tasks(tasks)

    def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Record a Label Studio event durably; the correction log and training read the stream."""
        return record_event(self.runtime.projects.connection, self.project_id, event, data)

    # -- internals ------------------------------------------------------------

    def task_requests(self, tasks: list[dict[str, Any]], version: str | None = None,
                      link: ProjectLink | None = None) -> list[PredictRequest | LabelassistError]:
        """Each task as the ``PredictRequest`` ``/predict`` submits for it, or the error that keeps it from one.

        ``link`` defaults to what ``/setup`` stored for the project. Job settings
        that break the contract raise ``RequestError`` for the whole batch.
        """
        version = version or self.model_version
        head = split_version(version)[1] or ""
        link = link if link is not None else self.runtime.projects.get(self.project_id)
        access, client = self._image_access(link), self.runtime.client(link)
        proposals, scoring = self.job_settings(link)
        out: list[PredictRequest | LabelassistError] = []
        for task in tasks:
            try:
                image = self._resolve(task, access, client)
                out.append(PredictRequest(task_id=str(task["id"]), image=image, concepts=self.config.concepts(),
                                          model_version=version, proposals=proposals, scoring=scoring, head=head))
            except (ImageReferenceError, ContractError, LabelStudioAPIError) as exc:
                out.append(exc)
        return out

    def job_settings(self, link: ProjectLink | None = None) -> tuple[ProposalSettings, ScoringSettings]:
        """Defaults <- serve settings <- the project's ``extra_params`` <- the config's control attributes."""
        link = link if link is not None else self.runtime.projects.get(self.project_id)
        extra = link.extra_params if link else {}
        proposals = {**json_object_setting(self.runtime.settings, "proposals"), **_object(extra.get("proposals"), "extra_params.proposals")}
        scoring = {**json_object_setting(self.runtime.settings, "scoring"), **_object(extra.get("scoring"), "extra_params.scoring"),
                   **self.config.scoring_overrides()}
        try:
            return ProposalSettings.from_json(proposals), ScoringSettings.from_json(scoring)
        except ContractError as exc:
            raise RequestError(f"project {self.project_id} job settings: {exc}") from None

    def _image_access(self, link: ProjectLink | None):
        from labelassist.plugin.images import ImageAccess

        settings = self.runtime.settings
        url, token = self.runtime.credentials(link)
        hosts = tuple(h.strip() for h in (settings.allowed_image_hosts or "").split(",") if h.strip())
        root = Path(settings.local_files_root) if settings.local_files_root else None
        return ImageAccess(url, token, root, hosts, settings.max_image_bytes)

    def _resolve(self, task: dict[str, Any], access, client) -> ImageSource:
        from labelassist.plugin.images import resolve_image

        return resolve_image(task, self.value_key, access, client)

    def _predict_tasks(self, tasks: list[dict[str, Any]]) -> list[Any]:
        from labelassist.plugin.regions import failed_prediction, prediction_from_result

        runtime = self.runtime
        version = self.model_version

        items: list[Any] = [None] * len(tasks)
        jobs: dict[int, tuple[str, PredictRequest]] = {}
        for i, (task, request) in enumerate(zip(tasks, self.task_requests(tasks, version))):
            if not isinstance(request, PredictRequest):
                log.warning("project %s task %s: no prediction: %s", self.project_id, task["id"], request)
                items[i] = failed_prediction(version)
                continue
            jobs[i] = (runtime.queue.submit(request, queue=QUEUE_PREDICT), request)

        done = runtime.queue.wait([job_id for job_id, _ in jobs.values()], runtime.settings.predict_wait_s) if jobs else {}
        late = 0
        for i, (job_id, request) in jobs.items():
            result = done.get(job_id)
            if result is None:
                # Not finished: the follow-up writes it to Label Studio later. The
                # reply for this task is an empty list of predictions, which Label
                # Studio stores nothing for (an item with "result": [] would be
                # stored as an empty prediction of our version, and the task would
                # end with two).
                runtime.pushes.add(PendingPush(job_id=job_id, task_id=int(tasks[i]["id"]), project_id=self.project_id,
                                               model_version=version, label_config=self.label_config,
                                               request=request.to_json(), queue=QUEUE_PREDICT, task_data=tasks[i]["data"]))
                items[i] = []
                late += 1
            elif not runtime.pushes.claim_for_reply(job_id):
                items[i] = []  # the follow-up is writing this one right now
            else:
                items[i] = self._format(result, version, prediction_from_result, failed_prediction)
        if late:
            log.info("project %s: %d of %d tasks still running after %.0f s; their predictions follow through the API",
                     self.project_id, late, len(tasks), runtime.settings.predict_wait_s)
        return items

    def _format(self, result: PredictResult, version: str, prediction_from_result, failed_prediction) -> dict[str, Any]:
        if not result.ok:
            log.warning("project %s task %s: %s: %s", self.project_id, result.task_id, result.error.code, result.error.message)
            return failed_prediction(version)
        return prediction_from_result(result, self.config, version, self.value_key)

    def _predict_interactive(self, tasks: list[dict[str, Any]], context: dict[str, Any]) -> dict[str, Any]:
        from labelassist.plugin.regions import interactive_result, parse_interactive_context

        runtime = self.runtime
        version = self.model_version
        empty = {"result": [], "score": 0.0, "model_version": version}
        if len(tasks) != 1:
            raise RequestError(f"interactive request: expected exactly one task, got {len(tasks)}")
        try:
            parsed = parse_interactive_context(context, self.config)
        except ContextError as exc:
            raise RequestError(str(exc)) from None
        if parsed is None:
            return empty
        prompt, label, control = parsed
        link = runtime.projects.get(self.project_id)
        task = tasks[0]
        try:
            image = self._resolve_for_control(task, control, link)
            request = PredictRequest(task_id=str(task["id"]), image=image, concepts=self.config.concepts(), model_version=version,
                                     prompt=prompt, prompt_label=label, head=split_version(version)[1] or "")
        except (ImageReferenceError, ContractError, LabelStudioAPIError) as exc:
            log.warning("project %s task %s: interactive prompt not run: %s", self.project_id, task["id"], exc)
            return empty
        job_id = runtime.queue.submit(request, queue=QUEUE_INTERACTIVE, timeout_s=runtime.settings.interactive_timeout_s)
        result = runtime.queue.wait([job_id], runtime.settings.interactive_wait_s).get(job_id)
        if result is None:
            log.warning("project %s task %s: interactive prompt not done within %.0f s", self.project_id, task["id"], runtime.settings.interactive_wait_s)
            return empty
        if not result.ok:
            log.warning("project %s task %s: interactive prompt failed: %s", self.project_id, task["id"], result.error.message)
            return empty
        return {"result": interactive_result(result, control, label), "score": result.score, "model_version": version}

    def _resolve_for_control(self, task: dict[str, Any], control: ControlTag, link: ProjectLink | None) -> ImageSource:
        from labelassist.plugin.images import resolve_image

        return resolve_image(task, control.value_key, self._image_access(link), self.runtime.client(link))


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


class LabelStudioDelivery:
    """Writes a finished job's prediction to Label Studio (the follow-up's ``deliver``)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, push: PendingPush, result: PredictResult) -> None:
        from labelassist.plugin.regions import failed_prediction, prediction_from_result

        link = self.runtime.projects.get(push.project_id)
        client = self.runtime.client(link)
        if client is None:
            raise LabelassistError(f"project {push.project_id}: no Label Studio URL and token to push with; "
                                   "set LABELASSIST_LS_URL and LABELASSIST_LS_TOKEN or let Label Studio call /setup")
        if self._has_prediction(client, push):
            log.info("follow-up: task %s already has a prediction of %s; nothing to push", push.task_id, push.model_version)
            return
        if result.ok:
            config = parse_label_config(push.label_config)
            prediction = prediction_from_result(result, config, push.model_version, config.value_keys()[0])
        else:
            log.warning("project %s task %s: %s: %s", push.project_id, push.task_id, result.error.code, result.error.message)
            prediction = failed_prediction(push.model_version)
        client.create_prediction(push.task_id, prediction["result"], prediction["score"], push.model_version)
        log.info("follow-up: wrote the prediction of task %s (project %s) to Label Studio", push.task_id, push.project_id)

    def refresh(self, push: PendingPush) -> PredictRequest:
        """The push's request made again from its task, with the image (and its download token) resolved afresh."""
        if not push.task_data:
            return PredictRequest.from_json(push.request)
        model = LabelassistModel(push.project_id, push.label_config, self.runtime)
        fresh = model.task_requests([{"id": push.task_id, "data": push.task_data}], push.model_version)[0]
        if not isinstance(fresh, PredictRequest):
            raise fresh
        return fresh

    def _has_prediction(self, client, push: PendingPush) -> bool:
        items = client.request("GET", "/api/predictions/", params={"task": push.task_id})
        items = items.get("results", []) if isinstance(items, dict) else (items or [])
        return any(p.get("model_version") == push.model_version and p.get("task") == push.task_id for p in items)
