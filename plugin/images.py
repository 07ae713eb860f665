"""Task image references -> where a worker may fetch the image, with which headers.

Label Studio tasks point at images in these ways (Label Studio 1.23):

======================================  ==================================================
``/data/upload/<pid>/<file>``           uploaded file: fetched from Label Studio with auth
``/data/local-files/?d=<rel>``          local-files storage: read from disk when
                                        ``local_files_root`` is set (the same directory as
                                        Label Studio's LOCAL_FILES_DOCUMENT_ROOT, mounted
                                        where the workers run), else fetched from Label
                                        Studio with auth
``/storage-data/uploaded/?filepath=``,  other Label Studio-relative paths: fetched from
``/tasks/<id>/presign/?fileuri=``, ...  Label Studio with auth
``s3://``, ``gs://``, ``azure-blob://``  through Label Studio's presign endpoint, with auth;
                                        the worker follows its redirect to the signed URL
``http(s)://<host>/...``                only the Label Studio host (with auth) or a host in
                                        ``allowed_hosts`` (without): no SSRF
======================================  ==================================================

Everything else is refused with ``ImageReferenceError``: other schemes
(``file:``, ``ftp:``), relative paths Label Studio does not serve, and
``data:`` URIs. Inline ``data:`` images are refused on purpose: a job would
carry the whole image through Redis, and the worker fetches by location only;
import such images as files instead.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from labelassist.plugin.errors import ImageReferenceError
from labelassist.plugin.ls_client import LabelStudioClient, presign_path
from labelassist.workers.contract import ImageSource

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
WEB_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
LOCAL_FILES_PATH = "/data/local-files/"
# Paths Label Studio itself serves media from; anything else relative is refused.
LS_MEDIA_PATHS = (
    re.compile(r"^/data/upload/"),
    re.compile(r"^/data/local-files/?$"),
    re.compile(r"^/storage-data/uploaded/?$"),
    re.compile(r"^/(tasks|projects)/\d+/(presign|resolve)/?$"),
)
# Names of the settings that widen what may be fetched, quoted in error messages.
ALLOWED_HOSTS_SETTING = "LABELASSIST_ALLOWED_IMAGE_HOSTS"
LOCAL_FILES_ROOT_SETTING = "LABELASSIST_LOCAL_FILES_ROOT"
_UNSAFE_URL_CHARS = re.compile(r"[\\\s\x00-\x1f\x7f]")  # parsers disagree on these: refuse, never guess


@dataclass(frozen=True)
class ImageAccess:
    """What the web tier may fetch images from.

    ``ls_url``: Label Studio's address as the workers reach it (``""`` when
    unknown: Label Studio-relative references then fail clearly). ``token``:
    a legacy API key or a personal access token. ``local_files_root``: the
    local-files document root, or None to go through Label Studio.
    ``allowed_hosts``: extra hosts for absolute URLs (``"cdn.example.com"``,
    ``"minio:9000"``, ``"*.example.com"``). ``max_bytes``: the largest local
    file accepted (remote sizes are enforced by the worker while fetching).
    """

    ls_url: str = ""
    token: str = ""
    local_files_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        url = (self.ls_url or "").rstrip("/")
        if url and urlsplit(url).scheme not in WEB_SCHEMES:
            raise ImageReferenceError(f"Label Studio URL: expected http(s)://host[:port], got {self.ls_url!r}")
        object.__setattr__(self, "ls_url", url)
        if self.local_files_root is not None:
            root = Path(self.local_files_root)
            if not root.is_absolute():
                raise ImageReferenceError(f"{LOCAL_FILES_ROOT_SETTING}: expected an absolute directory, got {str(root)!r}")
            object.__setattr__(self, "local_files_root", root)
        hosts = (self.allowed_hosts,) if isinstance(self.allowed_hosts, str) else tuple(self.allowed_hosts)
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in hosts if h.strip()))
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ImageReferenceError(f"max_bytes: expected a positive integer, got {self.max_bytes!r}")


def resolve_image(task: dict[str, Any], value_key: str, access: ImageAccess,
                  client: LabelStudioClient | None = None) -> ImageSource:
    """Where the worker gets task ``task``'s image under ``data[value_key]``.

    ``client`` supplies Label Studio auth headers; without one, a client is made
    from ``access.token`` (pass one to reuse its cached access token). Raises
    ImageReferenceError for references that cannot or may not be fetched, and
    LabelStudioAPIError when a personal access token cannot be exchanged.

    Headers carry a Bearer access token when the token is a personal access
    token: it lives 5 minutes, so resolve right before enqueueing, not for jobs
    that may wait longer in a queue.
    """
    ref = _reference(task, value_key)
    task_label = f"task {task.get('id', '?')}"
    if ref[:5].lower() == "data:":
        raise ImageReferenceError(f"{task_label}: data[{value_key!r}] is an inline data: URI; labelassist fetches images by "
                                  "location only: import the image as a file or a URL")
    if _UNSAFE_URL_CHARS.search(ref):
        raise ImageReferenceError(f"{task_label}: data[{value_key!r}] contains whitespace, a backslash or a control character: {ref[:120]!r}")
    parts = urlsplit(ref)
    scheme = parts.scheme.lower()
    if scheme in CLOUD_SCHEMES:
        task_id = task.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ImageReferenceError(f"{task_label}: {scheme}:// images are presigned by Label Studio per task, but the task has no integer id")
        return _through_label_studio(presign_path(task_id, ref), access, client, task_label)
    if scheme in WEB_SCHEMES:
        return _absolute_url(ref, parts, access, client, task_label)
    if scheme:
        raise ImageReferenceError(f"{task_label}: data[{value_key!r}] uses the {scheme}: scheme; expected a Label Studio path, "
                                  f"http(s), {', '.join(s + '://' for s in CLOUD_SCHEMES)}")
    return _relative(ref, parts, access, client, task_label)


def _reference(task: Any, value_key: str) -> str:
    if not isinstance(task, dict):
        raise ImageReferenceError(f"task: expected a JSON object, got {type(task).__name__}")
    data = task.get("data")
    label = f"task {task.get('id', '?')}"
    if not isinstance(data, dict):
        raise ImageReferenceError(f"{label}: expected a 'data' object, got {type(data).__name__}")
    if value_key not in data:
        keys = ", ".join(repr(k) for k in list(data)[:10]) or "none"
        raise ImageReferenceError(f"{label}: data has no key {value_key!r} (the Image tag's value=\"${value_key}\"); keys present: {keys}")
    ref = data[value_key]
    if not isinstance(ref, str) or not ref.strip():
        raise ImageReferenceError(f"{label}: data[{value_key!r}]: expected an image URL or path as a non-empty string, got {type(ref).__name__} {str(ref)[:40]!r}")
    return ref.strip()


def _relative(ref: str, parts: Any, access: ImageAccess, client: LabelStudioClient | None, task_label: str) -> ImageSource:
    path = parts.path if parts.path.startswith("/") else "/" + parts.path
    if path.startswith("/upload/"):  # older exports drop the /data prefix
        path = "/data" + path
    if not any(p.match(path) for p in LS_MEDIA_PATHS) or parts.netloc:
        raise ImageReferenceError(f"{task_label}: {ref[:120]!r} is neither a URL nor a path Label Studio serves media from "
                                  "(/data/upload/, /data/local-files/?d=, /storage-data/uploaded/, /tasks/<id>/presign/)")
    if path.rstrip("/") + "/" == LOCAL_FILES_PATH and access.local_files_root is not None:
        return _local_file(parts.query, access, task_label)
    return _through_label_studio(path + (f"?{parts.query}" if parts.query else ""), access, client, task_label)


def _local_file(query: str, access: ImageAccess, task_label: str) -> ImageSource:
    values = parse_qs(query, keep_blank_values=True).get("d")  # the last d= wins, as in Label Studio's view
    rel = values[-1] if values else ""
    if not rel:
        raise ImageReferenceError(f"{task_label}: local-files reference without a ?d=<path>")
    if "\x00" in rel:
        raise ImageReferenceError(f"{task_label}: local-files path {rel!r} contains a NUL byte; refused")
    if ".." in rel.replace("\\", "/").split("/"):
        raise ImageReferenceError(f"{task_label}: local-files path {rel!r} climbs out with '..'; refused")
    root = access.local_files_root.resolve()
    # ?d= is relative to the document root even with a leading slash, as Label Studio treats it.
    try:
        path = (root / posixpath.normpath(rel).lstrip("/")).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ImageReferenceError(f"{task_label}: local-files path {rel!r} cannot be resolved ({type(exc).__name__})") from None
    if not path.is_relative_to(root):
        raise ImageReferenceError(f"{task_label}: local-files path {rel!r} leaves {LOCAL_FILES_ROOT_SETTING} ({root}) through a link; refused")
    if not path.is_file():
        raise ImageReferenceError(f"{task_label}: local file {rel!r} not found under {LOCAL_FILES_ROOT_SETTING} ({root}); "
                                  "it must be the directory Label Studio's LOCAL_FILES_DOCUMENT_ROOT points at")
    size = path.stat().st_size
    if size > access.max_bytes:
        raise ImageReferenceError(f"{task_label}: local file {rel!r} has {size} bytes, more than the {access.max_bytes} allowed")
    return ImageSource(uri=str(path))


def _absolute_url(ref: str, parts: Any, access: ImageAccess, client: LabelStudioClient | None, task_label: str) -> ImageSource:
    if "@" in parts.netloc:
        raise ImageReferenceError(f"{task_label}: image URLs with credentials in them are refused: {parts.scheme}://…@{parts.hostname}")
    host, port = _host_port(parts)
    if not host:
        raise ImageReferenceError(f"{task_label}: image URL without a host: {ref[:120]!r}")
    if access.ls_url:
        ls_host, ls_port = _host_port(urlsplit(access.ls_url))
        if (host, port) == (ls_host, ls_port):
            # Credentials go with Label Studio's media paths only, never to its API.
            media = any(p.match(parts.path) for p in LS_MEDIA_PATHS)
            return ImageSource(uri=ref, headers=_auth(access, client, task_label) if media else {})
    if _host_allowed(host, port, access.allowed_hosts):
        return ImageSource(uri=ref)  # never Label Studio's credentials to another host
    shown = host if port == DEFAULT_PORTS.get(parts.scheme.lower()) else f"{host}:{port}"
    raise ImageReferenceError(f"{task_label}: image host {shown!r} is not Label Studio's and not allowed; "
                              f"add it to {ALLOWED_HOSTS_SETTING} to fetch images from it")


def _through_label_studio(path: str, access: ImageAccess, client: LabelStudioClient | None, task_label: str) -> ImageSource:
    if not access.ls_url:
        raise ImageReferenceError(f"{task_label}: {path[:80]!r} is served by Label Studio, but its URL is unknown; "
                                  "set the Label Studio URL so images can be fetched from it")
    return ImageSource(uri=access.ls_url + path, headers=_auth(access, client, task_label))


def _auth(access: ImageAccess, client: LabelStudioClient | None, task_label: str) -> dict[str, str]:
    if client is None:
        if not access.token:
            raise ImageReferenceError(f"{task_label}: the image is stored in Label Studio, which needs an API token to hand it out; "
                                      "set the Label Studio API token (a personal access token or a legacy key)")
        client = LabelStudioClient(access.ls_url, access.token)
    return client.auth_headers()


def _host_port(parts: Any) -> tuple[str, int | None]:
    try:
        port = parts.port
    except ValueError:
        raise ImageReferenceError(f"image URL has an invalid port: {parts.netloc!r}") from None
    return (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(parts.scheme.lower())


def _host_allowed(host: str, port: int | None, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        name, _, want_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if want_port and (not want_port.isdigit() or int(want_port) != port):
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False
