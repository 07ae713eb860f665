"""Benchmark of the learning loop: predict, correct, log, train, predict again.

What is real and what is simulated:

- Scenes: synthetic images with ground truth, discs, squares and triangles on a
  textured background; each class has its own hue range, sizes and rotations vary.
- SAM: simulated from the ground truth with stated noise (``Noise`` below):
  every object's boundary jitters (a smooth random shift of its edge); some
  objects jitter heavily, some are split in two, some merged with a
  neighbour, some missed; spurious blobs of background are added. This replaces
  only the mask generator: everything after it is the pipeline workers run.
- CLIP: the real scoring code (masked crops, prompts, background rejection,
  thresholds, concept heads) on tiny *random-weight* OpenCLIP, so zero-shot
  labels are guesses; what the loop learns, it learns from the corrections.
- Annotator: corrects each prediction to the ground truth and posts it, as a
  Label Studio annotation payload (``parent_prediction``, region ``origin``),
  to the service's ``/webhook``. A region whose polygon overlaps its object
  with IoU >= ``ACCEPT_IOU`` and carries the right label is left as it is
  (accepted); a wrong label is changed (relabeled); a poorer outline is
  redrawn (edited); a region matching no object is deleted; an object no
  region matches is drawn by hand (added).
- Service: the real app, event sink, correction store (SQLite), training hook,
  ``train`` queue on a real Redis and a real RQ worker, heads in Redis. Label
  Studio itself is a stub that serves the predictions back by id.

Rounds: round 0 is zero-shot; before each later round, ``START_TRAINING``
goes through ``/webhook`` and the head trained on the whole log so far is
rolled out. Each round has new tasks. Acceptance (share of predicted regions
kept unchanged) and edits per task (edited + relabeled + deleted + added) come
from the correction store's own report for the round's model version. The
"ceiling" is the acceptance a perfect classifier would reach on the same
proposals (proposals that match an object at ACCEPT_IOU, over proposals that
match one at all or are spurious): SAM's noise, not the head, bounds it.

The last line reads ``acceptance: <before> -> <after> edits_per_task: <before> -> <after>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.assist_loop")

PROJECT = 1
LABELS = ("disc", "square", "triangle")
HUES = {"disc": 0.0, "square": 0.55, "triangle": 0.3}  # centre hue per class, in turns
HUE_SPREAD = 0.12  # +- around the centre: neighbouring classes' ranges nearly touch
SIZE = 256
ACCEPT_IOU = 0.85  # an annotator leaves an outline this close to the object
MATCH_IOU = 0.5  # below this a region is not the object at all
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="label" toName="image">{''.join(f'<Label value="{l}"/>' for l in LABELS)}</PolygonLabels>
</View>"""
# A fresh project shows every proposal CLIP labels (no threshold, no margin, and no
# background prompts: with random weights those win every region): the annotator's
# corrections of them are what the loop learns from, background included (deleted regions).
SCORING = {"label_threshold": 0.0, "min_margin": 0.0, "background_prompts": []}


@dataclass(frozen=True)
class Noise:
    """The simulated SAM's errors, per object unless said otherwise."""

    jitter_px: float = 1.0  # boundary shift amplitude of every mask
    heavy_jitter: float = 0.05  # share of objects whose boundary shifts by heavy_jitter_px
    heavy_jitter_px: float = 6.0
    split: float = 0.03  # cut in two halves, both proposed
    merge: float = 0.03  # proposed as one mask with the nearest other object
    miss: float = 0.05  # not proposed at all
    spurious_per_image: float = 2.0  # mean count of background blobs proposed


# -- scenes -------------------------------------------------------------------------------------


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[tuple[str, np.ndarray]]  # (label, (H, W) bool)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array([round(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)], np.uint8)


