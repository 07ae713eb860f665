"""Bootstrap runs: selection, writes, retries, resume and cancel, on a real Redis and real RQ jobs.

Label Studio is an in-memory stand-in with the calls ``Bootstrap`` makes (the
real server is in tests/e2e/test_bootstrap.py). Jobs run through RQ's
``SimpleWorker`` in this process with ``labelassist.workers.jobs.predict`` and
a stand-in pipeline installed, so submission, job ids, results and failures
are RQ's own; only the models are replaced by a function of the image URL.
"""

from __future__ import annotations

import threading
import time

import pytest
from click.testing import CliRunner
from redis import Redis
from rq import Queue, SimpleWorker
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from labelassist.backend import bootstrap as bs
from labelassist.backend.bootstrap import Bootstrap, BootstrapError, RunStore, parse_task_filter, select_tasks
from labelassist.backend.queue import JobOptions, QueueClient
from labelassist.backend.service import Runtime
from labelassist.backend.settings import Settings
from labelassist.plugin.errors import LabelStudioAPIError
from labelassist.workers import jobs
from labelassist.workers.contract import MODEL_VERSION_KEY, QUEUE_BULK, JobFailure, PredictResult

VERSION = "labelassist-test-v2"
CONFIG = """<View><Image name="image" value="$image"/>
<PolygonLabels name="label" toName="image"><Label value="cat"/></PolygonLabels></View>"""


class FakePipeline:
    """Results by image URL: ``bad`` -> bad_image; ``flaky`` -> image_unavailable the first ``flaky_times`` runs."""

    version = VERSION

    def __init__(self, flaky_times: int = 1):
        self.flaky_times = flaky_times
        self.runs: dict[str, int] = {}

    def run(self, request, head=None):
        uri = request.image.uri
        self.runs[uri] = self.runs.get(uri, 0) + 1
        if "bad" in uri:
            return PredictResult(task_id=request.task_id, model_version=VERSION, error=JobFailure("bad_image", "image: not a decodable image"))
        if "flaky" in uri and self.runs[uri] <= self.flaky_times:
            return PredictResult(task_id=request.task_id, model_version=VERSION, error=JobFailure("image_unavailable", "HTTP 503"))
        return PredictResult(task_id=request.task_id, model_version=VERSION, size_wh=(10, 10), score=0.5)


class FakeLabelStudio:
    """The Label Studio calls a bootstrap makes, over in-memory tasks and predictions."""

    def __init__(self, images: list[str]):
        self.tasks = {i + 1: {"id": i + 1, "data": {"image": url}, "annotations": []} for i, url in enumerate(images)}
        self.predictions: list[dict] = []
        self.imports = 0
        self.deleted: list[int] = []
        self.reachable = True

    def add_prediction(self, task_id: int, version: str) -> None:
        self.predictions.append({"id": len(self.predictions) + 1000, "task": task_id, "model_version": version, "result": [], "score": 0.0})

    def of(self, task_id: int, version: str | None = None) -> list[dict]:
        return [p for p in self.predictions if p["task"] == task_id and (version is None or p["model_version"] == version)]

    def _check(self):
        if not self.reachable:
            raise LabelStudioAPIError("GET /api/projects/1/: cannot reach Label Studio at http://ls.test")

    def get_project(self, pid):
        self._check()
        return {"id": pid, "label_config": CONFIG}

    def list_ml_backends(self, pid):
        return [{"id": 1, "extra_params": {"scoring": {"label_threshold": 0.1}}}]

    def list_tasks(self, pid):
        self._check()
        for task in self.tasks.values():
            yield {**task, "predictions": [dict(p) for p in self.predictions if p["task"] == task["id"]]}

    def create_prediction(self, task_id, result, score, model_version):
        self.add_prediction(task_id, model_version)
        return {}

    def request(self, method, path, *, params=None, json=None, ok_statuses=()):
        self._check()
        if method == "GET" and path == "/api/predictions/":
            return [dict(p) for p in self.predictions if p["task"] == params["task"]]
        if method == "POST" and path.endswith("/import/predictions"):
            self.imports += 1
            for item in json:
                self.add_prediction(item["task"], item["model_version"])
            return {"created": len(json)}
        if method == "DELETE" and path.startswith("/api/predictions/"):
            pid = int(path.rstrip("/").rsplit("/", 1)[1])
            self.deleted.append(pid)
            self.predictions = [p for p in self.predictions if p["id"] != pid]
            return None
        raise AssertionError(f"unexpected call {method} {path}")


