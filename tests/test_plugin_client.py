"""LabelStudioClient against a small real HTTP server on 127.0.0.1 that speaks Label Studio's API shapes."""

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from labelassist.plugin.errors import LabelStudioAPIError
from labelassist.plugin.ls_client import ACCESS_REFRESH_MARGIN_S, LabelStudioClient, jwt_claims

LEGACY = "0123456789abcdef0123456789abcdef01234567"
ACCESS_LIFETIME_S = 300


def fake_jwt(**claims) -> str:
    """A JWT-shaped token (unsigned: the client never verifies, the fake server compares strings)."""
    def enc(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(claims)}.c2lnbmF0dXJl"


PAT = fake_jwt(token_type="refresh", exp=int(time.time()) + 86400, jti="pat-1", user_id=1)


class FakeLabelStudio:
    """State and routes of the fake server; ``calls`` records (method, path) of authenticated calls."""

    def __init__(self, n_tasks=5, send_total=True):
        self.lock = threading.Lock()
        self.refreshes = 0
        self.valid_access: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.auth_seen: list[str] = []
        self.project = {"id": 1, "title": "pets", "model_version": "labelassist"}
        self.tasks = [{"id": i + 1, "data": {"image": f"/data/upload/1/{i + 1}.png"}} for i in range(n_tasks)]
        self.send_total = send_total
        self.predictions: list[dict] = []
        self.ml: list[dict] = []
        self.hooks: list[dict] = [{"id": 90, "project": None, "url": "http://org-wide/hook"}]

    def issue_access(self) -> str:
        now = int(time.time())
        with self.lock:
            self.refreshes += 1
            token = fake_jwt(token_type="access", iat=now, exp=now + ACCESS_LIFETIME_S, jti=f"a{self.refreshes}")
            self.valid_access.add(token)
        return token

    def revoke_all(self):
        with self.lock:
            self.valid_access.clear()

    def authorized(self, header: str) -> bool:
        kind, _, value = header.partition(" ")
        return (kind == "Token" and value == LEGACY) or (kind == "Bearer" and value in self.valid_access)

    def handle(self, method, path, query, body, auth):
        if (method, path) == ("POST", "/api/token/refresh/"):
            if body.get("refresh") != PAT:
                return 401, {"detail": "Token is invalid or expired", "code": "token_not_valid"}
            return 200, {"access": self.issue_access()}
        if not self.authorized(auth):
            return 401, {"detail": "Authentication credentials were not provided."}
        self.calls.append((method, path))
        self.auth_seen.append(auth)
        if path == "/api/projects/1/":
            if method == "PATCH":
                self.project.update(body)
            return 200, self.project
        if path == "/api/projects/2/":
            return 400, {"id": "x", "status_code": 400, "detail": "Validation error",
                         "validation_errors": {"model_version": ["too long"]}, "exc_info": "Traceback (most recent call last): secret"}
        if path.startswith("/api/projects/"):
            return 404, {"detail": "Not found.", "exc_info": "Traceback: secret"}
        if (method, path) == ("POST", "/api/predictions/"):
            pred = {"id": len(self.predictions) + 1, **body}
            self.predictions.append(pred)
            return 201, pred
        if path == "/api/tasks/":
            project, page, size = int(query["project"][0]), int(query["page"][0]), int(query["page_size"][0])
            assert project == 1 and query["resolve_uri"] == ["false"]
            chunk = self.tasks[(page - 1) * size: page * size]
            if not chunk and page > 1:
                return 404, {"detail": "Invalid page."}
            return 200, {"tasks": chunk, **({"total": len(self.tasks)} if self.send_total else {})}
        if path == "/api/ml/":
            if method == "GET":
                return 200, [b for b in self.ml if b["project"] == int(query["project"][0])]
            backend = {"id": 10 + len(self.ml), **body}
            self.ml.append(backend)
            return 201, backend
        if path.startswith("/api/ml/") and method == "PATCH":
            backend = next(b for b in self.ml if b["id"] == int(path.rsplit("/", 1)[1]))
            backend.update(body)
            return 200, backend
        if path == "/api/webhooks/":
            if method == "GET":  # like Label Studio, organisation-wide hooks come along
                return 200, [h for h in self.hooks if h["project"] in (None, int(query["project"][0]))]
            hook = {"id": 100 + len(self.hooks), **body}
            self.hooks.append(hook)
            return 201, hook
        if path.startswith("/api/webhooks/") and method == "PATCH":
            hook = next(h for h in self.hooks if h["id"] == int(path.strip("/").rsplit("/", 1)[1]))
            hook.update(body)
            return 200, hook
        if path == "/api/not-json/":
            return 200, "<html>proxy login</html>"
        return 404, {"detail": "no route"}


