"""The correction store on SQLite and PostgreSQL: schema migrations, raw events,
idempotent corrections, filters, stats, and crash safety under SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from labelassist.backend import store as st
from labelassist.plugin.corrections import AnnotationCorrection, RegionCorrection, RegionExtras
from test_store_support import pg_url, store_url  # noqa: F401  (fixtures)


def region(kind, pid="p1", fid="f1", lfrom="cat", lto="cat", iou=1.0, rtype="polygonlabels", **kw):
    if kind == "deleted":
        fid, lto, iou = None, None, None
    if kind == "added":
        pid, lfrom, iou = None, None, None
    match = kw.pop("match", "id" if kind not in ("deleted", "added") else None)
    return RegionCorrection(kind=kind, region_type=rtype, pred_region_id=pid, final_region_id=fid, label_from=lfrom,
                            label_to=lto, iou=iou, match=match, size_wh=(20, 10), **kw)


def annotation(aid=17, updated="2025-05-02T10:00:00.000000Z", project=3, version="v1", regions=None, **kw):
    regions = regions if regions is not None else (
        region("accepted", pred_score=0.9, pred_embedding=(0.5, -0.25), pred_value={"points": [[10, 20], [30, 20], [30, 60]], "polygonlabels": ["cat"]},
               final_value={"points": [[10, 20], [30, 20], [30, 60]], "polygonlabels": ["cat"]}, origin="prediction"),
        region("deleted", pid="p2", lfrom="dog", pred_score=0.3),
        region("added", fid="m1", lto="cat", rtype="brushlabels", origin="manual", pixels_added=12),
    )
    return AnnotationCorrection(annotation_id=aid, task_id=kw.pop("task_id", 7), updated_at=updated, project=project,
                                lead_time=kw.pop("lead_time", 12.5), prediction_id=41, model_version=version,
                                completed_by=1, image="/data/upload/3/a.png", image_sha256="ab" * 32, regions=tuple(regions), **kw)


@pytest.fixture
def store(store_url, tmp_path):
    s = st.open_store(store_url, tmp_path / "unused.sqlite3")
    yield s
    s.close()


def test_open_creates_the_schema_and_reopening_changes_nothing(store_url, tmp_path):
    with st.open_store(store_url, tmp_path / "x") as s:
        assert s.schema_version() == st.SCHEMA_VERSION
    with st.open_store(store_url, tmp_path / "x") as s:
        assert s.migrate() == st.SCHEMA_VERSION


def test_migrations_apply_in_order_to_an_older_store(store_url, tmp_path):
    with st.open_store(store_url, tmp_path / "x", migrate_to=1) as s:
        assert s.schema_version() == 1
        eid = s.append_event(b'{"action": "PING"}')
    with st.open_store(store_url, tmp_path / "x") as s:
        assert s.schema_version() == st.SCHEMA_VERSION
        assert s.event(eid).body == b'{"action": "PING"}'
        assert s.add_correction(annotation())


def test_default_is_sqlite_in_wal_mode_at_the_default_path(tmp_path):
    path = tmp_path / "data" / "corrections.sqlite3"
    with st.open_store(None, path) as s:
        assert isinstance(s, st.SQLiteCorrectionStore) and path.exists()
        s.append_event(b"{}")
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest.mark.parametrize("url,fragment", [
    ("mysql://root@localhost/db", "expected postgresql://"),
    ("postgresql://nobody@127.0.0.1:1/none", "cannot open the PostgreSQL correction store"),
])
def test_bad_store_urls_fail_clearly(url, fragment, tmp_path):
    if url.startswith("postgresql"):
        pytest.importorskip("psycopg", reason="psycopg 3 is not installed")
    with pytest.raises(st.StoreError, match=fragment):
        st.open_store(url, tmp_path / "x")


def test_events_are_kept_verbatim_with_their_status(store):
    raw = b'{"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}'
    bad = b'\xff\xfe not json'
    e1 = store.append_event(raw, 1_700_000_000.0, action="ANNOTATION_CREATED")
    e2 = store.append_event(bad, status=st.EVENT_MALFORMED, error="body is not JSON")
    assert e2 > e1
    assert [e.id for e in store.pending_events()] == [e1]
    got = store.event(e2)
    assert (got.body, got.status, got.error, got.action) == (bad, "malformed", "body is not JSON", None)
    assert store.event(e1).received_at.startswith("2023-11-14T22:13:20")
    store.mark_event(e1, st.EVENT_DONE)
    assert store.pending_events() == []
    assert (store.event(e1).status, store.event(e1).attempts) == ("done", 1)
    with pytest.raises(st.StoreError, match="no such event"):
        store.mark_event(10_000, st.EVENT_DONE)
    with pytest.raises(ValueError, match="event status"):
        store.mark_event(e1, "finished")


def test_same_annotation_version_is_stored_once(store):
    assert store.add_correction(annotation()) is True
    assert store.add_correction(annotation()) is False
    assert [c.annotation_id for c in store.corrections()] == [17]


def test_corrections_round_trip(store):
    rec = annotation()
    store.add_correction(rec, event_id=5)
    [got] = list(store.corrections())
    assert got == rec


def test_latest_version_wins_unless_all_are_asked_for(store):
    v2 = annotation(updated="2025-05-02T11:00:00.000000Z", regions=[region("edited", iou=0.8, geometry_changed=True)])
    v1 = annotation(updated="2025-05-02T10:00:00.000000Z")
    assert store.add_correction(v2) and store.add_correction(v1)  # arrive out of order
    assert [c.updated_at for c in store.corrections()] == [v2.updated_at]
    assert sorted(c.updated_at for c in store.corrections(latest_only=False)) == [v1.updated_at, v2.updated_at]


# (filter kwargs, expected annotation ids)
FILTERS = [
    ({}, [1, 2, 3]),
    ({"project": 3}, [1, 2]),
    ({"project": 4}, [3]),
    ({"model_version": "v2"}, [2, 3]),
    ({"project": 3, "model_version": "v2"}, [2]),
    ({"project": 99}, []),
]


@pytest.mark.parametrize("kwargs,expected", FILTERS)
def test_corrections_filter(store, kwargs, expected):
    store.add_correction(annotation(1, project=3, version="v1"))
    store.add_correction(annotation(2, project=3, version="v2"))
    store.add_correction(annotation(3, project=4, version="v2"))
    assert [c.annotation_id for c in store.corrections(**kwargs)] == expected


def test_deleted_annotations_are_hidden_but_kept(store):
    store.add_correction(annotation(1))
    store.add_correction(annotation(2))
    assert store.delete_annotations([1, 1, 42]) == 2
    assert [c.annotation_id for c in store.corrections()] == [2]
    assert [c.annotation_id for c in store.corrections(include_deleted=True)] == [1, 2]


def test_annotation_with_no_regions(store):
    store.add_correction(annotation(5, regions=[]))
    [got] = list(store.corrections())
    assert got.regions == ()


def test_region_extras_side_table(store):
    assert store.put_region_extras("v1", {"r1": RegionExtras(0.75, (0.5, 0.25)), "r2": RegionExtras(None, ())}, task_id=7) == 2
    assert store.put_region_extras("v2", {"r1": RegionExtras(0.1, (1.0,))}) == 0  # first write wins
    got = store.region_extras(["r1", "r2", "r3"])
    assert got == {"r1": RegionExtras(0.75, (0.5, 0.25)), "r2": RegionExtras(None, ())}


def test_stats(store):
    store.add_correction(annotation(1, version="v1", lead_time=10.0, regions=[
        region("accepted"), region("accepted", pid="p2", fid="f2"), region("deleted", pid="p3"),
        region("relabeled", pid="p4", fid="f4", lfrom="cat", lto="dog"),
    ]))
    store.add_correction(annotation(2, version="v1", lead_time=20.0, regions=[
        region("edited", iou=0.5, geometry_changed=True), region("added", fid="m1", lto="dog"),
        region("relabeled", pid="p5", fid="f5", lfrom="cat", lto="dog", iou=0.7, geometry_changed=True),
    ]))
    store.add_correction(annotation(3, version="v2", project=3, regions=[region("accepted")]))
    store.add_correction(annotation(4, version="v1", project=4, regions=[region("deleted")]))  # other project
    s = store.stats(project=3)
    v1 = s.versions["v1"]
    assert (v1.annotations, v1.predicted_regions, v1.accepted, v1.edited, v1.relabeled, v1.deleted, v1.added) == (2, 6, 2, 1, 2, 1, 1)
    assert v1.acceptance_rate == pytest.approx(2 / 6)
    assert v1.kept_rate == pytest.approx(5 / 6)
    assert v1.edits_per_task == pytest.approx(5 / 2)
    assert v1.mean_iou_changed == pytest.approx(0.6)
    assert v1.mean_lead_time_s == pytest.approx(15.0)
    assert s.versions["v2"].acceptance_rate == 1.0
    assert s.total.annotations == 3
    assert s.relabel_confusion == {("cat", "dog"): 2}
    assert s.by_label["cat"]["accepted"] == 3 and s.by_label["dog"]["added"] == 1
    table = st.format_stats_table(s)
    assert "v1" in table and "33.3%" in table and "cat -> dog: 2" in table
    assert s.to_json()["relabel_confusion"] == [{"from": "cat", "to": "dog", "count": 2}]


def test_concurrent_writers_lose_nothing(store):
    ids: list[int] = []
    lock = threading.Lock()

    def work(k):
        for i in range(20):
            eid = store.append_event(f'{{"n": {k * 100 + i}}}'.encode())
            store.add_correction(annotation(k * 100 + i))
            with lock:
                ids.append(eid)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 80
    assert len(store.events()) == 80
    assert len(list(store.corrections())) == 80


CRASH_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from labelassist.backend.store import open_store
    from labelassist.plugin.corrections import AnnotationCorrection, RegionCorrection

    store = open_store(sys.argv[1], Path("unused"))
    i = 0
    while True:
        regions = tuple(RegionCorrection(kind="deleted", region_type="polygonlabels", pred_region_id=f"p{i}-{k}",
                                         final_region_id=None, label_from="cat", label_to=None, iou=None,
                                         pred_embedding=tuple(float(k) for _ in range(512)))
                        for k in range(REGIONS))
        store.append_event(b"x" * 2000)
        store.add_correction(AnnotationCorrection(annotation_id=i, task_id=i, updated_at="t", regions=regions))
        print(i, flush=True)
        i += 1
""")
CRASH_REGIONS = 5


def test_sigkill_mid_write_leaves_whole_records_only(store_url, tmp_path):
    code = CRASH_WRITER.replace("REGIONS", str(CRASH_REGIONS))
    proc = subprocess.Popen([sys.executable, "-c", code, store_url], stdout=subprocess.PIPE, text=True)
    printed = []
    deadline = time.monotonic() + 60
    try:
        while len(printed) < 30 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(int(line))
        time.sleep(0.05)  # let it get into the middle of further writes
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert len(printed) >= 30, f"the writer printed {len(printed)} records before the deadline"
    with st.open_store(store_url, tmp_path / "unused") as s:
        got = list(s.corrections())
        ids = [c.annotation_id for c in got]
        # every acknowledged record is there once; at most the records after it, whole
        assert ids == list(range(len(ids))) and len(ids) >= len(printed)
        assert all(len(c.regions) == CRASH_REGIONS and len(c.regions[0].pred_embedding) == 512 for c in got)
        assert len(s.events()) >= len(printed)
    if store_url.startswith("sqlite://"):
        conn = sqlite3.connect(Path(store_url[len("sqlite://"):]))
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
