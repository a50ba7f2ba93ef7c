"""Checks of what a Label Studio request carries (pure, no Flask): /setup's extra_params, /predict's tasks
and their texts. A failed check raises :class:`BadRequest` (the HTTP layer answers 400 with its message).
"""
from __future__ import annotations

from typing import Any

from freeal_backend.config import unit_share, whole_number
from freeal_backend.labelstudio.label_config import TaskConfig

MAX_ROUNDS = 5  # /setup's extra_params.rounds: 1..MAX_ROUNDS (each round is a pass of LLM calls over the project)
MAX_TASK_DESCRIPTION = 2000  # characters of /setup's extra_params.task_description (it goes into every LLM call)


class BadRequest(ValueError):
    """The request is malformed; the message says how."""


def task_texts(cfg: TaskConfig, tasks: list[dict[str, Any]]) -> dict[int, str]:
    """The text of each task that has one (tasks without it are left out: :func:`no_text_note`)."""
    texts = {}
    for task in tasks:
        value = (task.get("data") or {}).get(cfg.data_key)
        if isinstance(value, str) and value.strip():
            texts[int(task["id"])] = value
    return texts


def no_text_note(cfg: TaskConfig) -> str:
    """What a task without text is told (the others of its batch get their labels: Label Studio stores
    nothing for any task of a batch that /predict refuses)."""
    return (f"FreeAL: no text in data[{cfg.data_key!r}] (named by <Text value=\"${cfg.data_key}\"> in the label "
            "config); nothing to label.")


def valid_extra(value: Any) -> dict[str, Any]:
    """/setup's extra_params, with ``rounds``, ``task_description``, ``target_error`` and ``max_llm_calls`` in
    bounds (else :class:`BadRequest`)."""
    extra = value if isinstance(value, dict) else {}
    rounds = extra.get("rounds")
    if rounds is not None:
        number = whole_number(rounds)
        if number is None or not 1 <= number <= MAX_ROUNDS:
            raise BadRequest(f"extra_params.rounds must be a whole number from 1 to {MAX_ROUNDS}, "
                             f"not {str(rounds)[:20]!r}")
    task = extra.get("task_description")
    if task is not None and not isinstance(task, str):
        raise BadRequest("extra_params.task_description must be a string")
    if isinstance(task, str) and len(task) > MAX_TASK_DESCRIPTION:
        raise BadRequest(f"extra_params.task_description has {len(task)} characters; at most "
                         f"{MAX_TASK_DESCRIPTION} are allowed")
    target = extra.get("target_error")
    if target is not None and unit_share(target) is None:
        raise BadRequest("extra_params.target_error must be a number strictly between 0 and 1 (e.g. 0.05: review "
                         f"until about 5 % of the labels are wrong), not {str(target)[:20]!r}")
    cap = extra.get("max_llm_calls")
    if cap is not None and (whole_number(cap) or 0) < 1:
        raise BadRequest("extra_params.max_llm_calls must be a whole number of LLM requests per job, at least 1, "
                         f"not {str(cap)[:20]!r}")
    return extra


def valid_tasks(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadRequest("'tasks' must be a list of tasks")
    for task in value:
        if not isinstance(task, dict) or isinstance(task.get("id"), bool) or not isinstance(task.get("id"), int):
            raise BadRequest("every task needs an integer 'id'")
        if not isinstance(task.get("data"), dict):
            raise BadRequest(f"task {task['id']} has no 'data' object")
    ids = [t["id"] for t in value]
    if len(set(ids)) != len(ids):
        raise BadRequest("task ids must be unique within one request")
    return value