@pytest.fixture
def connection(redis_url):
    conn = Redis.from_url(redis_url)
    conn.set(MODEL_VERSION_KEY, VERSION)
    return conn


def runtime_for(connection) -> Runtime:
    settings = Settings(redis_url="redis://unused", ls_url="http://ls.test", ls_token="legacy-token-123",
                        allowed_image_hosts="img.test")
    return Runtime.build(settings, QueueClient(connection, JobOptions(60, 3600, 3600)))


def images(n: int, bad: tuple[int, ...] = (), flaky: tuple[int, ...] = ()) -> list[str]:
    return [f"http://img.test/{'bad' if i in bad else 'flaky' if i in flaky else 'ok'}{i}.png" for i in range(n)]


def run_with_worker(connection, run: Bootstrap, pipeline: FakePipeline, timeout_s: float = 30):
    """``run.run()`` in a thread while this thread works the bulk queue in bursts; returns its Summary."""
    jobs.install(pipeline)
    out: dict = {}

    def target():
        try:
            out["summary"] = run.run()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        SimpleWorker([Queue(QUEUE_BULK, connection=connection, serializer=JSONSerializer)], connection=connection,
                     serializer=JSONSerializer).work(burst=True, logging_level="WARNING")
        time.sleep(0.05)
    thread.join(5)
    assert not thread.is_alive(), "the bootstrap did not finish"
    if "error" in out:
        raise out["error"]
    return out["summary"]


class TokenIssuer:
    """The client seam of ``Runtime``: download headers as Label Studio hands them out, a fresh access token per call."""

    def __init__(self):
        self.issued = 0

    def auth_headers(self) -> dict[str, str]:
        self.issued += 1
        return {"Authorization": f"Bearer access-{self.issued}"}


class WindowProbe(FakePipeline):
    """A ``FakePipeline`` that records, as each job starts, the bulk jobs queued plus running (this one included)
    and how many download tokens had been issued; the first job waits until the run has filled its window."""

    def __init__(self, connection, tokens: TokenIssuer, window: int, flaky_times: int = 1):
        super().__init__(flaky_times)
        self.connection = connection
        self.tokens = tokens
        self.window = window
        self.outstanding: list[int] = []
        self.issued: list[int] = []

    def _queued_and_running(self) -> int:
        queue = Queue(QUEUE_BULK, connection=self.connection, serializer=JSONSerializer)
        pipe = self.connection.pipeline(transaction=True)  # one snapshot of both
        pipe.llen(queue.key)
        pipe.zcard(StartedJobRegistry(queue=queue).key)
        queued, running = pipe.execute()
        return queued + running

    def run(self, request, head=None):
        deadline = time.monotonic() + 10
        while not self.outstanding and self._queued_and_running() < self.window and time.monotonic() < deadline:
            time.sleep(0.01)
        self.outstanding.append(self._queued_and_running())
        self.issued.append(self.tokens.issued)
        return super().run(request, head)


def test_window_bounds_outstanding_jobs_and_resolves_each_task_as_it_enters(connection):
    n, window = 30, 4
    urls = [f"http://ls.test/data/upload/1/{'flaky' if i == 7 else 'ok'}{i}.png" for i in range(n)] + ["ftp://nowhere/x.png"]
    ls = FakeLabelStudio(urls)
    tokens = TokenIssuer()
    settings = Settings(redis_url="redis://unused", ls_url="http://ls.test", ls_token="legacy-token-123")
    runtime = Runtime.build(settings, QueueClient(connection, JobOptions(60, 3600, 3600)), client_factory=lambda url, token: tokens)
    pipeline = WindowProbe(connection, tokens, window)
    summary = run_with_worker(connection, Bootstrap(runtime, ls, 1, progress=False, batch_size=5, window=window, poll_s=0.02),
                              pipeline)
    assert (summary.status, summary.selected, summary.done, summary.failed, summary.retried) == ("finished", n + 1, n, 1, 1)
    assert summary.failures["31"]["code"] == "bad_image"
    assert all(len(ls.of(t, VERSION)) == (0 if t == 31 else 1) for t in ls.tasks)
    assert len(pipeline.outstanding) == n + 1  # every job, the retried one twice
    assert max(pipeline.outstanding) == window, pipeline.outstanding  # filled, never exceeded
    # Only the window's tasks had been resolved when the first job ran; in all, each task once and the retried one again.
    assert pipeline.issued[0] == window and tokens.issued == n + 1
    assert connection.scard(bs.RUN_JOBS_KEY.format(run_id=summary.run_id)) == n  # every job recorded, for cancel


