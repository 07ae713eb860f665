"""The job contract between the web tier and the workers.

Both sides import this module; it depends on the standard library only, so the
web process stays free of torch. Every type validates itself on construction and
has an explicit JSON round trip (``to_json`` / ``from_json``) because jobs cross
Redis with RQ's JSON serializer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from labelassist.workers.errors import ContractError

CONTRACT_VERSION = 1

# RQ queues, highest priority first. Workers listen on the first three; training
# runs on its own workers so it never delays an annotator.
QUEUE_INTERACTIVE = "interactive"
QUEUE_PREDICT = "predict"
QUEUE_BULK = "bulk"
QUEUE_TRAIN = "train"
INFERENCE_QUEUES = (QUEUE_INTERACTIVE, QUEUE_PREDICT, QUEUE_BULK)

# Job functions, enqueued by dotted path so the web process never imports them.
PREDICT_JOB = "labelassist.workers.jobs.predict"
TRAIN_JOB = "labelassist.workers.jobs.train_head"

# Redis keys workers write and the web tier reads.
MODEL_VERSION_KEY = "labelassist:model_version"  # the version the workers serve
WORKER_MODELS_KEY = "labelassist:worker:{name}:models"  # JSON provenance of one worker's models

# A trained concept head's id (see ``labelassist.workers.heads``): "h" + 12 hex digits.
HEAD_ID_PATTERN = re.compile(r"^h[0-9a-f]{12}$")

# Proposal defaults carry segment-anything's SamAutomaticMaskGenerator meaning and
# values, so users can move their settings over unchanged.
DEFAULT_POINTS_PER_SIDE = 32
DEFAULT_POINTS_PER_BATCH = 256  # prompts decoded per forward; the stock generator uses 64
DEFAULT_PRED_IOU_THRESH = 0.88
DEFAULT_STABILITY_SCORE_THRESH = 0.95
DEFAULT_STABILITY_SCORE_OFFSET = 1.0  # logit offset for the stability score
DEFAULT_BOX_NMS_THRESH = 0.7
DEFAULT_CROP_N_LAYERS = 0
DEFAULT_CROP_NMS_THRESH = 0.7
DEFAULT_CROP_OVERLAP_RATIO = 512 / 1500
DEFAULT_CROP_N_POINTS_DOWNSCALE_FACTOR = 1
DEFAULT_MIN_MASK_REGION_AREA = 0  # px; 0 keeps every mask

# Scoring defaults (OpenCLIP region scores are softmax probabilities over the
# project's labels plus the background prompts).
DEFAULT_LABEL_THRESHOLD = 0.30  # minimum probability of the winning label
DEFAULT_MIN_MARGIN = 0.05  # minimum winning probability minus the runner-up's
DEFAULT_IMAGE_GATE_THRESHOLD = 0.0  # image-level probability a concept needs to be assigned
DEFAULT_CONTEXT_PAD = 0.15  # crop padding as a fraction of the mask box side

# Geometry defaults.
DEFAULT_MAX_VERTICES = 64  # per polygon, met by a tolerance search
DEFAULT_MIN_POLYGON_AREA_PX = 16  # components smaller than this are dropped


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ContractError(message)


def _finite(value: float, name: str, lo: float | None = None, hi: float | None = None) -> float:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}: expected a number, got {value!r}")
    value = float(value)
    _require(math.isfinite(value), f"{name}: expected a finite number, got {value!r}")
    if lo is not None:
        _require(value >= lo, f"{name}: expected >= {lo}, got {value}")
    if hi is not None:
        _require(value <= hi, f"{name}: expected <= {hi}, got {value}")
    return value


def _from_dict(cls, data: Any, what: str):
    """Build dataclass ``cls`` from a JSON object, naming unknown or missing keys."""
    _require(isinstance(data, dict), f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    _require(not unknown, f"{what}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a missing required field
        raise ContractError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Concept:
    """One label of the project and how to find it.

    ``prompts`` are the texts CLIP scores for this label (the label itself plus
    synonyms from ``predicted_values``); ``threshold`` overrides the default
    probability a region needs to be given this label.
    """

    name: str
    prompts: tuple[str, ...] = ()
    threshold: float | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and self.name.strip() != "", f"concept name: expected a non-empty string, got {self.name!r}")
        prompts = tuple(self.prompts) if self.prompts else (self.name,)
        _require(all(isinstance(p, str) and p.strip() for p in prompts), f"concept {self.name!r}: prompts must be non-empty strings, got {prompts!r}")
        object.__setattr__(self, "prompts", prompts)
        if self.threshold is not None:
            object.__setattr__(self, "threshold", _finite(self.threshold, f"concept {self.name!r} threshold", 0.0, 1.0))

    @classmethod
    def from_json(cls, data: Any) -> Concept:
        c = _from_dict(cls, data, "concept")
        return c


@dataclass(frozen=True)
class ImageSource:
    """Where a worker gets the image: an http(s) URL, a ``file://`` URL or an absolute path.

    ``headers`` carries download auth resolved by the web tier; ``sha256`` is the
    content hash when the web tier already knows it.
    """

    uri: str
    headers: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.uri, str) and self.uri != "", f"image uri: expected a non-empty string, got {self.uri!r}")
        _require(isinstance(self.headers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in self.headers.items()),
                 "image headers: expected an object of string to string")
        if self.sha256 is not None:
            _require(isinstance(self.sha256, str) and len(self.sha256) == 64, f"image sha256: expected 64 hex digits, got {self.sha256!r}")

    @classmethod
    def from_json(cls, data: Any) -> ImageSource:
        return _from_dict(cls, data, "image")


@dataclass(frozen=True)
class ProposalSettings:
    """Automatic mask proposal settings, named and valued as in segment-anything's generator."""

    points_per_side: int = DEFAULT_POINTS_PER_SIDE
    points_per_batch: int = DEFAULT_POINTS_PER_BATCH
    pred_iou_thresh: float = DEFAULT_PRED_IOU_THRESH
    stability_score_thresh: float = DEFAULT_STABILITY_SCORE_THRESH
    stability_score_offset: float = DEFAULT_STABILITY_SCORE_OFFSET
    box_nms_thresh: float = DEFAULT_BOX_NMS_THRESH
    crop_n_layers: int = DEFAULT_CROP_N_LAYERS
    crop_nms_thresh: float = DEFAULT_CROP_NMS_THRESH
    crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO
    crop_n_points_downscale_factor: int = DEFAULT_CROP_N_POINTS_DOWNSCALE_FACTOR
    min_mask_region_area: int = DEFAULT_MIN_MASK_REGION_AREA
    # Not in segment-anything: decode the grid coarse to fine (every 4th row and
    # column, then every 2nd, then the rest), each round only at points no kept
    # mask covers. Several times fewer
    # prompts on images with large objects; results differ from the full grid
    # (bench/pipeline.py measures how much).
    skip_covered_points: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.skip_covered_points, bool), f"skip_covered_points: expected a boolean, got {self.skip_covered_points!r}")
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096, f"{name}: expected an integer in [1, 4096], got {v!r}")
        for name in ("crop_n_layers", "min_mask_region_area"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name}: expected a non-negative integer, got {v!r}")
        _require(self.crop_n_layers <= 3, f"crop_n_layers: expected at most 3, got {self.crop_n_layers}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh", "crop_overlap_ratio"):
            object.__setattr__(self, name, _finite(getattr(self, name), name, 0.0, 1.0))
        object.__setattr__(self, "stability_score_offset", _finite(self.stability_score_offset, "stability_score_offset", 0.0, 100.0))

    @classmethod
    def from_json(cls, data: Any) -> ProposalSettings:
        return _from_dict(cls, data, "proposal settings")