def make_scene(rng: np.random.Generator) -> Scene:
    import cv2

    yy, xx = np.mgrid[:SIZE, :SIZE]
    base = rng.uniform(0.25, 0.75, 3)
    texture = cv2.resize(rng.normal(0, 1, (16, 16, 3)).astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    image = np.clip(255 * (base + 0.08 * texture + 0.03 * rng.normal(0, 1, (SIZE, SIZE, 3))), 0, 255).astype(np.uint8)
    objects: list[tuple[str, np.ndarray]] = []
    taken = np.zeros((SIZE, SIZE), bool)
    for _ in range(int(rng.integers(3, 7))):
        label = LABELS[int(rng.integers(len(LABELS)))]
        for _attempt in range(20):
            r = int(rng.integers(16, 36))
            cx, cy = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, 2))
            if label == "disc":
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            elif label == "square":
                angle = rng.uniform(0, math.pi / 2)
                u, v = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle), -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
                mask = (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
            else:
                angle = rng.uniform(0, 2 * math.pi)
                pts = np.array([[cx + r * 1.1 * math.cos(angle + k * 2 * math.pi / 3), cy + r * 1.1 * math.sin(angle + k * 2 * math.pi / 3)]
                                for k in range(3)], np.int32)
                canvas = np.zeros((SIZE, SIZE), np.uint8)
                cv2.fillPoly(canvas, [pts], 1)
                mask = canvas.astype(bool)
            if not (mask & taken).any():
                break
        else:
            continue
        taken |= cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        colour = _hsv(HUES[label] + rng.uniform(-HUE_SPREAD, HUE_SPREAD), rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.95))
        shade = 1.0 + 0.06 * rng.normal(0, 1, (SIZE, SIZE, 1))
        image[mask] = np.clip(colour[None, :] * shade[mask], 0, 255).astype(np.uint8)
        objects.append((label, mask))
    return Scene(image, objects)


# -- the simulated SAM ---------------------------------------------------------------------------


def _jitter(mask: np.ndarray, amplitude_px: float, rng: np.random.Generator) -> np.ndarray:
    """The mask with its boundary shifted by a smooth random field of about ``amplitude_px``."""
    import cv2

    m = mask.astype(np.uint8)
    signed = cv2.distanceTransform(m, cv2.DIST_L2, 3) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
    field = cv2.resize(rng.normal(0, 1, (8, 8)).astype(np.float32), mask.shape[::-1], interpolation=cv2.INTER_CUBIC)
    out = signed + amplitude_px * field > 0
    return out if out.sum() >= 16 else mask


def simulate_sam(scene: Scene, noise: Noise, rng: np.random.Generator) -> list[np.ndarray]:
    """Proposal masks for ``scene``, as a noisy SAM would give them."""
    import cv2

    masks: list[np.ndarray] = []
    merged: set[int] = set()
    centres = [np.argwhere(m).mean(0) for _, m in scene.objects]
    for i, (_, mask) in enumerate(scene.objects):
        if i in merged:
            continue
        u = rng.random()
        if u < noise.miss:
            continue
        u -= noise.miss
        if u < noise.split:
            cy, cx = centres[i]
            angle = rng.uniform(0, math.pi)
            yy, xx = np.mgrid[:SIZE, :SIZE]
            side = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle) > 0
            masks += [_jitter(mask & side, noise.jitter_px, rng), _jitter(mask & ~side, noise.jitter_px, rng)]
            continue
        u -= noise.split
        if u < noise.merge and len(scene.objects) > 1:
            others = [j for j in range(len(scene.objects)) if j != i and j not in merged]
            if others:
                j = min(others, key=lambda k: float(np.linalg.norm(centres[k] - centres[i])))
                merged.add(j)
                masks.append(_jitter(mask | scene.objects[j][1], noise.jitter_px, rng))
                continue
        u -= noise.merge
        amplitude = noise.heavy_jitter_px if u < noise.heavy_jitter else noise.jitter_px
        masks.append(_jitter(mask, amplitude, rng))
    covered = np.zeros((SIZE, SIZE), bool)
    for _, m in scene.objects:
        covered |= m
    for _ in range(int(rng.poisson(noise.spurious_per_image))):
        yy, xx = np.mgrid[:SIZE, :SIZE]
        cx, cy = rng.integers(20, SIZE - 20, 2)
        ax, ay = rng.integers(8, 28, 2)
        blob = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
        blob = _jitter(blob & ~cv2.dilate(covered.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool), 2.0, rng)
        if blob.sum() >= 64:
            masks.append(blob)
    return masks