@pytest.mark.parametrize("option, value, message", [
    ("--window", "0", "--window: expected 1 or more jobs, got 0"),
    ("--batch-size", "0", "--batch-size: expected 1 or more, got 0"),
    ("--max-retries", "-1", "--max-retries: expected 0 or more, got -1"),
])
def test_cli_bootstrap_rejects_bad_run_options(redis_url, option, value, message):
    from labelassist.backend.cli import cli

    out = CliRunner().invoke(cli, ["bootstrap", "--ls-url", "http://127.0.0.1:9", "--token", "legacy-token-123", "--project", "1",
                                   "--redis-url", redis_url, "--no-progress", option, value])
    assert out.exit_code == 1 and message in out.output, out.output


def test_filter_parses_ids_and_ranges():
    assert parse_task_filter(None) is None
    assert parse_task_filter("1, 4,10-12") == {1, 4, 10, 11, 12}
    with pytest.raises(BootstrapError):
        parse_task_filter("3-1")
    with pytest.raises(BootstrapError):
        parse_task_filter("a")


def test_selection_skips_tasks_with_the_current_version_only():
    tasks = [{"id": 1, "predictions": [{"model_version": VERSION}]},
             {"id": 2, "predictions": [{"model_version": "old"}]},
             {"id": 3, "predictions": [], "annotations": [{"id": 9}]},
             {"id": 4}]
    selected, skipped = select_tasks(tasks, VERSION)
    assert [t["id"] for t in selected] == [2, 3, 4] and skipped == 1
    selected, skipped = select_tasks(tasks, VERSION, {1, 3})
    assert [t["id"] for t in selected] == [3] and skipped == 1


def test_run_writes_one_prediction_per_good_task_records_failures_and_retries(connection):
    ls = FakeLabelStudio(images(12, bad=(3,), flaky=(5,)) + ["ftp://nowhere/x.png"])
    ls.add_prediction(1, VERSION)  # already done: skipped
    ls.add_prediction(2, "old-version")  # kept without --replace
    pipeline = FakePipeline(flaky_times=1)
    summary = run_with_worker(connection, Bootstrap(runtime_for(connection), ls, 1, progress=False, batch_size=4, poll_s=0.05), pipeline)
    assert summary.status == "finished"
    assert (summary.selected, summary.skipped, summary.done, summary.failed, summary.retried) == (12, 1, 10, 2, 1)
    assert summary.failures["4"]["code"] == "bad_image"  # task 4 has image 3
    assert summary.failures["13"]["code"] == "bad_image" and "ftp" in summary.failures["13"]["message"]
    for task_id in ls.tasks:
        want = 0 if task_id in (4, 13) else 1
        assert len(ls.of(task_id, VERSION)) == want, task_id
    assert len(ls.of(2, "old-version")) == 1
    assert ls.imports >= 3  # batches, not one call per task
    assert pipeline.runs["http://img.test/flaky5.png"] == 2
    run = RunStore(connection).get(summary.run_id)
    assert run["status"] == "finished" and run["done"] == 10 and run["failed"] == 2 and run["project"] == 1
    assert run["failures"] == summary.failures and run["finished_at"] >= run["started_at"]


class HeadRecordingPipeline(FakePipeline):
    """Records the concept head each job was run with."""

    def __init__(self):
        super().__init__()
        self.heads: list[str | None] = []

    def run(self, request, head=None):
        self.heads.append(head.id if head is not None else None)
        return super().run(request, head)


