"""Weight files: local paths, downloads from a real HTTP server, the cache, checksums, checkpoint reading."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from labelassist.workers.errors import WeightsError
from labelassist.workers.weights import SAM_WEIGHTS_OPTION, fetch_weights, file_sha256, load_state_dict

BLOB = b"labelassist test weights\n" * 1000  # 25 kB: several chunks for the progress bar
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
WRONG_SHA = "0" * 64


class FileServer:
    """A real HTTP server on 127.0.0.1 serving ``files`` by path and counting GET requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                server.requests[path] += 1
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer({"/w.pth": BLOB})
    yield s
    s.close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/w.pth"


def resolve(source, cache: Path, **kw) -> Path:
    args = dict(default_url=None, sha256=None, filename="w.pth", cache_dir=cache, what="test weights")
    return fetch_weights(source, **{**args, **kw}).path


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*")) if cache.exists() else []


def test_file_sha256_matches_hashlib(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(BLOB * 100)  # 2.5 MB: more than one read chunk
    assert file_sha256(p) == hashlib.sha256(BLOB * 100).hexdigest()


@pytest.mark.parametrize("kind", ["path", "file-url", "missing", "unsupported-scheme"])
def test_local_sources(tmp_path, kind):
    weights = tmp_path / "mine.pth"
    weights.write_bytes(BLOB)
    source = {"path": str(weights), "file-url": weights.as_uri(), "missing": str(tmp_path / "nope.pth"),
              "unsupported-scheme": "s3://bucket/mine.pth"}[kind]
    if kind in ("path", "file-url"):
        assert resolve(source, tmp_path / "cache", sha256=WRONG_SHA) == weights  # local files are not checked
        assert leftovers(tmp_path / "cache") == []
        return
    with pytest.raises(WeightsError) as err:
        resolve(source, tmp_path / "cache", option=SAM_WEIGHTS_OPTION)
    assert source.split("/")[-1] in str(err.value)
    assert "--sam-weights" in str(err.value)


def test_download_verifies_then_reuses_the_cache(server, tmp_path):
    cache = tmp_path / "cache"
    got = resolve(None, cache, default_url=server.url("/w.pth"), sha256=BLOB_SHA)
    assert got == cache / "w.pth" and got.read_bytes() == BLOB
    assert leftovers(cache) == ["w.pth"]  # no .part left behind
    assert resolve(None, cache, default_url=server.url("/w.pth"), sha256=BLOB_SHA) == got
    assert server.requests["/w.pth"] == 1  # the second call never touched the network


def test_unpinned_cached_file_is_reused_without_network(server, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"whatever was cached")
    assert resolve(None, tmp_path, default_url=server.url("/w.pth")).read_bytes() == b"whatever was cached"
    assert sum(server.requests.values()) == 0


def test_corrupt_cached_file_is_replaced(server, tmp_path):
    (tmp_path / "w.pth").write_bytes(BLOB[:-10])  # a truncated earlier download
    got = resolve(None, tmp_path, default_url=server.url("/w.pth"), sha256=BLOB_SHA)
    assert got.read_bytes() == BLOB and server.requests["/w.pth"] == 1


@pytest.mark.parametrize("case, expect_in_message", [
    ("wrong-sha256", [WRONG_SHA, BLOB_SHA]),  # expected and actual
    ("http-404", ["HTTP 404", "missing.pth"]),
    ("unreachable", ["cannot download", "--sam-weights"]),
    ("offline", ["offline"]),
])
def test_download_failures_say_where_to_put_the_file(server, tmp_path, case, expect_in_message):
    cache = tmp_path / "cache"
    url = {"wrong-sha256": server.url("/w.pth"), "http-404": server.url("/missing.pth"),
           "unreachable": closed_port_url(), "offline": server.url("/w.pth")}[case]
    sha = WRONG_SHA if case == "wrong-sha256" else BLOB_SHA
    with pytest.raises(WeightsError) as err:
        resolve(None, cache, default_url=url, sha256=sha, option=SAM_WEIGHTS_OPTION, offline=case == "offline")
    message = str(err.value)
    for text in expect_in_message + [str(cache / "w.pth"), url, "--sam-weights"]:
        assert text in message, f"{text!r} not in {message!r}"
    assert leftovers(cache) == []  # neither the .part nor a bad file remains
    assert server.requests["/w.pth"] == (1 if case == "wrong-sha256" else 0)


def test_url_source_is_pinned_by_fragment_and_cached_under_its_own_name(server, tmp_path):
    got = resolve(server.url("/w.pth") + f"#sha256={BLOB_SHA}", tmp_path)
    assert got.parent == tmp_path and got.name.endswith("-w.pth") and got.read_bytes() == BLOB
    with pytest.raises(WeightsError, match=WRONG_SHA):
        resolve(server.url("/w.pth") + f"#sha256={WRONG_SHA}", tmp_path / "other")
    with pytest.raises(WeightsError, match="registry expects"):
        resolve(server.url("/w.pth") + f"#sha256={BLOB_SHA}", tmp_path, sha256=WRONG_SHA)


TENSORS = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2)}


@pytest.mark.parametrize("payload", [
    TENSORS,
    {"state_dict": TENSORS, "epoch": 3},
    {"model": TENSORS, "optimizer": {}},
    {f"module.{k}": v for k, v in TENSORS.items()},
], ids=["bare", "state_dict", "model", "ddp-prefix"])
def test_load_state_dict_accepts_common_layouts(tmp_path, payload):
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    got = load_state_dict(path, "cpu")
    assert got.keys() == TENSORS.keys()
    assert all(torch.equal(got[k], TENSORS[k]) for k in TENSORS)


@pytest.mark.parametrize("content", [b"not a checkpoint", [torch.ones(1)], {}], ids=["garbage", "list", "empty"])
def test_load_state_dict_refuses_what_is_not_a_state_dict(tmp_path, content):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError, match="bad.pt"):
        load_state_dict(path, "cpu")
