"""Concept heads: fitting, their store in Redis, how scoring applies them, and the whole loop
(corrections -> START_TRAINING -> train job on a real worker -> new version -> restore)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from redis import Redis

from labelassist.backend.events import CorrectionProcessor, EventSink
from labelassist.backend.hooks import event_hooks
from labelassist.backend.queue import JobOptions, QueueClient
from labelassist.backend.service import LabelassistModel, ProjectLink, Runtime
from labelassist.backend.settings import Settings
from labelassist.backend.store import SQLiteCorrectionStore
from labelassist.backend.training import collect_examples, start_training, wait_training
from labelassist.plugin.corrections import AnnotationCorrection, RegionCorrection
from labelassist.workers.contract import Concept, PredictRequest
from labelassist.workers.errors import ContractError, TrainingError
from labelassist.workers.heads import BACKGROUND_TARGET, ConceptHead, HeadError, HeadStore, split_version, versioned
from labelassist.workers.training import TrainingOptions, calibrate_threshold, train

from processes import running_worker
from test_app_integration import CONFIG, PROPOSALS, SCORING, write_png

CONCEPTS = (Concept("cat"), Concept("dog"), Concept("bird"))


def clustered(n_per_class: int = 30, dim: int = 32, seed: int = 0):
    """Embeddings in one cluster per label plus one for background, and a zero-shot classifier that knows nothing."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CONCEPTS) + 1, dim))
    x, y = [], []
    for c, centre in enumerate(centres):
        x.append(centre + 0.7 * rng.normal(size=(n_per_class, dim)))
        y += [c if c < len(CONCEPTS) else BACKGROUND_TARGET] * n_per_class
    x = np.concatenate(x).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    text = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(len(CONCEPTS) + 1, dim)), dtype=torch.float32), dim=-1)
    return x, np.array(y), 14.0 * text, torch.zeros(len(CONCEPTS) + 1)


def test_training_learns_the_labels_that_zero_shot_misses():
    x, y, text_w, text_b = clustered()
    head = train(x, y, [c.name for c in CONCEPTS], CONCEPTS, text_w, text_b, project=7, base_version="la-base")
    report = head.report
    assert report["label_accuracy_zero_shot"] < 0.5
    assert report["label_accuracy_out_of_fold"] > 0.95
    assert report["examples"] == 120 and report["background_examples"] == 30 and report["folds"] == 5
    assert set(head.thresholds) == {"cat", "dog", "bird"}
    assert all(0.05 <= t <= 0.95 for t in head.thresholds.values())
    assert head.version == f"la-base+{head.id}" and split_version(head.version) == ("la-base", head.id)
    # The fitted head classifies the training clusters.
    logits = x @ head.weights.T + head.bias
    decided = np.where(logits.argmax(1) == 3, BACKGROUND_TARGET, logits.argmax(1))
    assert (decided == y).mean() > 0.95


def test_examples_of_labels_the_config_no_longer_has_are_ignored_and_named():
    x, y, text_w, text_b = clustered()
    labels = ["cat", "dog", "zebra"]  # "zebra" was removed from the config since
    head = train(x, y, labels, CONCEPTS, text_w, text_b, project=7, base_version="b")
    assert head.report["ignored_labels"] == ["zebra"]
    assert head.report["examples"] == 90
    assert head.report["labels"]["bird"]["examples"] == 0 and "bird" not in head.thresholds


def test_training_refuses_examples_from_other_models_and_bad_options():
    x, y, text_w, text_b = clustered(dim=32)
    with pytest.raises(TrainingError, match="other models"):
        train(x[:, :16], y, ["cat", "dog", "bird"], CONCEPTS, text_w, text_b, project=1, base_version="b")
    with pytest.raises(ContractError, match="target_precision"):
        TrainingOptions(target_precision=1.5)
    with pytest.raises(ContractError, match="unknown field"):
        TrainingOptions.from_json({"learning_rate": 1})


