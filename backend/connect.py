"""Connecting a Label Studio project to a running labelassist backend.

Three things, all idempotent (run it again after changing models):

1. add (or update) the ML backend, interactive on; Label Studio calls our
   ``/health`` and ``/setup`` while saving it;
2. point Label Studio's webhook at ``/webhook/<secret>`` (it sends no auth
   header, so the secret path is how it passes basic auth), and remove the plain
   ``<backend>/webhook`` one Label Studio adds for every backend, which would
   deliver each event twice (or fail with 401 when basic auth is on);
3. set the project's ``model_version`` to ours: Label Studio's prediction-score
   column and uncertainty sampling only use predictions of the project's version.
   Label Studio accepts a project version only when it is an ML backend's
   *title* or already on a prediction, so the backend's title is our version
   (adding a backend also makes its title the project's version).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import requests

from labelassist.plugin.errors import LabelStudioAPIError

log = logging.getLogger(__name__)

BACKEND_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 1.0


class ConnectError(RuntimeError):
    """Connecting failed; the message says which step and what to check."""


@dataclass(frozen=True)
class Connected:
    project_id: int
    ml_backend_id: int
    webhook_url: str
    model_version: str


def connect_project(ls_url: str, token: str, project_id: int, backend_url: str,
                    basic_auth_user: str | None = None, basic_auth_pass: str | None = None,
                    extra_params: str | dict | None = None, wait_s: float = 300.0, client=None) -> Connected:
    from labelassist.plugin.ls_client import LabelStudioClient

    backend_url = backend_url.rstrip("/")
    auth = (basic_auth_user, basic_auth_pass) if basic_auth_user and basic_auth_pass else None
    extra = _extra_params(extra_params)
    health = _wait_for_version(backend_url, auth, wait_s)
    try:
        webhook_path = _backend_get(backend_url, "/webhook-url", auth)["path"]
    except (KeyError, TypeError):
        raise ConnectError(f"{backend_url}/webhook-url: expected {{'path': ...}}; is this a labelassist backend?") from None
    try:
        client = client or LabelStudioClient(ls_url, token)
        client.get_project(project_id)
        version = health["model_version"]
        backend = client.add_ml_backend(project_id, backend_url, version, is_interactive=True, basic_auth_user=basic_auth_user,
                                        basic_auth_pass=basic_auth_pass, extra_params=extra)
        webhook_url = backend_url + webhook_path
        client.create_webhook(project_id, webhook_url)
        plain = backend_url + "/webhook"
        for hook in client.list_webhooks(project_id):
            if str(hook.get("url", "")).rstrip("/") == plain:
                client.request("DELETE", f"/api/webhooks/{int(hook['id'])}/")
                log.info("removed Label Studio's plain webhook %s (events go to the secret path)", plain)
        if backend.get("model_version") and backend["model_version"] != version:
            log.warning("the backend answered /setup with version %s, not %s: the workers changed models while "
                        "connecting; run connect again", backend["model_version"], version)
        client.update_project(project_id, model_version=version)
    except LabelStudioAPIError as exc:
        raise ConnectError(f"Label Studio at {ls_url}: {exc}") from None
    if backend.get("state") not in (None, "CO"):
        log.warning("Label Studio reports the backend in state %s: %s", backend.get("state"), backend.get("error_message"))
    return Connected(project_id, int(backend["id"]), webhook_url, version)


def _extra_params(value: str | dict | None) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ConnectError(f"--extra-params: expected a JSON object, got {value!r} ({exc})") from None
    if not isinstance(parsed, dict):
        raise ConnectError(f"--extra-params: expected a JSON object, got {type(parsed).__name__}")
    return parsed


def _backend_get(backend_url: str, path: str, auth) -> Any:
    try:
        response = requests.get(backend_url + path, auth=auth, timeout=BACKEND_TIMEOUT_S)
    except requests.RequestException as exc:
        raise ConnectError(f"cannot reach the backend at {backend_url}: {exc}; is `labelassist serve` running there?") from None
    if response.status_code == 401:
        raise ConnectError(f"{backend_url}{path}: 401; pass the backend's --basic-auth-user and --basic-auth-pass")
    if response.status_code != 200:
        raise ConnectError(f"{backend_url}{path}: HTTP {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except ValueError:
        raise ConnectError(f"{backend_url}{path}: not JSON; is this a labelassist backend?") from None


def _wait_for_version(backend_url: str, auth, wait_s: float) -> dict[str, Any]:
    """Health, once the workers published their model version (or after ``wait_s``, with a warning)."""
    deadline = time.monotonic() + wait_s
    while True:
        health = _backend_get(backend_url, "/health", auth)
        if health.get("model_version_source") == "workers":
            return health
        if time.monotonic() >= deadline:
            log.warning("no worker has published its model version within %.0f s; connecting with %s, which changes "
                        "when they do (run connect again then)", wait_s, health.get("model_version"))
            return health
        time.sleep(POLL_INTERVAL_S)