@dataclass(frozen=True)
class ScoringSettings:
    """How CLIP probabilities become labels.

    ``label_threshold``: the winning label's probability must reach it (a
    concept's own threshold overrides it). ``min_margin``: the winner must beat
    the runner-up (background included) by this much. ``image_gate_threshold``:
    a concept whose image-level probability is below it is not assigned to any
    region. ``background_prompts``: texts whose winning means "no concept".
    """

    label_threshold: float = DEFAULT_LABEL_THRESHOLD
    min_margin: float = DEFAULT_MIN_MARGIN
    image_gate_threshold: float = DEFAULT_IMAGE_GATE_THRESHOLD
    context_pad: float = DEFAULT_CONTEXT_PAD
    background_prompts: tuple[str, ...] = ("background", "nothing in particular", "a blurry texture")
    keep_unlabeled: bool = False  # return regions no concept claimed, labelled ""

    def __post_init__(self) -> None:
        for name in ("label_threshold", "min_margin", "image_gate_threshold"):
            object.__setattr__(self, name, _finite(getattr(self, name), name, 0.0, 1.0))
        object.__setattr__(self, "context_pad", _finite(self.context_pad, "context_pad", 0.0, 2.0))
        prompts = tuple(self.background_prompts)
        _require(all(isinstance(p, str) and p.strip() for p in prompts), f"background_prompts: expected non-empty strings, got {prompts!r}")
        object.__setattr__(self, "background_prompts", prompts)
        _require(isinstance(self.keep_unlabeled, bool), f"keep_unlabeled: expected a boolean, got {self.keep_unlabeled!r}")

    @classmethod
    def from_json(cls, data: Any) -> ScoringSettings:
        return _from_dict(cls, data, "scoring settings")


