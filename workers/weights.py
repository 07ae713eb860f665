"""Finding model weights: a local file, or a download into the cache, checked by sha256.

Every failure is a ``WeightsError`` whose message says which file is missing,
its expected sha256, where it comes from, and where to put a copy fetched by
hand (the exact cache path) or which option points at it. Workers often run
without internet access, so that message is the user interface.

No torch at module level: the helpers for files and downloads serve callers
that never load a model (checking a cache, the CLI); ``load_state_dict``
imports torch when called.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from labelassist.workers.errors import WeightsError


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/labelassist`` (else ``~/.cache/labelassist``): downloaded weights live under it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "labelassist"

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # an unreachable host fails in seconds, not after a TCP timeout of minutes
READ_TIMEOUT_S = 60.0  # between two chunks of a running download
CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"  # downloads land in "<name>.<random>.part" and are renamed once verified

# How the user points labelassist at a file; named in every error message.
SAM_WEIGHTS_OPTION = "--sam-weights (env LABELASSIST_SAM_WEIGHTS)"
CLIP_PRETRAINED_OPTION = "--clip-pretrained (env LABELASSIST_CLIP_PRETRAINED)"
_ANY_OPTION = f"{SAM_WEIGHTS_OPTION} or {CLIP_PRETRAINED_OPTION}"

# Keys under which training scripts commonly nest the weights in a checkpoint.
_NESTED_STATE_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file on local disk and the sha256 of its bytes (hex, 64 digits)."""

    path: Path
    sha256: str


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def split_pinned_url(url: str) -> tuple[str, str | None]:
    """``https://h/x.pth#sha256=<hex>`` -> (``https://h/x.pth``, ``<hex>``).

    The fragment is pip's convention for pinning a hash to a URL; it lets a user
    pin a checkpoint that is not in the registry. Fragments are never sent to
    the server, so stripping it changes nothing about the request.
    """
    base, _, fragment = url.partition("#")
    for part in fragment.split("&"):
        key, _, value = part.partition("=")
        if key == "sha256" and value:
            return base, value.lower()
    return base, None


def fetch_weights(
    source: str | None,
    *,
    default_url: str | None,
    sha256: str | None,
    filename: str,
    cache_dir: Path,
    what: str,
    option: str | None = None,
    offline: bool = False,
) -> ResolvedWeights:
    """A weights file on local disk (``.path``) and its sha256, downloading it into the cache if needed.

    ``source``: a local path (used as is; it must exist), an http(s) URL, or
    None for ``default_url``. ``sha256`` pins the download (a ``#sha256=`` URL
    fragment pins a URL given as ``source``). The registry's file is cached as
    ``cache_dir/filename``; a URL given as ``source`` is cached under its own
    name prefixed with a hash of the URL, so two URLs ending in ``model.pth``
    never share a cache entry. ``what`` names the file for people ("SAM vit_b
    checkpoint"); ``option`` says how to point at a local copy. ``offline``:
    never touch the network; only a cached file will do. The sha256 comes
    along so callers recording provenance do not read a multi-gigabyte file a
    second time.
    """
    option = option or _ANY_OPTION
    if source is not None and source.startswith("file://"):
        source = unquote(urlsplit(source).path)
    if source is not None and not is_url(source):
        if "://" in source:
            raise WeightsError(f"{what}: {source!r} is neither a local path nor an http(s) URL; "
                               f"download the file and pass its path with {option}")
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsError(f"{what} not found: {path} does not exist or is not a file. Put the weights file at "
                               f"that path, or point {option} at the file, or unset it to download the default"
                               + (f" from {default_url}" if default_url else "") + ".")
        # A local file is the user's choice (fine-tuned weights are legitimate), so
        # its hash is recorded for provenance, not checked against the registry's.
        return ResolvedWeights(path, file_sha256(path))

    if source is not None:
        url, pinned = split_pinned_url(source)
        if pinned is not None and sha256 is not None and pinned != sha256.lower():
            raise WeightsError(f"{what}: the URL pins sha256 {pinned} but the registry expects {sha256}")
        sha256 = pinned or sha256
        cache_name = f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{_url_basename(url) or filename}"
    elif default_url is not None:
        url, cache_name = default_url, filename
    else:
        raise WeightsError(f"{what}: no weights given and no download URL is known; pass a weights file with {option}")
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower())):
        raise WeightsError(f"{what}: expected sha256 to be 64 hex digits, got {sha256!r}")
    sha256 = sha256.lower() if sha256 else None
    target = Path(cache_dir).expanduser() / cache_name

    removed_corrupt = ""
    if target.is_file():
        actual = file_sha256(target)
        if sha256 is None or actual == sha256:
            log.debug("%s: using cached %s", what, target)
            return ResolvedWeights(target, actual)
        # A truncated or tampered file would load as garbage or fail deep inside
        # torch; removing it makes the next attempt download a clean copy.
        log.warning("%s: cached %s has sha256 %s, expected %s; removing it", what, target, actual, sha256)
        target.unlink()
        removed_corrupt = f" (a cached copy with the wrong sha256 {actual} was removed)"

    def manual(reason: str) -> WeightsError:
        expected = sha256 or "not pinned"
        return WeightsError(
            f"{what} {cache_name} is not available: {reason}{removed_corrupt}. Expected sha256: {expected}. "
            f"Download {url} by hand and put it at {target}, or pass its path with {option}.")

    if offline:
        raise manual("offline mode forbids downloads and no cached copy exists")
    return ResolvedWeights(target, _download(url, target, sha256, manual))


