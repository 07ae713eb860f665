"""Model registry and loading: SAM and OpenCLIP variants as data, built by name.

Importing this module builds and loads nothing; segment-anything and open_clip
(which pull in torchvision) are imported by the functions that build models.

Weights always go through ``labelassist.workers.weights``: a local file, or a
download into the cache checked against a pinned sha256. The ``tiny-random``
variants have no published weights: without a weights file they are initialised
from a fixed seed, and their weight hash reads ``random-<hash>`` so provenance
and the model version say plainly that the predictions are meaningless.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

import torch

from labelassist.workers.weights import (
    default_cache_dir,
    CLIP_PRETRAINED_OPTION,
    SAM_WEIGHTS_OPTION,
    ResolvedWeights,
    fetch_weights,
    is_url,
    load_state_dict,
)
from labelassist.workers.errors import WeightsError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random-"  # weight hashes of randomly initialised models start with this
RANDOM_INIT_SEED = 0
WEIGHTS_SUBDIR = "weights"  # load_models keeps downloads in <cache_dir>/weights
VERSION_PREFIX = "la"
VERSION_HASH_CHARS = 8  # hex digits of each weight hash in the model version

# segment-anything's fixed geometry: every variant takes 1024 px inputs in
# 16 px patches (a 64x64 embedding), so SamPredictor and the automatic mask
# generator work unchanged whatever the widths below.
SAM_IMAGE_SIZE = 1024
SAM_PATCH_SIZE = 16
SAM_WINDOW_SIZE = 14
SAM_MASK_IN_CHANS = 16
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics in 0..255 RGB, as segment-anything uses
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_HF_URL = "https://huggingface.co"
_OPEN_CLIP_HF_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's file name in every hub repository


@dataclass(frozen=True)
class SamVariant:
    """The dimensions of one SAM model and where its official checkpoint lives."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    prompt_embed_dim: int = 256
    decoder_dim: int = 256  # the two-way transformer's width; segment-anything ties it to prompt_embed_dim
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256
    url: str | None = None
    sha256: str | None = None
    filename: str | None = None
    random_init: bool = False  # no published weights: random from RANDOM_INIT_SEED unless a file is given

    def __post_init__(self) -> None:
        if self.decoder_dim != self.prompt_embed_dim:
            raise ValueError(f"SAM variant {self.name!r}: decoder_dim ({self.decoder_dim}) must equal prompt_embed_dim "
                             f"({self.prompt_embed_dim}); the mask decoder attends over prompt tokens of that width")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise ValueError(f"SAM variant {self.name!r}: global attention indexes {self.encoder_global_attn_indexes} "
                             f"must lie in [0, {self.encoder_depth})")


# Official checkpoints, from segment-anything's README. The sha256 values are not
# published by Meta; they are the digests that many independent projects pin for
# these exact files (the names' suffixes are md5 prefixes, not sha256).
SAM_VARIANTS: dict[str, SamVariant] = {
    v.name: v
    for v in (
        SamVariant("vit_b", 768, 12, 12, (2, 5, 8, 11), url=_SAM_URL + "sam_vit_b_01ec64.pth",
                   sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
                   filename="sam_vit_b_01ec64.pth"),  # 375 MB
        SamVariant("vit_l", 1024, 24, 16, (5, 11, 17, 23), url=_SAM_URL + "sam_vit_l_0b3195.pth",
                   sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
                   filename="sam_vit_l_0b3195.pth"),  # 1.25 GB
        SamVariant("vit_h", 1280, 32, 16, (7, 15, 23, 31), url=_SAM_URL + "sam_vit_h_4b8939.pth",
                   sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                   filename="sam_vit_h_4b8939.pth"),  # 2.56 GB
        # Wiring checks and tests: ~0.1 M parameters, real segment-anything code paths.
        SamVariant("tiny-random", 32, 2, 2, (1,), prompt_embed_dim=32, decoder_dim=32, decoder_mlp_dim=64,
                   decoder_heads=2, iou_head_hidden_dim=32, filename="sam_tiny_random.pth", random_init=True),
    )
}


