"""Image fetching and decoding: every bad input is a clear ImageError, every odd format a correct RGB array."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from labelassist.workers.contract import ImageSource
from labelassist.workers.errors import ImageDecodeError, ImageFetchError
from labelassist.workers.images import decode_image_rgb, fetch_image_bytes, load_image

MAX_PIXELS = 10_000


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated_jpeg() -> bytes:
    # 40 wide, 20 high, stored with orientation 6 ("rotate 90 CW to display"): upright it is 20 x 40.
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", exif=exif.tobytes())


PNG_10x8 = _encode(Image.new("RGB", (10, 8), (1, 2, 3)))
NOISE_PNG = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))

DECODE_CASES = [
    # (name, bytes, expected shape, expected pixel [0, 0])
    ("rgb", PNG_10x8, (8, 10, 3), (1, 2, 3)),
    ("grayscale", _encode(Image.new("L", (5, 4), 77)), (4, 5, 3), (77, 77, 77)),
    ("rgba transparent on white", _encode(Image.new("RGBA", (3, 3), (0, 0, 0, 0))), (3, 3, 3), (255, 255, 255)),
    ("rgba opaque", _encode(Image.new("RGBA", (3, 3), (9, 8, 7, 255))), (3, 3, 3), (9, 8, 7)),
    ("palette", _encode(Image.new("P", (4, 4), 0)), (4, 4, 3), None),
    ("16-bit scaled to its range", _encode(Image.fromarray(np.array([[0, 4095], [2048, 4095]], np.uint16))), (2, 2, 3), (0, 0, 0)),
    ("cmyk jpeg", _encode(Image.new("CMYK", (6, 6), (0, 0, 0, 0)), "JPEG"), (6, 6, 3), None),
    ("exif rotation applied", _exif_rotated_jpeg(), (40, 20, 3), None),
]


@pytest.mark.parametrize("name, data, shape, first", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_formats(name, data, shape, first):
    rgb = decode_image_rgb(data, MAX_PIXELS)
    assert rgb.dtype == np.uint8 and rgb.shape == shape
    assert rgb.flags.writeable
    if first is not None:
        assert tuple(rgb[0, 0]) == first


def test_sixteen_bit_keeps_relative_levels():
    data = _encode(Image.fromarray(np.array([[0, 4095], [2048, 4095]], np.uint16)))
    gray = decode_image_rgb(data, MAX_PIXELS)[..., 0]
    assert gray[0, 1] == 255 and 120 <= gray[1, 0] <= 135


BAD_DECODE = [
    ("empty", b"", "empty file"),
    ("not an image", b"hello world, not a picture", "not a decodable image"),
    ("truncated png", NOISE_PNG[: len(NOISE_PNG) * 7 // 10], "truncated or corrupt"),
    ("header only", PNG_10x8[:38], "not a decodable image"),
    ("too many pixels", _encode(Image.new("RGB", (200, 100))), "more than the limit"),
]


@pytest.mark.parametrize("name, data, message", BAD_DECODE, ids=[c[0] for c in BAD_DECODE])
def test_decode_errors(name, data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image_rgb(data, MAX_PIXELS)


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        status, body = self.routes.get(self.path.split("?")[0], (404, b"missing"))
        if self.path.startswith("/auth") and self.headers.get("Authorization") != "Token abc":
            status, body = 401, b"no"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_base():
    _Handler.routes = {"/ok.png": (200, PNG_10x8), "/auth.png": (200, PNG_10x8), "/big.png": (200, b"x" * 5000)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_fetch_with_headers_and_hash(http_base):
    rgb, sha = load_image(ImageSource(f"{http_base}/auth.png", headers={"Authorization": "Token abc"}), 10_000, MAX_PIXELS)
    assert rgb.shape == (8, 10, 3) and len(sha) == 64


@pytest.mark.parametrize("path, headers, message", [
    ("/missing.png", {}, "HTTP 404"),
    ("/auth.png", {}, "HTTP 401"),
    ("/big.png", {}, "more than the limit of 1000"),
    ("/ok.png?X-Amz-Signature=secret", {"Authorization": "x"}, "HTTP 401|cannot"),
])
def test_http_fetch_errors(http_base, path, headers, message):
    if "Signature" in path:
        # A closed port: the error must not echo the presigned query string.
        with pytest.raises(ImageFetchError) as err:
            fetch_image_bytes(ImageSource("http://127.0.0.1:1" + path, headers=headers), 1000)
        assert "secret" not in str(err.value)
        return
    with pytest.raises(ImageFetchError, match=message):
        fetch_image_bytes(ImageSource(http_base + path, headers=headers), 1000)


def test_local_file_and_errors(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(PNG_10x8)
    assert load_image(ImageSource(str(path)), 10_000, MAX_PIXELS)[0].shape == (8, 10, 3)
    assert load_image(ImageSource(path.as_uri()), 10_000, MAX_PIXELS)[0].shape == (8, 10, 3)
    with pytest.raises(ImageFetchError, match="cannot read"):
        load_image(ImageSource(str(tmp_path / "nope.png")), 10_000, MAX_PIXELS)
    with pytest.raises(ImageFetchError, match="more than the limit"):
        load_image(ImageSource(str(path)), 10, MAX_PIXELS)
    with pytest.raises(ImageFetchError, match="unsupported location"):
        load_image(ImageSource("s3://bucket/a.png"), 10_000, MAX_PIXELS)
    with pytest.raises(ImageFetchError, match="differs from the expected"):
        load_image(ImageSource(str(path), sha256="0" * 64), 10_000, MAX_PIXELS)
