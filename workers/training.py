"""Training a project's concept head from its correction log (the ``train`` queue's job).

What the log teaches: every predicted region an annotator kept is an example of
its final label (accepted or edited: the predicted label; relabeled: the new
one) and every region they deleted is an example of background. Each example is
the region's CLIP embedding, recorded when it was predicted.

The head is a softmax classifier over the project's labels and background,
started from the zero-shot classifier (the text embeddings times CLIP's logit
scale) and pulled back towards it by an L2 penalty: with few corrections it
stays close to zero-shot, with many it follows the log. Classes are weighted so
a frequent label does not drown a rare one. Per-label thresholds are then
calibrated on out-of-fold probabilities: the lowest probability at which the
regions the head gives a label were right at least ``target_precision`` of the
time. The same folds measure label accuracy, zero-shot against the head.

The web tier builds the examples (``labelassist.backend.training``) and puts
them in Redis; this job reads them, fits, stores the head with ``HeadStore``
and, unless told otherwise, makes it the project's active head: the next job for
the project uses it, no worker restarts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labelassist.workers.contract import Concept
from labelassist.workers.errors import ContractError, TrainingError
from labelassist.workers.heads import BACKGROUND_TARGET, ConceptHead, HeadStore, unpack_examples

log = logging.getLogger(__name__)

DEFAULT_L2 = 1e-3  # pull of the weights towards zero-shot, on standardised features
DEFAULT_TARGET_PRECISION = 0.8  # calibrated thresholds aim at this share of right labels
DEFAULT_MIN_EXAMPLES = 5  # a label needs this many examples before it gets a calibrated threshold
DEFAULT_FOLDS = 5
LBFGS_STEPS = 100
THRESHOLD_RANGE = (0.05, 0.95)  # calibrated thresholds stay inside this
SEED = 0


@dataclass(frozen=True)
class TrainingOptions:
    l2: float = DEFAULT_L2
    target_precision: float = DEFAULT_TARGET_PRECISION
    min_examples: int = DEFAULT_MIN_EXAMPLES
    folds: int = DEFAULT_FOLDS

    def __post_init__(self) -> None:
        if not (self.l2 >= 0 and np.isfinite(self.l2)):
            raise ContractError(f"l2: expected a non-negative number, got {self.l2!r}")
        if not 0 < self.target_precision <= 1:
            raise ContractError(f"target_precision: expected a number in (0, 1], got {self.target_precision!r}")
        if not (isinstance(self.min_examples, int) and self.min_examples >= 1):
            raise ContractError(f"min_examples: expected an integer >= 1, got {self.min_examples!r}")
        if not (isinstance(self.folds, int) and self.folds >= 2):
            raise ContractError(f"folds: expected an integer >= 2, got {self.folds!r}")

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TrainingOptions:
        data = dict(data or {})
        unknown = sorted(set(data) - set(asdict(cls())))
        if unknown:
            raise ContractError(f"training options: unknown field(s) {unknown}; expected some of {sorted(asdict(cls()))}")
        return cls(**data)


# -- fitting ---------------------------------------------------------------------------------


def fit_classifier(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-weighted softmax regression started from, and pulled towards, (w0, b0).

    ``x``: (N, D) normalised embeddings; ``y``: (N,) in [0, C); ``w0``: (C, D).
    The bias of a class with -inf zero-shot bias (no background prompts) starts at 0.
    """
    c = w0.shape[0]
    counts = torch.bincount(y, minlength=c).float()
    present = counts > 0
    class_weight = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
    b0 = torch.where(torch.isfinite(b0), b0, torch.zeros_like(b0))
    # CLIP embeddings of one domain share most of their direction: what tells regions apart is
    # small. Fit on standardised features (the same classifier, re-parametrised), fold back after.
    mu, sigma = x.mean(0), x.std(0).clamp(min=1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1])
    z = (x - mu) / sigma
    wz0, bz0 = w0 * sigma, b0 + mu @ w0.T
    w = wz0.clone().requires_grad_(True)
    b = bz0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y, weight=class_weight) + l2 * ((w - wz0).pow(2).sum() + (b - bz0).pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = w.detach(), b.detach()
    return w / sigma, b - (mu / sigma) @ w.T


def _folds(y: np.ndarray, k: int) -> list[np.ndarray]:
    """``k`` disjoint index sets, each class spread over them (stratified, seeded)."""
    rng = np.random.default_rng(SEED)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(int(i))
        offset += len(idx)
    return [np.array(sorted(f), dtype=np.int64) for f in folds if f]


def _decide(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each region's best label (or -1 when background beats it) and that label's probability."""
    best_p, best = probs[:, :k].max(dim=1)
    best = torch.where(best_p >= probs[:, k], best, torch.full_like(best, -1))
    return best.numpy(), best_p.numpy()


def calibrate_threshold(p: np.ndarray, right: np.ndarray, target_precision: float) -> float:
    """The lowest probability at which the regions kept (p >= it) are right ``target_precision`` of the
    time; when no cut reaches it, the cut with the best precision. Clipped to THRESHOLD_RANGE."""
    order = np.argsort(-p, kind="stable")
    p, right = p[order], right[order].astype(np.float64)
    precision = np.cumsum(right) / np.arange(1, len(p) + 1)
    ok = np.flatnonzero(precision >= target_precision)
    cut = ok[-1] if ok.size else int(np.argmax(precision))
    return float(np.clip(p[cut], *THRESHOLD_RANGE))


def train(embeddings: np.ndarray, targets: np.ndarray, example_labels: list[str], concepts: tuple[Concept, ...],
          text_weights: torch.Tensor, text_bias: torch.Tensor, project: int, base_version: str,
          options: TrainingOptions = TrainingOptions()) -> ConceptHead:
    """Fit a head for ``concepts`` from examples; ``text_*``: the zero-shot classifier, (K + 1, D) and (K + 1,)."""
    names = [c.name for c in concepts]
    k = len(names)
    if text_weights.shape[0] != k + 1 or embeddings.shape[1] != text_weights.shape[1]:
        raise TrainingError(f"the examples are {embeddings.shape[1]}-d CLIP embeddings, the models' text classifier is "
                            f"{tuple(text_weights.shape)}: they come from other models")
    index = {n: i for i, n in enumerate(names)}
    mapped = np.array([k if t == BACKGROUND_TARGET else index.get(example_labels[t], -1) for t in targets], dtype=np.int64)
    unknown = sorted({example_labels[t] for t, m in zip(targets, mapped) if m < 0})
    keep = mapped >= 0
    x_np, y_np = embeddings[keep], mapped[keep]
    if len(y_np) == 0:
        raise TrainingError(f"project {project}: none of the {len(targets)} corrected regions carries one of the labels "
                            f"{names} or is a deleted region; nothing to learn from")
    x = F.normalize(torch.as_tensor(x_np, dtype=torch.float32), dim=-1)
    y = torch.as_tensor(y_np)
    w0, b0 = text_weights.float().cpu(), text_bias.float().cpu()

    # Out-of-fold probabilities: zero-shot against the head, and the thresholds' evidence.
    n_folds = min(options.folds, len(y_np))
    oof = torch.zeros((len(y_np), k + 1))
    folds = _folds(y_np, n_folds) if n_folds >= 2 else []
    for held in folds:
        train_idx = np.setdiff1d(np.arange(len(y_np)), held)
        if train_idx.size == 0:
            continue
        w, b = fit_classifier(x[train_idx], y[train_idx], w0, b0, options.l2)
        oof[held] = torch.softmax(x[held] @ w.T + b, dim=-1)
    zero_shot = torch.softmax(x @ w0.T + b0, dim=-1)
    w, b = fit_classifier(x, y, w0, b0, options.l2)

    decided, p = _decide(oof, k)
    truth = np.where(y_np == k, -1, y_np)
    thresholds: dict[str, float] = {}
    per_label: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        n_examples = int((y_np == j).sum())
        mine = decided == j
        entry: dict[str, Any] = {"examples": n_examples, "given_out_of_fold": int(mine.sum())}
        if folds and n_examples >= options.min_examples and mine.any():
            thresholds[name] = calibrate_threshold(p[mine], truth[mine] == j, options.target_precision)
            entry["threshold"] = thresholds[name]
        per_label[name] = entry
    zs_decided, _ = _decide(zero_shot, k)
    report = {
        "examples": int(len(y_np)),
        "background_examples": int((y_np == k).sum()),
        "labels": per_label,
        "ignored_labels": unknown,
        "folds": len(folds),
        "label_accuracy_zero_shot": float((zs_decided == truth).mean()),
        "label_accuracy_out_of_fold": float((decided == truth).mean()) if folds else None,
        "options": asdict(options),
    }
    return ConceptHead(project=project, base_version=base_version, labels=tuple(names), weights=w.numpy(), bias=b.numpy(),
                       thresholds=thresholds, created_at=time.time(), report=report)


# -- the job ----------------------------------------------------------------------------------


def run_training_job(payload: dict[str, Any], pipeline, connection) -> dict[str, Any]:
    """The ``train`` queue's job body: examples from Redis in, the stored (and activated) head's summary out."""
    if not isinstance(payload, dict):
        raise TrainingError(f"training job: expected a JSON object, got {type(payload).__name__}")
    try:
        project = int(payload["project"])
        base_version = str(payload["base_version"])
        data_key = str(payload["data_key"])
        concepts = tuple(Concept.from_json(c) for c in payload["concepts"])
        background = tuple(str(p) for p in payload.get("background_prompts") or ())
        options = TrainingOptions.from_json(payload.get("options"))
        activate = bool(payload.get("activate", True))
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainingError(f"training job: malformed payload: {exc}") from None
    if not concepts:
        raise TrainingError(f"project {project}: no labels to train (the labeling config defines none)")
    if base_version != pipeline.version:
        raise TrainingError(f"project {project}: the examples were recorded with models {base_version}, this worker serves "
                            f"{pipeline.version}; run training with workers on the same models")
    raw = connection.get(data_key)
    if raw is None:
        raise TrainingError(f"project {project}: the training examples ({data_key}) expired before a worker took the job; "
                            "start training again")
    embeddings, targets, labels = unpack_examples(raw)
    scorer = pipeline.scorer
    bank = scorer.text_bank(concepts, background)
    text_weights, text_bias = scorer.classifier(bank, None)
    t = time.perf_counter()
    head = train(embeddings, targets, labels, concepts, text_weights.cpu(), text_bias.cpu(), project, base_version, options)
    head.report["fit_s"] = round(time.perf_counter() - t, 3)
    store = HeadStore(connection)
    store.put(head)
    previous = store.activate(project, head.id) if activate else None
    log.info("project %s: concept head %s trained on %d examples (label accuracy %.2f zero-shot, %s out of fold)%s",
             project, head.id, head.report["examples"], head.report["label_accuracy_zero_shot"],
             head.report["label_accuracy_out_of_fold"], "; active" if activate else "")
    return {"head": head.id, "model_version": head.version, "activated": activate, "previous": previous,
            "report": head.report, "thresholds": head.thresholds}