def test_threshold_is_the_lowest_probability_that_keeps_the_target_precision():
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    right = np.array([1, 1, 1, 1, 0, 0], bool)
    assert calibrate_threshold(p, right, 0.9) == pytest.approx(0.6)
    assert calibrate_threshold(p, right, 0.6) == pytest.approx(0.4)
    # Never reached: the best precision's cut.
    assert calibrate_threshold(np.array([0.9, 0.8]), np.array([0, 1], bool), 0.9) == pytest.approx(0.8)


def test_head_json_round_trip_keeps_its_id_and_rejects_tampering():
    x, y, text_w, text_b = clustered()
    head = train(x, y, ["cat", "dog", "bird"], CONCEPTS, text_w, text_b, project=3, base_version="b")
    again = ConceptHead.from_json(head.to_json())
    assert again.id == head.id and np.array_equal(again.weights, head.weights) and again.thresholds == head.thresholds
    broken = head.to_json() | {"dim": 5}
    with pytest.raises(HeadError, match="cannot be decoded"):
        ConceptHead.from_json(broken)


def _head(project: int, seed: int, base: str = "base") -> ConceptHead:
    rng = np.random.default_rng(seed)
    return ConceptHead(project=project, base_version=base, labels=("cat", "dog"), weights=rng.normal(size=(3, 8)).astype(np.float32),
                       bias=np.zeros(3, np.float32))


def test_head_store_activates_restores_and_guards_projects(redis_url):
    store = HeadStore(Redis.from_url(redis_url))
    first, second, other = _head(1, 0), _head(1, 1), _head(2, 2)
    for h in (first, second, other):
        store.put(h)
    store.put(first)  # idempotent
    assert [h.id for h in store.heads(1)] == [first.id, second.id]
    assert store.active(1) is None
    with pytest.raises(HeadError, match="no earlier"):
        store.restore(1)
    assert store.activate(1, first.id) is None
    assert store.activate(1, second.id) == first.id
    assert store.active(1) == (second.id, "base")
    assert store.restore(1) == first.id
    assert store.restore(1) is None  # zero-shot again
    assert store.active(1) is None
    with pytest.raises(HeadError, match="project 2, not 1"):
        store.activate(1, other.id)
    with pytest.raises(HeadError, match="not in this Redis"):
        store.get("h0123456789ab")
    with pytest.raises(ContractError):
        store.get("../etc")


def test_scoring_uses_head_rows_for_known_labels_and_text_for_new_ones(tiny_models):
    from labelassist.workers.scoring import ConceptScorer

    scorer = ConceptScorer(tiny_models.clip, tiny_models.device, tiny_models.dtype)
    concepts = (Concept("cat"), Concept("dog"), Concept("newcomer"))
    bank = scorer.text_bank(concepts, ("background",))
    dim = bank.embeddings.shape[1]
    zero_w, zero_b = scorer.classifier(bank, None)
    head = ConceptHead(project=1, base_version=tiny_models.version, labels=("dog", "cat"),
                       weights=np.arange(3 * dim, dtype=np.float32).reshape(3, dim), bias=np.array([1, 2, 3], np.float32))
    w, b = scorer.classifier(bank, head)
    assert torch.equal(w[0], torch.as_tensor(head.weights[1])) and b[0] == 2  # cat
    assert torch.equal(w[1], torch.as_tensor(head.weights[0])) and b[1] == 1  # dog
    assert torch.equal(w[2], zero_w[2]) and b[2] == 0  # a label added after training stays zero-shot
    assert torch.equal(w[3], torch.as_tensor(head.weights[2])) and b[3] == 3  # background
    wrong = ConceptHead(project=1, base_version="b", labels=("cat",), weights=np.zeros((2, dim + 1), np.float32),
                        bias=np.zeros(2, np.float32))
    with pytest.raises(HeadError, match="-d CLIP embeddings"):
        scorer.classifier(bank, wrong)


