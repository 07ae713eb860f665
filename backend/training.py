"""Training a project's concept head: from the correction log to the ``train`` queue and back.

``start_training`` reads the project's corrections from the store, turns each
predicted region an annotator judged into an example (its CLIP embedding and
its final label, or background when deleted; a deleted region mostly inside a
region the annotator kept is a duplicate or part of an object, and is left out),
puts the examples in Redis and
enqueues ``labelassist.workers.jobs.train_head`` on the ``train`` queue, which
only training workers serve. The job fits the head, stores it and makes it the
project's active head (``labelassist.workers.heads``): from then on the web tier
reports the project's model version as ``<base>+<head id>`` and requests carry
the head, so workers use it without a restart. ``finish_training`` waits for
the job and tells Label Studio the project's new model version. The same
examples and options make the same job id: pressing Train twice runs once.

Only corrections of predictions made with the workers' current base models
count: another CLIP's embeddings live in another space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from labelassist.backend.queue import JOB_FAILED, JOB_FINISHED, JOB_MISSING, QueueClient
from labelassist.backend.store import CorrectionStore
from labelassist.plugin.corrections import (
    KIND_ACCEPTED,
    KIND_ADDED,
    KIND_DELETED,
    KIND_EDITED,
    KIND_RELABELED,
    share_inside_final,
)
from labelassist.workers.contract import QUEUE_TRAIN, TRAIN_JOB, Concept
from labelassist.workers.errors import TrainingError
from labelassist.workers.heads import BACKGROUND_TARGET, HeadStore, pack_examples, split_version

log = logging.getLogger(__name__)

EXAMPLES_KEY = "labelassist:train:examples:{digest}"
EXAMPLES_TTL_S = 7 * 24 * 3600  # a training job waiting longer than this for a worker finds its examples gone
TRAIN_TIMEOUT_S = 3600  # one training job, worst case
WAIT_POLL_S = 0.5
PART_OF_OBJECT = 0.5  # a deleted region this much inside the final regions is not a background example


@dataclass
class Examples:
    """What the log offers for training: one row per judged predicted region."""

    embeddings: np.ndarray  # (N, D) float32
    targets: np.ndarray  # (N,) int: index into labels, BACKGROUND_TARGET for deleted regions
    labels: list[str]
    kinds: dict[str, int] = field(default_factory=dict)  # judged regions by correction kind
    without_embedding: int = 0  # judged regions whose prediction carried no embedding
    other_models: int = 0  # corrections of predictions made with other base models
    annotations: int = 0
    deleted_parts: int = 0  # deleted regions left out: mostly inside a region the annotator kept

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def summary(self) -> dict[str, Any]:
        per_label = {name: int((self.targets == i).sum()) for i, name in enumerate(self.labels)}
        return {"examples": len(self), "per_label": per_label, "background": int((self.targets == BACKGROUND_TARGET).sum()),
                "kinds": self.kinds, "without_embedding": self.without_embedding, "other_models": self.other_models,
                "annotations": self.annotations, "deleted_parts": self.deleted_parts}


def collect_examples(store: CorrectionStore, project_id: int, base_version: str) -> Examples:
    """The project's training examples from its latest annotation versions, for models ``base_version``."""
    rows: list[tuple[float, ...]] = []
    names: list[str] = []
    targets: list[int] = []
    index: dict[str, int] = {}
    kinds: dict[str, int] = {}
    without = other = annotations = parts = 0
    dim = None
    for corr in store.corrections(project=project_id):
        if split_version(corr.model_version)[0] != base_version:
            other += 1 if corr.model_version else 0
            continue
        annotations += 1
        for r in corr.regions:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
            if r.kind == KIND_ADDED:
                continue  # drawn by hand: no proposal, no embedding
            if not r.pred_embedding or (dim is not None and len(r.pred_embedding) != dim):
                without += 1
                continue
            dim = len(r.pred_embedding)
            if r.kind == KIND_DELETED:
                if share_inside_final(r, corr) >= PART_OF_OBJECT:
                    parts += 1
                    continue  # a duplicate or part of an object the annotator kept: not background
                target = BACKGROUND_TARGET
            else:
                label = r.label_to if r.kind == KIND_RELABELED else (r.label_from or r.label_to)
                if r.kind not in (KIND_ACCEPTED, KIND_EDITED, KIND_RELABELED) or not label:
                    continue
                target = index.setdefault(label, len(index))
                if target == len(names):
                    names.append(label)
            rows.append(r.pred_embedding)
            targets.append(target)
    embeddings = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim or 0)
    return Examples(embeddings, np.asarray(targets, dtype=np.int64), names, kinds, without, other, annotations, parts)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    project_id: int
    base_version: str
    examples: dict[str, Any]


