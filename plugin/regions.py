"""Label Studio region JSON, out (predictions) and in (interactive prompts).

Shapes follow DESIGN.md section 3. Coordinates in Label Studio results are
percentages of the original image size, top-left origin; the job contract keeps
polygons in percent too, boxes and masks in pixels.

Result item ids are ``<region id>-<control slug>-<polygon index>`` (index 0 for
brush and rectangle items): full length, deterministic, unique within one
prediction, and the region id stays recoverable by prefix for correction diffs.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np

from labelassist.plugin.config import ControlTag, ProjectConfig
from labelassist.plugin.corrections import prediction_meta
from labelassist.plugin.errors import ContextError, UnsupportedConfigError
from labelassist.workers.contract import PredictResult, Prompt, Region
from labelassist.workers.errors import ContractError

BRUSH_ALPHA = 255  # mask pixels are written as opaque RGBA (255, 255, 255, 255)
_SLUG = re.compile(r"[^A-Za-z0-9_]+")

# Interactive context item types (Label Studio's result ``type``) -> prompt kind.
POINT_TYPES = ("keypointlabels", "keypoint")
BOX_TYPES = ("rectanglelabels", "rectangle")
# Interactive output prefers a mask control over a box control for the same label.
_INTERACTIVE_PREFERENCE = {"polygonlabels": 0, "brushlabels": 0, "rectanglelabels": 1}


def prediction_from_result(result: PredictResult, config: ProjectConfig, model_version: str,
                           value_key: str | None = None) -> dict[str, Any]:
    """One Label Studio prediction item for one task: ``{"result", "score", "model_version"}``.

    Each labelled region becomes an item in every control whose labels include
    the region's label (restricted to controls on ``value_key``'s image when
    given); regions labelled ``""`` (no concept claimed them) are skipped.

    ``score`` is the task-level score: ``PredictResult.score`` passed through,
    the pipeline's certainty about the whole image in [0, 1], lower meaning less
    certain. Label Studio's uncertainty sampling shows the lowest first. A
    failed job gives ``failed_prediction``. A region that breaks the contract
    (a mask of the wrong size, bad RLE) raises ContractError for this task.
    """
    if not result.ok:
        return failed_prediction(model_version)
    controls = config.controls if value_key is None else config.controls_for(value_key)
    pairs = [(r, c) for r in result.regions if r.label != "" for c in controls if c.has_label(r.label)]
    items: list[dict[str, Any]] = []
    if pairs:
        size_wh = _size_wh(result)
        for region, control in pairs:
            items.extend(region_items(region, control, region.label, size_wh, result.image_sha256))
    return {"result": _unique_ids(items), "score": float(result.score), "model_version": model_version}


def failed_prediction(model_version: str) -> dict[str, Any]:
    """The prediction for a task whose job failed: no regions, score 0.

    Label Studio stores it like any prediction and does not ask again for this
    model version; a caller that wants a retry leaves the task out instead.
    """
    return {"result": [], "score": 0.0, "model_version": model_version}


def interactive_result(result: PredictResult, control: ControlTag, label: str) -> list[dict[str, Any]]:
    """Result items for an interactive reply, all in ``control``.

    ``label`` is the label the annotator picked; ``""`` keeps each region's own
    label. Regions left without a label are skipped.
    """
    if not result.ok:
        return []
    named = [(r, label or r.label) for r in result.regions if label or r.label]
    items: list[dict[str, Any]] = []
    if named:
        size_wh = _size_wh(result)
        for region, name in named:
            items.extend(region_items(region, control, name, size_wh))
    return _unique_ids(items)


def region_items(region: Region, control: ControlTag, label: str, size_wh: tuple[int, int],
                 image_sha256: str = "") -> list[dict[str, Any]]:
    """The result items of one region in one control (one per polygon for PolygonLabels).

    Each item's ``meta`` carries the region's CLIP embedding and the image hash
    (``plugin.corrections.prediction_meta``), so when an annotator corrects the
    prediction, the correction log knows what the model saw without asking a worker.
    """
    width, height = size_wh
    prefix = f"{region.id}-{_slug(control.name)}"
    base = {
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.kind,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "score": float(region.score),
    }
    if region.embedding or image_sha256:
        base["meta"] = prediction_meta(region.embedding, image_sha256)
    if control.kind == "polygonlabels":
        items = []
        for index, polygon in enumerate(region.polygons_pct):
            if len(polygon) < 3:
                continue
            items.append({
                "id": f"{prefix}-{index}",
                **base,
                "value": {"points": points_pct(polygon), "closed": True, "polygonlabels": [label]},
            })
        return items
    if control.kind == "brushlabels":
        mask = mask_from_coco_rle(region.rle)
        if mask.shape != (height, width):
            raise ContractError(f"region {region.id}: mask is {mask.shape[1]}x{mask.shape[0]} px, the image {width}x{height}")
        return [{
            "id": f"{prefix}-0",
            **base,
            "value": {"format": "rle", "rle": brush_rle_from_mask(mask), "brushlabels": [label]},
        }]
    if control.kind == "rectanglelabels":
        return [{"id": f"{prefix}-0", **base, "value": {**box_pct(region.bbox_xywh_px, size_wh), "rotation": 0, "rectanglelabels": [label]}}]
    raise UnsupportedConfigError(f"control {control.name!r}: cannot write {control.kind!r} results")


def points_pct(polygon: Iterable[Sequence[float]]) -> list[list[float]]:
    """``[[x%, y%], ...]`` clamped to [0, 100] (Label Studio rejects points outside the image)."""
    return [[_clamp(float(x), 0.0, 100.0), _clamp(float(y), 0.0, 100.0)] for x, y in polygon]


def box_pct(bbox_xywh_px: Sequence[float], size_wh: tuple[int, int]) -> dict[str, float]:
    """Pixel box ``(x, y, w, h)`` -> Label Studio's ``{x, y, width, height}`` in percent, clipped to the image."""
    if len(bbox_xywh_px) != 4:
        raise ContractError(f"region box: expected (x, y, w, h) in pixels, got {tuple(bbox_xywh_px)!r}")
    width, height = size_wh
    x0, y0, w, h = (float(v) for v in bbox_xywh_px)
    x1, y1 = _clamp(x0 + w, 0.0, width), _clamp(y0 + h, 0.0, height)
    x0, y0 = _clamp(x0, 0.0, width), _clamp(y0, 0.0, height)
    return {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width, "height": 100.0 * (y1 - y0) / height}


