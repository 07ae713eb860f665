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
    "compile_decoder": ("--compile-decoder", click.Choice(["auto", "on", "off"]), "Compile SAM's mask decoder with torch.compile (~1 min at start, several times faster decoding); auto: on unless the models are tiny-random."),
    "torch_threads": ("--torch-threads", int, "torch CPU threads per worker (0: torch's default). Never more than cores."),
    "host": ("--host", str, "Address the web tier listens on."),
    "port": ("--port", int, "Port the web tier listens on."),
    "predict_wait_s": ("--predict-wait", float, "Seconds /predict waits for jobs before answering with what is done."),
    "interactive_wait_s": ("--interactive-wait", float, "Seconds an interactive /predict waits for its prompt's job."),
    "web_threads": ("--web-threads", int, "Request threads of the web tier."),
    "max_request_bytes": ("--max-request-bytes", int, "Largest HTTP body accepted (413 above)."),
    "basic_auth_user": ("--basic-auth-user", str, "Basic auth user Label Studio must send (with --basic-auth-pass)."),
    "basic_auth_pass": ("--basic-auth-pass", str, "Basic auth password Label Studio must send."),
    "webhook_secret": ("--webhook-secret", str, "Secret path segment of /webhook/<secret> (default: a random one kept in Redis)."),
    "ls_url": ("--ls-url", str, "Label Studio URL as this machine reaches it (default: the host name Label Studio sends in /setup)."),
    "ls_token": ("--ls-token", str, "Label Studio personal access token or legacy key (default: the one sent in /setup)."),
    "local_files_root": ("--local-files-root", click.Path(file_okay=False), "Label Studio's LOCAL_FILES_DOCUMENT_ROOT as mounted here, to read local files from disk."),
    "allowed_image_hosts": ("--allowed-image-hosts", str, "Comma-separated hosts besides Label Studio that images may come from."),
    "proposals": ("--proposals", str, 'Mask proposal settings as JSON, e.g. \'{"points_per_side": 16}\'.'),
    "scoring": ("--scoring", str, 'Label scoring settings as JSON, e.g. \'{"label_threshold": 0.4}\'.'),
    "preannotate_new_tasks": ("--preannotate-new-tasks/--no-preannotate-new-tasks", bool,
                              "Pre-annotate tasks as they are imported (Label Studio's TASKS_CREATED webhook; bulk queue)."),
    "corrections_url": ("--corrections-url", str, "Correction store: postgresql://... (default: SQLite in the data dir)."),
    "data_dir": ("--data-dir", click.Path(file_okay=False), "Where kept data lives (the SQLite correction store)."),
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
@setting_options("redis_url", "models", "sam_model", "sam_weights", "clip_model", "clip_pretrained", "device", "cache_dir", "torch_threads", "compile_decoder")
@click.option("--queues", default=None, help="Comma-separated queues, highest priority first [env LABELASSIST_QUEUES] (default: interactive,predict,bulk).")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
def worker(queues: str | None, burst: bool, **options) -> None:
    """Run a GPU worker: load the models once, keep them resident, serve jobs by priority."""
    import os

    from labelassist.workers.contract import INFERENCE_QUEUES, QUEUE_INTERACTIVE, QUEUE_TRAIN
    from labelassist.workers.worker import WorkerConfig, run_worker

    settings = build_settings(**options)
    if not settings.redis_url:
        raise click.UsageError(f"a worker needs the queue's Redis URL: --redis-url or {ENV_PREFIX}REDIS_URL")
    queues = queues or os.environ.get(ENV_PREFIX + "QUEUES")
    names = tuple(q.strip() for q in queues.split(",")) if queues else INFERENCE_QUEUES
    if QUEUE_TRAIN in names and QUEUE_INTERACTIVE in names:
        raise click.UsageError(f"--queues: training never shares a worker with interactive inference; run "
                               f"`--queues {QUEUE_TRAIN}` as a worker of its own")
    from labelassist.workers.errors import LabelassistError

    try:
        run_worker(WorkerConfig.from_settings(settings), settings.redis_url, names, burst=burst)
    except (LabelassistError, ValueError) as exc:  # missing weights, unknown model or device: say what to do
        raise click.ClickException(str(exc)) from None


