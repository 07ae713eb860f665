"""The HTTP side of the ML-backend protocol Label Studio 1.23 speaks.

``create_app(settings, queue)`` builds the Flask app; tests build their own with
their own Redis. Endpoints: ``GET /health``, ``POST /setup``, ``POST /predict``,
``POST /webhook`` (and ``/webhook/<secret>`` for Label Studio's own webhook,
which sends no auth header), ``GET /versions``, ``GET /webhook-url``.

Every error is a JSON object ``{"error": message, "code": code}`` with a 4xx
status for anything the client can fix; a fault of ours is a 500 with a generic
message and the traceback in our log only.
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
from collections import OrderedDict
from typing import Any

from flask import Flask, Response, jsonify, request
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker
from werkzeug.exceptions import HTTPException

from labelassist.backend.queue import QueueClient
from labelassist.backend.service import (
    LabelassistModel,
    ProjectLink,
    RequestError,
    Runtime,
    parse_project_id,
    record_event,
    webhook_secret,
)
from labelassist.backend.settings import Settings
from labelassist.plugin.errors import PluginError, UnsupportedConfigError
from labelassist.workers.errors import ContractError

log = logging.getLogger(__name__)

HEALTH_REDIS_TIMEOUT_S = 0.3  # Label Studio gives /health 1 s
MODEL_CACHE_SIZE = 64  # parsed per-project models kept (project id, config)
WEBHOOK_PATH = "/webhook"


def create_app(settings: Settings, queue: QueueClient, runtime: Runtime | None = None, events=None) -> Flask:
    """An app serving the protocol over ``queue``; ``runtime`` overrides the collaborators built from them.

    ``events``: an ``EventSink`` (``labelassist.backend.events``) that stores webhook
    bodies in the correction store; without one, events go to the ``labelassist:events``
    Redis stream through the model's ``fit``.
    """
    runtime = runtime or Runtime.build(settings, queue)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.extensions["labelassist"] = runtime
    models = _ModelCache(runtime)
    health_redis = _probe_client(queue.connection)
    auth = _BasicAuth(settings.basic_auth_user, settings.basic_auth_pass)
    secret_cache: list[str] = []  # the webhook secret, read from settings or Redis once

    def current_secret() -> str:
        if not secret_cache:
            secret_cache.append(webhook_secret(settings, queue.connection))
        return secret_cache[0]

    @app.before_request
    def check_auth():
        if request.endpoint == "webhook_secret" or not auth.enabled:
            return None
        if not auth.check(request.headers.get("Authorization", "")):
            response = jsonify(error="authentication required: this backend expects HTTP basic auth (the ML backend's "
                                     "basic auth user and password in Label Studio)", code="unauthorized")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="labelassist"'
            return response
        return None

    @app.get("/health")
    def health():
        queue_state: dict[str, Any] = {"reachable": False}
        try:
            health_redis.ping()
            queue_state = {"reachable": True, "workers": Worker.count(connection=health_redis)}
        except RedisError as exc:
            queue_state["error"] = f"{type(exc).__name__}: {exc}"
        published = _published_version(runtime, queue_state["reachable"])
        return jsonify(status="UP", model_class=LabelassistModel.__name__,
                       model_version=published or runtime.versions.fallback,
                       model_version_source="workers" if published else "settings",
                       queue=queue_state)

    @app.post("/setup")
    def setup():
        body = _json_object()
        schema = _field(body, "schema", str)
        project_id = parse_project_id(_field(body, "project", (str, int)))
        extra = body.get("extra_params")
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise RequestError(f"extra_params: expected a JSON object or null, got {type(extra).__name__}")
        model = models.get(project_id, schema)  # raises UnsupportedConfigError for a config we cannot fill in
        hostname, token = body.get("hostname"), body.get("access_token")
        runtime.projects.save(ProjectLink(project_id, hostname if isinstance(hostname, str) and hostname else None,
                                          token if isinstance(token, str) and token else None, extra, schema))
        log.info("project %s set up: %d control(s), labels %s", project_id, len(model.config.controls),
                 [c.name for c in model.config.concepts()])
        return jsonify(model_version=model.model_version)

    @app.post("/predict")
    def predict():
        body = _json_object()
        tasks = _field(body, "tasks", list)
        for i, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict) or not _is_id(task.get("id")):
                raise RequestError(f"tasks[{i}]: expected an object with an integer 'id' and a 'data' object, got {_preview(task)}")
        params = body.get("params")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise RequestError(f"params: expected a JSON object, got {type(params).__name__}")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise RequestError(f"params.context: expected a JSON object or null, got {type(context).__name__}")
        if not tasks:
            return jsonify(results=[])
        project = body.get("project", tasks[0].get("project"))
        if project is None:
            raise RequestError("project: missing; expected '<id>.<created>' or the tasks' 'project' id")
        project_id = parse_project_id(project)
        label_config = body.get("label_config")
        if label_config is None:
            raise RequestError("label_config: missing; Label Studio sends the project's labeling config with every /predict")
        model = models.get(project_id, _field(body, "label_config", str))
        return jsonify(results=model.predict(tasks, context))

    @app.post(WEBHOOK_PATH)
    def webhook():
        return _webhook()

    @app.post(WEBHOOK_PATH + "/<secret>", endpoint="webhook_secret")
    def webhook_with_secret(secret: str):
        expected = current_secret()
        if not hmac.compare_digest(secret.encode(), expected.encode()):
            return _error(404, "not_found", "no such webhook path")
        return _webhook()

    def _webhook():
        if events is not None:
            status, reply = events.receive(request.get_data())  # the raw bytes: stored before anything else
            response = jsonify(reply)
            response.status_code = status
            return response
        body = _json_object()
        action = _field(body, "action", str)
        project = body.get("project")
        project_id = parse_project_id(project.get("id") if isinstance(project, dict) else project) if project is not None else 0
        label_config = project.get("label_config") if isinstance(project, dict) else None
        if project_id and isinstance(label_config, str):
            try:
                model = models.get(project_id, label_config)
                return jsonify(status="ok", **model.fit(action, body))
            except UnsupportedConfigError:
                pass  # a project we do not pre-annotate still has its events kept
        return jsonify(status="ok", **record_event(queue.connection, project_id, action, body))

    @app.get("/versions")
    def versions():
        return jsonify(versions=[runtime.versions.current()])

    @app.get("/webhook-url")
    def webhook_url():
        """The path Label Studio's webhook should post to (``connect`` reads it; behind basic auth when on)."""
        return jsonify(path=f"{WEBHOOK_PATH}/{current_secret()}")

    @app.errorhandler(RequestError)
    def on_request_error(exc: RequestError):
        return _error(exc.status, exc.code, str(exc))

    @app.errorhandler(UnsupportedConfigError)
    def on_unsupported(exc: UnsupportedConfigError):
        return _error(422, exc.code, str(exc))

    @app.errorhandler(ContractError)
    def on_contract(exc: ContractError):
        return _error(400, exc.code, str(exc))

    @app.errorhandler(PluginError)
    def on_plugin(exc: PluginError):
        return _error(400, exc.code, str(exc))

    @app.errorhandler(RedisError)
    def on_redis(exc: RedisError):
        log.error("queue unavailable during %s %s: %s", request.method, request.path, exc)
        return _error(503, "queue_unavailable", "the job queue (Redis) is unavailable; try again shortly")

    @app.errorhandler(HTTPException)
    def on_http(exc: HTTPException):
        messages = {413: f"request body too large: the limit is {settings.max_request_bytes} bytes (LABELASSIST_MAX_REQUEST_BYTES)"}
        code = (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, code, messages.get(exc.code, exc.description or exc.name))

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error(500, "internal", "internal error in labelassist; the details are in its log")

    return app


