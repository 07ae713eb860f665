"""Service settings: one frozen object, read from the environment once at the edge.

Every setting has an environment variable ``LABELASSIST_<NAME>`` and a CLI option;
defaults are the named constants below, with their units.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from labelassist.workers.images import DEFAULT_EMBEDDING_CACHE_SIZE, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from labelassist.workers.weights import default_cache_dir

ENV_PREFIX = "LABELASSIST_"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9090  # Label Studio's conventional ML-backend port
DEFAULT_MODELS = "default"  # SAM vit_b + OpenCLIP ViT-B-32 laion2b_s34b_b79k; "tiny-random" for wiring checks
DEFAULT_DEVICE = "auto"  # CUDA with bf16 where present, else CPU fp32
DEFAULT_PREDICT_WAIT_S = 60.0  # how long /predict waits for jobs; Label Studio gives up at 100 s
DEFAULT_JOB_TIMEOUT_S = 600  # one image through the whole pipeline, worst case on a CPU
DEFAULT_INTERACTIVE_TIMEOUT_S = 60
DEFAULT_RESULT_TTL_S = 24 * 3600  # finished results stay this long, so a late reader still finds them
DEFAULT_FAILURE_TTL_S = 7 * 24 * 3600
DEFAULT_COMPILE_DECODER = "auto"  # on, off, or auto: on unless the models are tiny-random (start-up speed)
DEFAULT_TORCH_THREADS = 0  # 0: leave torch's default
DEFAULT_INTERACTIVE_WAIT_S = 30.0  # how long an interactive /predict waits for its one prompt
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024  # larger HTTP bodies get 413 (a /predict of ~10k tasks fits)
DEFAULT_WEB_THREADS = 16  # request threads: /health must answer while /predict calls wait on jobs
DEFAULT_PUSH_INTERVAL_S = 1.0  # how often the follow-up looks for finished jobs to push to Label Studio
DEFAULT_PREANNOTATE_NEW_TASKS = False  # pre-annotate tasks on Label Studio's TASKS_CREATED webhook
TRUE_WORDS = ("1", "true", "yes", "on")  # how a boolean setting is switched on in the environment
FALSE_WORDS = ("0", "false", "no", "off")


def default_data_dir() -> Path:
    """Where kept data lives (the correction store), apart from the disposable cache."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "labelassist"


@dataclass(frozen=True)
class Settings:
    # Queue: None means "embedded": serve starts a private Redis and one worker itself.
    redis_url: str | None = None
    # Models and devices (workers).
    models: str = DEFAULT_MODELS
    sam_model: str | None = None  # overrides the preset's SAM (vit_b, vit_l, vit_h, tiny-random)
    sam_weights: str | None = None  # local path or URL; None: the registry's URL into the cache
    clip_model: str | None = None
    clip_pretrained: str | None = None  # tag or local file
    device: str = DEFAULT_DEVICE
    cache_dir: Path = default_cache_dir()
    torch_threads: int = DEFAULT_TORCH_THREADS
    compile_decoder: str = DEFAULT_COMPILE_DECODER
    embedding_cache_size: int = DEFAULT_EMBEDDING_CACHE_SIZE
    # Jobs.
    job_timeout_s: int = DEFAULT_JOB_TIMEOUT_S
    interactive_timeout_s: int = DEFAULT_INTERACTIVE_TIMEOUT_S
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    failure_ttl_s: int = DEFAULT_FAILURE_TTL_S
    # Images.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Web tier.
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    predict_wait_s: float = DEFAULT_PREDICT_WAIT_S
    interactive_wait_s: float = DEFAULT_INTERACTIVE_WAIT_S
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    web_threads: int = DEFAULT_WEB_THREADS
    push_interval_s: float = DEFAULT_PUSH_INTERVAL_S
    # Pre-annotate newly imported tasks (bulk queue) when Label Studio's TASKS_CREATED webhook arrives.
    preannotate_new_tasks: bool = DEFAULT_PREANNOTATE_NEW_TASKS
    # Basic auth for Label Studio's calls (both set: on). /webhook/<secret> is exempt.
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    webhook_secret: str | None = None  # unset: a random one kept in Redis
    # Label Studio: API access for image downloads and pushing late predictions.
    # Unset: the host name and token that Label Studio sends in /setup.
    ls_url: str | None = None
    ls_token: str | None = None  # legacy token or personal access token
    local_files_root: str | None = None  # LOCAL_FILES_DOCUMENT_ROOT, when the backend shares Label Studio's disk
    allowed_image_hosts: str | None = None  # comma-separated extra hosts images may come from ("cdn.example.com", "*.example.com")
    # Job settings as JSON objects of ProposalSettings / ScoringSettings fields, e.g. '{"points_per_side": 16}'.
    proposals: str | None = None
    scoring: str | None = None
    # Corrections log: unset -> SQLite in data_dir; postgresql://user@host/db -> PostgreSQL.
    corrections_url: str | None = None
    data_dir: Path = default_data_dir()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``LABELASSIST_*`` variables; keyword overrides (CLI options) win over them."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name in ("port", "job_timeout_s", "interactive_timeout_s", "result_ttl_s", "max_image_bytes", "max_image_pixels", "embedding_cache_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("max_request_bytes", "web_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected a positive number, got {getattr(self, name)!r}")
        if not 0 < self.interactive_wait_s < 100:
            raise ValueError(f"{ENV_PREFIX}INTERACTIVE_WAIT_S: expected 0 < seconds < 100 (Label Studio's /predict timeout), got {self.interactive_wait_s}")
        if self.push_interval_s <= 0:
            raise ValueError(f"{ENV_PREFIX}PUSH_INTERVAL_S: expected a positive number of seconds, got {self.push_interval_s}")
        if self.compile_decoder not in ("auto", "on", "off"):
            raise ValueError(f"{ENV_PREFIX}COMPILE_DECODER: expected auto, on or off, got {self.compile_decoder!r}")
        for name in ("proposals", "scoring"):
            json_object_setting(self, name)  # fail at start-up, not on the first task
        if not 0 < self.predict_wait_s < 100:
            raise ValueError(f"{ENV_PREFIX}PREDICT_WAIT_S: expected 0 < seconds < 100 (Label Studio's /predict timeout), got {self.predict_wait_s}")


def json_object_setting(settings: Settings, name: str) -> dict[str, Any]:
    """A JSON-object setting (``proposals``, ``scoring``) parsed and checked against its contract type."""
    from labelassist.workers.contract import ProposalSettings, ScoringSettings
    from labelassist.workers.errors import ContractError

    raw = getattr(settings, name)
    if not raw:
        return {}
    kind = {"proposals": ProposalSettings, "scoring": ScoringSettings}[name]
    try:
        value = json.loads(raw)
        kind.from_json(value)
    except (ValueError, ContractError) as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected a JSON object of {kind.__name__} fields, got {raw!r} ({exc})") from None
    return value


def _coerce(name: str, type_name: Any, raw: str) -> Any:
    t = str(type_name)
    if t == "bool":
        word = raw.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}, got {raw!r}")
    try:
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
        if t == "Path":
            return Path(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: expected {t}, got {raw!r}") from None
    return raw
