"""Task image references -> ImageSource: Label Studio paths, local files, hosts, cloud URIs, refusals."""

import base64
import os

import pytest

from labelassist.plugin.errors import ImageReferenceError
from labelassist.plugin.images import ALLOWED_HOSTS_SETTING, ImageAccess, resolve_image
from labelassist.plugin.ls_client import LabelStudioClient

LS = "http://ls.internal:8080"
AUTH = {"Authorization": "Token legacy-key-123"}
CLIENT = LabelStudioClient(LS, "legacy-key-123")  # a legacy key: no request is made for headers
ACCESS = ImageAccess(ls_url=LS + "/", token="legacy-key-123", allowed_hosts=("cdn.example.com", "minio:9000", "*.images.example.org"))


def task(ref, tid=11, key="image"):
    return {"id": tid, "data": {key: ref, "other": 1}}


def b64(uri):
    return base64.urlsafe_b64encode(uri.encode()).decode()


RESOLVED = [
    # (id, reference, expected uri, expected headers)
    ("upload", "/data/upload/3/abc-cat.jpg", LS + "/data/upload/3/abc-cat.jpg", AUTH),
    ("upload without /data", "upload/3/cat.jpg", LS + "/data/upload/3/cat.jpg", AUTH),
    ("local files via Label Studio", "/data/local-files/?d=pets/cat.jpg", LS + "/data/local-files/?d=pets/cat.jpg", AUTH),
    ("storage proxy", "/storage-data/uploaded/?filepath=upload/3/cat.jpg", LS + "/storage-data/uploaded/?filepath=upload/3/cat.jpg", AUTH),
    ("already presigned path", "/tasks/11/presign/?fileuri=czM6Ly9i", LS + "/tasks/11/presign/?fileuri=czM6Ly9i", AUTH),
    ("absolute Label Studio URL", LS + "/data/upload/3/cat.jpg", LS + "/data/upload/3/cat.jpg", AUTH),
    ("Label Studio host, case differs", "HTTP://LS.internal:8080/data/upload/3/a.png", "HTTP://LS.internal:8080/data/upload/3/a.png", AUTH),
    ("allowed host, no credentials sent", "https://cdn.example.com/a.png", "https://cdn.example.com/a.png", {}),
    ("allowed host and port", "http://minio:9000/bucket/a.png", "http://minio:9000/bucket/a.png", {}),
    ("allowed wildcard", "https://eu.images.example.org/a.png", "https://eu.images.example.org/a.png", {}),
    ("s3 via presign", "s3://bucket/dir/cat 1.jpg".replace(" ", "_"), LS + f"/tasks/11/presign/?fileuri={b64('s3://bucket/dir/cat_1.jpg')}", AUTH),
    ("gs via presign", "gs://bucket/a.png", LS + f"/tasks/11/presign/?fileuri={b64('gs://bucket/a.png')}", AUTH),
    ("azure via presign", "azure-blob://container/a.png", LS + f"/tasks/11/presign/?fileuri={b64('azure-blob://container/a.png')}", AUTH),
    ("surrounding spaces", "  /data/upload/3/a.png ", LS + "/data/upload/3/a.png", AUTH),
    ("Label Studio host, not a media path: no credentials", LS + "/api/projects/1/", LS + "/api/projects/1/", {}),
]


@pytest.mark.parametrize("ref, uri, headers", [r[1:] for r in RESOLVED], ids=[r[0] for r in RESOLVED])
def test_references_resolve(ref, uri, headers):
    source = resolve_image(task(ref), "image", ACCESS, CLIENT)
    assert source.uri == uri
    assert source.headers == headers


def test_without_a_client_the_token_is_used():
    assert resolve_image(task("/data/upload/1/a.png"), "image", ACCESS).headers == AUTH


REFUSED = [
    ("missing key", {"id": 1, "data": {"img": "x"}}, "data has no key 'image' (the Image tag's value=\"$image\"); keys present: 'img'"),
    ("no data", {"id": 1}, "expected a 'data' object"),
    ("task not an object", ["x"], "task: expected a JSON object"),
    ("number", task(42), "expected an image URL or path as a non-empty string, got int"),
    ("list", task(["a.png"]), "got list"),
    ("empty", task("  "), "non-empty string"),
    ("data URI", task("data:image/png;base64,iVBORw0KGgo="), "inline data: URI"),
    ("foreign host", task("http://169.254.169.254/latest/meta-data"), f"image host '169.254.169.254' is not Label Studio's and not allowed; add it to {ALLOWED_HOSTS_SETTING}"),
    ("foreign host with port", task("https://evil.example.com:8443/a.png"), "'evil.example.com:8443'"),
    ("allowed host, other port", task("http://minio:9001/a.png"), "'minio:9001'"),
    ("Label Studio host, other port", task("http://ls.internal:9999/data/upload/1/a.png"), "'ls.internal:9999'"),
    ("wildcard does not match the bare domain", task("https://images.example.org/a.png"), "'images.example.org'"),
    ("lookalike suffix", task("https://cdn.example.com.evil.net/a.png"), "'cdn.example.com.evil.net'"),
    ("userinfo trick", task("http://ls.internal:8080@evil.net/a.png"), "credentials in them"),
    ("backslash trick", task("http://evil.net\\@ls.internal:8080/a.png"), "backslash"),
    ("file scheme", task("file:///etc/passwd"), "uses the file: scheme"),
    ("ftp scheme", task("ftp://host/a.png"), "uses the ftp: scheme"),
    ("relative path Label Studio does not serve", task("/etc/passwd"), "neither a URL nor a path Label Studio serves"),
    ("bare file name", task("cat.jpg"), "neither a URL nor a path"),
    ("cloud URI without task id", {"data": {"image": "s3://b/a.png"}}, "no integer id"),
]


