"""``labelassist``: one command, sub-commands that map to library calls.

Every option also reads ``LABELASSIST_<OPTION>`` from the environment (see
``labelassist.backend.settings``); an option given on the command line wins.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

import click

from labelassist.backend.settings import ENV_PREFIX, Settings

log = logging.getLogger("labelassist")

# Options shared by the commands that build Settings: (option, field, type, help).
_SETTING_OPTIONS = {
    "redis_url": ("--redis-url", str, "Redis URL of the job queue; unset: serve starts a private one."),
    "models": ("--models", str, "Model preset: default (SAM vit_b + OpenCLIP ViT-B-32) or tiny-random (random weights, wiring checks only)."),
    "sam_model": ("--sam-model", str, "SAM variant overriding the preset: vit_b, vit_l, vit_h, tiny-random."),
    "sam_weights": ("--sam-weights", str, "SAM checkpoint: a local path or an http(s) URL (default: the registry's URL, cached)."),
    "clip_model": ("--clip-model", str, "OpenCLIP model name overriding the preset, e.g. ViT-B-16."),
    "clip_pretrained": ("--clip-pretrained", str, "OpenCLIP pretrained tag or local weights file."),
    "device": ("--device", str, "auto, cpu, cuda or cuda:N."),
    "cache_dir": ("--cache-dir", click.Path(file_okay=False), "Where downloaded weights are kept."),
    "torch_threads": ("--torch-threads", int, "torch CPU threads per worker (0: torch's default). Never more than cores."),
    "host": ("--host", str, "Address the web tier listens on."),
    "port": ("--port", int, "Port the web tier listens on."),
    "predict_wait_s": ("--predict-wait", float, "Seconds /predict waits for jobs before answering with what is done."),
}


def setting_options(*names: str) -> Callable:
    """Add the named Settings fields as options (default None: fall back to the environment)."""

    def decorate(fn: Callable) -> Callable:
        for name in reversed(names):
            flag, type_, help_ = _SETTING_OPTIONS[name]
            fn = click.option(flag, name, type=type_, default=None, help=f"{help_} [env {ENV_PREFIX}{name.upper()}]")(fn)
        return fn

    return decorate


def build_settings(**options) -> Settings:
    try:
        return Settings.from_env(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="labelassist")
def cli(verbose: int) -> None:
    """labelassist: SAM + OpenCLIP pre-annotation for Label Studio."""
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command()
@setting_options("redis_url", "models", "sam_model", "sam_weights", "clip_model", "clip_pretrained", "device", "cache_dir", "torch_threads")
@click.option("--queues", default=None, help="Comma-separated queues, highest priority first [env LABELASSIST_QUEUES] (default: interactive,predict,bulk).")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
def worker(queues: str | None, burst: bool, **options) -> None:
    """Run a GPU worker: load the models once, keep them resident, serve jobs by priority."""
    import os

    from labelassist.workers.contract import INFERENCE_QUEUES
    from labelassist.workers.worker import WorkerConfig, run_worker

    settings = build_settings(**options)
    if not settings.redis_url:
        raise click.UsageError(f"a worker needs the queue's Redis URL: --redis-url or {ENV_PREFIX}REDIS_URL")
    queues = queues or os.environ.get(ENV_PREFIX + "QUEUES")
    names = tuple(q.strip() for q in queues.split(",")) if queues else INFERENCE_QUEUES
    run_worker(WorkerConfig.from_settings(settings), settings.redis_url, names, burst=burst)


def main() -> None:
    cli(prog_name="labelassist")


if __name__ == "__main__":
    main()
