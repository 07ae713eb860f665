"""OpenCLIP concept scoring: which of the project's labels each mask is, if any.

A mask is shown to CLIP as a crop of its box with context padding, the pixels
outside the mask greyed, so the crop is about the mask and not its neighbours.
All crops of an image are cut, resized and normalised on the device in one
``roi_align`` call and encoded in batched forwards. Labels are scored by a
softmax over the project's concepts *and* a background class, so a mask that
is none of the labels can lose; a concept must also pass an image-level gate
(is it in this image at all?), its threshold, and a margin over the runner-up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labelassist.workers.contract import Concept, ScoringSettings
from labelassist.workers.errors import ConceptError
from labelassist.workers.heads import ConceptHead, HeadError

# Averaged per label; the ensemble is more robust than the bare label name.
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)
BACKGROUND = ""  # the label of the background class in label_scores
OUTSIDE_MASK_KEEP = 0.3  # outside the mask: this much of the image, the rest grey
OUTSIDE_MASK_GREY = 0.5  # grey level in [0, 1]
CROP_BATCH = 128  # crops per CLIP forward
TEXT_CACHE_SIZE = 64  # concept sets whose text embeddings are kept


@dataclass(frozen=True)
class TextBank:
    """Normalised text embeddings: one row per concept, then the background row if there are
    background prompts. (K + 1, D) or (K, D)."""

    names: tuple[str, ...]
    embeddings: torch.Tensor

    def probs(self, image_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """Softmax over concepts and background, (N, K + 1); without background prompts its column is 0."""
        logits = logit_scale * image_embeddings @ self.embeddings.T
        if self.embeddings.shape[0] == len(self.names):
            logits = torch.cat([logits, torch.full_like(logits[:, :1], float("-inf"))], dim=1)
        return torch.softmax(logits, dim=-1)


@dataclass
class RegionScores:
    """Per-region scoring output, aligned with the input masks.

    ``labels[i]``: the assigned concept name, or "" when rejected.
    ``probs``: (N, K + 1) softmax over concepts then background.
    ``embeddings``: (N, D) normalised CLIP region embeddings.
    """

    labels: list[str]
    scores: np.ndarray
    margins: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    image_probs: dict[str, float]
    present: tuple[str, ...]


class ConceptScorer:
    def __init__(self, clip, device: torch.device, dtype: torch.dtype):
        self.clip = clip
        self.device = device
        self.dtype = dtype
        self._text_cache: OrderedDict[tuple, TextBank] = OrderedDict()
        self.mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)
        self.logit_scale = float(clip.model.logit_scale.exp().item()) if hasattr(clip.model, "logit_scale") else 100.0

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=enabled)

    @torch.inference_mode()
    def text_bank(self, concepts: tuple[Concept, ...], background_prompts: tuple[str, ...]) -> TextBank:
        """Text embeddings for a concept set, cached: the same project asks for the same set every job."""
        if not concepts:
            raise ConceptError("no concepts to score: the labeling config must define at least one label")
        key = (tuple((c.name, c.prompts) for c in concepts), background_prompts)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        rows = [self._encode_prompts(c.prompts) for c in concepts]
        if background_prompts:
            rows.append(self._encode_prompts(background_prompts, templated=False))
        bank = TextBank(tuple(c.name for c in concepts), torch.stack(rows))
        self._text_cache[key] = bank
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return bank

    def _encode_prompts(self, prompts: tuple[str, ...], templated: bool = True) -> torch.Tensor:
        texts = [t.format(p) for p in prompts for t in PROMPT_TEMPLATES] if templated else list(prompts)
        tokens = self.clip.tokenizer(texts).to(self.device)
        with self._autocast():
            emb = self.clip.model.encode_text(tokens).float()
        emb = F.normalize(emb, dim=-1).mean(0)
        return F.normalize(emb, dim=0)

    @torch.inference_mode()
    def encode_crops(self, image: torch.Tensor, boxes_xyxy: torch.Tensor, masks: torch.Tensor | None, context_pad: float) -> torch.Tensor:
        """Normalised CLIP embeddings of masked crops.

        ``image``: (3, H, W) float in [0, 1] on the device. ``boxes_xyxy``: (N, 4) px.
        ``masks``: (N, H, W) bool, or None to embed plain box crops. Returns (N, D).
        """
        from torchvision.ops import roi_align

        n = boxes_xyxy.shape[0]
        size = self.clip.image_size
        if n == 0:
            return torch.zeros((0, 0), device=self.device)
        rois = _square_padded_boxes(boxes_xyxy.float(), context_pad, image.shape[-2:])
        idx = torch.zeros((n, 1), device=self.device)
        out = []
        for start in range(0, n, CROP_BATCH):
            sl = slice(start, start + CROP_BATCH)
            batch_rois = torch.cat([idx[sl], rois[sl]], dim=1)
            crops = roi_align(image[None], batch_rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
            if masks is not None:
                # A crop samples about two mask pixels per output pixel, so finer mask detail
                # is averaged away anyway: subsample first rather than turn every pixel into a float.
                stride = max(1, min(masks.shape[-2:]) // (2 * size))
                m = masks[sl, ::stride, ::stride].float()[:, None]
                mroi = torch.cat([torch.arange(m.shape[0], device=self.device, dtype=torch.float32)[:, None], rois[sl]], dim=1)
                inside = roi_align(m, mroi, output_size=(size, size), spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)
                outside = OUTSIDE_MASK_KEEP * crops + (1 - OUTSIDE_MASK_KEEP) * OUTSIDE_MASK_GREY
                crops = inside * crops + (1 - inside) * outside
            crops = (crops - self.mean) / self.std
            with self._autocast():
                emb = self.clip.model.encode_image(crops).float()
            out.append(F.normalize(emb, dim=-1))
        return torch.cat(out)

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-image embedding (1, D), the image resized to the CLIP input (aspect not kept: nothing cut off)."""
        x = F.interpolate(image[None], (self.clip.image_size, self.clip.image_size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        with self._autocast():
            return F.normalize(self.clip.model.encode_image(x).float(), dim=-1)

    def classifier(self, bank: TextBank, head: ConceptHead | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Region classifier rows for ``bank``'s concepts then background: (K + 1, D) weights, (K + 1,) bias.

        Zero-shot, a row is the concept's text embedding times CLIP's logit scale.
        A trained ``head`` supplies the rows of the labels it knows and the
        background row; the others stay zero-shot. Without any background (no
        prompts, no head) the background bias is -inf: it never wins.
        """
        k, dim = len(bank.names), bank.embeddings.shape[1]
        weights = self.logit_scale * bank.embeddings[:k]
        background = self.logit_scale * bank.embeddings[k:k + 1]
        bias = torch.zeros(k + 1, device=self.device)
        if head is None:
            if background.shape[0] == 0:
                background = torch.zeros((1, dim), device=self.device)
                bias[k] = float("-inf")
            return torch.cat([weights, background]), bias
        if head.dim != dim:
            raise HeadError(f"concept head {head.id} expects {head.dim}-d CLIP embeddings, these models make {dim}-d ones")
        rows = torch.as_tensor(head.weights, device=self.device)
        head_bias = torch.as_tensor(head.bias, device=self.device)
        index = {name: i for i, name in enumerate(head.labels)}
        weights = weights.clone()
        for j, name in enumerate(bank.names):
            if name in index:
                weights[j] = rows[index[name]]
                bias[j] = head_bias[index[name]]
        bias[k] = head_bias[-1]
        return torch.cat([weights, rows[-1:]]), bias

    def score(self, image_rgb: np.ndarray, masks: torch.Tensor, boxes_xyxy: torch.Tensor,
              concepts: tuple[Concept, ...], settings: ScoringSettings, head: ConceptHead | None = None) -> RegionScores:
        """Assign a concept (or none) to every mask of one image; ``head``: a trained classifier to use."""
        bank = self.text_bank(concepts, settings.background_prompts)
        image = torch.as_tensor(image_rgb, device=self.device).permute(2, 0, 1).float() / 255.0
        k = len(bank.names)

        image_emb = self.encode_image(image)
        image_probs = bank.probs(image_emb, self.logit_scale)[0]
        present = image_probs[:k] >= settings.image_gate_threshold

        region_emb = self.encode_crops(image, boxes_xyxy, masks, settings.context_pad)
        if region_emb.shape[0] == 0:
            region_emb = torch.zeros((0, bank.embeddings.shape[1]), device=self.device)
        weights, bias = self.classifier(bank, head)
        probs = torch.softmax(region_emb @ weights.T + bias, dim=-1)
        learned = head.thresholds if head is not None else {}
        thresholds = [c.threshold if c.threshold is not None else learned.get(c.name, settings.label_threshold) for c in concepts]
        labels, scores, margins = assign_labels(probs, present, concepts, settings, thresholds)
        return RegionScores(
            labels=labels,
            scores=scores,
            margins=margins,
            probs=probs.cpu().numpy(),
            embeddings=region_emb.cpu().numpy(),
            image_probs={name: float(p) for name, p in zip(bank.names, image_probs[:k].tolist())},
            present=tuple(n for n, ok in zip(bank.names, present.tolist()) if ok),
        )


def assign_labels(probs: torch.Tensor, present: torch.Tensor, concepts: tuple[Concept, ...],
                  settings: ScoringSettings, thresholds: list[float] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Decide each region's label from its probabilities.

    ``probs``: (N, K + 1), concepts then background. ``present``: (K,) bool image gate.
    Returns (labels with "" for rejected, winner probability (N,), margin to the
    runner-up including background (N,)). A region is rejected when its best
    present concept is beaten by background, is under its threshold, or leads by
    less than ``min_margin``. ``thresholds``: one per concept; by default each
    concept's own, else ``settings.label_threshold``.
    """
    n, k1 = probs.shape
    k = k1 - 1
    if n == 0:
        return [], np.zeros(0, np.float32), np.zeros(0, np.float32)
    gated = probs[:, :k].masked_fill(~present[None, :], -1.0)
    best_p, best = gated.max(dim=1)
    # The runner-up is whatever else has the most probability, background included.
    others = probs.clone()
    others[torch.arange(n), best] = -1.0
    second = others.max(dim=1).values
    margin = (best_p - second).clamp(min=0.0)
    if thresholds is None:
        thresholds = [c.threshold if c.threshold is not None else settings.label_threshold for c in concepts]
    thresholds = torch.tensor(thresholds, device=probs.device)
    ok = (best_p >= 0) & (best_p >= thresholds[best]) & (margin >= settings.min_margin) & (best_p >= probs[:, k])
    names = [c.name for c in concepts]
    labels = [names[b] if good else "" for b, good in zip(best.tolist(), ok.tolist())]
    return labels, best_p.clamp(min=0).cpu().numpy(), margin.cpu().numpy()


def _square_padded_boxes(boxes: torch.Tensor, pad: float, hw) -> torch.Tensor:
    """Boxes grown by ``pad`` x their longer side and made square around their centre, in px (N, 4).

    Squares keep the object's aspect ratio through the resize to CLIP's square
    input; parts outside the image sample zeros (roi_align), which is fine: it
    only happens at the border.
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    # segment-anything boxes are inclusive: a one-pixel mask has x0 == x1.
    side = torch.maximum(x1 - x0 + 1, y1 - y0 + 1) * (1 + 2 * pad)
    cx = (x0 + x1 + 1) / 2
    cy = (y0 + y1 + 1) / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)
