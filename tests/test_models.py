"""Model registry and loading: tiny SAM and OpenCLIP weights saved to files and loaded back
through the same resolve path as real checkpoints, then run through real forwards."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from labelassist.workers import models
from labelassist.workers.errors import WeightsError
from labelassist.workers.models import (
    CLIP_VARIANTS,
    SAM_VARIANTS,
    ModelSpec,
    build_clip,
    build_sam,
    load_models,
    select_device,
)
from labelassist.workers.weights import file_sha256

from test_weights import FileServer, closed_port_url

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


def _perturbed(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every tensor moved off the seeded init, so a load that
    silently fell back to random init cannot pass for a real one."""
    gen = torch.Generator().manual_seed(1)
    return {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Saved tiny SAM and tiny CLIP state dicts, served also over a real local HTTP server."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("weights")
    sam, _ = build_sam("tiny-random", None, CPU, torch.float32, root / "unused")
    clip = build_clip("tiny-random", None, CPU, root / "unused")
    files = {}
    for name, module in (("sam", sam), ("clip", clip.model)):
        state = _perturbed(module)
        path = root / f"tiny_{name}.pt"
        torch.save(state, path)
        files[name] = (path, state)
    server = FileServer({f"/{p.name}": p.read_bytes() for p, _ in files.values()})
    yield files, server
    server.close()


def _source(kind: str, path, server: FileServer) -> str:
    if kind == "path":
        return str(path)
    return server.url(f"/{path.name}") + f"#sha256={file_sha256(path)}"


def _assert_same(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k].cpu(), v), k


@pytest.mark.parametrize("kind", ["path", "url"])
def test_build_sam_loads_saved_weights_and_predicts(weight_files, tmp_path, kind):
    from segment_anything import SamPredictor

    files, server = weight_files
    path, state = files["sam"]
    sam, sha = build_sam("tiny-random", _source(kind, path, server), CPU, torch.float32, tmp_path)
    _assert_same(sam, state)
    assert sha == file_sha256(path) and not sam.training
    assert all(p.dtype == torch.float32 for p in sam.parameters())
    assert sam.pixel_mean.flatten().tolist() == pytest.approx(models.SAM_PIXEL_MEAN)  # not in the checkpoint
    assert sam.pixel_std.flatten().tolist() == pytest.approx(models.SAM_PIXEL_STD)

    predictor = SamPredictor(sam)
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    predictor.set_image(image)
    masks, scores, logits = predictor.predict(point_coords=np.array([[512.0, 300.0]]), point_labels=np.array([1]),
                                              multimask_output=True)
    assert masks.shape == (3, 1024, 1024) and masks.dtype == bool
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert logits.shape == (3, 256, 256)


@pytest.mark.parametrize("kind", ["path", "url"])
def test_build_clip_loads_saved_weights_and_encodes(weight_files, tmp_path, kind):
    files, server = weight_files
    path, state = files["clip"]
    bundle = build_clip("tiny-random", _source(kind, path, server), CPU, tmp_path)
    _assert_same(bundle.model, state)
    assert bundle.weights_sha256 == file_sha256(path) and not bundle.model.training
    assert (bundle.image_size, len(bundle.mean), len(bundle.std)) == (224, 3, 3)

    pixels = bundle.preprocess(Image.new("RGB", (300, 200), (200, 30, 30)))
    assert pixels.shape == (3, 224, 224)
    with torch.no_grad():
        image = bundle.model.encode_image(pixels[None])
        text = bundle.model.encode_text(bundle.tokenizer(["a photo of a cat", "background"]))
    assert image.shape == (1, 32) and text.shape == (2, 32)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()


@pytest.mark.parametrize("model", ["sam", "clip"])
def test_state_dict_with_a_missing_key_is_a_clear_error(weight_files, tmp_path, model):
    files, _ = weight_files
    path, state = files[model]
    dropped = sorted(state)[-1]
    broken = tmp_path / f"broken_{model}.pt"
    torch.save({k: v for k, v in state.items() if k != dropped}, broken)
    with pytest.raises(WeightsError) as err:
        if model == "sam":
            build_sam("tiny-random", str(broken), CPU, torch.float32, tmp_path)
        else:
            build_clip("tiny-random", str(broken), CPU, tmp_path)
    assert str(broken) in str(err.value) and dropped in str(err.value)


def test_checkpoint_of_another_variant_names_the_variant_it_fits(weight_files, tmp_path):
    path, _ = weight_files[0]["sam"]
    with pytest.raises(WeightsError, match=r"wrong shape: .*checkpoint of tiny-random.*--sam-model"):
        build_sam("vit_b", str(path), CPU, torch.float32, tmp_path)


def test_tiny_random_version_is_random_and_stable(tmp_path):
    first = load_models(ModelSpec.preset("tiny-random"), "cpu", tmp_path)
    second = load_models(ModelSpec.preset("tiny-random"), "cpu", tmp_path)
    assert first.version == second.version
    assert first.version.startswith("la-tiny-random.random-") and first.version.count("random-") == 2
    assert first.provenance["random_weights"] is True
    assert first.provenance["model_version"] == first.version
    _assert_same(second.sam, first.sam.state_dict())
    assert list((tmp_path / "weights").glob("*")) == []  # random weights download nothing


