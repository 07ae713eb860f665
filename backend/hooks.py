"""What the service does on Label Studio events beyond logging corrections.

``event_hooks(runtime)`` is the ``hooks`` table of the ``CorrectionProcessor``
the service runs: action -> callable(payload), called on the event thread once
the event is stored and handled. A hook must be quick (it enqueues work, it does
not do it) and raise only for a reason worth keeping on the stored event.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

Hook = Callable[[Mapping[str, Any]], None]


def event_hooks(runtime, store) -> dict[str, Hook]:
    """The hooks for a service with this ``Runtime`` and correction store."""
    from labelassist.backend.events import START_TRAINING
    from labelassist.backend.training import TrainingHook

    hooks: dict[str, Hook] = {START_TRAINING: TrainingHook(runtime, store)}
    if runtime.settings.preannotate_new_tasks:  # labelassist.backend.preannotate
        from labelassist.backend.events import TASKS_CREATED
        from labelassist.backend.preannotate import PreannotateNewTasks

        hooks[TASKS_CREATED] = PreannotateNewTasks(runtime)
    return hooks
