"""A small Label Studio API client: the calls labelassist makes, with the auth Label Studio 1.23 wants.

Tokens. A *personal access token* (a JWT refresh token, the default kind since
1.20) is never sent as is: Label Studio answers 401. It is exchanged at
``POST /api/token/refresh/`` for a short-lived access token (5 minutes), which
is cached and renewed ``ACCESS_REFRESH_MARGIN_S`` before it expires and sent as
``Authorization: Bearer <access>``. Anything else is a *legacy token*, sent as
``Authorization: Token <key>``.

Endpoints (Label Studio 1.23): ``/api/projects/<id>/``, ``/api/predictions/``,
``/api/tasks/?project=`` (paged, 404 past the last page), ``/api/ml/`` and
``/api/ml/<id>`` (no trailing slash), ``/api/webhooks/`` and
``/api/webhooks/<id>/``, and the storage resolver ``/tasks/<id>/presign/?fileuri=``.

Every failure is a ``LabelStudioAPIError`` carrying the HTTP status and Label
Studio's own message; no traceback, no credential.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from typing import Any, Callable, Iterator

import requests

from labelassist.plugin.errors import LabelStudioAPIError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0  # per request (connect and read); the prediction push path is not latency-bound
DEFAULT_PAGE_SIZE = 100  # tasks per page when listing a project
ACCESS_TOKEN_LIFETIME_S = 300.0  # Label Studio's access token lifetime, used when the token carries no exp/iat
ACCESS_REFRESH_MARGIN_S = 30.0  # renew the access token this long before it expires
MAX_ERROR_DETAIL_CHARS = 500  # of a non-JSON error body quoted in a message
AUTH_BASIC = "BASIC_AUTH"
AUTH_NONE = "NONE"
ALL_WEBHOOK_ACTIONS = ()  # empty: the webhook is sent for every action


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, unverified, or None when ``token`` is not one.

    Only used to tell token kinds apart and to read ``exp``/``iat``; Label Studio
    verifies signatures.
    """
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def presign_path(task_id: int | str, fileuri: str) -> str:
    """``/tasks/<id>/presign/?fileuri=<urlsafe base64 of the cloud URI>``, as Label Studio's resolver expects."""
    encoded = base64.urlsafe_b64encode(fileuri.encode()).decode()
    return f"/tasks/{task_id}/presign/?fileuri={encoded}"