@dataclass(frozen=True)
class ClipVariant:
    """One OpenCLIP model: open_clip's architecture name and its default weights.

    ``url``/``filename``/``sha256`` describe ``default_pretrained``'s file; other
    tags are located through open_clip's own pretrained table.
    ``config_overrides`` replace parts of the architecture's open_clip config
    (passed to open_clip's factory as model keyword arguments, so open_clip's
    global config registry is never modified).
    """

    name: str
    arch: str
    default_pretrained: str | None = None
    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    random_init: bool = False
    config_overrides: dict[str, Any] | None = field(default=None, hash=False)


# No sha256 is pinned for the OpenCLIP files: the hub shows the digests only on
# each file's web page and no independent source states them, so a guess would be
# worse than none. Downloads are still hashed and the hash recorded in provenance.
CLIP_VARIANTS: dict[str, ClipVariant] = {
    v.name: v
    for v in (
        # 66.6% ImageNet zero-shot, 8.8 GFLOPs per 224 px image.
        ClipVariant("ViT-B-32", "ViT-B-32", "laion2b_s34b_b79k",
                    url=f"{_HF_URL}/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/{_OPEN_CLIP_HF_WEIGHTS}",
                    filename="open_clip_ViT-B-32_laion2b_s34b_b79k.bin"),
        # 70.2% ImageNet zero-shot, ~4x the compute of ViT-B-32.
        ClipVariant("ViT-B-16", "ViT-B-16", "laion2b_s34b_b88k",
                    url=f"{_HF_URL}/laion/CLIP-ViT-B-16-laion2B-s34B-b88K/resolve/main/{_OPEN_CLIP_HF_WEIGHTS}",
                    filename="open_clip_ViT-B-16_laion2b_s34b_b88k.bin"),
        # Wiring checks and tests: ViT-B-32's tokenizer and preprocessing with tiny towers.
        ClipVariant("tiny-random", "ViT-B-32", random_init=True, config_overrides={
            "embed_dim": 32,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        }),
    )
}


# ---------------------------------------------------------------------------
# Devices


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