@dataclass(frozen=True)
class GeometrySettings:
    max_vertices: int = DEFAULT_MAX_VERTICES
    min_polygon_area_px: int = DEFAULT_MIN_POLYGON_AREA_PX

    def __post_init__(self) -> None:
        _require(isinstance(self.max_vertices, int) and 3 <= self.max_vertices <= 10_000, f"max_vertices: expected an integer in [3, 10000], got {self.max_vertices!r}")
        _require(isinstance(self.min_polygon_area_px, int) and self.min_polygon_area_px >= 0, f"min_polygon_area_px: expected a non-negative integer, got {self.min_polygon_area_px!r}")

    @classmethod
    def from_json(cls, data: Any) -> GeometrySettings:
        return _from_dict(cls, data, "geometry settings")


@dataclass(frozen=True)
class Prompt:
    """An interactive prompt: points in pixels with labels 1 (positive) / 0 (negative), and/or a box."""

    points_xy_px: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    box_xyxy_px: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        pts = tuple(tuple(_finite(c, "prompt point", 0.0) for c in p) for p in self.points_xy_px)
        _require(all(len(p) == 2 for p in pts), "prompt points: expected [x, y] pairs")
        labels = tuple(self.point_labels)
        _require(len(labels) == len(pts), f"prompt point_labels: expected {len(pts)} labels, got {len(labels)}")
        _require(all(l in (0, 1) for l in labels), f"prompt point_labels: expected 0 or 1, got {labels!r}")
        box = self.box_xyxy_px
        if box is not None:
            box = tuple(_finite(c, "prompt box", 0.0) for c in box)
            _require(len(box) == 4 and box[2] > box[0] and box[3] > box[1], f"prompt box: expected [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box!r}")
        _require(bool(pts) or box is not None, "prompt: expected at least one point or a box")
        object.__setattr__(self, "points_xy_px", pts)
        object.__setattr__(self, "point_labels", labels)
        object.__setattr__(self, "box_xyxy_px", box)

    @classmethod
    def from_json(cls, data: Any) -> Prompt:
        return _from_dict(cls, data, "prompt")