@cli.command()
@setting_options("redis_url", "models", "sam_model", "sam_weights", "clip_model", "clip_pretrained", "device", "cache_dir",
                 "torch_threads", "host", "port", "predict_wait_s", "interactive_wait_s", "web_threads", "max_request_bytes",
                 "basic_auth_user", "basic_auth_pass", "webhook_secret", "ls_url", "ls_token", "local_files_root",
                 "allowed_image_hosts", "proposals", "scoring", "preannotate_new_tasks", "corrections_url", "data_dir")
def serve(**options) -> None:
    """Serve the Label Studio ML backend; without a Redis URL, also a private Redis and one worker."""
    from labelassist.backend.embedded import serve as run_serve

    run_serve(build_settings(**options))


@cli.command()
@click.option("--ls-url", required=True, envvar=ENV_PREFIX + "LS_URL", help=f"Label Studio URL [env {ENV_PREFIX}LS_URL].")
@click.option("--token", required=True, envvar=ENV_PREFIX + "LS_TOKEN",
              help=f"Label Studio personal access token or legacy API key [env {ENV_PREFIX}LS_TOKEN].")
@click.option("--project", "project_id", required=True, type=int, envvar=ENV_PREFIX + "PROJECT", help=f"Project id [env {ENV_PREFIX}PROJECT].")
@click.option("--backend-url", required=True, envvar=ENV_PREFIX + "BACKEND_URL",
              help=f"This backend's URL as Label Studio reaches it [env {ENV_PREFIX}BACKEND_URL].")
@click.option("--basic-auth-user", default=None, envvar=ENV_PREFIX + "BASIC_AUTH_USER", help=f"The backend's basic auth user [env {ENV_PREFIX}BASIC_AUTH_USER].")
@click.option("--basic-auth-pass", default=None, envvar=ENV_PREFIX + "BASIC_AUTH_PASS", help=f"The backend's basic auth password [env {ENV_PREFIX}BASIC_AUTH_PASS].")
@click.option("--extra-params", default=None, envvar=ENV_PREFIX + "EXTRA_PARAMS",
              help='Per-project job settings as JSON, e.g. \'{"scoring": {"label_threshold": 0.4}}\' '
                   f"[env {ENV_PREFIX}EXTRA_PARAMS].")
@click.option("--wait", "wait_s", default=300.0, show_default=True, type=float, envvar=ENV_PREFIX + "CONNECT_WAIT_S",
              help=f"Seconds to wait for the workers to publish their model version [env {ENV_PREFIX}CONNECT_WAIT_S].")
def connect(**options) -> None:
    """Connect a Label Studio project: add this backend (interactive on), its webhook, and our model version."""
    from labelassist.backend.connect import ConnectError, connect_project

    try:
        outcome = connect_project(**options)
    except ConnectError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("project %s connected: backend %s, webhook %s, model version %s",
             outcome.project_id, outcome.ml_backend_id, outcome.webhook_url, outcome.model_version)


@cli.command()
@setting_options("redis_url")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def status(as_json: bool, **options) -> None:
    """Queues and their depths, workers and what they run, predictions waiting to be written."""
    import json

    from redis import Redis
    from redis.exceptions import RedisError

    from labelassist.backend.status import collect_status, format_status

    settings = build_settings(**options)
    if not settings.redis_url:
        raise click.UsageError(f"status needs the queue's Redis URL: --redis-url or {ENV_PREFIX}REDIS_URL "
                               "(`labelassist serve` logs its private one)")
    try:
        snapshot = collect_status(Redis.from_url(settings.redis_url, socket_timeout=5))
    except RedisError as exc:
        raise click.ClickException(f"cannot read the queue at {settings.redis_url}: {exc}") from None
    click.echo(json.dumps(snapshot) if as_json else format_status(snapshot))


