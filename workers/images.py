"""Fetching and decoding task images into RGB uint8 arrays, with bounds.

Every failure is an ``ImageError`` that says what was wrong with which image;
nothing here may take the worker down.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from labelassist.workers.contract import ImageSource
from labelassist.workers.errors import ImageDecodeError, ImageFetchError

FETCH_TIMEOUT_S = (5.0, 60.0)  # (connect, read) for image downloads
CHUNK_BYTES = 1 << 16
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # ~8000 x 8000; larger images are refused, not resized
DEFAULT_EMBEDDING_CACHE_SIZE = 32  # SAM image embeddings a worker keeps (LRU), so a re-asked image skips the encoder
ALPHA_BACKGROUND_RGB = (255, 255, 255)  # transparent pixels are shown on white, as viewers do


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_image_bytes(source: ImageSource, max_bytes: int) -> bytes:
    """Read the image behind ``source``: an http(s) URL, a ``file://`` URL or an absolute path.

    Raises ImageFetchError for an unreachable or oversized image, naming the URI.
    """
    parsed = urlparse(source.uri)
    if parsed.scheme in ("http", "https"):
        return _fetch_http(source, max_bytes)
    if parsed.scheme == "file":
        return _read_file(Path(unquote(parsed.path)), source.uri, max_bytes)
    if parsed.scheme == "" and source.uri.startswith("/"):
        return _read_file(Path(source.uri), source.uri, max_bytes)
    raise ImageFetchError(f"image {source.uri!r}: unsupported location; expected an http(s) URL, a file:// URL or an absolute path")


def _fetch_http(source: ImageSource, max_bytes: int) -> bytes:
    import requests

    try:
        with requests.get(source.uri, headers=source.headers, timeout=FETCH_TIMEOUT_S, stream=True) as resp:
            if resp.status_code != 200:
                raise ImageFetchError(f"image {_redact(source.uri)}: HTTP {resp.status_code} {resp.reason}")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageFetchError(f"image {_redact(source.uri)}: {int(declared)} bytes, more than the limit of {max_bytes}")
            buf = bytearray()
            for chunk in resp.iter_content(CHUNK_BYTES):
                buf += chunk
                if len(buf) > max_bytes:
                    raise ImageFetchError(f"image {_redact(source.uri)}: more than the limit of {max_bytes} bytes")
            return bytes(buf)
    except requests.RequestException as exc:
        # The exception's text repeats the full URL, presigned credentials included: name its kind only.
        raise ImageFetchError(f"image {_redact(source.uri)}: cannot download ({type(exc).__name__})") from None


def _read_file(path: Path, uri: str, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageFetchError(f"image {uri!r}: {size} bytes, more than the limit of {max_bytes}")
        return path.read_bytes()
    except OSError as exc:
        raise ImageFetchError(f"image {uri!r}: cannot read ({exc.strerror or exc})") from None


def _redact(uri: str) -> str:
    """The URI without its query string, which may carry presigned credentials."""
    return repr(uri.split("?", 1)[0])


def decode_image_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array of shape (H, W, 3), upright.

    EXIF orientation is applied (the annotator sees the rotated image, so
    polygons must be in its frame). Grayscale and palette images become RGB;
    alpha is composited on white; 16-bit and float images are scaled linearly
    from [0, max] to [0, 255] so 12-bit data stays visible. The pixel count is
    checked from the header before any pixel is decoded (decompression bombs).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("image: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageDecodeError(f"image: zero size ({w}x{h})")
            if w * h > max_pixels:
                raise ImageDecodeError(f"image: {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"image: not a decodable image ({len(data)} bytes, starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image: cannot decode ({exc}); the file may be truncated or corrupt") from None
    return _to_rgb_uint8(img)


def _to_rgb_uint8(img) -> np.ndarray:
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        arr = np.nan_to_num(arr, nan=0.0)
        scaled = np.clip(arr * (255.0 / top), 0, 255) if top > 255 else np.clip(arr, 0, 255)
        gray = scaled.astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND_RGB + (255,))
        img = Image.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy, which torch wants


def load_image(source: ImageSource, max_bytes: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """Fetch and decode; return (RGB uint8 (H, W, 3), sha256 of the bytes)."""
    data = fetch_image_bytes(source, max_bytes)
    digest = sha256_hex(data)
    if source.sha256 is not None and source.sha256 != digest:
        raise ImageFetchError(f"image {_redact(source.uri)}: content sha256 {digest} differs from the expected {source.sha256}")
    return decode_image_rgb(data, max_pixels), digest
