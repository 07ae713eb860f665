"""Label Studio labeling configs -> what labelassist looks for and where it writes.

A config is supported when it has at least one PolygonLabels, BrushLabels or
RectangleLabels control bound to an Image; other controls (Choices, TextArea,
KeyPointLabels, ...) are left to the annotator. Attributes labelassist reads:

- on a ``<Label>``: ``predicted_values="kitty, feline"`` (extra CLIP prompts,
  comma separated) and ``threshold="0.4"`` (the probability this label needs);
  ``alias`` is honoured as Label Studio does: the result carries the alias and
  the human-readable ``value`` becomes the first prompt;
- on a control tag: ``threshold`` (the default for its labels) and
  ``min_margin`` / ``image_gate_threshold`` (see ``ScoringSettings``).

Attribute names are matched case-insensitively, as Label Studio's editor does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable

import defusedxml.ElementTree as safe_etree
from defusedxml import DefusedXmlException

from labelassist.plugin.errors import UnsupportedConfigError
from labelassist.workers.contract import Concept
from labelassist.workers.errors import ContractError

# Control tag (lower-cased) -> the Label Studio result ``type`` it produces.
SUPPORTED_CONTROLS = {
    "polygonlabels": "polygonlabels",
    "brushlabels": "brushlabels",
    "rectanglelabels": "rectanglelabels",
}
SUPPORTED_TEXT = "PolygonLabels, BrushLabels or RectangleLabels bound to an Image"
SYNONYMS_ATTR = "predicted_values"
THRESHOLD_ATTR = "threshold"
# Control attributes that override ScoringSettings fields of the same name.
SCORING_ATTRS = ("min_margin", "image_gate_threshold")
PARSE_CACHE_SIZE = 64  # distinct configs kept parsed; /predict sends the config with every call


@dataclass(frozen=True)
class ControlTag:
    """One output control: where labelassist writes regions.

    ``name`` is the result's ``from_name``; ``to_name`` the Image tag's name;
    ``value_key`` the task data key holding the image (``"image"`` for
    ``value="$image"``); ``kind`` the result type. Each concept's threshold is
    the label's own, else the control's ``threshold`` (kept here as given).
    ``min_margin`` / ``image_gate_threshold``: the control's scoring attributes.
    """

    name: str
    to_name: str
    kind: str
    value_key: str
    concepts: tuple[Concept, ...]
    threshold: float | None = None
    min_margin: float | None = None
    image_gate_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SUPPORTED_CONTROLS:
            raise UnsupportedConfigError(f"control {self.name!r}: kind {self.kind!r} is not one of {sorted(SUPPORTED_CONTROLS)}")
        if not self.concepts:
            raise UnsupportedConfigError(f"control {self.name!r}: expected at least one label")

    def labels(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.concepts)

    def has_label(self, label: str) -> bool:
        return any(c.name == label for c in self.concepts)


@dataclass(frozen=True)
class ProjectConfig:
    controls: tuple[ControlTag, ...]

    def __post_init__(self) -> None:
        if not self.controls:
            raise UnsupportedConfigError(f"labelassist needs at least one {SUPPORTED_TEXT}; got none")

    def concepts(self) -> tuple[Concept, ...]:
        """Every label once, in config order.

        A label in several controls keeps the union of their prompts and the
        first threshold set, in config order.
        """
        merged: dict[str, Concept] = {}
        for control in self.controls:
            for concept in control.concepts:
                seen = merged.get(concept.name)
                if seen is None:
                    merged[concept.name] = concept
                else:
                    merged[concept.name] = Concept(
                        concept.name,
                        _unique(seen.prompts + concept.prompts),
                        seen.threshold if seen.threshold is not None else concept.threshold,
                    )
        return tuple(merged.values())

    def scoring_overrides(self) -> dict[str, float]:
        """``ScoringSettings`` fields set by control attributes (``min_margin=...``).

        One image is scored once for all its controls, so where controls
        disagree the strictest (largest) value wins.
        """
        out: dict[str, float] = {}
        for control in self.controls:
            for name in SCORING_ATTRS:
                value = getattr(control, name)
                if value is not None:
                    out[name] = max(out.get(name, value), value)
        return out

    def controls_for(self, value_key: str) -> tuple[ControlTag, ...]:
        """The controls writing onto the image at task data key ``value_key``."""
        return tuple(c for c in self.controls if c.value_key == value_key)

    def value_keys(self) -> tuple[str, ...]:
        """Task data keys of the images to pre-annotate, in config order."""
        return _unique(c.value_key for c in self.controls)


def parse_label_config(xml: str) -> ProjectConfig:
    """Parse a Label Studio labeling config; raise UnsupportedConfigError naming what was found."""
    if not isinstance(xml, str) or not xml.strip():
        raise UnsupportedConfigError(f"label config: expected XML text with {SUPPORTED_TEXT}; got {type(xml).__name__} {str(xml)[:40]!r}")
    return _parse_cached(xml)


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _parse_cached(xml: str) -> ProjectConfig:
    # defusedxml first: /setup and /predict are unauthenticated, so a DTD or
    # entity declaration is refused before any other parser sees the text.
    try:
        safe_etree.fromstring(xml)
    except DefusedXmlException as exc:
        raise UnsupportedConfigError(f"label config: DTDs and entity declarations are not allowed ({type(exc).__name__})") from None
    except safe_etree.ParseError as exc:
        raise UnsupportedConfigError(f"label config is not valid XML ({exc}); labelassist expects {SUPPORTED_TEXT}") from None

    # The SDK's parser is Label Studio's own view of controls, objects and labels
    # (alias handling, labels nested in Views); imported here because it is slow to import.
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(xml)
    found: list[str] = []
    controls: list[ControlTag] = []
    for tag in interface.controls:
        kind = SUPPORTED_CONTROLS.get(tag.tag.lower())
        found.append(f"{tag.tag} {tag.name!r}")
        if kind is not None:
            controls.append(_control(tag, kind))
    if not controls:
        what = ", ".join(found) if found else "no control tags"
        raise UnsupportedConfigError(f"labelassist needs at least one {SUPPORTED_TEXT}; the config has {what}")
    return ProjectConfig(tuple(controls))


def _control(tag: Any, kind: str) -> ControlTag:
    where = f"{tag.tag} {tag.name!r}"
    if len(tag.to_name) != 1:
        raise UnsupportedConfigError(f"{where}: expected toName to name one Image, got {','.join(tag.to_name)!r}")
    to_name = tag.to_name[0]
    image = next((o for o in tag.objects if o.name == to_name), None)
    if image is None:
        raise UnsupportedConfigError(f"{where}: toName={to_name!r} names no tag in the config; add <Image name={to_name!r} value=\"$image\"/>")
    if image.tag.lower() != "image":
        raise UnsupportedConfigError(f"{where}: toName={to_name!r} is a <{image.tag}>; labelassist labels <Image> only")
    value = image.value or ""
    if not value.startswith("$") or len(value) < 2:
        raise UnsupportedConfigError(f"{where}: Image {to_name!r} has value={value!r}; expected a task data key such as \"$image\"")
    attrs = _lower(tag.attr)
    threshold = _probability(attrs.get(THRESHOLD_ATTR), f"{where} threshold")
    concepts = tuple(_concept(label, threshold, where) for label in (tag.labels_attrs or {}).values())
    if not concepts:
        raise UnsupportedConfigError(f"{where}: has no <Label value=...> children; add the labels to look for")
    scoring = {name: _probability(attrs.get(name), f"{where} {name}") for name in SCORING_ATTRS}
    return ControlTag(name=tag.name, to_name=to_name, kind=kind, value_key=value[1:], concepts=concepts, threshold=threshold, **scoring)


def _concept(label: Any, control_threshold: float | None, where: str) -> Concept:
    attrs = _lower(label.attr)
    name = label.value  # alias or value: what Label Studio writes into results
    text = attrs.get("value") or name
    synonyms = [s.strip() for s in (attrs.get(SYNONYMS_ATTR) or "").split(",")]
    threshold = _probability(attrs.get(THRESHOLD_ATTR), f"{where} label {name!r} threshold")
    if threshold is None:
        threshold = control_threshold
    try:
        return Concept(name=name, prompts=_unique([text.strip(), *synonyms]), threshold=threshold)
    except ContractError as exc:
        raise UnsupportedConfigError(f"{where}: {exc}") from None


def _probability(raw: str | None, what: str) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise UnsupportedConfigError(f"{what}: expected a number in [0, 1], got {raw!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise UnsupportedConfigError(f"{what}: expected a number in [0, 1], got {raw!r}")
    return value


def _lower(attrs: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in attrs.items()}


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))