@cli.command()
@click.option("--ls-url", required=True, envvar=ENV_PREFIX + "LS_URL", help=f"Label Studio URL [env {ENV_PREFIX}LS_URL].")
@click.option("--token", required=True, envvar=ENV_PREFIX + "LS_TOKEN",
              help=f"Label Studio personal access token or legacy API key [env {ENV_PREFIX}LS_TOKEN].")
@click.option("--project", "project_id", required=True, type=int, envvar=ENV_PREFIX + "PROJECT", help=f"Project id [env {ENV_PREFIX}PROJECT].")
@click.option("--model-version", default=None, help="Rank by this version's predictions (default: the project's model version).")
@click.option("--include-annotated", is_flag=True, help="Also list tasks that already have an annotation.")
@click.option("--limit", type=int, default=None, help="Show only the first N tasks.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def rank(ls_url: str, token: str, project_id: int, model_version: str | None, include_annotated: bool, limit: int | None,
         as_json: bool) -> None:
    """List a project's tasks from least to most certain (active learning: label these first)."""
    import json

    from labelassist.backend.ranking import format_ranking, rank_tasks
    from labelassist.plugin.errors import LabelStudioAPIError
    from labelassist.plugin.ls_client import LabelStudioClient

    try:
        client = LabelStudioClient(ls_url, token)
        version = model_version or client.get_project(project_id).get("model_version") or ""
        if not version:
            raise click.UsageError(f"project {project_id} has no model version; run `labelassist connect` or pass --model-version")
        ranked = rank_tasks(client.list_tasks(project_id), version, include_annotated)
    except LabelStudioAPIError as exc:
        raise click.ClickException(str(exc)) from None
    ranked = ranked[:limit] if limit is not None else ranked
    if as_json:
        for task in ranked:
            click.echo(json.dumps(task.to_json()))
    else:
        click.echo(format_ranking(ranked, version))


@cli.command()
@click.option("--ls-url", required=True, envvar=ENV_PREFIX + "LS_URL", help=f"Label Studio URL [env {ENV_PREFIX}LS_URL].")
@click.option("--token", required=True, envvar=ENV_PREFIX + "LS_TOKEN",
              help=f"Label Studio personal access token or legacy API key [env {ENV_PREFIX}LS_TOKEN].")
@click.option("--project", "project_id", required=True, type=int, envvar=ENV_PREFIX + "PROJECT", help=f"Project id [env {ENV_PREFIX}PROJECT].")
@setting_options("redis_url", "local_files_root", "allowed_image_hosts", "proposals", "scoring")
@click.option("--filter", "task_filter", default=None, help="Only these task ids: ids and inclusive ranges, e.g. '1,4,10-20'.")
@click.option("--replace", is_flag=True, help="Delete the selected tasks' predictions of other model versions (annotations are never touched).")
@click.option("--max-retries", type=int, default=2, show_default=True,
              help="Times a task is tried again after worker_failed, job_lost or image_unavailable.")
