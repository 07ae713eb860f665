"""The pre-annotation pipeline: image -> SAM proposals -> CLIP labels -> polygons.

``Pipeline.run(request)`` never raises for bad input: an image that cannot be
fetched or decoded, or a request without concepts, becomes a result whose
``error`` says what is wrong, so one bad task never takes a worker down.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from labelassist.workers import geometry
from labelassist.workers.contract import JobFailure, PredictRequest, PredictResult, Region
from labelassist.workers.errors import ConceptError, LabelassistError, WeightsError
from labelassist.workers.heads import ConceptHead, HeadError, versioned
from labelassist.workers.images import (
    DEFAULT_EMBEDDING_CACHE_SIZE,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    load_image,
)
from labelassist.workers.proposals import ImageEmbedding, ProposalGenerator, Proposals, SamEngine, masks_to_boxes_xyxy
from labelassist.workers.scoring import ConceptScorer

log = logging.getLogger(__name__)

REGION_ID_CHARS = 24  # hex digits; ids are deterministic per task, image, model and region


@dataclass(frozen=True)
class PipelineLimits:
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    embedding_cache_size: int = DEFAULT_EMBEDDING_CACHE_SIZE


class EmbeddingCache:
    """Bounded LRU of SAM image embeddings keyed by (image sha256, crop box).

    One cache belongs to one resident SAM, so the model is part of the key by
    construction. Interactive prompts on an image that was just pre-annotated
    reuse its embedding and skip the encoder.
    """

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, ImageEmbedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: tuple, compute) -> ImageEmbedding:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = compute()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


class Pipeline:
    """Resident models plus everything per job. One per worker process."""

    def __init__(self, models, limits: PipelineLimits = PipelineLimits(), compile_decoder: bool = False):
        self.models = models
        self.limits = limits
        self.engine = SamEngine(models.sam, models.device, models.dtype)
        if compile_decoder:
            self.engine.compile()
        self.generator = ProposalGenerator(self.engine)
        self.scorer = ConceptScorer(models.clip, models.device, models.dtype)
        self.embeddings = EmbeddingCache(limits.embedding_cache_size)

    def warm_up(self) -> None:
        """Run the compiled decoder once so compilation happens at start-up, not in the first job."""
        t = time.perf_counter()
        emb = self.engine.embed(np.zeros((64, 64, 3), np.uint8))
        self.engine.decode_points(emb, torch.full((1, 2), 32.0))
        log.info("mask decoder ready in %.1f s", time.perf_counter() - t)

    @property
    def version(self) -> str:
        return self.models.version

    def run(self, request: PredictRequest, head: ConceptHead | None = None) -> PredictResult:
        """Run one request, labelling regions with ``head`` (a trained concept head) when given, else zero-shot.

        Input problems come back as ``result.error``.
        """
        version = versioned(self.version, head.id if head is not None else None)
        try:
            if head is not None and head.base_version != self.version:
                raise HeadError(f"concept head {head.id} was trained for models {head.base_version}, this worker serves "
                                f"{self.version}; train the project again on these models")
            return self._run(request, head, version)
        except WeightsError:
            raise
        except LabelassistError as exc:
            log.warning("task %s: %s", request.task_id, exc)
            return PredictResult(task_id=request.task_id, model_version=version,
                                 error=JobFailure(exc.code, str(exc)), provenance=self.models.provenance)

    def _run(self, request: PredictRequest, head: ConceptHead | None, version: str) -> PredictResult:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image, sha = load_image(request.image, self.limits.max_image_bytes, self.limits.max_image_pixels)
        timings["load_s"] = time.perf_counter() - t0
        h, w = image.shape[:2]

        def embed(crop: np.ndarray, box: tuple) -> ImageEmbedding:
            return self.embeddings.get_or_compute((sha, box), lambda: self.engine.embed(crop))

        chosen_label = request.prompt is not None and bool(request.prompt_label)
        if not request.concepts and not chosen_label:
            raise ConceptError("no concepts to look for: the labeling config must define at least one label")
        t = time.perf_counter()
        if request.prompt is not None:
            emb = embed(image, (0, 0, w, h))
            timings["embed_s"] = time.perf_counter() - t
            t = time.perf_counter()
            mask, iou = self.engine.predict_prompt(emb, request.prompt)
            masks = mask[None]
            proposals = Proposals(masks, masks_to_boxes_xyxy(masks), torch.tensor([iou]), torch.tensor([1.0]), torch.zeros((1, 2)))
        else:
            proposals = self.generator.generate(image, request.proposals, embed=embed)
        timings["proposals_s"] = time.perf_counter() - t

        t = time.perf_counter()
        n = len(proposals)
        scored = None
        if request.concepts:
            scored = self.scorer.score(image, proposals.masks, proposals.boxes_xyxy_px, request.concepts, request.scoring, head)
        if chosen_label:
            # The annotator picked the label; CLIP still embeds the region for the correction log.
            labels = [request.prompt_label] * n
            scores = proposals.predicted_iou.cpu().numpy().astype(np.float32)
            margins = np.ones(n, np.float32)
        else:
            labels, scores, margins = scored.labels, scored.scores, scored.margins
        if scored is not None:
            names = [c.name for c in request.concepts]
            label_scores = [dict(zip(names, row[: len(names)].tolist())) | {"background": float(row[-1])} for row in scored.probs]
            embeddings, image_probs, present = scored.embeddings, scored.image_probs, scored.present
        else:
            label_scores, embeddings, image_probs, present = [{}] * n, np.zeros((n, 0), np.float32), {}, ()
        timings["scoring_s"] = time.perf_counter() - t

        t = time.perf_counter()
        keep = [i for i, label in enumerate(labels) if label or request.scoring.keep_unlabeled]
        regions = self._regions(request, sha, image.shape[:2], proposals, keep, labels, scores, margins, embeddings, label_scores,
                                version)
        timings["geometry_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0

        certainty = float(np.mean([r.margin for r in regions if r.label])) if any(r.label for r in regions) else 0.0
        provenance = dict(self.models.provenance)
        provenance.update({
            "proposals": len(proposals),
            "concepts_present": list(present),
            "image_concept_probs": image_probs,
            "scoring": {"label_threshold": request.scoring.label_threshold, "min_margin": request.scoring.min_margin,
                        "image_gate_threshold": request.scoring.image_gate_threshold,
                        "background_prompts": list(request.scoring.background_prompts)},
            "concept_prompts": {c.name: list(c.prompts) for c in request.concepts},
            "embedding_cache": {"hits": self.embeddings.hits, "misses": self.embeddings.misses},
            "concept_head": ({"id": head.id, "labels": list(head.labels), "thresholds": head.thresholds}
                             if head is not None else None),
        })
        return PredictResult(task_id=request.task_id, model_version=version, image_sha256=sha, size_wh=(w, h),
                             regions=tuple(regions), score=certainty, timings_s=timings, provenance=provenance)

    def _regions(self, request, sha, size_hw, proposals, keep, labels, scores, margins, embeddings, label_scores,
                 version) -> list[Region]:
        if not keep:
            return []
        h, w = size_hw
        idx = torch.tensor(keep, dtype=torch.long, device=proposals.masks.device)
        masks = proposals.masks[idx]
        # One device-to-host copy for the kept masks; RLE runs found on the device.
        rles = geometry.masks_to_rle_torch(masks)
        masks_np = masks.cpu().numpy()
        ious = proposals.predicted_iou[idx].tolist()
        stabs = proposals.stability_score[idx].tolist()
        regions = []
        for j, i in enumerate(keep):
            mask = masks_np[j]
            polys = geometry.mask_to_polygons_px(mask, request.geometry.max_vertices, request.geometry.min_polygon_area_px,
                                                 measure_iou=False)
            if not polys:
                continue
            region_id = hashlib.sha256(f"{request.task_id}|{sha}|{version}|{i}".encode()).hexdigest()[:REGION_ID_CHARS]
            regions.append(Region(
                id=region_id,
                label=labels[i],
                score=float(scores[i]),
                margin=float(margins[i]),
                polygons_pct=tuple(tuple(tuple(pt) for pt in geometry.polygon_px_to_pct(p.points_xy_px, (w, h))) for p in polys),
                rle=rles[j],
                bbox_xywh_px=geometry.bbox_xywh_px(mask),
                area_px=geometry.area_px(mask),
                predicted_iou=float(ious[j]),
                stability_score=float(stabs[j]),
                polygon_iou=geometry.polygons_iou([p.points_xy_px for p in polys], mask),
                embedding=tuple(float(x) for x in embeddings[i]) if embeddings.shape[1] else (),
                label_scores={k: float(v) for k, v in label_scores[i].items()},
            ))
        return regions