def submit_training(queue: QueueClient, store: CorrectionStore, project_id: int, base_version: str,
                    concepts: tuple[Concept, ...], background_prompts: tuple[str, ...] = (),
                    options: Mapping[str, Any] | None = None, activate: bool = True) -> Submitted:
    """Enqueue training of ``project_id``'s head on the ``train`` queue; TrainingError when the log has nothing to teach."""
    if not concepts:
        raise TrainingError(f"project {project_id}: its labeling config defines no labels to train")
    examples = collect_examples(store, project_id, base_version)
    if len(examples) == 0:
        raise TrainingError(
            f"project {project_id}: no corrected predictions of models {base_version} in the correction log yet "
            f"({examples.annotations} annotations of these models, {examples.other_models} of other models, "
            f"{examples.without_embedding} regions without embeddings); annotate pre-annotated tasks first")
    raw = pack_examples(examples.embeddings, examples.targets, examples.labels)
    payload_rest = {"project": project_id, "base_version": base_version, "concepts": [asdict(c) for c in concepts],
                    "background_prompts": list(background_prompts), "options": dict(options or {}), "activate": activate}
    digest = hashlib.sha256(raw + json.dumps(payload_rest, sort_keys=True).encode()).hexdigest()
    data_key = EXAMPLES_KEY.format(digest=digest[:32])
    queue.connection.set(data_key, raw, ex=EXAMPLES_TTL_S)
    job_id = queue.enqueue(TRAIN_JOB, {**payload_rest, "data_key": data_key}, f"la-train-{project_id}-{digest[:24]}", QUEUE_TRAIN,
                           timeout_s=TRAIN_TIMEOUT_S, description=f"train project {project_id}", retries=0)
    summary = examples.summary()
    log.info("project %s: training queued as %s on %d examples (%s)", project_id, job_id, len(examples), summary["per_label"])
    return Submitted(job_id, project_id, base_version, summary)


def wait_training(queue: QueueClient, job_id: str, timeout_s: float, on_poll: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The finished job's result (the head's summary); TrainingError when it failed, vanished or took too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = queue.outcome(job_id)
        if outcome.status == JOB_FINISHED:
            return outcome.value
        if outcome.status in (JOB_FAILED, JOB_MISSING):
            raise TrainingError(f"training job {job_id} failed: {outcome.error}")
        if on_poll is not None:
            on_poll(outcome.status)
        if time.monotonic() >= deadline:
            raise TrainingError(f"training job {job_id} is still {outcome.status} after {timeout_s:.0f} s; is a worker "
                                f"serving the '{QUEUE_TRAIN}' queue (`labelassist worker --queues {QUEUE_TRAIN}`)?")
        time.sleep(WAIT_POLL_S)


def announce_version(client, project_id: int, version: str, basic_auth_pass: str | None = None) -> None:
    """Tell Label Studio the project's model version, so its scores and sampling use the new predictions.

    Label Studio accepts a project version only when an ML backend of the project
    has it as its title or a prediction carries it, so our backends (titled with a
    version of the same base models, as ``connect`` titles them) are renamed first.
    Label Studio re-checks a backend on every update and wants its connection
    fields again, the basic auth password included (``basic_auth_pass``: ours).
    """
    base = split_version(version)[0]
    ours = [b for b in client.list_ml_backends(project_id) if split_version(str(b.get("title") or ""))[0] == base]
    if not ours:
        raise TrainingError(f"project {project_id}: none of its ML backends is titled with a version of models {base}; "
                            "run `labelassist connect` for it, then train again")
    for backend in ours:
        fields = {k: backend[k] for k in ("url", "auth_method", "is_interactive", "basic_auth_user", "extra_params")
                  if backend.get(k) is not None}
        if backend.get("auth_method") == "BASIC_AUTH":
            if not basic_auth_pass:
                raise TrainingError(f"project {project_id}: Label Studio needs our basic auth password to rename its ML "
                                    f"backend to {version}; set LABELASSIST_BASIC_AUTH_PASS")
            fields["basic_auth_pass"] = basic_auth_pass
        client.request("PATCH", f"/api/ml/{int(backend['id'])}", json={**fields, "project": project_id, "title": version})
    client.update_project(project_id, model_version=version)
    log.info("project %s: Label Studio now uses model version %s", project_id, version)