# -- the loop on a real worker -------------------------------------------------------------------

# The same project and permissive job settings as the web tier's integration tests (tiny random weights).


class RecordingClient:
    """What the training hook tells Label Studio, recorded."""

    def __init__(self):
        self.updates: list[tuple[int, dict]] = []
        self.titles: dict[int, str] = {1: "", 2: "someone else's model"}

    def list_ml_backends(self, project_id: int) -> list[dict]:
        return [{"id": i, "title": t} for i, t in self.titles.items()]

    def request(self, method: str, path: str, json=None, **kwargs):
        assert method == "PATCH" and path.startswith("/api/ml/") and json["project"] == 1, (method, path, json)
        self.titles[int(path.rsplit("/", 1)[1])] = json["title"]

    def update_project(self, project_id: int, **fields) -> None:
        self.updates.append((project_id, fields))


def _runtime(redis_url: str, root, client: RecordingClient) -> Runtime:
    settings = Settings(redis_url=redis_url, local_files_root=str(root), proposals=PROPOSALS, scoring=SCORING,
                        ls_url="http://ls.test", ls_token="t" * 40)
    queue = QueueClient(Redis.from_url(redis_url), JobOptions(120, 600, 600))
    return Runtime.build(settings, queue, client_factory=lambda url, token: client)


def _predict(model: LabelassistModel, runtime: Runtime, tasks: list[dict]):
    requests = model.task_requests(tasks)
    assert all(isinstance(r, PredictRequest) for r in requests), requests
    job_ids = [runtime.queue.submit(r) for r in requests]
    done = runtime.queue.wait(job_ids, 120)
    results = [done[j] for j in job_ids]
    assert all(r.ok for r in results), [r.error for r in results]
    return requests, results


def _corrections(results, wanted: str) -> list[AnnotationCorrection]:
    """An annotator who relabels every proposal to ``wanted``: one annotation per task."""
    out = []
    for n, result in enumerate(results):
        regions = tuple(
            RegionCorrection(kind="relabeled" if r.label != wanted else "accepted", region_type="polygonlabels", pred_region_id=r.id,
                             final_region_id=r.id, label_from=r.label, label_to=wanted, iou=1.0, match="id", pred_score=r.score,
                             pred_embedding=r.embedding)
            for r in result.regions)
        out.append(AnnotationCorrection(annotation_id=100 + n, task_id=int(result.task_id), updated_at="2026-11-23T10:00:00Z",
                                        project=1, model_version=result.model_version, regions=regions))
    return out