def test_a_project_with_a_trained_head_is_bootstrapped_under_its_version(connection):
    import numpy as np

    from labelassist.workers.heads import ConceptHead, HeadStore, versioned

    head = ConceptHead(project=1, base_version=VERSION, labels=("cat",), weights=np.zeros((2, 4), np.float32),
                       bias=np.zeros(2, np.float32))
    store = HeadStore(connection)
    store.put(head)
    store.activate(1, head.id)
    ls = FakeLabelStudio(images(3))
    ls.add_prediction(1, VERSION)  # a zero-shot prediction: the head's version still lacks it
    pipeline = HeadRecordingPipeline()
    summary = run_with_worker(connection, Bootstrap(runtime_for(connection), ls, 1, progress=False, poll_s=0.05), pipeline)
    version = versioned(VERSION, head.id)
    assert summary.model_version == version and (summary.selected, summary.done) == (3, 3)
    assert pipeline.heads == [head.id] * 3
    assert all(len(ls.of(t, version)) == 1 for t in ls.tasks)


def test_transient_failures_end_after_max_retries(connection):
    ls = FakeLabelStudio(images(3, flaky=(1,)))
    pipeline = FakePipeline(flaky_times=99)
    summary = run_with_worker(connection, Bootstrap(runtime_for(connection), ls, 1, progress=False, max_retries=2, poll_s=0.05), pipeline)
    assert summary.failures == {"2": {"code": "image_unavailable", "message": "HTTP 503"}}
    assert pipeline.runs["http://img.test/flaky1.png"] == 3 and summary.retried == 2 and summary.done == 2


def test_rerun_after_an_interrupted_run_predicts_and_writes_nothing_twice(connection):
    ls = FakeLabelStudio(images(10))
    pipeline = FakePipeline()
    first = run_with_worker(connection, Bootstrap(runtime_for(connection), ls, 1, progress=False, limit=4, poll_s=0.05), pipeline)
    assert first.done == 4 and sum(len(ls.of(t, VERSION)) for t in ls.tasks) == 4
    # A run killed after its jobs finished but before it wrote them: the jobs are in Redis, nothing in Label Studio.
    queue = QueueClient(connection, JobOptions(60, 3600, 3600))
    run = Bootstrap(runtime_for(connection), ls, 1, progress=False, poll_s=0.05)
    model = bs.LabelassistModel(1, CONFIG, run.runtime)
    selected, _ = select_tasks(ls.list_tasks(1), VERSION)
    for request in model.task_requests(selected[:3], VERSION, bs.project_link(run.runtime, ls, 1)):
        queue.submit(request, queue=QUEUE_BULK)
    SimpleWorker([Queue(QUEUE_BULK, connection=connection, serializer=JSONSerializer)], connection=connection,
                 serializer=JSONSerializer).work(burst=True, logging_level="WARNING")
    assert sum(pipeline.runs.values()) == 7
    second = run_with_worker(connection, run, pipeline)
    assert (second.selected, second.skipped, second.done, second.failed) == (6, 4, 6, 0)
    assert sum(pipeline.runs.values()) == 10  # the 3 finished jobs were reused, not run again
    assert all(len(ls.of(t, VERSION)) == 1 for t in ls.tasks)
    third = run_with_worker(connection, Bootstrap(runtime_for(connection), ls, 1, progress=False, poll_s=0.05), pipeline)
    assert (third.selected, third.skipped, third.done) == (0, 10, 0)


def test_a_prediction_written_meanwhile_is_not_written_again(connection):
    ls = FakeLabelStudio(images(3))
    run = Bootstrap(runtime_for(connection), ls, 1, progress=False, poll_s=0.05)
    original = ls.list_tasks

    def list_then_web_tier_writes(pid):
        tasks = list(original(pid))
        ls.add_prediction(2, VERSION)  # the web tier's follow-up, between listing and writing
        return iter(tasks)

    ls.list_tasks = list_then_web_tier_writes
    summary = run_with_worker(connection, run, FakePipeline())
    assert summary.done == 3 and all(len(ls.of(t, VERSION)) == 1 for t in ls.tasks)


