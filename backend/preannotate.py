"""Pre-annotation of newly imported tasks, on Label Studio's ``TASKS_CREATED`` webhook.

Off unless ``LABELASSIST_PREANNOTATE_NEW_TASKS`` (``serve --preannotate-new-tasks``)
is on. Label Studio 1.23 sends ``TASKS_CREATED`` after an import, a storage sync
or a task created through the API, with a payload of
``{"action", "tasks": [serialized tasks: id, data, project, ...], "project":
{serialized project: id, label_config, ...}}`` (up to ``WEBHOOK_BATCH_SIZE``,
5000, tasks per event; a larger import sends several events).

The hook runs on the event thread, so it only enqueues: each task becomes the
``PredictRequest`` ``/predict`` and ``labelassist bootstrap`` build for it
(``LabelassistModel.task_requests``), submitted on the ``bulk`` queue under its
deterministic job id and registered with the durable follow-up
(``labelassist.backend.followup``), which writes each finished result to Label
Studio exactly once: a task opened meanwhile (``/predict``) builds the same
request, so it shares the job and its follow-up record, and the follow-up checks
Label Studio for a prediction of the version before it writes one.

Tasks whose image cannot be resolved are logged with the reason and counted in
the hook's log line; they get no prediction, so opening the task, or a bootstrap
run, tries them again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from labelassist.backend.events import TransientError
from labelassist.backend.followup import PendingPush
from labelassist.backend.service import LabelassistModel, Runtime, parse_project_id
from labelassist.plugin.errors import LabelStudioAPIError
from labelassist.workers.contract import QUEUE_BULK, PredictRequest
from labelassist.workers.errors import LabelassistError

log = logging.getLogger(__name__)


class PreannotateError(LabelassistError):
    """A ``TASKS_CREATED`` event that cannot be pre-annotated; the reason is kept on the stored event."""

    code = "preannotate_failed"


@dataclass(frozen=True)
class NewTasks:
    """What ``TASKS_CREATED`` says: the project, its labeling config, and the created tasks (each with ``id`` and ``data``)."""

    project_id: int
    label_config: str
    tasks: list[dict[str, Any]]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> NewTasks:
        """Parse a ``TASKS_CREATED`` payload; PreannotateError says what is missing."""
        tasks = payload.get("tasks")
        if not isinstance(tasks, list):
            raise PreannotateError(f"TASKS_CREATED: expected 'tasks' as a list of task objects, got {type(tasks).__name__}; "
                                   "the webhook must send payloads (`labelassist connect` registers it that way)")
        bad = [t for t in tasks if not (isinstance(t, dict) and _is_id(t.get("id")) and isinstance(t.get("data"), dict))]
        if bad:
            raise PreannotateError(f"TASKS_CREATED: expected every task with an integer 'id' and a 'data' object, "
                                   f"got {len(bad)} without, e.g. {str(bad[0])[:200]}")
        project = payload.get("project")
        if not isinstance(project, Mapping):
            raise PreannotateError(f"TASKS_CREATED: expected 'project' as the project object, got {type(project).__name__}")
        try:
            project_id = parse_project_id(project.get("id"))
        except ValueError as exc:
            raise PreannotateError(f"TASKS_CREATED: {exc}") from None
        label_config = project.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            raise PreannotateError(f"TASKS_CREATED: project {project_id} came without its 'label_config'")
        return cls(project_id, label_config, [dict(t) for t in tasks])


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (isinstance(value, str) and value.isdigit())


class PreannotateNewTasks:
    """The ``TASKS_CREATED`` hook: submit the new tasks on the bulk queue; the follow-up writes their predictions.

    Returns the number of tasks submitted. Raises PreannotateError for an event
    it cannot act on (no tasks in the payload, a config without an image to
    segment, no Label Studio credentials to write with), so the stored event
    keeps the reason.
    """

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, payload: Mapping[str, Any]) -> int:
        from labelassist.backend.bootstrap import project_link

        event = NewTasks.from_payload(payload)
        runtime = self.runtime
        if not event.tasks:
            return 0
        try:
            model = LabelassistModel(event.project_id, event.label_config, runtime)
        except (LabelassistError, ValueError) as exc:
            raise PreannotateError(f"project {event.project_id}: its label config cannot be pre-annotated: {exc}") from None
        link = runtime.projects.get(event.project_id)
        client = runtime.client(link)
        if client is None:
            raise PreannotateError(f"project {event.project_id}: no Label Studio URL and token to write predictions with; "
                                   "set LABELASSIST_LS_URL and LABELASSIST_LS_TOKEN or let Label Studio call /setup")
        try:
            link = project_link(runtime, client, event.project_id)  # /setup's record, else the backend's extra_params
        except LabelStudioAPIError as exc:
            if exc.status is None or exc.status >= 500:
                raise TransientError(f"project {event.project_id}: {exc}") from exc  # tried again later
            raise PreannotateError(f"project {event.project_id}: {exc}") from None
        version = model.model_version
        try:
            requests = model.task_requests(event.tasks, version, link)
        except LabelassistError as exc:  # job settings that break the contract: no task can run
            raise PreannotateError(str(exc)) from None
        submitted = 0
        for task, request in zip(event.tasks, requests):
            task_id = int(task["id"])
            if not isinstance(request, PredictRequest):
                log.warning("project %s task %s: not pre-annotated: %s", event.project_id, task_id, request)
                continue
            job_id = runtime.queue.submit(request, queue=QUEUE_BULK)
            runtime.pushes.add(PendingPush(job_id=job_id, task_id=task_id, project_id=event.project_id, model_version=version,
                                           label_config=event.label_config, request=request.to_json(), queue=QUEUE_BULK,
                                           task_data=task["data"]))
            submitted += 1
        skipped = len(event.tasks) - submitted
        log.info("project %s: %d new tasks submitted for pre-annotation (model version %s)%s", event.project_id, submitted, version,
                 f"; {skipped} not: their images cannot be resolved (logged above)" if skipped else "")
        return submitted