@pytest.mark.slow
def test_start_training_event_trains_on_a_worker_rolls_out_and_restores(redis_url, tmp_path):
    root = tmp_path / "files"
    (root / "images").mkdir(parents=True)
    tasks = []
    for i in range(6):
        write_png(root / "images" / f"{i}.png", size_wh=(96 + 8 * i, 64))
        tasks.append({"id": i + 1, "data": {"image": f"/data/local-files/?d=images/{i}.png"}})
    client = RecordingClient()
    store = SQLiteCorrectionStore(tmp_path / "corrections.sqlite3").open()
    with running_worker(redis_url, "--queues", "predict,train"):
        runtime = _runtime(redis_url, root, client)
        runtime.projects.save(ProjectLink(1, label_config=CONFIG))
        model = LabelassistModel(1, CONFIG, runtime)
        base = runtime.versions.published()
        assert model.model_version == base
        client.titles[1] = base  # as `labelassist connect` titles our backend

        # Round 1, zero-shot; the annotator says every proposal is a square.
        _, results = _predict(model, runtime, tasks)
        assert {r.label for res in results for r in res.regions} != {"square"}  # zero-shot gets some wrong
        for corr in _corrections(results, "square"):
            assert store.add_correction(corr)
        examples = collect_examples(store, 1, base)
        assert len(examples) == sum(len(r.regions) for r in results) > 0 and examples.labels == ["square"]

        # Label Studio's Train button, through the event sink and its hooks.
        sink = EventSink(store, CorrectionProcessor(store, None, hooks=event_hooks(runtime, store))).start()
        try:
            status, reply = sink.receive(b'{"action": "START_TRAINING", "project": {"id": 1, "title": "p"}}')
            assert (status, reply["status"]) == (200, "accepted")
            assert sink.drain(30)
            heads = HeadStore(runtime.queue.connection)
            assert [e.status for e in store.events()] == ["done"]
            head_id = _wait_for(lambda: (heads.active(1) or (None,))[0])
        finally:
            sink.stop()
        version = versioned(base, head_id)
        _wait_for(lambda: client.updates == [(1, {"model_version": version})])
        assert client.titles == {1: version, 2: "someone else's model"}  # Label Studio accepts a backend's title

        # Round 2: the web tier reports and requests the new version; the worker applies the head.
        runtime = _runtime(redis_url, root, client)  # no version cache from before
        model = LabelassistModel(1, CONFIG, runtime)
        assert model.model_version == version
        requests, results = _predict(model, runtime, tasks)
        assert all(r.head == head_id for r in requests)
        assert all(res.model_version == version and res.provenance["concept_head"]["id"] == head_id for res in results)
        labels = [r.label for res in results for r in res.regions]
        assert labels and set(labels) == {"square"}

        # Restore: zero-shot again, under the base version.
        assert heads.restore(1) is None
        assert LabelassistModel(1, CONFIG, _runtime(redis_url, root, client)).model_version == base

        # A request naming a head Redis does not have fails with the reason, the worker lives on.
        missing = PredictRequest(task_id="9", image=requests[0].image, concepts=requests[0].concepts, head="h0123456789ab")
        result = runtime.queue.wait([runtime.queue.submit(missing)], 60)[missing.job_id()]
        assert result.error.code == "concept_head" and "not in this Redis" in result.error.message


@pytest.mark.slow
def test_training_with_nothing_to_learn_says_so(redis_url, tmp_path):
    client = RecordingClient()
    store = SQLiteCorrectionStore(tmp_path / "c.sqlite3").open()
    runtime = _runtime(redis_url, tmp_path, client)
    with pytest.raises(TrainingError, match="no worker has published"):
        start_training(runtime, store, 1, label_config=CONFIG)
    runtime.queue.connection.set("labelassist:model_version", "la-x")
    runtime.versions = type(runtime.versions)(runtime.queue.connection, runtime.settings)
    with pytest.raises(TrainingError, match="no corrected predictions of models la-x"):
        start_training(runtime, store, 1, label_config=CONFIG)
    with pytest.raises(TrainingError, match="still queued"):
        wait_training(runtime.queue, runtime.queue.enqueue("labelassist.workers.jobs.train_head", {}, "la-train-x", "train"), 0.1)


def _wait_for(fn, timeout_s: float = 60.0):
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# -- what the log offers, and the command --------------------------------------------------------


def _square(x0: float, y0: float, side: float) -> dict:
    return {"points": [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], "closed": True,
            "polygonlabels": ["circle"]}