class SimulatedGenerator:
    """Stands in for the pipeline's SAM proposal generator: looks the image up, returns the noisy masks."""

    def __init__(self):
        self.by_image: dict[bytes, list[np.ndarray]] = {}

    def add(self, image: np.ndarray, masks: list[np.ndarray]) -> None:
        self.by_image[image.tobytes()] = masks

    def generate(self, image_rgb: np.ndarray, settings, embed=None):
        import torch

        from labelassist.workers.proposals import Proposals, masks_to_boxes_xyxy

        masks = self.by_image[np.ascontiguousarray(image_rgb).tobytes()]
        m = torch.as_tensor(np.stack(masks)) if masks else torch.zeros((0, SIZE, SIZE), dtype=torch.bool)
        n = m.shape[0]
        centres = torch.as_tensor(np.array([np.argwhere(x).mean(0)[::-1] for x in masks], np.float32).reshape(n, 2))
        return Proposals(m, masks_to_boxes_xyxy(m), torch.full((n,), 0.95), torch.full((n,), 0.97), centres)


# -- the simulated annotator ---------------------------------------------------------------------


def _raster(points_pct, size: int = SIZE) -> np.ndarray:
    from labelassist.plugin.corrections import rasterize_polygon_px

    r = rasterize_polygon_px([(x * size / 100.0, y * size / 100.0) for x, y in points_pct], (size, size))
    out = np.zeros((size, size), bool)
    out[r.y0:r.y0 + r.mask.shape[0], r.x0:r.x0 + r.mask.shape[1]] = r.mask
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _outline_pct(mask: np.ndarray) -> list[list[float]]:
    from labelassist.workers import geometry

    polygons = geometry.mask_to_polygons_px(mask, 64, 16, measure_iou=False)
    return geometry.polygon_px_to_pct(polygons[0].points_xy_px, (SIZE, SIZE))


def annotate(prediction_items: list[dict], scene: Scene) -> tuple[list[dict], dict[str, int]]:
    """The annotator's final result for one task, and what they did (for the ceiling)."""
    items = [i for i in prediction_items if i.get("type") == "polygonlabels"]
    rasters = [_raster(i["value"]["points"]) for i in items]
    pairs = sorted(((_iou(r, m), a, b) for a, r in enumerate(rasters) for b, (_, m) in enumerate(scene.objects)), reverse=True)
    matched_item: dict[int, tuple[int, float]] = {}
    matched_object: set[int] = set()
    for iou, a, b in pairs:
        if iou < MATCH_IOU:
            break
        if a not in matched_item and b not in matched_object:
            matched_item[a] = (b, iou)
            matched_object.add(b)
    final: list[dict] = []
    good = 0
    for a, item in enumerate(items):
        if a not in matched_item:
            continue  # deleted: it is none of the objects
        b, iou = matched_item[a]
        label = scene.objects[b][0]
        good += iou >= ACCEPT_IOU
        value = dict(item["value"])
        if iou >= ACCEPT_IOU and value["polygonlabels"] == [label]:
            final.append(dict(item, origin="prediction"))
            continue
        value["polygonlabels"] = [label]
        if iou < ACCEPT_IOU:
            value["points"] = _outline_pct(scene.objects[b][1])
        final.append(dict(item, value=value, origin="prediction-changed"))
    for b, (label, mask) in enumerate(scene.objects):
        if b not in matched_object:
            final.append({"id": f"manual-{b}", "from_name": "label", "to_name": "image", "type": "polygonlabels",
                          "original_width": SIZE, "original_height": SIZE, "image_rotation": 0, "origin": "manual",
                          "value": {"points": _outline_pct(mask), "closed": True, "polygonlabels": [label]}})
    spurious = len(items) - len(matched_item)
    return final, {"proposals": len(items), "good_outline": good, "spurious": spurious, "matched": len(matched_item)}


# -- the service, with a stub Label Studio ---------------------------------------------------------