@pytest.mark.parametrize("the_task, message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_references_refused(the_task, message):
    with pytest.raises(ImageReferenceError) as err:
        resolve_image(the_task, "image", ACCESS, CLIENT)
    assert message in str(err.value)
    assert err.value.code == "bad_image_ref"


@pytest.mark.parametrize("access, message", [
    (ImageAccess(), "its URL is unknown"),
    (ImageAccess(ls_url=LS), "needs an API token"),
])
def test_label_studio_paths_need_url_and_token(access, message):
    with pytest.raises(ImageReferenceError, match=message):
        resolve_image(task("/data/upload/1/a.png"), "image", access)


@pytest.fixture
def root(tmp_path):
    """A local-files root with pets/cat.jpg, a big file, and links inside and out."""
    docs = tmp_path / "docs"
    (docs / "pets").mkdir(parents=True)
    (docs / "pets" / "cat.jpg").write_bytes(b"\xff\xd8jpeg")
    (docs / "big.jpg").write_bytes(b"x" * 100)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, docs / "escape.jpg")
    os.symlink(tmp_path, docs / "up")
    os.symlink(docs / "pets" / "cat.jpg", docs / "inside.jpg")
    os.symlink(docs / "loop", docs / "loop")
    return docs


LOCAL = [
    ("plain", "pets/cat.jpg", "pets/cat.jpg"),
    ("leading slash is still relative to the root", "/pets/cat.jpg", "pets/cat.jpg"),
    ("percent-encoded", "pets%2Fcat.jpg", "pets/cat.jpg"),
    ("dot segments that stay inside", "pets/./cat.jpg", "pets/cat.jpg"),
    ("link that stays inside", "inside.jpg", "pets/cat.jpg"),
]


@pytest.mark.parametrize("d, expected", [r[1:] for r in LOCAL], ids=[r[0] for r in LOCAL])
def test_local_files_are_read_from_disk_under_the_root(root, d, expected):
    access = ImageAccess(ls_url=LS, token="k", local_files_root=root, max_bytes=50)
    source = resolve_image(task(f"/data/local-files/?d={d}"), "image", access, CLIENT)
    assert source.uri == str((root / expected).resolve())
    assert os.path.isabs(source.uri)
    assert source.headers == {}


LOCAL_REFUSED = [
    ("parent traversal", "../secret.txt", "climbs out with '..'"),
    ("traversal in the middle", "pets/../../secret.txt", "climbs out with '..'"),
    ("encoded traversal", "%2e%2e/secret.txt", "climbs out with '..'"),
    ("backslash traversal", "pets\\..\\..\\secret.txt", "backslash"),
    ("symlink to a file outside", "escape.jpg", "through a link"),
    ("symlink to a directory outside", "up/secret.txt", "through a link"),
    ("missing", "pets/dog.jpg", "not found under"),
    ("a directory", "pets", "not found under"),
    ("too big", "big.jpg", "has 100 bytes, more than the 50 allowed"),
    ("no d", "", "without a ?d=<path>"),
    ("NUL byte", "pets/cat.jpg%00.png", "NUL byte"),
    ("symlink loop", "loop/a.jpg", "'loop/a.jpg'"),  # 'cannot be resolved' or 'not found', by Python version
]


@pytest.mark.parametrize("d, message", [r[1:] for r in LOCAL_REFUSED], ids=[r[0] for r in LOCAL_REFUSED])
def test_local_files_outside_the_root_are_refused(root, d, message):
    access = ImageAccess(ls_url=LS, token="k", local_files_root=root, max_bytes=50)
    ref = f"/data/local-files/?d={d}" if d else "/data/local-files/"
    with pytest.raises(ImageReferenceError) as err:
        resolve_image(task(ref), "image", access, CLIENT)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ls_url="ls.internal:8080"), r"expected http\(s\)://host"),
    (dict(local_files_root="relative/dir"), "expected an absolute directory"),
    (dict(max_bytes=0), "positive integer"),
])
def test_image_access_is_validated(kwargs, message):
    with pytest.raises(ImageReferenceError, match=message):
        ImageAccess(**kwargs)


def test_image_access_normalises():
    access = ImageAccess(ls_url=LS + "/", allowed_hosts=(" CDN.example.com ", ""), local_files_root="/data/docs")
    assert access.ls_url == LS
    assert access.allowed_hosts == ("cdn.example.com",)
    assert str(access.local_files_root) == "/data/docs"
    assert ImageAccess(allowed_hosts="one.example").allowed_hosts == ("one.example",)
