"""Starting and stopping the real processes tests run: workers, servers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the process's group, SIGKILL it after ``timeout_s``; a group already gone is fine.

    The group, not the process: ``serve`` and Label Studio leave children of their own.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


WORKER_START_TIMEOUT_S = 180


@contextlib.contextmanager
def running_worker(redis_url: str, *args: str, env: dict[str, str] | None = None):
    """A real ``labelassist worker --models tiny-random`` process on ``redis_url``, ready when entered.

    Ready means it published its model version, so its models are loaded. On exit it
    is stopped (SIGTERM, then SIGKILL) and the Redis database is flushed.
    """
    from redis import Redis

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LABELASSIST_")}
    full_env.update(HF_HUB_OFFLINE="1", LABELASSIST_TORCH_THREADS="1", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "labelassist.backend.cli", "worker", "--redis-url", redis_url,
                             "--models", "tiny-random", *args], env=full_env, start_new_session=True)
    connection = Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not connection.get("labelassist:model_version"):
            assert proc.poll() is None, "the worker exited during start-up"
            assert time.monotonic() < deadline, "the worker did not publish its model version"
            time.sleep(0.3)
        yield proc
    finally:
        stop_process_group(proc)
        connection.flushdb()