def mask_from_coco_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO uncompressed RLE ``{"size": [h, w], "counts": [...]}`` -> bool mask of shape (h, w).

    Runs alternate background/foreground starting with background and walk the
    image column by column (COCO's Fortran order).
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ContractError(f"rle size: expected [height, width] in pixels, got {size!r}")
    if not isinstance(counts, (list, tuple)):
        raise ContractError(f"rle counts: expected a list of run lengths (uncompressed COCO RLE), got {type(counts).__name__}")
    runs = np.asarray(counts, dtype=np.int64)
    height, width = size
    if runs.ndim != 1 or (runs < 0).any() or int(runs.sum()) != height * width:
        raise ContractError(f"rle counts: expected non-negative runs adding up to {height}x{width}={height * width}, got a sum of {int(runs.sum()) if runs.ndim == 1 else '?'}")
    flat = np.repeat((np.arange(runs.size) % 2).astype(bool), runs)
    return flat.reshape((height, width), order="F")


def brush_rle_from_mask(mask: np.ndarray) -> list[int]:
    """Bool mask (h, w) -> Label Studio's brush RLE: RGBA rows, top to bottom, every channel 0 or 255."""
    from label_studio_sdk.converter.brush import mask2rle  # slow import; only brush output needs it

    return [int(b) for b in mask2rle(np.where(mask, BRUSH_ALPHA, 0).astype(np.uint8))]


def mask_from_brush_rle(rle: Sequence[int], size_wh: tuple[int, int]) -> np.ndarray:
    """Label Studio brush RLE -> bool mask (h, w), read from the alpha channel."""
    from label_studio_sdk.converter.brush import decode_rle

    width, height = size_wh
    pixels = decode_rle(list(rle))
    if pixels.size != width * height * 4:
        raise ContractError(f"brush rle: decodes to {pixels.size} values, expected {width}x{height}x4")
    return pixels.reshape(height, width, 4)[:, :, 3] > 0


def parse_interactive_context(context: Any, config: ProjectConfig) -> tuple[Prompt, str, ControlTag] | None:
    """Label Studio's interactive ``params.context`` -> (prompt in pixels, label, output control).

    ``context["result"]`` holds the annotator's smart-tool regions: keypoints
    (``type`` keypointlabels, ``value.x/y`` in percent, top-level
    ``is_positive``; a point without the flag counts as positive) and/or a
    rectangle (``value.x/y/width/height`` in percent; the last one is the box).
    Pixels come from each item's ``original_width`` / ``original_height``.

    The label is the one the annotator picked (``value.<type>[0]`` or
    ``value.labels[0]``), ``""`` when none was. The output control is the first
    PolygonLabels/BrushLabels control on the same image having that label, else
    a RectangleLabels one. Returns None when the context holds no prompt.
    """
    if not isinstance(context, dict):
        return None
    items = context.get("result")
    if not isinstance(items, list):
        return None
    points: list[tuple[float, float]] = []
    point_labels: list[int] = []
    box: tuple[float, float, float, float] | None = None
    label = ""
    to_name: str | None = None
    for item in items:
        if not isinstance(item, dict):
            raise ContextError(f"context result: expected objects, got {type(item).__name__}")
        kind = str(item.get("type", "")).lower()
        if kind not in POINT_TYPES + BOX_TYPES:
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            raise ContextError(f"context {kind} item: expected a 'value' object, got {value!r}")
        width, height = _context_size(item, kind)
        x, y = _pct(value, "x", kind) * width / 100.0, _pct(value, "y", kind) * height / 100.0
        if kind in POINT_TYPES:
            points.append((_clamp(x, 0.0, width), _clamp(y, 0.0, height)))
            point_labels.append(0 if item.get("is_positive", True) in (False, 0) else 1)
        else:
            x1 = x + _pct(value, "width", kind) * width / 100.0
            y1 = y + _pct(value, "height", kind) * height / 100.0
            box = (_clamp(x, 0.0, width), _clamp(y, 0.0, height), _clamp(x1, 0.0, width), _clamp(y1, 0.0, height))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ContextError(f"context rectangle: expected a positive width and height, got {value!r}")
        label = label or _picked_label(value, kind)
        to_name = to_name or item.get("to_name")
    if not points and box is None:
        return None
    control = _interactive_control(config, label, to_name)
    try:
        prompt = Prompt(points_xy_px=tuple(points), point_labels=tuple(point_labels), box_xyxy_px=box)
    except ContractError as exc:
        raise ContextError(f"context: {exc}") from None
    return prompt, label, control


def _interactive_control(config: ProjectConfig, label: str, to_name: str | None) -> ControlTag:
    candidates = [c for c in config.controls if to_name is None or c.to_name == to_name]
    if label:
        candidates = [c for c in candidates if c.has_label(label)]
    if not candidates:
        where = f" on image {to_name!r}" if to_name else ""
        labelled = f" with label {label!r}" if label else ""
        raise ContextError(f"interactive prompt: no PolygonLabels, BrushLabels or RectangleLabels control{labelled}{where}; add the label to one")
    return min(candidates, key=lambda c: _INTERACTIVE_PREFERENCE[c.kind])  # min is stable: config order breaks ties


def _picked_label(value: dict[str, Any], kind: str) -> str:
    for key in (kind, "labels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return ""


def _context_size(item: dict[str, Any], kind: str) -> tuple[float, float]:
    width, height = item.get("original_width"), item.get("original_height")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise ContextError(f"context {kind} item: expected positive original_width and original_height, got {width!r} x {height!r}")
    return float(width), float(height)


def _pct(value: dict[str, Any], key: str, kind: str) -> float:
    v = value.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
        raise ContextError(f"context {kind} item: expected value.{key} as a number (percent), got {v!r}")
    return float(v)


def _size_wh(result: PredictResult) -> tuple[int, int]:
    width, height = (int(v) for v in result.size_wh)
    if width <= 0 or height <= 0:
        sizes = {tuple(r.rle.get("size", ())) for r in result.regions}
        if len(sizes) == 1:
            height, width = (int(v) for v in sizes.pop())
    if width <= 0 or height <= 0:
        raise ContractError(f"predict result for task {result.task_id}: expected size_wh with the image size in pixels, got {result.size_wh!r}")
    return width, height


def _unique_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for item in items:
        base, n = item["id"], 1
        while item["id"] in seen:  # two control names that slug alike
            item["id"] = f"{base}-{n}"
            n += 1
        seen.add(item["id"])
    return items


def _slug(name: str) -> str:
    return _SLUG.sub("_", name) or "control"


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)
