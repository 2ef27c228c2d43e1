"""The run of a command that writes a LoRA from results kept in its work directory
(``extract``, ``resize``) once it knows what to reuse: compute the rest, then write every result
(``write.py``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..run.cluster import TaskCall
from ..run.session import Recompute, Session
from .write import Exported, export_loras


def _no_check(markers: dict[str, dict]) -> None:
    pass


def compute_and_export(
    plan,
    session: Session,
    calls: Mapping[str, TaskCall],
    pending: Sequence,
    markers: dict[str, dict],
    changes: list[str],
    *,
    checked: bool = True,
    computed: Callable[[dict[str, dict]], None] = _no_check,
) -> Exported:
    """Start the run's progress (``changes``: why not more was reused), compute the
    ``pending`` tasks of ``plan`` into ``markers`` (which hold the reused ones), hand the
    finished ``markers`` to ``computed`` (a check before anything is written), then write the
    outputs (``export_loras``, ``checked``: every tensor finite). ``calls`` holds every task's
    call by tensor key: an intermediate that does not read back runs again through it."""
    session.start_tasks(plan.tasks, pending, changes)
    results = session.compute([calls[task.key] for task in pending])
    markers.update({task.key: results[task.name] for task in pending})
    computed(markers)
    session.emit("write", {"tensors": len(plan.tasks)})
    return export_loras(plan, markers, session, Recompute(session, calls), checked=checked)