def _error(status: int, code: str, message: str) -> Response:
    response = jsonify(error=message, code=code)
    response.status_code = status
    return response


def _json_object() -> dict[str, Any]:
    if not request.get_data(cache=True):
        raise RequestError("empty body: expected a JSON object")
    body = request.get_json(force=True, silent=True)  # Label Studio sends application/json; curl users may not
    if body is None:
        raise RequestError("malformed JSON body: expected a JSON object (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, got {type(body).__name__}")
    return body


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in body or body[name] is None:
        raise RequestError(f"{name}: missing; expected a field {name!r} in the JSON body")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise RequestError(f"{name}: expected {names}, got {type(value).__name__}")
    return value


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (isinstance(value, str) and value.isdigit())


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _published_version(runtime: Runtime, reachable: bool) -> str | None:
    return runtime.versions.published() if reachable else None


def _probe_client(connection: Redis) -> Redis:
    """A client on the queue's Redis with short timeouts, so /health answers within Label Studio's 1 s."""
    kwargs = dict(connection.connection_pool.connection_kwargs)
    kwargs.update(socket_timeout=HEALTH_REDIS_TIMEOUT_S, socket_connect_timeout=HEALTH_REDIS_TIMEOUT_S)
    kwargs.pop("retry", None)
    try:
        return Redis(**kwargs)
    except TypeError:  # a connection class with arguments Redis() does not take (e.g. a unix socket)
        return connection


class _BasicAuth:
    def __init__(self, user: str | None, password: str | None):
        self.enabled = bool(user and password)
        self._expected = f"{user}:{password}".encode() if self.enabled else b""

    def check(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(given, self._expected)


class _ModelCache:
    """Parsed models by (project id, config): /predict sends the config every time; parse it once."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._models: OrderedDict[tuple[int, str], LabelassistModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, project_id: int, label_config: str) -> LabelassistModel:
        key = (project_id, label_config)
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
        model = LabelassistModel(project_id, label_config, self.runtime)
        with self._lock:
            self._models[key] = model
            while len(self._models) > MODEL_CACHE_SIZE:
                self._models.popitem(last=False)
        return model