def project_concepts(runtime, project_id: int, label_config: str | None = None) -> tuple[tuple[Concept, ...], tuple[str, ...]]:
    """The project's concepts and background prompts, as its prediction jobs get them.

    The labeling config comes from ``label_config``, else what ``/setup`` stored, else Label Studio's API.
    """
    from labelassist.backend.service import LabelassistModel

    link = runtime.projects.get(project_id)
    config = label_config or (link.label_config if link else None)
    if not config:
        client = runtime.client(link)
        if client is None:
            raise TrainingError(f"project {project_id}: its labeling config is unknown here (Label Studio has not called "
                                "/setup for it) and no Label Studio URL and token are set to fetch it")
        config = client.get_project(project_id).get("label_config") or ""
    model = LabelassistModel(project_id, config, runtime)
    _, scoring = model.job_settings(link)
    return model.config.concepts(), scoring.background_prompts


def start_training(runtime, store: CorrectionStore, project_id: int, label_config: str | None = None,
                   options: Mapping[str, Any] | None = None, activate: bool = True) -> Submitted:
    """Submit training for a project served by ``runtime`` (a ``labelassist.backend.service.Runtime``)."""
    base = runtime.versions.published()
    if not base:
        raise TrainingError("no worker has published its model version yet; start the workers, then train")
    concepts, background = project_concepts(runtime, project_id, label_config)
    return submit_training(runtime.queue, store, project_id, base, concepts, background, options, activate)


class TrainingHook:
    """``START_TRAINING`` (Label Studio's Train button): submit training, then announce the new version.

    Submitting happens on the event thread (a failure there fails the stored
    event, with its reason); waiting and announcing on a thread of their own.
    """

    def __init__(self, runtime, store: CorrectionStore, wait_s: float = TRAIN_TIMEOUT_S):
        self.runtime = runtime
        self.store = store
        self.wait_s = wait_s

    def __call__(self, payload: Mapping[str, Any]) -> None:
        from labelassist.backend.service import parse_project_id

        project = payload.get("project")
        try:
            project_id = parse_project_id(project.get("id") if isinstance(project, Mapping) else project)
        except ValueError as exc:
            raise TrainingError(f"START_TRAINING: {exc}") from None
        label_config = project.get("label_config") if isinstance(project, Mapping) else None
        submitted = start_training(self.runtime, self.store, project_id, label_config if isinstance(label_config, str) else None)
        threading.Thread(target=self._finish, args=(submitted,), name=f"labelassist-train-{project_id}", daemon=True).start()

    def _finish(self, submitted: Submitted) -> None:
        try:
            result = wait_training(self.runtime.queue, submitted.job_id, self.wait_s)
            self.runtime.versions.forget(submitted.project_id)  # Label Studio calls /setup while we announce
            client = self.runtime.client(self.runtime.projects.get(submitted.project_id))
            if client is not None and result.get("activated"):
                announce_version(client, submitted.project_id, result["model_version"], self.runtime.settings.basic_auth_pass)
        except Exception as exc:  # logged: the head, if trained, is active whatever Label Studio answers
            log.error("project %s: training %s: %s", submitted.project_id, submitted.job_id, exc)


def head_listing(connection, project_id: int) -> list[dict[str, Any]]:
    """The project's heads, oldest first, each marked ``active`` or not."""
    store = HeadStore(connection)
    active = store.active(project_id)
    return [head.summary() | {"active": bool(active and active[0] == head.id)} for head in store.heads(project_id)]