@click.option("--limit", type=int, default=None, help="Pre-annotate at most N of the selected tasks this run.")
@click.option("--batch-size", type=int, default=50, show_default=True, help="Predictions written to Label Studio per call.")
@click.option("--window", type=int, default=64, show_default=True, envvar=ENV_PREFIX + "BOOTSTRAP_WINDOW",
              help="Jobs of the run outstanding at once; a task's image is resolved only when it enters the window, "
                   f"so download tokens do not expire in the queue [env {ENV_PREFIX}BOOTSTRAP_WINDOW].")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def bootstrap(ls_url: str, token: str, project_id: int, task_filter: str | None, replace: bool, max_retries: int,
              limit: int | None, batch_size: int, window: int, no_progress: bool, as_json: bool, **options) -> None:
    """Pre-annotate every task of a project that has no prediction of the workers' model version.

    Jobs go to the bulk queue; run it again to resume (nothing is predicted or written twice).
    Exits 0 even when some tasks fail (they are listed); non-zero when the run cannot proceed.
    """
    import json

    from redis import Redis
    from redis.exceptions import RedisError

    from labelassist.backend.bootstrap import Bootstrap, BootstrapError, format_summary, parse_task_filter
    from labelassist.backend.queue import JobOptions, QueueClient
    from labelassist.backend.service import Runtime
    from labelassist.plugin.errors import LabelStudioAPIError
    from labelassist.plugin.ls_client import LabelStudioClient

    settings = build_settings(ls_url=ls_url, ls_token=token, **options)
    if not settings.redis_url:
        raise click.UsageError(f"bootstrap needs the queue's Redis URL: --redis-url or {ENV_PREFIX}REDIS_URL")
    try:
        connection = Redis.from_url(settings.redis_url, socket_timeout=30)
        queue = QueueClient(connection, JobOptions.from_settings(settings))
        client = LabelStudioClient(ls_url, token)
        run = Bootstrap(Runtime.build(settings, queue), client, project_id, task_ids=parse_task_filter(task_filter),
                        replace=replace, max_retries=max_retries, batch_size=batch_size, limit=limit, window=window,
                        progress=not no_progress)
        summary = run.run()
    except (BootstrapError, LabelStudioAPIError) as exc:
        raise click.ClickException(str(exc)) from None
    except RedisError as exc:
        raise click.ClickException(f"cannot use the queue at {settings.redis_url}: {exc}") from None
    click.echo(json.dumps(summary.to_json()) if as_json else format_summary(summary))


@cli.command()
@setting_options("redis_url")
@click.argument("run_id")
def cancel(run_id: str, **options) -> None:
    """Cancel a bootstrap run: mark it cancelled (its process stops) and cancel its queued jobs."""
    from redis import Redis
    from redis.exceptions import RedisError

    from labelassist.backend.bootstrap import RunStore

    settings = build_settings(**options)
    if not settings.redis_url:
        raise click.UsageError(f"cancel needs the queue's Redis URL: --redis-url or {ENV_PREFIX}REDIS_URL")
    try:
        cancelled = RunStore(Redis.from_url(settings.redis_url, socket_timeout=5)).cancel(run_id)
    except RedisError as exc:
        raise click.ClickException(f"cannot read the queue at {settings.redis_url}: {exc}") from None
    if cancelled is None:
        raise click.ClickException(f"no bootstrap run {run_id!r} (see `labelassist status`)")
    click.echo(f"run {run_id} cancelled; {cancelled} queued jobs cancelled")


@cli.group()
def corrections() -> None:
    """The corrections log: what annotators did to the predictions."""


@corrections.command("export")
@setting_options("corrections_url", "data_dir")
@click.option("--format", "fmt", type=click.Choice(["coco", "jsonl"]), default="jsonl", show_default=True,
              envvar=ENV_PREFIX + "EXPORT_FORMAT", help=f"coco: final regions as COCO instances; jsonl: one annotation per line, deleted proposals included [env {ENV_PREFIX}EXPORT_FORMAT].")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), envvar=ENV_PREFIX + "EXPORT_OUT", help=f"File to write [env {ENV_PREFIX}EXPORT_OUT].")
@click.option("--project", type=int, default=None, envvar=ENV_PREFIX + "PROJECT", help=f"Only this Label Studio project [env {ENV_PREFIX}PROJECT].")
@click.option("--model-version", default=None, envvar=ENV_PREFIX + "EXPORT_MODEL_VERSION", help=f"Only annotations of predictions of this model version [env {ENV_PREFIX}EXPORT_MODEL_VERSION].")
@click.option("--with-embeddings", is_flag=True, envvar=ENV_PREFIX + "EXPORT_EMBEDDINGS", help=f"jsonl: include each proposal's CLIP embedding [env {ENV_PREFIX}EXPORT_EMBEDDINGS].")
def corrections_export(fmt: str, out_path: str, project: int | None, model_version: str | None, with_embeddings: bool, **options) -> None:
    """Export the fine-tuning set: images, final polygons/masks, labels, and the proposal each came from."""
    from labelassist.backend.store import StoreError, export_corrections, open_settings_store

    settings = build_settings(**options)
    try:
        with open_settings_store(settings) as store:
            n = export_corrections(store, fmt, out_path, project=project, model_version=model_version, with_embeddings=with_embeddings)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("exported %d annotations to %s (%s)", n, out_path, fmt)


