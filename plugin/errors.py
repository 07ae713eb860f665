"""Errors raised by the Label Studio-facing layer, as one tree.

    LabelassistError                 (labelassist.workers.errors)
    └── PluginError
        ├── UnsupportedConfigError   the labeling config has nothing labelassist can fill in
        ├── ImageReferenceError      a task's image reference cannot or may not be fetched
        ├── ContextError             an interactive request's context is malformed
        └── LabelStudioAPIError      Label Studio's API refused a call or could not be reached

Every message says what was expected, what was found and what to change; none
carries a traceback or a credential, so the HTTP layer can show ``code`` and
``str(error)`` to the client as they are.
"""

from __future__ import annotations

from labelassist.workers.errors import LabelassistError


class PluginError(LabelassistError):
    code = "plugin"


class UnsupportedConfigError(PluginError, ValueError):
    code = "unsupported_config"


class ImageReferenceError(PluginError, ValueError):
    code = "bad_image_ref"


class ContextError(PluginError, ValueError):
    code = "bad_context"


class LabelStudioAPIError(PluginError):
    """``status`` is the HTTP status Label Studio answered, or None when it could not be reached."""

    code = "label_studio_api"

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status = status
        self.detail = detail
