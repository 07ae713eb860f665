"""Concept heads: what training on the correction log produces, kept in Redis.

A concept head replaces a project's zero-shot CLIP text classifier: one weight
row (and bias) per label the log taught it, one for background, and per-label
thresholds calibrated from what annotators accepted. It is trained for one base
model version (its rows live in that CLIP's embedding space) and is applied to
the labels it knows; a label it has never seen keeps its text embedding.

The model version Label Studio sees for a project with an active head is
``<base version>+<head id>``, so a new head is a new version: Label Studio
re-predicts tasks for it, and each prediction says which head made it.

Redis keys (this module owns them; the web tier and the workers both read them):

- ``labelassist:head:<id>``: the head as JSON (weights base64 float32).
- ``labelassist:project:<id>:heads``: list of the project's head ids, oldest first.
- ``labelassist:project:<id>:head``: JSON ``{"head", "base_version"}`` of the
  active head; absent means zero-shot.
- ``labelassist:project:<id>:head_history``: the active heads before the
  current one, latest last (what ``restore`` goes back to); ``""`` stands for
  zero-shot.

Torch-free: the web tier imports it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelassist.workers.contract import HEAD_ID_PATTERN
from labelassist.workers.errors import ContractError, LabelassistError

HEAD_KEY = "labelassist:head:{head_id}"
PROJECT_HEADS_KEY = "labelassist:project:{project_id}:heads"
ACTIVE_HEAD_KEY = "labelassist:project:{project_id}:head"
HEAD_HISTORY_KEY = "labelassist:project:{project_id}:head_history"
VERSION_SEPARATOR = "+"  # between the base version and the head id
HEAD_ID_HEX = 12  # HEAD_ID_PATTERN's digits
HISTORY_KEPT = 50  # earlier active heads remembered per project
ZERO_SHOT = ""  # the history's and restore's name for "no head"
BACKGROUND_TARGET = -1  # a training example's target for "not any label" (a deleted region)


class HeadError(LabelassistError):
    """A concept head that is missing, malformed, or made for other models."""

    code = "concept_head"


def versioned(base_version: str, head_id: str | None) -> str:
    """The model version of ``base_version`` with ``head_id`` applied (the base itself without one)."""
    return f"{base_version}{VERSION_SEPARATOR}{head_id}" if head_id else base_version


def split_version(version: str) -> tuple[str, str | None]:
    """``(base version, head id or None)`` of a model version string."""
    base, sep, head = version.rpartition(VERSION_SEPARATOR)
    if sep and HEAD_ID_PATTERN.match(head):
        return base, head
    return version, None


def check_head_id(head_id: str) -> str:
    if not isinstance(head_id, str) or not HEAD_ID_PATTERN.match(head_id):
        raise ContractError(f"head: expected a concept head id like 'h0123456789ab', got {head_id!r}")
    return head_id


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def _unb64(text: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    except (ValueError, TypeError) as exc:
        raise HeadError(f"concept head {what}: cannot be decoded as {shape} float32: {exc}") from None


@dataclass(frozen=True)
class ConceptHead:
    """A trained classifier over CLIP region embeddings.

    ``weights``: (len(labels) + 1, D); rows follow ``labels`` then background.
    Logits are ``embedding @ weights.T + bias``; probabilities their softmax.
    ``thresholds``: label -> the probability a region needs to get that label
    (labels without enough evidence in the log have none and keep the default).
    """

    project: int
    base_version: str
    labels: tuple[str, ...]
    weights: np.ndarray
    bias: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)  # what training saw and measured
    id: str = ""

    def __post_init__(self) -> None:
        k = len(self.labels)
        if k == 0 or len(set(self.labels)) != k:
            raise HeadError(f"concept head: expected distinct label names, got {list(self.labels)}")
        if self.weights.ndim != 2 or self.weights.shape[0] != k + 1 or self.bias.shape != (k + 1,):
            raise HeadError(f"concept head: expected weights ({k + 1}, D) and bias ({k + 1},) for {k} labels + background, "
                            f"got {self.weights.shape} and {self.bias.shape}")
        if not (np.isfinite(self.weights).all() and np.isfinite(self.bias).all()):
            raise HeadError("concept head: weights or bias are not finite")
        unknown = sorted(set(self.thresholds) - set(self.labels))
        if unknown:
            raise HeadError(f"concept head: thresholds for labels it does not have: {unknown}")
        if not self.id:
            object.__setattr__(self, "id", self._digest())

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    @property
    def version(self) -> str:
        return versioned(self.base_version, self.id)

    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.project, self.base_version, list(self.labels), sorted(self.thresholds.items())]).encode())
        h.update(np.ascontiguousarray(self.weights, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.bias, dtype="<f4").tobytes())
        return "h" + h.hexdigest()[:HEAD_ID_HEX]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "project": self.project, "base_version": self.base_version, "labels": list(self.labels),
            "dim": self.dim, "weights": _b64(self.weights), "bias": _b64(self.bias), "thresholds": self.thresholds,
            "created_at": self.created_at, "report": self.report,
        }

    @classmethod
    def from_json(cls, data: Any) -> ConceptHead:
        if not isinstance(data, dict):
            raise HeadError(f"concept head: expected a JSON object, got {type(data).__name__}")
        try:
            labels = tuple(data["labels"])
            dim = int(data["dim"])
            head = cls(
                project=int(data["project"]), base_version=str(data["base_version"]), labels=labels,
                weights=_unb64(data["weights"], (len(labels) + 1, dim), "weights"),
                bias=_unb64(data["bias"], (len(labels) + 1,), "bias"),
                thresholds={str(k): float(v) for k, v in dict(data.get("thresholds") or {}).items()},
                created_at=float(data.get("created_at") or 0.0), report=dict(data.get("report") or {}),
                id=str(data["id"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadError(f"concept head: malformed record: {exc}") from None
        return head

    def summary(self) -> dict[str, Any]:
        """What ``labelassist train --list`` shows: everything but the weights."""
        return {"id": self.id, "project": self.project, "base_version": self.base_version, "labels": list(self.labels),
                "thresholds": self.thresholds, "created_at": self.created_at, "report": self.report}


class HeadStore:
    """Concept heads and each project's active one, in Redis."""

    def __init__(self, connection):
        self.connection = connection

    def put(self, head: ConceptHead) -> None:
        """Keep ``head`` (idempotent: the id is its content's hash)."""
        key = HEAD_KEY.format(head_id=head.id)
        if self.connection.set(key, json.dumps(head.to_json()), nx=True):
            self.connection.rpush(PROJECT_HEADS_KEY.format(project_id=head.project), head.id)

    def get(self, head_id: str) -> ConceptHead:
        raw = self.connection.get(HEAD_KEY.format(head_id=check_head_id(head_id)))
        if raw is None:
            raise HeadError(f"concept head {head_id} is not in this Redis (deleted, or trained against another one)")
        try:
            return ConceptHead.from_json(json.loads(raw))
        except ValueError as exc:
            raise HeadError(f"concept head {head_id}: not JSON: {exc}") from None

    def heads(self, project_id: int) -> list[ConceptHead]:
        ids = [_text(i) for i in self.connection.lrange(PROJECT_HEADS_KEY.format(project_id=project_id), 0, -1)]
        return [self.get(i) for i in dict.fromkeys(ids)]

    def active(self, project_id: int) -> tuple[str, str] | None:
        """``(head id, base version)`` of the project's active head, or None for zero-shot."""
        raw = self.connection.get(ACTIVE_HEAD_KEY.format(project_id=project_id))
        if not raw:
            return None
        data = json.loads(raw)
        return str(data["head"]), str(data["base_version"])

    def activate(self, project_id: int, head_id: str | None) -> str | None:
        """Make ``head_id`` (None: zero-shot) the project's head; return the one it replaces."""
        if head_id:
            head = self.get(head_id)
            if head.project != project_id:
                raise HeadError(f"concept head {head_id} was trained for project {head.project}, not {project_id}")
        previous = self.active(project_id)
        previous_id = previous[0] if previous else ZERO_SHOT
        if previous_id == (head_id or ZERO_SHOT):
            return previous_id or None
        pipe = self.connection.pipeline()
        history = HEAD_HISTORY_KEY.format(project_id=project_id)
        pipe.rpush(history, previous_id)
        pipe.ltrim(history, -HISTORY_KEPT, -1)
        if head_id:
            pipe.set(ACTIVE_HEAD_KEY.format(project_id=project_id), json.dumps({"head": head_id, "base_version": head.base_version}))
        else:
            pipe.delete(ACTIVE_HEAD_KEY.format(project_id=project_id))
        pipe.execute()
        return previous_id or None

    def restore(self, project_id: int) -> str | None:
        """Go back to the head that was active before the current one; return it (None: zero-shot).

        Raises HeadError when there is nothing to go back to.
        """
        history = HEAD_HISTORY_KEY.format(project_id=project_id)
        raw = self.connection.rpop(history)
        if raw is None:
            raise HeadError(f"project {project_id}: no earlier concept head to restore")
        target = _text(raw) or None
        self.activate(project_id, target)
        self.connection.rpop(history)  # activate() pushed the head we just left; going back does not record it
        return target


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- training examples on the wire: the web tier packs them, the training job unpacks them ----


def pack_examples(embeddings: np.ndarray, targets: np.ndarray, labels: list[str]) -> bytes:
    """Examples as bytes for Redis: (N, D) embeddings, (N,) targets indexing ``labels`` (-1: background)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, embeddings=embeddings.astype(np.float16), targets=targets.astype(np.int32),
                        labels=np.array(labels, dtype=np.str_))
    return buf.getvalue()


def unpack_examples(raw: bytes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            embeddings = data["embeddings"].astype(np.float32)
            targets = data["targets"].astype(np.int64)
            labels = [str(x) for x in data["labels"]]
    except (ValueError, KeyError, OSError) as exc:
        raise HeadError(f"the training examples cannot be read: {exc}") from None
    if embeddings.ndim != 2 or targets.shape != (embeddings.shape[0],):
        raise HeadError(f"the training examples are inconsistent: embeddings {embeddings.shape}, targets {targets.shape}")
    if targets.size and (targets.min() < BACKGROUND_TARGET or targets.max() >= len(labels)):
        raise HeadError("the training examples have targets outside their label list")
    return embeddings, targets, labels