class LabelStudioClient:
    """Label Studio's REST API, authenticated with a legacy key or a personal access token.

    ``session`` is any ``requests.Session`` (tests pass their own); ``clock`` is
    a monotonic clock in seconds, the seam tests use to age the access token.
    Thread-safe: one client can serve every request thread of the web process.
    """

    def __init__(self, url: str, token: str, session: requests.Session | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, clock: Callable[[], float] = time.monotonic):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise LabelStudioAPIError(f"Label Studio URL: expected http(s)://host[:port], got {url!r}")
        if not isinstance(token, str) or not token.strip():
            raise LabelStudioAPIError("Label Studio token: expected a legacy API key or a personal access token, got an empty value")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._token = token.strip()
        self._session = session or requests.Session()
        self._clock = clock
        claims = jwt_claims(self._token)
        self.token_kind = "legacy" if claims is None else ("access" if claims.get("token_type") == "access" else "personal")
        self._access: str | None = self._token if self.token_kind == "access" else None
        self._access_deadline = float("inf")  # monotonic time after which the cached access token is renewed
        self._lock = threading.Lock()
        self.refresh_count = 0  # access tokens obtained so far

    # -- auth -------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """``Authorization`` for Label Studio, renewing the access token when it is about to expire."""
        if self.token_kind == "legacy":
            return {"Authorization": f"Token {self._token}"}
        if self.token_kind == "access":
            return {"Authorization": f"Bearer {self._token}"}
        with self._lock:
            if self._access is None or self._clock() >= self._access_deadline:
                self._refresh_access()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh_access(self) -> None:
        claims = jwt_claims(self._token) or {}
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and exp < time.time():
            raise LabelStudioAPIError(
                "the personal access token has expired; create a new one in Label Studio (Account & Settings > Personal Access Token)",
                status=401)
        data = self._send("POST", "/api/token/refresh/", {}, json={"refresh": self._token})
        access = data.get("access") if isinstance(data, dict) else None
        if not isinstance(access, str) or not access:
            raise LabelStudioAPIError("POST /api/token/refresh/ answered without an access token", status=200)
        access_claims = jwt_claims(access) or {}
        lifetime = ACCESS_TOKEN_LIFETIME_S
        exp, iat = access_claims.get("exp"), access_claims.get("iat")
        if isinstance(exp, (int, float)) and isinstance(iat, (int, float)) and exp > iat:
            lifetime = float(exp - iat)  # from the token itself: immune to clock skew between hosts
        self._access = access
        self._access_deadline = self._clock() + max(lifetime - ACCESS_REFRESH_MARGIN_S, 0.0)
        self.refresh_count += 1
        log.debug("obtained a Label Studio access token valid for %.0f s", lifetime)

    def _forget_access(self) -> None:
        with self._lock:
            if self.token_kind == "personal":
                self._access = None

    # -- HTTP -------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                json: Any = None, ok_statuses: tuple[int, ...] = ()) -> Any:
        """Call ``path`` (relative to the Label Studio URL); the decoded JSON body, or None when empty.

        A 401 to a request sent with a renewed access token renews it once more
        and retries, in case Label Studio ended it early. ``ok_statuses`` lists
        non-2xx statuses returned as ``None`` instead of raising (404 at the end
        of a task listing).
        """
        headers = self.auth_headers()  # a refused personal access token raises here, not retried
        try:
            return self._send(method, path, headers, params=params, json=json, ok_statuses=ok_statuses)
        except LabelStudioAPIError as exc:
            if exc.status != 401 or self.token_kind != "personal":
                raise
        self._forget_access()
        return self._send(method, path, self.auth_headers(), params=params, json=json, ok_statuses=ok_statuses)

    def _send(self, method: str, path: str, auth: dict[str, str], *, params: dict[str, Any] | None = None,
              json: Any = None, ok_statuses: tuple[int, ...] = ()) -> Any:
        headers = {"Accept": "application/json", **auth}
        what = f"{method} {path}"
        try:
            response = self._session.request(method, self.url + path, params=params, json=json,
                                             headers=headers, timeout=self.timeout_s, allow_redirects=False)
        except requests.Timeout:
            raise LabelStudioAPIError(f"{what}: Label Studio at {self.url} did not answer within {self.timeout_s:g} s") from None
        except requests.RequestException as exc:
            raise LabelStudioAPIError(f"{what}: cannot reach Label Studio at {self.url} ({type(exc).__name__}); check the URL and that the server is up") from None
        if response.status_code in ok_statuses:
            return None
        if not 200 <= response.status_code < 300:
            detail = _error_detail(response)
            hint = _HINTS.get(response.status_code, "")
            if 300 <= response.status_code < 400:
                hint = f" (redirected to {response.headers.get('Location', '?')}; use that address as the Label Studio URL)"
            raise LabelStudioAPIError(f"{what}: Label Studio answered {response.status_code}: {detail}{hint}",
                                      status=response.status_code, detail=detail)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise LabelStudioAPIError(f"{what}: Label Studio answered {response.status_code} with a body that is not JSON "
                                      f"({response.headers.get('Content-Type', 'no content type')}); is {self.url} Label Studio?",
                                      status=response.status_code) from None

    # -- projects, tasks, predictions -------------------------------------

    def get_project(self, pid: int) -> dict[str, Any]:
        return self.request("GET", f"/api/projects/{int(pid)}/")

    def update_project(self, pid: int, **fields: Any) -> dict[str, Any]:
        """PATCH project fields, e.g. ``model_version`` so prediction scores and uncertainty sampling use ours."""
        return self.request("PATCH", f"/api/projects/{int(pid)}/", json=fields)

    def create_prediction(self, task_id: int, result: list[dict[str, Any]], score: float, model_version: str) -> dict[str, Any]:
        return self.request("POST", "/api/predictions/", json={
            "task": int(task_id), "result": result, "score": float(score), "model_version": model_version})

    def list_tasks(self, pid: int, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """Every task of project ``pid``, page by page (``GET /api/tasks/?project=&page=&page_size=``).

        Tasks come with their data unresolved (``resolve_uri=false``), as in
        ``/predict``, so image references go through ``images.resolve_image``.
        """
        if page_size < 1:
            raise LabelStudioAPIError(f"page_size: expected a positive integer, got {page_size!r}")
        page, seen = 1, 0
        while True:
            data = self.request("GET", "/api/tasks/", params={
                "project": int(pid), "page": page, "page_size": page_size, "fields": "all", "resolve_uri": "false",
            }, ok_statuses=(404,))  # Label Studio answers 404 for a page past the last
            if data is None:
                return
            tasks = data.get("tasks") if isinstance(data, dict) else data
            if not isinstance(tasks, list):
                raise LabelStudioAPIError(f"GET /api/tasks/: expected a list of tasks, got {type(tasks).__name__}")
            yield from tasks
            seen += len(tasks)
            total = data.get("total") if isinstance(data, dict) else None
            if not tasks or len(tasks) < page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1

    # -- ML backends and webhooks ------------------------------------------

    def list_ml_backends(self, pid: int) -> list[dict[str, Any]]:
        return _as_list(self.request("GET", "/api/ml/", params={"project": int(pid)}), "GET /api/ml/")

    def add_ml_backend(self, pid: int, url: str, title: str, *, is_interactive: bool = True,
                       basic_auth_user: str | None = None, basic_auth_pass: str | None = None,
                       extra_params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Connect the backend at ``url`` to project ``pid``; a backend already there at that URL is updated.

        Label Studio calls the backend's ``/health`` and ``/setup`` while saving,
        so the backend must be up and reachable from the Label Studio server.
        """
        fields: dict[str, Any] = {"url": url, "title": title, "is_interactive": bool(is_interactive),
                                  "auth_method": AUTH_BASIC if basic_auth_user else AUTH_NONE}
        if basic_auth_user:
            fields["basic_auth_user"] = basic_auth_user
            if basic_auth_pass is not None:
                fields["basic_auth_pass"] = basic_auth_pass
        if extra_params is not None:
            fields["extra_params"] = extra_params
        existing = _same_url(self.list_ml_backends(pid), url)
        if existing is not None:
            return self.request("PATCH", f"/api/ml/{int(existing['id'])}", json=fields)
        return self.request("POST", "/api/ml/", json={"project": int(pid), **fields})

    def list_webhooks(self, pid: int) -> list[dict[str, Any]]:
        """Webhooks of project ``pid`` (organisation-wide ones, with no project, are left out)."""
        hooks = _as_list(self.request("GET", "/api/webhooks/", params={"project": int(pid)}), "GET /api/webhooks/")
        return [h for h in hooks if str(h.get("project")) == str(int(pid))]

    def create_webhook(self, pid: int, url: str, send_payload: bool = True,
                       actions: tuple[str, ...] | list[str] = ALL_WEBHOOK_ACTIONS) -> dict[str, Any]:
        """Register a webhook for project ``pid`` (all actions unless ``actions`` names some); idempotent by URL."""
        actions = list(actions)
        fields = {"url": url, "send_payload": bool(send_payload), "send_for_all_actions": not actions,
                  "actions": actions, "is_active": True}
        existing = _same_url(self.list_webhooks(pid), url)
        if existing is not None:
            return self.request("PATCH", f"/api/webhooks/{int(existing['id'])}/", json=fields)
        return self.request("POST", "/api/webhooks/", json={"project": int(pid), **fields})

    # -- storage ------------------------------------------------------------

    def presign_url(self, task_id: int | str, fileuri: str) -> str:
        """Label Studio's URL that redirects to a presigned URL for ``fileuri`` (s3://, gs://, azure-blob://).

        Fetch it with ``auth_headers()``; the redirect target carries its own
        signature (``requests`` drops the Authorization header when the host changes).
        """
        return self.url + presign_path(task_id, fileuri)


_HINTS = {
    401: " (check the token: Label Studio 1.23 takes a personal access token or, where enabled, a legacy API key)",
    403: " (the token's user lacks access to this project)",
}


def _error_detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return text[:MAX_ERROR_DETAIL_CHARS] or response.reason or "no message"
    if isinstance(body, dict):
        # Label Studio's error body: detail, validation_errors; exc_info (a server traceback) is left out.
        parts = [str(body[k]) for k in ("detail", "error", "message") if body.get(k)]
        if body.get("validation_errors"):
            parts.append(json.dumps(body["validation_errors"], sort_keys=True))
        if parts:
            return "; ".join(parts)[:MAX_ERROR_DETAIL_CHARS]
        body = {k: v for k, v in body.items() if k != "exc_info"}
    return json.dumps(body, sort_keys=True)[:MAX_ERROR_DETAIL_CHARS]


def _as_list(data: Any, what: str) -> list[dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("results"), list):  # a paginated answer
        data = data["results"]
    if not isinstance(data, list):
        raise LabelStudioAPIError(f"{what}: expected a list, got {type(data).__name__}")
    return [d for d in data if isinstance(d, dict)]


def _same_url(items: list[dict[str, Any]], url: str) -> dict[str, Any] | None:
    want = url.rstrip("/")
    return next((i for i in items if str(i.get("url", "")).rstrip("/") == want), None)