def test_version_of_loaded_weights_names_their_hashes(weight_files, tmp_path):
    files, _ = weight_files
    spec = ModelSpec.preset("tiny-random", sam_weights=str(files["sam"][0]), clip_pretrained=str(files["clip"][0]))
    loaded = load_models(spec, "cpu", tmp_path)
    sam_sha, clip_sha = file_sha256(files["sam"][0]), file_sha256(files["clip"][0])
    assert loaded.version == f"la-tiny-random.{sam_sha[:8]}-tiny-random.{clip_sha[:8]}"
    assert "random-" not in loaded.version and loaded.provenance["random_weights"] is False
    assert (loaded.provenance["sam_weights_sha256"], loaded.provenance["clip_weights_sha256"]) == (sam_sha, clip_sha)
    assert (loaded.device, loaded.dtype) == (CPU, torch.float32)


def test_provenance_keeps_no_url_credentials(weight_files, tmp_path):
    files, server = weight_files
    url = server.url("/" + files["sam"][0].name).replace("http://", "http://user:secret@") + "?token=secret"
    spec = ModelSpec.preset("tiny-random", sam_weights=url)
    loaded = load_models(spec, "cpu", tmp_path)
    assert "secret" not in repr(loaded.provenance)
    assert loaded.provenance["sam_weights"].endswith("/" + files["sam"][0].name)


def test_weights_that_cannot_be_fetched_fail_before_any_model_is_built(tmp_path):
    start = time.monotonic()
    with pytest.raises(WeightsError, match="--clip-pretrained") as clip_err:
        build_clip("ViT-B-32", None, CPU, tmp_path)  # the default tag, with HF_HUB_OFFLINE=1
    assert "open_clip_ViT-B-32_laion2b_s34b_b79k.bin" in str(clip_err.value)
    assert "huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in str(clip_err.value)
    with pytest.raises(WeightsError, match="--sam-weights"):
        build_sam("vit_h", closed_port_url(), CPU, torch.float32, tmp_path)
    with pytest.raises(WeightsError, match="laion2b_s34b_b79k"):  # the error lists the known tags
        build_clip("ViT-B-32", "no_such_tag", CPU, tmp_path)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("call, known", [
    (lambda: build_sam("vit_x", None, CPU, torch.float32, "."), SAM_VARIANTS),
    (lambda: build_clip("RN50", None, CPU, "."), CLIP_VARIANTS),
    (lambda: ModelSpec.preset("huge"), models.MODEL_PRESETS),
    (lambda: ModelSpec("vit_b", None, "ViT-Z", None), CLIP_VARIANTS),
])
def test_unknown_names_list_the_known_ones(call, known):
    with pytest.raises(ValueError) as err:
        call()
    assert all(name in str(err.value) for name in known)


@pytest.mark.parametrize("name, overrides, expected", [
    ("default", {}, ModelSpec("vit_b", None, "ViT-B-32", "laion2b_s34b_b79k")),
    ("default", {"sam": None, "clip_pretrained": None}, ModelSpec("vit_b", None, "ViT-B-32", "laion2b_s34b_b79k")),
    ("default", {"clip": "ViT-B-16"}, ModelSpec("vit_b", None, "ViT-B-16", "laion2b_s34b_b88k")),
    ("default", {"sam": "vit_h", "sam_weights": "/w/sam.pth"}, ModelSpec("vit_h", "/w/sam.pth", "ViT-B-32", "laion2b_s34b_b79k")),
    ("tiny-random", {}, ModelSpec("tiny-random", None, "tiny-random", None)),
    ("default", {"sam_model": "vit_h"}, ValueError),
])
def test_presets_and_overrides(name, overrides, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="sam_model"):
            ModelSpec.preset(name, **overrides)
    else:
        assert ModelSpec.preset(name, **overrides) == expected


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_registry_dimensions_match_segment_anything(variant):
    """Our builder against segment-anything's own, on the meta device (no memory, no init)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ours = models._sam_module(SAM_VARIANTS[variant])
        theirs = sam_model_registry[variant]()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    v = SAM_VARIANTS[variant]
    assert v.url.endswith("/" + v.filename) and v.url.startswith("https://dl.fbaipublicfiles.com/segment_anything/")
    assert len(v.sha256) == 64 and not v.random_init


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("preference, expected", [
    ("cpu", (CPU, torch.float32)),
    (" CPU ", (CPU, torch.float32)),
    pytest.param("auto", (CPU, torch.float32), marks=pytest.mark.skipif(CUDA, reason="CUDA present")),
    pytest.param("cuda", ValueError, marks=pytest.mark.skipif(CUDA, reason="CUDA present")),
    pytest.param("auto", "cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    pytest.param("cuda:0", "cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    ("cuda:99", ValueError),
    ("tpu", ValueError),
    ("cuda:x", ValueError),
])
def test_select_device(preference, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="cpu"):
            select_device(preference)
    elif expected == "cuda":
        device, dtype = select_device(preference)
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float32)
    else:
        assert select_device(preference) == expected


def test_importing_builds_and_loads_nothing():
    code = ("import sys; import labelassist.workers.weights; assert 'torch' not in sys.modules; "
            "import labelassist.workers.models; "
            "assert not {'segment_anything', 'open_clip', 'torchvision'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