class StubLabelStudio:
    """What the service asks Label Studio in this loop: predictions by id, the project, version updates."""

    def __init__(self, backend_title: str):
        self.predictions: dict[int, dict] = {}
        self.model_versions: list[str] = []
        self.backend = {"id": 1, "title": backend_title, "url": "http://labelassist.stub", "auth_method": "NONE"}

    def add_prediction(self, task_id: int, prediction: dict) -> int:
        pid = len(self.predictions) + 1
        self.predictions[pid] = dict(prediction, id=pid, task=task_id)
        return pid

    def request(self, method: str, path: str, json=None, **kwargs):
        parts = [p for p in path.split("/") if p]
        if method == "GET" and parts[:2] == ["api", "predictions"] and len(parts) == 3:
            return self.predictions[int(parts[2])]
        if method == "PATCH" and parts == ["api", "ml", "1"]:
            self.backend.update(json)
            return self.backend
        raise AssertionError(f"the loop does not expect {method} {path}")

    def list_ml_backends(self, project_id: int) -> list[dict]:
        return [self.backend]

    def get_project(self, project_id: int) -> dict:
        return {"id": project_id, "label_config": CONFIG}

    def update_project(self, project_id: int, **fields) -> None:
        self.model_versions.append(fields["model_version"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="training rounds after the zero-shot round")
    parser.add_argument("--tasks", type=int, default=20, help="tasks per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import cv2
    import torch
    from redis import Redis
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    from labelassist.backend.app import create_app
    from labelassist.backend.embedded import EmbeddedRedis
    from labelassist.backend.events import CorrectionProcessor, EventSink
    from labelassist.backend.hooks import event_hooks
    from labelassist.backend.queue import JobOptions, QueueClient
    from labelassist.backend.service import LabelassistModel, Runtime, VersionSource
    from labelassist.backend.settings import Settings
    from labelassist.backend.store import SQLiteCorrectionStore
    from labelassist.plugin.regions import prediction_from_result
    from labelassist.workers import jobs
    from labelassist.workers.contract import MODEL_VERSION_KEY, QUEUE_TRAIN, PredictResult
    from labelassist.workers.heads import HeadStore
    from labelassist.workers.models import ModelSpec, load_models
    from labelassist.workers.pipeline import Pipeline

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rng = np.random.default_rng(args.seed)
    noise = Noise()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="labelassist-loop-") as tmp:
        root = Path(tmp)
        (root / "files").mkdir()
        redis = EmbeddedRedis(root / "redis")
        url = redis.start()
        try:
            connection = Redis.from_url(url)
            models = load_models(ModelSpec.preset("tiny-random"), device="cpu")
            pipeline = Pipeline(models)
            simulated = SimulatedGenerator()
            pipeline.generator = simulated
            jobs.install(pipeline, connection)
            connection.set(MODEL_VERSION_KEY, pipeline.version)

            settings = Settings(redis_url=url, local_files_root=str(root / "files"), scoring=json.dumps(SCORING),
                                ls_url="http://label-studio.stub", ls_token="stub-token-0123456789")
            stub = StubLabelStudio(pipeline.version)  # connected: our backend is titled with our version
            queue = QueueClient(connection, JobOptions(600, 3600, 3600))
            runtime = Runtime.build(settings, queue, client_factory=lambda url_, token: stub)
            store = SQLiteCorrectionStore(root / "corrections.sqlite3").open()
            sink = EventSink(store, CorrectionProcessor(store, runtime.fetch_prediction, hooks=event_hooks(runtime, store))).start()
            client = create_app(settings, queue, runtime, events=sink).test_client()
            heads = HeadStore(connection)

            rounds = []
            annotation_id = 0
            for r in range(args.rounds + 1):
                if r > 0:
                    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}})
                    assert reply.status_code == 200, reply.get_json()
                    assert sink.drain(60), "the training event was not handled"
                    failed = [e for e in store.events(action="START_TRAINING") if e.status != "done"]
                    assert not failed, failed[0].error
                    SimpleWorker([Queue(QUEUE_TRAIN, connection=connection, serializer=JSONSerializer)], connection=connection,
                                 serializer=JSONSerializer).work(burst=True, logging_level="WARNING")
                runtime.versions = VersionSource(connection, settings)  # read the active head afresh
                model = LabelassistModel(PROJECT, CONFIG, runtime)
                version = model.model_version
                tasks = []
                for t in range(args.tasks):
                    task_id = r * args.tasks + t + 1
                    scene = make_scene(rng)
                    name = f"task{task_id}.png"
                    cv2.imwrite(str(root / "files" / name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
                    simulated.add(scene.image, simulate_sam(scene, noise, rng))
                    tasks.append(({"id": task_id, "data": {"image": f"/data/local-files/?d={name}"}, "project": PROJECT}, scene))
                ceiling = {"proposals": 0, "good_outline": 0, "spurious": 0, "matched": 0}
                t0 = time.perf_counter()
                for (task, scene), request in zip(tasks, model.task_requests([t for t, _ in tasks])):
                    result = PredictResult.from_json(jobs.predict(request.to_json()))
                    assert result.ok, result.error
                    prediction = prediction_from_result(result, model.config, version, model.value_key)
                    pid = stub.add_prediction(task["id"], prediction)
                    final, seen = annotate(prediction["result"], scene)
                    for k in ceiling:
                        ceiling[k] += seen[k]
                    annotation_id += 1
                    body = {"action": "ANNOTATION_CREATED", "project": {"id": PROJECT}, "task": task,
                            "annotation": {"id": annotation_id, "task": task["id"], "project": PROJECT, "result": final,
                                           "parent_prediction": pid, "updated_at": f"2026-11-23T12:00:{annotation_id % 60:02d}Z",
                                           "completed_by": 1, "lead_time": 10.0}}
                    reply = client.post("/webhook", json=body)
                    assert reply.status_code == 200, reply.get_json()
                predict_s = time.perf_counter() - t0
                assert sink.drain(120), "corrections were not all processed"
                stats = store.stats(PROJECT).versions[version]
                judged = ceiling["matched"]
                rounds.append({
                    "round": r, "model_version": version, "head": heads.active(PROJECT)[0] if r else None,
                    "head_report": heads.get(heads.active(PROJECT)[0]).report if r else None,
                    "tasks": stats.annotations, "predicted_regions": stats.predicted_regions,
                    "accepted": stats.accepted, "edited": stats.edited, "relabeled": stats.relabeled,
                    "deleted": stats.deleted, "added": stats.added,
                    "acceptance": stats.acceptance_rate, "edits_per_task": stats.edits_per_task,
                    "ceiling_acceptance": ceiling["good_outline"] / judged if judged else None,
                    "predict_s_per_task": predict_s / args.tasks,
                })
            sink.stop()
            store.close()
        finally:
            redis.stop()

    print(f"# learning loop: {args.tasks} tasks per round, {args.rounds} training rounds, seed {args.seed}; "
          f"simulated SAM noise {noise}; tiny random-weight OpenCLIP (figures of this simulation, not of trained models)")
    print(f"# {'round':>5} {'head':>14} {'regions':>7} {'acc':>4} {'edit':>4} {'relab':>5} {'del':>4} {'add':>4} "
          f"{'acceptance':>10} {'ceiling':>7} {'edits/task':>10}")
    for x in rounds:
        print(f"# {x['round']:>5} {x['head'] or 'zero-shot':>14} {x['predicted_regions']:>7} {x['accepted']:>4} {x['edited']:>4} "
              f"{x['relabeled']:>5} {x['deleted']:>4} {x['added']:>4} {_pct(x['acceptance']):>10} {_pct(x['ceiling_acceptance']):>7} "
              f"{x['edits_per_task']:>10.2f}")
    first, last = rounds[0], rounds[-1]
    print(f"# label studio was told versions: {len(stub.model_versions)}; wall {time.perf_counter() - started:.0f} s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"rounds": rounds, "noise": noise.__dict__, "seed": args.seed}, indent=2))
    print(f"acceptance: {_pct(first['acceptance'])} -> {_pct(last['acceptance'])} "
          f"edits_per_task: {first['edits_per_task']:.2f} -> {last['edits_per_task']:.2f}")
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
