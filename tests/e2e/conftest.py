"""A real Label Studio 1.23.2 for end-to-end tests, in its own virtualenv.

Label Studio pins rq and redis versions labelassist cannot share, so it lives in
``~/.cache/labelassist-test/ls-<version>`` (``$LABELASSIST_TEST_CACHE``
overrides the parent directory; keyed by Label Studio's and Python's versions),
installed once with ``uv`` (``pip`` when uv is
missing). Its first start runs ~400 migrations; the migrated data directory is
kept beside the venv as a template and copied for every session, so later
sessions start in seconds.

Settings are the ones DESIGN.md section 3 lists for a backend on loopback:
``ML_BLOCK_LOCAL_IP=false``, ``SSRF_PROTECTION_ENABLED=false``, legacy tokens
on, offline, and local-files serving under a per-session document root.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from processes import stop_process_group

LS_VERSION = "1.23.2"
LS_USER = "e2e@example.com"
LS_PASSWORD = "e2e-password-123"
LS_TOKEN = "e2e0legacy0token0123456"  # legacy API key; Label Studio wants more than 5 characters
INSTALL_TIMEOUT_S = 900
START_TIMEOUT_S = 300  # the first start migrates the database (~1 min here, more on a loaded machine)


def cache_root() -> Path:
    return Path(os.environ.get("LABELASSIST_TEST_CACHE") or Path.home() / ".cache" / "labelassist-test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ls_env(data_dir: Path, files_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABELASSIST_", "DJANGO_", "LABEL_STUDIO_"))}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        LOCAL_FILES_SERVING_ENABLED="true",
        LOCAL_FILES_DOCUMENT_ROOT=str(files_root),
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        SECRET_KEY="labelassist-e2e-not-secret",
        PYTHONUNBUFFERED="1",
    )
    return env


def cache_key() -> str:
    return f"ls-{LS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"


def ensure_venv(root: Path) -> Path:
    """The Label Studio venv, installed once; concurrent sessions wait on a lock."""
    venv = root / cache_key()
    marker = venv / ".labelassist-complete"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{cache_key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        uv = shutil.which("uv") or (shutil.which("uv", path=str(Path(sys.executable).parent)))
        if uv:
            subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True, timeout=INSTALL_TIMEOUT_S)
            subprocess.run([uv, "pip", "install", "-q", f"label-studio=={LS_VERSION}"], check=True, timeout=INSTALL_TIMEOUT_S,
                           env={**os.environ, "VIRTUAL_ENV": str(venv)})
        else:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT_S)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"label-studio=={LS_VERSION}"],
                           check=True, timeout=INSTALL_TIMEOUT_S)
        marker.touch()
    return venv


@dataclass
class LabelStudio:
    url: str
    token: str
    files_root: Path
    process: subprocess.Popen
    log_path: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return requests.request(method, self.url + path, headers=self.headers(), **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_label_studio(venv: Path, data_dir: Path, files_root: Path, log_path: Path) -> LabelStudio:
    port = free_port()
    cmd = [str(venv / "bin" / "python"), "-m", "label_studio.server", "start", "--no-browser",
           "--internal-host", "127.0.0.1", "--port", str(port), "--username", LS_USER, "--password", LS_PASSWORD,
           "--user-token", LS_TOKEN, "--enable-legacy-api-token"]
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, env=ls_env(data_dir, files_root), stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(data_dir), start_new_session=True)
    ls = LabelStudio(f"http://127.0.0.1:{port}", LS_TOKEN, files_root, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {proc.returncode}:\n{ls.log_tail()}")
        try:
            if requests.get(ls.url + "/health", timeout=2).status_code == 200:
                if ls.api("GET", "/api/projects/", timeout=10).status_code == 200:
                    return ls
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_process_group(proc, 20)
            raise RuntimeError(f"Label Studio did not answer within {START_TIMEOUT_S} s:\n{ls.log_tail()}")
        time.sleep(1)


def ensure_template(venv: Path, root: Path, tmp: Path) -> Path:
    """A migrated data directory with the test user, made by one first start."""
    template = root / f"{cache_key()}-data"
    marker = template / ".labelassist-complete"
    with open(root / f"{cache_key()}-data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return template
        shutil.rmtree(template, ignore_errors=True)
        template.mkdir(parents=True)
        files = tmp / "template-files"
        files.mkdir()
        ls = start_label_studio(venv, template, files, tmp / "label-studio-first-start.log")
        stop_process_group(ls.process, 20)
        marker.touch()
    return template


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudio:
    root = cache_root()
    tmp = tmp_path_factory.mktemp("label-studio")
    venv = ensure_venv(root)
    template = ensure_template(venv, root, tmp)
    data_dir = tmp / "data"
    shutil.copytree(template, data_dir, ignore=shutil.ignore_patterns(".labelassist-complete"))
    files_root = tmp / "files"
    files_root.mkdir()
    ls = start_label_studio(venv, data_dir, files_root, tmp / "label-studio.log")
    yield ls
    stop_process_group(ls.process, 20)