def make_handler(state: FakeLabelStudio):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            status, payload = state.handle(self.command, parts.path, parse_qs(parts.query), body, self.headers.get("Authorization", ""))
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server():
    """(state, url) of a fresh fake Label Studio on a free port."""
    state = FakeLabelStudio()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_kinds_are_detected():
    assert LabelStudioClient("http://x", LEGACY).token_kind == "legacy"
    assert LabelStudioClient("http://x", PAT).token_kind == "personal"
    assert LabelStudioClient("http://x", fake_jwt(token_type="access", exp=1)).token_kind == "access"
    assert jwt_claims("a.b") is None and jwt_claims("not.a.jwt!") is None
    assert jwt_claims(PAT)["token_type"] == "refresh"


def test_legacy_key_is_sent_as_token(server):
    state, url = server
    client = LabelStudioClient(url + "/", LEGACY)
    assert client.get_project(1)["title"] == "pets"
    assert client.auth_headers() == {"Authorization": f"Token {LEGACY}"}
    assert state.auth_seen == [f"Token {LEGACY}"] and state.refreshes == 0


def test_personal_token_is_exchanged_once_and_renewed_before_expiry(server):
    state, url = server
    clock = FakeClock()
    client = LabelStudioClient(url, PAT, clock=clock)
    for _ in range(3):
        client.get_project(1)
    assert state.refreshes == 1 and client.refresh_count == 1
    assert all(a.startswith("Bearer ") and a != f"Bearer {PAT}" for a in state.auth_seen)
    clock.now += ACCESS_LIFETIME_S - ACCESS_REFRESH_MARGIN_S - 1  # still inside the margin: reuse
    client.get_project(1)
    assert state.refreshes == 1
    clock.now += 2  # within ACCESS_REFRESH_MARGIN_S of expiry: renew
    client.get_project(1)
    assert state.refreshes == 2
    assert state.auth_seen[-1] != state.auth_seen[0]


def test_access_token_ended_early_is_renewed_once_and_the_call_retried(server):
    state, url = server
    client = LabelStudioClient(url, PAT)
    client.get_project(1)
    state.revoke_all()
    assert client.update_project(1, model_version="la-2")["model_version"] == "la-2"
    assert state.refreshes == 2
    assert state.calls == [("GET", "/api/projects/1/"), ("PATCH", "/api/projects/1/")]