@cli.command()
@setting_options("corrections_url", "data_dir")
@click.option("--project", type=int, default=None, envvar=ENV_PREFIX + "PROJECT", help=f"Label Studio project (default: all) [env {ENV_PREFIX}PROJECT].")
@click.option("--json", "as_json", is_flag=True, envvar=ENV_PREFIX + "REPORT_JSON", help=f"Print the numbers as JSON instead of a table [env {ENV_PREFIX}REPORT_JSON].")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), envvar=ENV_PREFIX + "REPORT_PLOT",
              help=f"Also draw the change kinds per model version to this PNG (needs matplotlib) [env {ENV_PREFIX}REPORT_PLOT].")
def report(project: int | None, as_json: bool, plot_path: str | None, **options) -> None:
    """How predictions fared: acceptance, edits per task, relabel confusion, per model version."""
    import json as json_module

    from labelassist.backend.store import StoreError, format_stats_table, open_settings_store, plot_stats

    settings = build_settings(**options)
    try:
        with open_settings_store(settings) as store:
            stats = store.stats(project)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json_module.dumps(stats.to_json(), indent=2) if as_json else format_stats_table(stats))
    if plot_path:
        if plot_stats(stats, plot_path):
            log.info("plot written to %s", plot_path)
        else:
            log.warning("matplotlib is not installed: no plot written (pip install matplotlib)")


@cli.command()
@setting_options("redis_url", "corrections_url", "data_dir", "ls_url", "ls_token", "basic_auth_pass")
@click.option("--project", "project_id", required=True, type=int, envvar=ENV_PREFIX + "PROJECT", help=f"Label Studio project id [env {ENV_PREFIX}PROJECT].")
@click.option("--list", "list_heads", is_flag=True, help="List the project's concept heads instead of training.")
@click.option("--restore", is_flag=True, help="Go back to the head (or zero-shot) that was active before the current one.")
@click.option("--activate", "activate_id", default=None, metavar="HEAD",
              help="Make this head the project's active one ('zero-shot': none).")
@click.option("--no-activate", is_flag=True, help="Train and keep the head, but leave the active one as it is.")
@click.option("--l2", type=float, default=None, help="Pull of the head towards zero-shot (default 1e-3; larger: closer).")
@click.option("--target-precision", type=float, default=None,
              help="Share of right labels the calibrated per-label thresholds aim at (default 0.8).")
