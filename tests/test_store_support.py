"""Fixtures for the correction store tests: a store URL per backend.

PostgreSQL: ``$LABELASSIST_TEST_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``),
each test in a schema of its own, dropped afterwards. Where that server does not
answer, the PostgreSQL half of a test is skipped with the reason.
"""

from __future__ import annotations

import os
import uuid

import pytest

PG_URL = os.environ.get("LABELASSIST_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url():
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: pip install 'labelassist[postgres]'")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {PG_URL} does not answer: {str(exc).strip()}")
    schema = f"la_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return "sqlite://" + str(tmp_path / "corrections.sqlite3")
    return request.getfixturevalue("pg_url")
