"""Active learning: a project's tasks from least to most certain, by our predictions' task scores.

The task score is what the workers computed (``PredictResult.score``: the mean
margin of the task's labelled regions, 0 when nothing was found), the same
number Label Studio's uncertainty sampling orders by. Tasks without a
prediction of the model version come last, marked unscored: they need
pre-annotating first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class RankedTask:
    task_id: int
    score: float | None  # None: no prediction of this model version
    regions: int  # result items of that prediction
    annotated: bool  # has at least one submitted annotation

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rank_tasks(tasks: Iterable[dict[str, Any]], model_version: str, include_annotated: bool = False) -> list[RankedTask]:
    """Rank Label Studio task objects (with their ``predictions``) by the score of their
    ``model_version`` prediction, lowest first; ties by task id; unscored tasks last."""
    ranked = []
    for task in tasks:
        annotated = bool(task.get("total_annotations") or task.get("annotations"))
        if annotated and not include_annotated:
            continue
        ours = [p for p in task.get("predictions") or [] if isinstance(p, dict) and p.get("model_version") == model_version]
        score = None
        regions = 0
        if ours:
            latest = max(ours, key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0))
            raw = latest.get("score")
            score = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else 0.0
            regions = len(latest.get("result") or [])
        ranked.append(RankedTask(int(task["id"]), score, regions, annotated))
    return sorted(ranked, key=lambda t: (t.score is None, t.score if t.score is not None else 0.0, t.task_id))


def format_ranking(ranked: list[RankedTask], model_version: str) -> str:
    lines = [f"model version {model_version}: {sum(t.score is not None for t in ranked)} scored, "
             f"{sum(t.score is None for t in ranked)} unscored; least certain first",
             f"{'task':>10}  {'score':>7}  {'regions':>7}  annotated"]
    for t in ranked:
        score = f"{t.score:7.4f}" if t.score is not None else "      -"
        lines.append(f"{t.task_id:>10}  {score}  {t.regions:>7}  {'yes' if t.annotated else 'no'}")
    return "\n".join(lines)
