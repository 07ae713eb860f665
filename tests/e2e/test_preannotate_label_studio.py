"""End to end: tasks imported into Label Studio 1.23.2 are pre-annotated on its TASKS_CREATED webhook.

``labelassist serve --preannotate-new-tasks`` (private Redis, one tiny-random
worker) is connected to an empty project with ``labelassist connect``, which
points the project's webhook at it. Tasks are then imported in two batches
(two events); nobody opens them or asks for predictions, yet each ends with
exactly one prediction of the backend's version, written by the follow-up.
"""

from __future__ import annotations

import time

import pytest
from processes import stop_process_group
from test_label_studio import CONFIG, assert_one_polygon_prediction_each, connect, png, start_serve, wait_for_predictions

pytestmark = pytest.mark.e2e

FIRST_IMPORT = 6
SECOND_IMPORT = 2
EVENTS_TIMEOUT_S = 60


def import_uploads(ls, pid: int, names: list[str]) -> None:
    files = [(f"file{i}", (f"{name}.png", png((48, 40), i), "image/png")) for i, name in enumerate(names)]
    r = ls.api("POST", f"/api/projects/{pid}/import", files=files)
    assert r.status_code == 201, r.text


def test_imported_tasks_get_one_prediction_each_without_being_opened(label_studio, tmp_path):
    from labelassist.backend.store import DEFAULT_DB_FILENAME, EVENT_DONE, EVENT_PENDING, open_store

    ls = label_studio
    r = ls.api("POST", "/api/projects/", json={"title": "labelassist pre-annotate on import", "label_config": CONFIG})
    assert r.status_code == 201, r.text
    project = {"id": r.json()["id"], "task_ids": []}
    log_path = tmp_path / "serve.log"
    proc, url, health = start_serve(["--models", "tiny-random", "--cache-dir", str(tmp_path / "cache"), "--data-dir",
                                     str(tmp_path / "data"), "--preannotate-new-tasks"], log_path)
    try:
        connect(ls, project, url)
        import_uploads(ls, project["id"], [f"first{i}" for i in range(FIRST_IMPORT)])
        import_uploads(ls, project["id"], [f"second{i}" for i in range(SECOND_IMPORT)])
        tasks = ls.api("GET", "/api/tasks/", params={"project": project["id"], "fields": "all"}).json()["tasks"]
        project["task_ids"] = sorted(t["id"] for t in tasks)
        assert len(project["task_ids"]) == FIRST_IMPORT + SECOND_IMPORT

        by_task = wait_for_predictions(ls, project)
        assert_one_polygon_prediction_each(by_task, health["model_version"], log_path)

        # Both events were stored and handled, and every task went through the follow-up once.
        store = open_store(None, tmp_path / "data" / DEFAULT_DB_FILENAME)
        try:
            deadline = time.monotonic() + EVENTS_TIMEOUT_S
            while True:
                events = store.events(action="TASKS_CREATED")
                if all(e.status != EVENT_PENDING for e in events) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert [e.status for e in events] == [EVENT_DONE, EVENT_DONE], [(e.status, e.error) for e in events]
        finally:
            store.close()
        # The follow-up logs a write just after Label Studio took it: wait for the last line, then look again.
        deadline = time.monotonic() + EVENTS_TIMEOUT_S
        while True:
            text = log_path.read_text()
            wrote = [line for line in text.splitlines()
                     if "follow-up: wrote the prediction" in line and f"(project {project['id']})" in line]
            if len(wrote) >= len(project["task_ids"]) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(wrote) == len(project["task_ids"]), wrote
        assert_one_polygon_prediction_each(wait_for_predictions(ls, project, timeout_s=0), health["model_version"], log_path)
        assert f"project {project['id']}: {FIRST_IMPORT} new tasks submitted for pre-annotation" in text
    finally:
        stop_process_group(proc)