@dataclass(frozen=True)
class PredictRequest:
    """One image to pre-annotate (or, with ``prompt``, one interactive SAM prompt)."""

    task_id: str
    image: ImageSource
    concepts: tuple[Concept, ...]
    model_version: str = ""
    proposals: ProposalSettings = field(default_factory=ProposalSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    geometry: GeometrySettings = field(default_factory=GeometrySettings)
    prompt: Prompt | None = None
    # Interactive: the label the user picked; the region gets it without CLIP deciding.
    prompt_label: str | None = None
    # The project's trained concept head to label regions with; "" for zero-shot CLIP.
    head: str = ""

    def __post_init__(self) -> None:
        _require(isinstance(self.task_id, (str, int)) and not isinstance(self.task_id, bool) and str(self.task_id) != "",
                 f"task_id: expected a non-empty string or integer, got {self.task_id!r}")
        object.__setattr__(self, "task_id", str(self.task_id))
        _require(isinstance(self.image, ImageSource), f"image: expected ImageSource, got {type(self.image).__name__}")
        concepts = tuple(self.concepts)
        _require(all(isinstance(c, Concept) for c in concepts), "concepts: expected Concept items")
        names = [c.name for c in concepts]
        _require(len(set(names)) == len(names), f"concepts: duplicate names in {names}")
        if self.prompt is None:
            _require(len(concepts) > 0, "concepts: expected at least one concept to look for, got none")
        object.__setattr__(self, "concepts", concepts)
        _require(isinstance(self.model_version, str), f"model_version: expected a string, got {self.model_version!r}")
        _require(self.head == "" or (isinstance(self.head, str) and HEAD_ID_PATTERN.match(self.head) is not None),
                 f"head: expected a concept head id like 'h0123456789ab' or \"\", got {self.head!r}")

    def job_id(self) -> str:
        """Deterministic id: same task, image and model version -> same job (idempotent re-submission)."""
        image_key = self.image.sha256 or hashlib.sha256(self.image.uri.encode()).hexdigest()
        settings = json.dumps({k: v for k, v in self.to_json().items() if k not in ("task_id", "image")}, sort_keys=True)
        digest = hashlib.sha256(f"{image_key}|{settings}".encode()).hexdigest()[:24]
        kind = "interactive" if self.prompt is not None else "predict"
        return f"la-{kind}-{self.task_id}-{digest}"

    def to_json(self) -> dict[str, Any]:
        return {"contract": CONTRACT_VERSION, **_plain(asdict(self))}

    @classmethod
    def from_json(cls, data: Any) -> PredictRequest:
        _require(isinstance(data, dict), f"predict request: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("contract", CONTRACT_VERSION)
        _require(version == CONTRACT_VERSION, f"predict request: contract version {version!r}, this worker speaks {CONTRACT_VERSION}")
        for key, sub in (("image", ImageSource), ("proposals", ProposalSettings), ("scoring", ScoringSettings),
                         ("geometry", GeometrySettings), ("prompt", Prompt)):
            if data.get(key) is not None:
                data[key] = sub.from_json(data[key])
        _require(isinstance(data.get("concepts", []), list), "concepts: expected a list")
        data["concepts"] = tuple(Concept.from_json(c) for c in data.get("concepts", []))
        return _from_dict(cls, data, "predict request")


@dataclass(frozen=True)
class Region:
    """One labelled region. Coordinates: polygons in percent of the image size
    (Label Studio's convention), everything else in pixels of the original image.

    ``rle``: COCO-style uncompressed RLE of the mask, ``{"size": [h, w], "counts": [...]}``,
    column-major runs starting with zeros (re-derive detail from it).
    ``polygon_iou``: IoU of the rasterised polygons to the mask (what the vertex
    budget cost). ``embedding``: the CLIP region embedding (L2-normalised).
    """

    id: str
    label: str
    score: float
    margin: float
    polygons_pct: tuple[tuple[tuple[float, float], ...], ...]
    rle: dict[str, Any]
    bbox_xywh_px: tuple[float, float, float, float]
    area_px: int
    predicted_iou: float
    stability_score: float
    polygon_iou: float
    embedding: tuple[float, ...] = ()
    label_scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(isinstance(self.id, str) and len(self.id) >= 16, f"region id: expected a full-length unique id, got {self.id!r}")
        for name in ("score", "margin", "predicted_iou", "stability_score", "polygon_iou"):
            object.__setattr__(self, name, _finite(getattr(self, name), f"region {name}"))
        _require(isinstance(self.rle, dict) and "size" in self.rle and "counts" in self.rle, "region rle: expected {size, counts}")

    @classmethod
    def from_json(cls, data: Any) -> Region:
        data = dict(data)
        data["polygons_pct"] = tuple(tuple(tuple(p) for p in poly) for poly in data.get("polygons_pct", ()))
        data["bbox_xywh_px"] = tuple(data.get("bbox_xywh_px", ()))
        data["embedding"] = tuple(data.get("embedding", ()))
        return _from_dict(cls, data, "region")


@dataclass(frozen=True)
class JobFailure:
    """A per-task failure the client should see: a stable ``code`` and a message saying what to do."""

    code: str
    message: str

    @classmethod
    def from_json(cls, data: Any) -> JobFailure:
        return _from_dict(cls, data, "job failure")


@dataclass(frozen=True)
class PredictResult:
    task_id: str
    model_version: str
    image_sha256: str = ""
    size_wh: tuple[int, int] = (0, 0)
    regions: tuple[Region, ...] = ()
    score: float = 0.0  # task-level score (certainty) for Label Studio's uncertainty sampling
    timings_s: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    error: JobFailure | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"contract": CONTRACT_VERSION, **_plain(asdict(self))}

    @classmethod
    def from_json(cls, data: Any) -> PredictResult:
        _require(isinstance(data, dict), f"predict result: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        data.pop("contract", None)
        data["regions"] = tuple(Region.from_json(r) for r in data.get("regions", ()))
        data["size_wh"] = tuple(data.get("size_wh", (0, 0)))
        if data.get("error") is not None:
            data["error"] = JobFailure.from_json(data["error"])
        return _from_dict(cls, data, "predict result")


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so ``json.dumps`` output equals what comes back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