def test_examples_leave_out_deleted_parts_of_kept_objects_and_follow_relabels(tmp_path):
    emb = tuple(float(i) for i in range(8))
    common = dict(region_type="polygonlabels", size_wh=(100, 100), pred_embedding=emb, match="id")
    regions = (
        RegionCorrection(kind="accepted", pred_region_id="a", final_region_id="a", label_from="circle", label_to="circle", iou=1.0,
                         pred_value=_square(10, 10, 40), final_value=_square(10, 10, 40), **common),
        RegionCorrection(kind="relabeled", pred_region_id="b", final_region_id="b", label_from="circle", label_to="square", iou=1.0,
                         pred_value=_square(60, 60, 30), final_value=_square(60, 60, 30), **common),
        # a fragment of the accepted object: a duplicate, not background
        RegionCorrection(kind="deleted", pred_region_id="c", final_region_id=None, label_from="circle", label_to=None, iou=None,
                         pred_value=_square(15, 15, 20), **{**common, "match": None}),
        # something that is none of the labels
        RegionCorrection(kind="deleted", pred_region_id="d", final_region_id=None, label_from="square", label_to=None, iou=None,
                         pred_value=_square(60, 5, 20), **{**common, "match": None}),
        RegionCorrection(kind="added", pred_region_id=None, final_region_id="e", label_from=None, label_to="circle", iou=None,
                         final_value=_square(70, 10, 10), **{**common, "pred_embedding": (), "match": None}),
    )
    store = SQLiteCorrectionStore(tmp_path / "c.sqlite3").open()
    store.add_correction(AnnotationCorrection(annotation_id=1, task_id=1, updated_at="t1", project=1, model_version="base+h0123456789ab",
                                              regions=regions))
    store.add_correction(AnnotationCorrection(annotation_id=2, task_id=2, updated_at="t1", project=1, model_version="other-models",
                                              regions=regions[:1]))
    examples = collect_examples(store, 1, "base")
    assert examples.labels == ["circle", "square"]
    assert examples.targets.tolist() == [0, 1, BACKGROUND_TARGET]
    assert examples.embeddings.shape == (3, 8)
    assert (examples.deleted_parts, examples.other_models, examples.annotations) == (1, 1, 1)
    assert examples.summary()["kinds"] == {"accepted": 1, "relabeled": 1, "deleted": 2, "added": 1}


def test_train_command_lists_restores_and_refuses_what_it_cannot_do(redis_url):
    from click.testing import CliRunner

    from labelassist.backend.cli import cli

    env = {"LABELASSIST_REDIS_URL": redis_url}
    runner = CliRunner()
    listed = runner.invoke(cli, ["train", "--project", "3", "--list"], env=env)
    assert listed.exit_code == 0 and "no concept heads yet" in listed.output
    restored = runner.invoke(cli, ["train", "--project", "3", "--restore"], env=env)
    assert restored.exit_code == 1 and "no earlier concept head" in restored.output
    both = runner.invoke(cli, ["train", "--project", "3", "--list", "--restore"], env=env)
    assert both.exit_code == 2 and "one at most" in both.output
    untrained = runner.invoke(cli, ["train", "--project", "3", "--wait", "0"], env=env)
    assert untrained.exit_code == 1 and "no worker has published" in untrained.output
    store = HeadStore(Redis.from_url(redis_url))
    head = _head(3, 0)
    store.put(head)
    activated = runner.invoke(cli, ["train", "--project", "3", "--activate", head.id], env=env)
    assert activated.exit_code == 0 and head.id in activated.output and store.active(3) == (head.id, "base")
    listed = runner.invoke(cli, ["train", "--project", "3", "--list"], env=env)
    assert head.id in listed.output and "*" in listed.output
    back = runner.invoke(cli, ["train", "--project", "3", "--restore"], env=env)
    assert back.exit_code == 0 and "zero-shot is active" in back.output and store.active(3) is None


def test_worker_refuses_to_mix_training_with_interactive_inference(redis_url):
    from click.testing import CliRunner

    from labelassist.backend.cli import cli

    result = CliRunner().invoke(cli, ["worker", "--redis-url", redis_url, "--queues", "interactive,train"])
    assert result.exit_code == 2 and "never shares a worker" in result.output


def test_start_training_event_without_a_project_fails_the_event_with_the_reason(redis_url, tmp_path):
    from labelassist.backend.training import TrainingHook

    store = SQLiteCorrectionStore(tmp_path / "c.sqlite3").open()
    hook = TrainingHook(_runtime(redis_url, tmp_path, RecordingClient()), store)
    for payload in ({"action": "START_TRAINING"}, {"action": "START_TRAINING", "project": {"id": "x"}}):
        with pytest.raises(TrainingError, match="START_TRAINING: project"):
            hook(payload)