def _url_basename(url: str) -> str:
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    # Only a conservative character set reaches the file system.
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")


def _download(url: str, target: Path, sha256: str | None, manual) -> str:
    """Stream ``url`` into ``target`` through a unique ``.part`` file; return the sha256."""
    import requests
    from tqdm import tqdm

    log.info("downloading %s -> %s", url, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name: two workers starting together each download
        # their own copy and the atomic rename makes the last complete one win.
        fd, part_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=PART_SUFFIX)
    except OSError as exc:
        raise manual(f"cannot write to the cache directory {target.parent} ({exc})") from None
    part = Path(part_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
                    if response.status_code != 200:
                        raise manual(f"HTTP {response.status_code} {response.reason} from {url}")
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                              file=sys.stderr, mininterval=1.0) as bar:
                        for chunk in response.iter_content(CHUNK_BYTES):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except requests.RequestException as exc:
                raise manual(f"cannot download it ({type(exc).__name__}: {exc})") from None
            except OSError as exc:  # disk full, permissions
                raise manual(f"cannot write {part} ({exc})") from None
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise manual(f"the download from {url} has sha256 {actual}, expected {sha256} (a corrupt or changed file)")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return actual


def load_state_dict(path: str | os.PathLike, device: "str | torch.device" = "cpu") -> dict[str, "torch.Tensor"]:
    """The tensors of a checkpoint file, as ``{name: tensor}`` on ``device``.

    Accepts a bare state dict, one nested under ``"state_dict"`` or ``"model"``
    (training checkpoints), and strips the ``module.`` prefix that
    DistributedDataParallel adds. ``.safetensors`` files are read with
    safetensors; anything else with ``torch.load(weights_only=True)``, which
    refuses pickled code.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device=str(device))
        else:
            data = torch.load(path, map_location=device, weights_only=True)
    except ImportError:
        raise WeightsError(f"{path} is a .safetensors file but the safetensors package is not installed "
                           f"(pip install safetensors)") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}. "
                           f"Is it a complete PyTorch checkpoint? Download it again or pass another file.") from None
    for key in _NESTED_STATE_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        kind = type(data).__name__ if not isinstance(data, dict) else f"a dict with keys {sorted(map(str, data))[:8]}"
        raise WeightsError(f"weights file {path}: expected a state dict (parameter name -> tensor), got {kind}")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data