def test_concurrent_first_calls_refresh_once(server):
    state, url = server
    client = LabelStudioClient(url, PAT)
    threads = [threading.Thread(target=client.get_project, args=(1,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.refreshes == 1 and len(state.calls) == 8


@pytest.mark.parametrize("token, status, message", [
    (fake_jwt(token_type="refresh", exp=int(time.time()) + 24 * 3600, jti="other"), 401, "POST /api/token/refresh/: Label Studio answered 401: Token is invalid or expired"),
    (fake_jwt(token_type="refresh", exp=int(time.time()) - 60), 401, "personal access token has expired"),
    ("wrong-legacy-key", 401, "GET /api/projects/1/: Label Studio answered 401: Authentication credentials were not provided. (check the token"),
])
def test_refused_tokens_raise_with_status_and_message(server, token, status, message):
    state, url = server
    with pytest.raises(LabelStudioAPIError) as err:
        LabelStudioClient(url, token).get_project(1)
    assert err.value.status == status
    assert message in str(err.value)
    assert state.refreshes == 0


def test_server_errors_carry_status_and_message_without_traceback(server):
    _, url = server
    client = LabelStudioClient(url, LEGACY)
    with pytest.raises(LabelStudioAPIError) as err:
        client.get_project(2)
    assert err.value.status == 400
    assert str(err.value) == 'GET /api/projects/2/: Label Studio answered 400: Validation error; {"model_version": ["too long"]}'
    with pytest.raises(LabelStudioAPIError) as err:
        client.get_project(3)
    assert err.value.status == 404 and "Not found." in str(err.value)
    assert "Traceback" not in str(err.value) and err.value.code == "label_studio_api"
    with pytest.raises(LabelStudioAPIError, match="not JSON"):
        client.request("GET", "/api/not-json/")


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(LabelStudioAPIError) as err:
        LabelStudioClient(f"http://127.0.0.1:{port}", LEGACY, timeout_s=2).get_project(1)
    assert err.value.status is None
    assert f"cannot reach Label Studio at http://127.0.0.1:{port}" in str(err.value)


def test_create_prediction_posts_the_task_prediction(server):
    state, url = server
    item = {"id": "r-poly-0", "type": "polygonlabels", "value": {"points": [[1, 2], [3, 4], [5, 6]], "closed": True, "polygonlabels": ["cat"]}}
    pred = LabelStudioClient(url, LEGACY).create_prediction(4, [item], 0.25, "la-1")
    assert state.predictions == [{"id": 1, "task": 4, "result": [item], "score": 0.25, "model_version": "la-1"}]
    assert pred["id"] == 1


@pytest.mark.parametrize("n_tasks, page_size, send_total, requests_made", [
    (5, 2, True, 3),  # the last page is short
    (4, 2, True, 2),  # the total says we are done
    (4, 2, False, 3),  # no total: the page past the end answers 404
    (0, 2, True, 1),
])
def test_list_tasks_pages_through_the_project(server, n_tasks, page_size, send_total, requests_made):
    state, url = server
    state.tasks = [{"id": i + 1, "data": {}} for i in range(n_tasks)]
    state.send_total = send_total
    got = list(LabelStudioClient(url, LEGACY).list_tasks(1, page_size=page_size))
    assert [t["id"] for t in got] == list(range(1, n_tasks + 1))
    assert state.calls.count(("GET", "/api/tasks/")) == requests_made


def test_add_ml_backend_is_idempotent_by_url(server):
    state, url = server
    client = LabelStudioClient(url, LEGACY)
    first = client.add_ml_backend(1, "http://backend:9090", "labelassist")
    second = client.add_ml_backend(1, "http://backend:9090/", "labelassist v2", basic_auth_user="u", basic_auth_pass="p")
    assert first["id"] == second["id"] and len(state.ml) == 1
    assert state.ml[0] == {"id": first["id"], "project": 1, "url": "http://backend:9090/", "title": "labelassist v2",
                          "is_interactive": True, "auth_method": "BASIC_AUTH", "basic_auth_user": "u", "basic_auth_pass": "p"}
    assert ("PATCH", f"/api/ml/{first['id']}") in state.calls
    assert client.list_ml_backends(1) == state.ml and client.list_ml_backends(2) == []


def test_create_webhook_is_idempotent_by_url_and_ignores_org_hooks(server):
    state, url = server
    client = LabelStudioClient(url, LEGACY)
    hook = client.create_webhook(1, "http://backend:9090/webhook")
    assert hook["send_for_all_actions"] is True and hook["send_payload"] is True and hook["project"] == 1
    again = client.create_webhook(1, "http://backend:9090/webhook", actions=["ANNOTATION_CREATED", "ANNOTATION_UPDATED"])
    assert again["id"] == hook["id"]
    assert again["send_for_all_actions"] is False and again["actions"] == ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
    assert [h["url"] for h in client.list_webhooks(1)] == ["http://backend:9090/webhook"]


def test_presign_url_encodes_the_cloud_uri():
    client = LabelStudioClient("http://ls:8080/", LEGACY)
    url = client.presign_url(7, "s3://bucket/a b.png")
    assert url == "http://ls:8080/tasks/7/presign/?fileuri=" + base64.urlsafe_b64encode(b"s3://bucket/a b.png").decode()


@pytest.mark.parametrize("url, token, message", [
    ("ls:8080", LEGACY, "expected http(s)://"),
    ("http://ls:8080", " ", "empty value"),
])
def test_client_arguments_are_validated(url, token, message):
    with pytest.raises(LabelStudioAPIError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LabelStudioClient(url, token)
