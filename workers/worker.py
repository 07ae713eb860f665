"""The GPU worker: load models once, keep them resident, serve jobs by queue priority.

It is RQ's ``SimpleWorker``: jobs run in the worker process itself, so models
stay loaded between jobs and no process forks after CUDA (or a multi-threaded
torch) is initialised. Each job still has its own timeout.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from labelassist.workers.contract import INFERENCE_QUEUES, MODEL_VERSION_KEY, WORKER_MODELS_KEY
from labelassist.workers.pipeline import PipelineLimits

log = logging.getLogger(__name__)

# How often a worker looks for jobs whose worker died (RQ's default is 10 minutes).
# Such a job is found once its heartbeat lapses (its timeout, at most 30 s, plus 60 s).
MAINTENANCE_INTERVAL_S = 60
ENV_PREFIX = "LABELASSIST_"


@dataclass(frozen=True)
class WorkerConfig:
    models: str = "default"
    sam_model: str | None = None
    sam_weights: str | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    device: str = "auto"
    cache_dir: Path | None = None
    torch_threads: int = 0
    compile_decoder: str = "auto"  # on, off, or auto: on unless the models are tiny-random
    limits: PipelineLimits = field(default_factory=PipelineLimits)

    @classmethod
    def from_settings(cls, settings) -> WorkerConfig:
        """From the service's Settings (any object with those attributes)."""
        return cls(
            models=settings.models, sam_model=settings.sam_model, sam_weights=settings.sam_weights,
            clip_model=settings.clip_model, clip_pretrained=settings.clip_pretrained, device=settings.device,
            cache_dir=settings.cache_dir, torch_threads=settings.torch_threads,
            compile_decoder=settings.compile_decoder,
            limits=PipelineLimits(settings.max_image_bytes, settings.max_image_pixels, settings.embedding_cache_size),
        )

    @classmethod
    def from_env(cls) -> WorkerConfig:
        from labelassist.backend.settings import Settings  # stdlib-only module: no web framework

        return cls.from_settings(Settings.from_env())


def build_pipeline(config: WorkerConfig):
    import torch

    from labelassist.workers.models import ModelSpec, load_models
    from labelassist.workers.pipeline import Pipeline

    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    spec = ModelSpec.preset(config.models, sam=config.sam_model, sam_weights=config.sam_weights,
                            clip=config.clip_model, clip_pretrained=config.clip_pretrained)
    models = load_models(spec, device=config.device, cache_dir=config.cache_dir)
    if models.provenance.get("random_weights"):
        log.warning("serving RANDOM weights (%s): masks and labels are meaningless; for wiring checks only", models.version)
    compile_decoder = config.compile_decoder == "on" or (config.compile_decoder == "auto" and config.models != "tiny-random")
    pipeline = Pipeline(models, config.limits, compile_decoder=compile_decoder)
    if compile_decoder:
        pipeline.warm_up()
    return pipeline


def run_worker(config: WorkerConfig, redis_url: str, queues=INFERENCE_QUEUES, burst: bool = False, name: str | None = None) -> None:
    """Load the models, then work ``queues`` (highest priority first) until stopped (or empty, with ``burst``)."""
    import json

    from redis import Redis
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    from labelassist.workers import jobs

    pipeline = build_pipeline(config)
    connection = Redis.from_url(redis_url)
    jobs.install(pipeline, connection)
    connection.set(MODEL_VERSION_KEY, pipeline.version)
    worker = SimpleWorker(
        [Queue(q, connection=connection, serializer=JSONSerializer) for q in queues],
        connection=connection,
        serializer=JSONSerializer,
        name=name,
        maintenance_interval=MAINTENANCE_INTERVAL_S,
    )
    connection.set(WORKER_MODELS_KEY.format(name=worker.name), json.dumps(pipeline.models.provenance))
    log.info("worker %s serving %s on queues %s (pid %d)", worker.name, pipeline.version, ",".join(queues), os.getpid())
    worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