@click.option("--wait", "wait_s", default=3600.0, show_default=True, type=float, envvar=ENV_PREFIX + "TRAIN_WAIT_S",
              help=f"Seconds to wait for the training job; 0: submit and return [env {ENV_PREFIX}TRAIN_WAIT_S].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(project_id: int, list_heads: bool, restore: bool, activate_id: str | None, no_activate: bool, l2: float | None,
          target_precision: float | None, wait_s: float, as_json: bool, **options) -> None:
    """Train a project's concept head on its correction log, on the train queue; or list, restore, activate heads.

    A new head becomes the project's model version (<base>+<head>): the workers
    use it from their next job, and Label Studio is told the new version when
    --ls-url and --token are given.
    """
    import json as json_module

    from redis.exceptions import RedisError

    from labelassist.backend.training import TrainingError, announce_version, head_listing, start_training, wait_training
    from labelassist.workers.heads import ZERO_SHOT, HeadError, HeadStore, versioned

    settings = build_settings(**options)
    if not settings.redis_url:
        raise click.UsageError(f"training runs on the queue's workers: --redis-url or {ENV_PREFIX}REDIS_URL")
    if sum([list_heads, restore, activate_id is not None]) > 1:
        raise click.UsageError("--list, --restore and --activate: give one at most")
    runtime = _runtime(settings)
    heads = HeadStore(runtime.queue.connection)

    def announce(head_id: str | None) -> str:
        base = runtime.versions.published() or ""
        version = versioned(base, head_id)
        client = runtime.client(None)
        if client is not None and base:
            announce_version(client, project_id, version, settings.basic_auth_pass)
        return version

    try:
        if list_heads:
            rows = head_listing(runtime.queue.connection, project_id)
            click.echo(json_module.dumps(rows, indent=2) if as_json else _format_heads(rows))
            return
        if restore or activate_id is not None:
            if restore:
                head_id = heads.restore(project_id)
            else:
                head_id = None if activate_id in ("zero-shot", ZERO_SHOT) else activate_id
                heads.activate(project_id, head_id)
            click.echo(f"project {project_id}: {head_id or 'zero-shot'} is active; model version {announce(head_id)}")
            return
        training_options = {k: v for k, v in (("l2", l2), ("target_precision", target_precision)) if v is not None}
        from labelassist.backend.store import open_settings_store

        with open_settings_store(settings) as store:
            submitted = start_training(runtime, store, project_id, options=training_options, activate=not no_activate)
        log.info("project %s: training job %s queued on %d examples %s", project_id, submitted.job_id,
                 submitted.examples["examples"], submitted.examples["per_label"])
        if wait_s <= 0:
            click.echo(submitted.job_id)
            return
        result = wait_training(runtime.queue, submitted.job_id, wait_s)
        if result.get("activated"):
            announce(result["head"])
    except (TrainingError, HeadError) as exc:
        raise click.ClickException(str(exc)) from None
    except RedisError as exc:
        raise click.ClickException(f"cannot reach the queue at {settings.redis_url}: {exc}") from None
    if as_json:
        click.echo(json_module.dumps(result, indent=2))
        return
    report = result["report"]
    zero_shot, trained = report["label_accuracy_zero_shot"], report["label_accuracy_out_of_fold"]
    click.echo(f"project {project_id}: head {result['head']} on {report['examples']} regions "
               f"({report['background_examples']} deleted); label accuracy zero-shot {zero_shot:.2f}, "
               f"head {'n/a' if trained is None else f'{trained:.2f}'} ({report['folds']}-fold)")
    for name, entry in report["labels"].items():
        threshold = entry.get("threshold")
        click.echo(f"  {name:<24} {entry['examples']:>6} examples  threshold {'default' if threshold is None else f'{threshold:.2f}'}")
    click.echo(f"model version {result['model_version']}" + (" (active)" if result.get("activated") else " (not activated)"))


def _runtime(settings):
    from redis import Redis

    from labelassist.backend.queue import JobOptions, QueueClient
    from labelassist.backend.service import Runtime

    connection = Redis.from_url(settings.redis_url, socket_timeout=10)
    return Runtime.build(settings, QueueClient(connection, JobOptions.from_settings(settings)))


def _format_heads(rows: list[dict]) -> str:
    import datetime as dt

    if not rows:
        return "no concept heads yet (zero-shot); train one with `labelassist train --project ID`"
    lines = [f"  {'head':<14} {'created (UTC)':<20} {'examples':>8} {'zero-shot':>9} {'head':>6}  active"]
    for r in rows:
        rep = r.get("report") or {}
        created = dt.datetime.fromtimestamp(r["created_at"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        oof = rep.get("label_accuracy_out_of_fold")
        lines.append(f"  {r['id']:<14} {created:<20} {rep.get('examples', 0):>8} {rep.get('label_accuracy_zero_shot', 0):>9.2f} "
                     f"{'n/a' if oof is None else f'{oof:.2f}':>6}  {'*' if r['active'] else ''}")
    return "\n".join(lines)


def main() -> None:
    cli(prog_name="labelassist")


if __name__ == "__main__":
    main()