def select_device(preference: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device to run on and the autocast dtype to use there.

    ``auto``: the current CUDA device with bfloat16 when CUDA is present, else
    the CPU with float32. ``cpu``, ``cuda`` and ``cuda:N`` are taken literally
    and fail with a ValueError when unavailable. GPUs without native bfloat16
    (before Ampere) get float32 rather than float16, whose range SAM's attention
    logits are not known to respect.
    """
    text = (preference or "auto").strip().lower()
    match = _DEVICE_RE.match(text)
    if match is None:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {preference!r}")
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise ValueError(f"device {preference!r}: CUDA is not available to this torch ({torch.__version__}, "
                         f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
    index = int(match.group(2)) if match.group(2) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {preference!r}: only {torch.cuda.device_count()} CUDA device(s) visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                         f"use cuda:0..cuda:{torch.cuda.device_count() - 1}, auto or cpu")
    device = torch.device("cuda", index)
    with torch.cuda.device(device):
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return device, torch.bfloat16 if bf16 else torch.float32


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of a module's state dict, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _random_hash(module: torch.nn.Module) -> str:
    return RANDOM_PREFIX + state_dict_sha256(module)


def _seeded(build: Callable[[], Any]) -> Any:
    """Run ``build`` with torch's CPU RNG at RANDOM_INIT_SEED, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build()


def _unknown(kind: str, name: str, known) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


# ---------------------------------------------------------------------------
# SAM


def sam_variant(name: str) -> SamVariant:
    try:
        return SAM_VARIANTS[name]
    except KeyError:
        raise _unknown("SAM variant", name, SAM_VARIANTS) from None


def _sam_module(v: SamVariant) -> Sam:
    """segment-anything's ``Sam`` with ``v``'s dimensions, mirroring its ``_build_sam``
    but without its checkpoint loading (a ``torch.load`` with no ``map_location``)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = SAM_IMAGE_SIZE // SAM_PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=v.encoder_depth,
            embed_dim=v.encoder_embed_dim,
            img_size=SAM_IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=v.encoder_num_heads,
            patch_size=SAM_PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=v.encoder_global_attn_indexes,
            window_size=SAM_WINDOW_SIZE,
            out_chans=v.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=v.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(SAM_IMAGE_SIZE, SAM_IMAGE_SIZE),
            mask_in_chans=SAM_MASK_IN_CHANS,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=v.decoder_dim, mlp_dim=v.decoder_mlp_dim,
                                          num_heads=v.decoder_heads),
            transformer_dim=v.decoder_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=v.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, hint: str = "") -> None:
    """Raise a WeightsError naming missing, unexpected and mis-shaped tensors, before
    ``load_state_dict(strict=True)`` would raise a RuntimeError listing hundreds of them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)} in the model"
              for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = [f"{label}: {few(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if items]
    raise WeightsError(f"weights file {path} does not fit {what}: {'; '.join(problems)}.{hint}")


def _guess_sam_variants(state: dict[str, torch.Tensor]) -> list[str]:
    """Registry variants whose encoder width and depth match a SAM state dict."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return []
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    return [v.name for v in SAM_VARIANTS.values() if v.encoder_embed_dim == patch.shape[0] and v.encoder_depth == depth]


def _smooth_random_decoder(model: Sam) -> None:
    """Give each transposed convolution of the mask upscaling one weight per 2x2 output block.

    A randomly initialised upscaling path paints a checkerboard, so random
    masks come out as pixel-level noise with hundreds of components; trained
    SAM's masks are smooth. Tied kernels make random masks blobs that follow
    the image's regions, so tests and benchmarks on random weights exercise
    polygons, crops and RLE at realistic cost rather than at noise's.
    """
    with torch.no_grad():
        for layer in model.mask_decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight.copy_(layer.weight.mean(dim=(2, 3), keepdim=True).expand_as(layer.weight))


def build_sam(variant: str, weights: str | None, device: torch.device | str, dtype: torch.dtype,
              cache_dir: Path) -> tuple[Sam, str]:
    """SAM ``variant`` in eval mode on ``device``, and the sha256 of its weights.

    ``weights``: a local checkpoint, an http(s) URL (pin it with ``#sha256=<hex>``)
    or None for the registry's checkpoint, downloaded into ``cache_dir`` and
    checked against its pinned sha256. ``tiny-random`` without weights is
    initialised from a fixed seed; its hash is ``random-<sha256 of the tensors>``.

    Parameters stay float32 whatever ``dtype`` (the autocast dtype from
    ``select_device``): callers run under ``torch.autocast``, which keeps the
    numerically sensitive ops (layer norms, softmax) in float32.
    """
    v = sam_variant(variant)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: expected torch.float32, bfloat16 or float16, got {dtype}")
    device = torch.device(device)
    resolved: ResolvedWeights | None = None
    if weights is not None or not v.random_init:
        # Resolve before building: a missing file fails in milliseconds, not after
        # initialising 600 M parameters.
        resolved = fetch_weights(weights, default_url=v.url, sha256=v.sha256 if weights is None else None,
                                 filename=v.filename or f"sam_{v.name}.pth", cache_dir=Path(cache_dir),
                                 what=f"SAM {v.name} checkpoint", option=SAM_WEIGHTS_OPTION)
    if resolved is None:
        model = _seeded(lambda: _sam_module(v))
        _smooth_random_decoder(model)
        sha = _random_hash(model)
        log.warning("SAM %s has random weights (%s): its masks are meaningless", v.name, sha[:20])
        return model.to(device).eval(), sha

    state = load_state_dict(resolved.path, "cpu")
    # Built on the meta device: no memory and no random init for tensors the
    # checkpoint replaces anyway (a random init of vit_h takes most of a minute
    # on a CPU); the checkpoint's tensors are then assigned in place.
    with torch.device("meta"):
        model = _sam_module(v)
    guesses = [g for g in _guess_sam_variants(state) if g != v.name]
    hint = f" It looks like a checkpoint of {' or '.join(guesses)}: choose that variant with --sam-model." if guesses else ""
    _check_keys(model, state, resolved.path, f"SAM variant {v.name!r}", hint)
    # Parameters stay float32 (see above) even when a checkpoint was saved in half precision.
    model.load_state_dict({k: t.float() if t.is_floating_point() else t for k, t in state.items()},
                          strict=True, assign=True)
    # The pixel statistics are non-persistent buffers, never in a checkpoint.
    model.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), persistent=False)
    model.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), persistent=False)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"SAM {v.name}: tensors not set by the checkpoint or the builder: {left}")
    log.info("SAM %s loaded from %s (sha256 %s)", v.name, resolved.path, resolved.sha256)
    return model.to(device).eval(), resolved.sha256


# ---------------------------------------------------------------------------
# OpenCLIP


@dataclass
class ClipBundle:
    """An OpenCLIP model with what must travel with it.

    ``preprocess``: the eval transform open_clip's factory built for this model
    (PIL image -> float tensor (3, image_size, image_size), normalised), so crops
    are always prepared the way the weights expect. ``tokenizer``: list of str ->
    int64 tensor (n, context_length). ``mean``/``std``: per-channel RGB
    normalisation in 0..1 units, for callers that prepare tensors on the GPU
    instead of through ``preprocess``.
    """

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_sha256: str
    name: str
    pretrained: str | None


def clip_variant(name: str) -> ClipVariant:
    try:
        return CLIP_VARIANTS[name]
    except KeyError:
        raise _unknown("OpenCLIP model", name, CLIP_VARIANTS) from None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_url(url: str) -> str:
    """Honour HF_ENDPOINT (a hub mirror) as huggingface_hub would."""
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    return endpoint + url[len(_HF_URL):] if endpoint and url.startswith(_HF_URL) else url


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz", ".ckpt")


def _is_local_file_ref(pretrained: str) -> bool:
    return (pretrained.startswith("file://") or os.sep in pretrained or pretrained.startswith("~")
            or pretrained.lower().endswith(_WEIGHT_SUFFIXES) or Path(pretrained).is_file())


def _tag_file(v: ClipVariant, tag: str, tag_cfg: dict[str, Any]) -> tuple[str, str, str | None]:
    """(url, cache file name, sha256) of an open_clip pretrained tag's weights."""
    if tag == v.default_pretrained and v.url and v.filename:
        return _hub_url(v.url), v.filename, v.sha256
    if tag_cfg.get("hf_hub"):
        # open_clip's convention: "org/repo/" names the repository's default
        # file, "org/repo/file.ext" a specific one.
        repo, hub_file = os.path.split(tag_cfg["hf_hub"])
        hub_file = hub_file or _OPEN_CLIP_HF_WEIGHTS
        url = _hub_url(f"{_HF_URL}/{repo}/resolve/main/{hub_file}")
    elif tag_cfg.get("url"):
        url = tag_cfg["url"]
        hub_file = url.rsplit("/", 1)[-1]
    else:
        raise WeightsError(f"OpenCLIP {v.arch} '{tag}': open_clip knows no download location; "
                           f"download the weights and pass the file with {CLIP_PRETRAINED_OPTION}")
    # open_clip picks its loader by suffix (.safetensors, .npz), so the suffix is kept.
    return url, f"open_clip_{v.arch}_{tag}{Path(hub_file).suffix or '.bin'}", None


def build_clip(name: str, pretrained: str | None, device: torch.device | str, cache_dir: Path) -> ClipBundle:
    """OpenCLIP model ``name`` in eval mode on ``device``, with its preprocessing and tokenizer.

    ``pretrained``: an open_clip tag (downloaded into ``cache_dir`` and loaded
    from there), a local weights file or http(s) URL, or None for the variant's
    default tag (``tiny-random``: random weights from a fixed seed). With
    ``HF_HUB_OFFLINE=1`` a tag whose file is not cached fails at once.
    """
    import open_clip

    v = clip_variant(name)
    device = torch.device(device)
    source = pretrained if pretrained is not None else v.default_pretrained
    what = f"OpenCLIP {v.name} weights"
    tag_cfg: dict[str, Any] = {}
    resolved: ResolvedWeights | None = None
    if source is None:
        pass  # a random_init variant with no file: seeded random weights
    elif is_url(source) or _is_local_file_ref(source):
        resolved = fetch_weights(source, default_url=None, sha256=None, filename=f"open_clip_{v.name}.bin",
                                 cache_dir=Path(cache_dir), what=what, option=CLIP_PRETRAINED_OPTION)
    else:
        tag_cfg = open_clip.get_pretrained_cfg(v.arch, source) if not v.random_init else {}
        if not tag_cfg:
            known = open_clip.list_pretrained_tags_by_model(v.arch) if not v.random_init else []
            raise WeightsError(f"{what}: {source!r} is neither an existing file nor a pretrained tag of {v.name}"
                               + (f" (tags: {', '.join(known)})" if known else " (it has no published weights)")
                               + f"; pass a weights file with {CLIP_PRETRAINED_OPTION}")
        url, filename, sha256 = _tag_file(v, source, tag_cfg)
        resolved = fetch_weights(None, default_url=url, sha256=sha256, filename=filename, cache_dir=Path(cache_dir),
                                 what=f"OpenCLIP {v.name} '{source}' weights", option=CLIP_PRETRAINED_OPTION,
                                 offline=_env_true("HF_HUB_OFFLINE"))

    kwargs: dict[str, Any] = {"precision": "fp32", "device": device,
                              # The tag's training recipe, applied although the weights come from a file.
                              "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if tag_cfg.get(key) is not None:
            kwargs[arg] = tag_cfg[key]
    kwargs.update(copy.deepcopy(v.config_overrides or {}))
    checkpoint = str(resolved.path) if resolved is not None else None
    try:
        model, _, preprocess = _seeded(lambda: open_clip.create_model_and_transforms(v.arch, pretrained=checkpoint, **kwargs))
    except (RuntimeError, AssertionError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        # open_clip raises RuntimeError for a state dict that does not fit (an
        # AssertionError when positional embeddings differ in width), and
        # torch.load its many error types for a file that is not a checkpoint.
        raise WeightsError(f"{what}: cannot load {checkpoint}: {type(exc).__name__}: {str(exc)[:1500]}. "
                           f"Is it a complete {v.name} checkpoint? Weights of another model need --clip-model.") from None
    model.eval()
    pp = model.visual.preprocess_cfg
    size = pp["size"]
    if not isinstance(size, int):
        if len(set(size)) != 1:
            raise ValueError(f"OpenCLIP {v.name}: expected a square input size, got {size}")
        size = size[0]
    sha = resolved.sha256 if resolved is not None else _random_hash(model)
    if resolved is None:
        log.warning("OpenCLIP %s has random weights (%s): its labels are meaningless", v.name, sha[:20])
    return ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(v.arch, context_length=model.context_length),
        image_size=int(size),
        mean=tuple(float(m) for m in pp["mean"]),
        std=tuple(float(s) for s in pp["std"]),
        weights_sha256=sha,
        name=v.name,
        pretrained=source,
    )


# ---------------------------------------------------------------------------
# Presets and loading


@dataclass(frozen=True)
class ModelSpec:
    """Which models a worker loads. ``sam_weights``: None for the registry's
    checkpoint, or a path/URL; ``clip_pretrained``: an open_clip tag, a path/URL,
    or None for the variant's default."""

    sam: str
    sam_weights: str | None
    clip: str
    clip_pretrained: str | None

    def __post_init__(self) -> None:
        sam_variant(self.sam)
        clip_variant(self.clip)

    @classmethod
    def preset(cls, name: str, **overrides: str | None) -> ModelSpec:
        """A named preset with field overrides; overrides that are None are ignored,
        so unset CLI options and environment variables can be passed through as is.
        Overriding ``clip`` without ``clip_pretrained`` takes the new model's default tag."""
        try:
            spec = MODEL_PRESETS[name]
        except KeyError:
            raise _unknown("model preset", name, MODEL_PRESETS) from None
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"model preset overrides: unknown field(s) {bad}; expected some of {sorted(names)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("sam", spec.sam) != spec.sam:
            given.setdefault("sam_weights", None)
        if given.get("clip", spec.clip) != spec.clip:
            given.setdefault("clip_pretrained", clip_variant(given["clip"]).default_pretrained)
        return replace(spec, **given)


MODEL_PRESETS: dict[str, ModelSpec] = {
    "default": ModelSpec("vit_b", None, "ViT-B-32", "laion2b_s34b_b79k"),
    "tiny-random": ModelSpec("tiny-random", None, "tiny-random", None),
}


@dataclass
class LoadedModels:
    """Everything a worker keeps resident. ``dtype``: the autocast dtype for
    ``device``. ``version``: the model version Label Studio sees; it changes
    whenever a model or its weights change, and contains "random" when any
    weights are random."""

    sam: Sam
    clip: ClipBundle
    device: torch.device
    dtype: torch.dtype
    spec: ModelSpec
    provenance: dict[str, Any]
    version: str


def model_version(sam: str, sam_sha256: str, clip: str, clip_sha256: str) -> str:
    """``la-<sam>.<hash8>-<clip>.<hash8>``; a random model's hash part reads ``random-<hash8>``."""

    def short(sha: str) -> str:
        if sha.startswith(RANDOM_PREFIX):
            return RANDOM_PREFIX + sha[len(RANDOM_PREFIX):][:VERSION_HASH_CHARS]
        return sha[:VERSION_HASH_CHARS]

    return f"{VERSION_PREFIX}-{sam}.{short(sam_sha256)}-{clip}.{short(clip_sha256)}"


def _public_source(source: str | None) -> str | None:
    """A weights source fit for provenance: URLs lose user info, query and fragment,
    where presigned URLs carry their credentials."""
    if source is None or not is_url(source):
        return source
    parts = urlsplit(source)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


def load_models(spec: ModelSpec, device: str = "auto", cache_dir: Path | None = None) -> LoadedModels:
    """Build both models of ``spec`` on ``device``; downloads go to ``<cache_dir>/weights``."""
    torch_device, dtype = select_device(device)
    weights_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / WEIGHTS_SUBDIR
    sam, sam_sha = build_sam(spec.sam, spec.sam_weights, torch_device, dtype, weights_dir)
    clip = build_clip(spec.clip, spec.clip_pretrained, torch_device, weights_dir)
    version = model_version(spec.sam, sam_sha, spec.clip, clip.weights_sha256)
    provenance = {
        "sam": spec.sam,
        "sam_weights": _public_source(spec.sam_weights),
        "sam_weights_sha256": sam_sha,
        "clip": spec.clip,
        "clip_pretrained": _public_source(clip.pretrained),
        "clip_weights_sha256": clip.weights_sha256,
        "device": str(torch_device),
        "dtype": str(dtype).removeprefix("torch."),
        "random_weights": sam_sha.startswith(RANDOM_PREFIX) or clip.weights_sha256.startswith(RANDOM_PREFIX),
        "model_version": version,
    }
    log.info("models loaded: %s on %s (%s)", version, torch_device, provenance["dtype"])
    return LoadedModels(sam=sam, clip=clip, device=torch_device, dtype=dtype, spec=spec, provenance=provenance,
                        version=version)