def test_replace_deletes_other_versions_of_selected_tasks_only(connection):
    ls = FakeLabelStudio(images(3))
    ls.add_prediction(1, "old")
    ls.add_prediction(2, "old")
    ls.add_prediction(2, VERSION)  # not selected: its old prediction stays
    summary = run_with_worker(connection, Bootstrap(runtime_for(connection), ls, 1, progress=False, replace=True, poll_s=0.05), FakePipeline())
    assert summary.replaced == 1 and summary.done == 2
    assert ls.of(1, "old") == [] and len(ls.of(2, "old")) == 1
    assert all(len(ls.of(t, VERSION)) == 1 for t in ls.tasks)


def test_cancel_marks_the_run_and_cancels_its_queued_jobs(connection):
    ls = FakeLabelStudio(images(6))
    run = Bootstrap(runtime_for(connection), ls, 1, progress=False, poll_s=0.05)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("summary", run.run()))
    thread.start()  # no worker: every job stays queued
    deadline = time.monotonic() + 10
    while (run.run_id is None or connection.scard(bs.RUN_JOBS_KEY.format(run_id=run.run_id)) < 6) and time.monotonic() < deadline:
        time.sleep(0.02)
    store = RunStore(connection)
    assert store.get(run.run_id)["status"] == "running"
    assert store.cancel(run.run_id) == 6
    thread.join(10)
    assert not thread.is_alive()
    assert out["summary"].status == "cancelled" and out["summary"].done == 0 and out["summary"].failed == 0
    assert store.get(run.run_id)["status"] == "cancelled"
    assert Queue(QUEUE_BULK, connection=connection, serializer=JSONSerializer).count == 0
    assert store.cancel("no-such-run") is None
    # A new run submits the cancelled jobs again and finishes them.
    summary = run_with_worker(connection, Bootstrap(runtime_for(connection), ls, 1, progress=False, poll_s=0.05), FakePipeline())
    assert summary.done == 6 and all(len(ls.of(t, VERSION)) == 1 for t in ls.tasks)


def test_run_cannot_proceed_without_workers_or_label_studio(connection):
    connection.delete(MODEL_VERSION_KEY)
    ls = FakeLabelStudio(images(2))
    with pytest.raises(BootstrapError, match="no worker has published"):
        Bootstrap(runtime_for(connection), ls, 1, progress=False).run()
    connection.set(MODEL_VERSION_KEY, VERSION)
    ls.reachable = False
    with pytest.raises(BootstrapError, match="cannot reach Label Studio"):
        Bootstrap(runtime_for(connection), ls, 1, progress=False).run()


def test_runs_are_listed_by_status_and_a_dead_run_shows_stopped(connection):
    from labelassist.backend.status import collect_status, format_status

    store = RunStore(connection)
    run_id = store.create(7, VERSION)
    connection.hset(bs.RUN_KEY.format(run_id=run_id), mapping={"selected": 10, "done": 3, "failed": 1})
    status = collect_status(connection)
    assert [r["run_id"] for r in status["runs"]] == [run_id]
    text = format_status(status)
    assert run_id in text and "running" in text and "4/10 40%" in text
    connection.hset(bs.RUN_KEY.format(run_id=run_id), "updated_at", time.time() - bs.STALE_RUN_S - 1)
    assert store.get(run_id)["status"] == "stopped"


def test_cli_bootstrap_exits_non_zero_when_it_cannot_proceed_and_cancel_names_unknown_runs(redis_url):
    from labelassist.backend.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["bootstrap", "--ls-url", "http://127.0.0.1:9", "--token", "legacy-token-123", "--project", "1",
                              "--redis-url", redis_url, "--no-progress"])
    assert out.exit_code == 1 and "no worker has published" in out.output, out.output
    Redis.from_url(redis_url).set(MODEL_VERSION_KEY, VERSION)
    out = runner.invoke(cli, ["bootstrap", "--ls-url", "http://127.0.0.1:9", "--token", "legacy-token-123", "--project", "1",
                              "--redis-url", redis_url, "--no-progress"])
    assert out.exit_code == 1 and "cannot reach Label Studio" in out.output, out.output
    out = runner.invoke(cli, ["cancel", "nope", "--redis-url", redis_url])
    assert out.exit_code == 1 and "no bootstrap run 'nope'" in out.output
