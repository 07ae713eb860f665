"""Errors raised on the worker side, as one tree.

    LabelassistError
    ├── ContractError          a job payload or result that breaks the contract
    ├── ImageError             the image cannot be used (fetch, decode, size)
    │   ├── ImageFetchError
    │   └── ImageDecodeError
    ├── ConceptError           nothing to look for, or a bad concept set
    └── WeightsError           weights missing, unreachable or corrupt

Input errors (everything but WeightsError) become a per-task ``JobFailure`` in
the result: the job itself succeeds, the worker lives on and the client sees
``code`` and ``message``. Anything else fails the job, and RQ retries it.
"""

from __future__ import annotations


class LabelassistError(Exception):
    """Base of every error labelassist raises on purpose."""

    code = "error"


class ContractError(LabelassistError, ValueError):
    code = "bad_request"


class ImageError(LabelassistError):
    code = "bad_image"


class ImageFetchError(ImageError):
    code = "image_unavailable"


class ImageDecodeError(ImageError):
    code = "bad_image"


class ConceptError(LabelassistError, ValueError):
    code = "bad_concepts"


class WeightsError(LabelassistError):
    code = "weights_unavailable"


class TrainingError(LabelassistError):
    """Training a concept head cannot start, or did not finish; the message says why and what to do."""

    code = "training"
