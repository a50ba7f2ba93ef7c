"""The FreeAL side of a project's job: its options, its loaded run (set aside when its labels change), its items
and the notes of its message."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from freeal_backend.config import Settings, unit_share, whole_number
from freeal_backend.labelstudio.client import TaskRecord
from freeal_backend.llm.provider import LLMProvider
from freeal_backend.loop import FreeALRun
from freeal_backend.loop_spans import run_type
from freeal_backend.records import Item, ItemResult
from freeal_backend.slm.encoder import Encoder
from freeal_backend.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectOptions:
    """Per-project options from Label Studio's "extra params" of the model (all optional)."""

    from_name: str | None = None
    rounds: int | None = None
    task_description: str | None = None
    judge_version: str | None = None  # judge this model version's predictions instead of asking the LLM
    audit: int | None = None  # random audit tasks (FREEAL_AUDIT for this project; 0 = none)
    target_error: float | None = None  # the review budget's target (FREEAL_TARGET_ERROR for this project)
    max_llm_calls: int | None = None  # LLM requests per job (FREEAL_MAX_LLM_CALLS for this project)

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "ProjectOptions":
        extra = extra if isinstance(extra, dict) else {}
        return cls(
            from_name=str(extra["from_name"]) if extra.get("from_name") else None,
            rounds=whole_number(extra.get("rounds")),
            task_description=str(extra["task_description"]) if extra.get("task_description") else None,
            judge_version=str(extra["judge_version"]) if extra.get("judge_version") else None,
            audit=whole_number(extra.get("audit")),
            target_error=unit_share(extra.get("target_error")),
            max_llm_calls=whole_number(extra.get("max_llm_calls")) or None,
        )

    def over(self, settings: Settings) -> "ProjectOptions":
        """These options with the backend's settings where the project sets none (audit, target error, LLM
        call cap)."""
        return replace(self, audit=settings.audit_size if self.audit is None else self.audit,
                       target_error=settings.target_error if self.target_error is None else self.target_error,
                       max_llm_calls=self.max_llm_calls or settings.max_llm_calls)


class RunRegistry:
    """One :class:`FreeALRun` per project and label set per process (models are loaded once, not per request).

    All runs share the registry's LLM client (one embedded LLM server per process) and its encoder, loaded when
    a run first needs it (a job's stage), never while a request holds the registry's lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._runs: dict[tuple[int, str, tuple[str, ...]], FreeALRun] = {}
        self.llm = LLMProvider(settings)
        self._encoder: Encoder | None = None
        self._encoder_lock = threading.Lock()

    def run_dir(self, project_id: int) -> Path:
        """Where the project's FreeAL state lives."""
        return self.settings.data_dir / f"project-{project_id}"

    def encoder(self) -> Encoder:
        """The encoder every run shares, loaded on first use."""
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = Encoder(self.settings.encoder)
            return self._encoder

    def get(self, project_id: int, labels: tuple[str, ...], task_description: str | None = None, *,
            task_type: str = "classification") -> FreeALRun:
        """The project's run; ``labels`` in another order than its stored run's (a config whose choices were
        only reordered) get that run, in its order."""
        with self._lock:
            self._forget_moved(project_id)
            key = (project_id, task_type, labels)
            run = self._runs.get(key)
            if run is None:
                labels = self._stored_order(project_id, labels)
                key = (project_id, task_type, labels)
                run = self._runs.get(key)
            if run is None:
                run = run_type(task_type)(self.settings, list(labels), self.run_dir(project_id), task_description,
                                          llm=self.llm, encoder=self.encoder)
                self._runs[key] = run
            if task_description:
                run.task_description = task_description
            return run

    def relabelled(self, project_id: int, task_type: str, labels: Sequence[str]) -> list[str] | None:
        """The labels of the project's stored run where they are another set than ``labels`` (or another task
        type): the project's label config changed since its run. None where they are the same, or no run. A run
        of these labels loaded already answers without opening the state (every /predict asks)."""
        with self._lock:
            self._forget_moved(project_id)
        if any(pid == project_id and kind == task_type and same_label_set(held, labels)
               for pid, kind, held in list(self._runs)):
            return None
        with self.stored_state(project_id) as store:
            if store is None:
                return None
            stored, kind = store.get_meta("labels"), store.get_meta("task_type") or "classification"
        if stored is None or (kind == task_type and same_label_set(stored, labels)):
            return None
        return list(stored)

    def start_over(self, project_id: int, task_type: str, labels: Sequence[str]) -> str | None:
        """Set the project's run aside where its label set is not ``labels`` (the label config changed): its
        directory is renamed and keeps its state (the LLM answers, the verdicts; not the small models' weights and
        embeddings), and the project's next run starts afresh. Only a job of the project may
        call this (one runs at a time). Returns what happened, in words, or None where nothing changed."""
        with self._lock:
            old = self.relabelled(project_id, task_type, labels)
            if old is None:
                return None
            for key in [k for k in self._runs if k[0] == project_id]:
                self._runs.pop(key).close()
            src = self.run_dir(project_id)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            dst = next(d for n in range(1000) if not (d := src.with_name(
                f"{src.name}.set-aside-{stamp}{f'-{n}' if n else ''}")).exists())
            src.rename(dst)
        for path in [*dst.glob("slm_r*.pt"), *dst.glob("*.npy")]:  # computed again by any run; nothing reads them
            path.unlink()
        log.warning("project %s: the label set changed from %s to %s; the earlier run is kept in %s and every "
                    "task is labelled again", project_id, old, list(labels), dst)
        return (f"the label set changed from {old} to {list(labels)}: every task was labelled again (the earlier "
                f"run is kept in <data dir>/{dst.name})")

    def _forget_moved(self, project_id: int) -> None:
        """Let go of the project's runs whose state another process (a queue worker) set aside: their files
        moved, and the project's state is a new run's. They are not closed here, since a request may still be
        reading one; each closes when the last reference goes. The caller holds the lock."""
        for key in [k for k, run in self._runs.items() if k[0] == project_id and run.store.moved()]:
            log.info("project %s: its run %s was set aside by another process; reading the new one", project_id,
                     list(key[2]))
            del self._runs[key]

    @contextmanager
    def stored_state(self, project_id: int) -> Iterator[Store | None]:
        """The project's FreeAL state, opened for reading (None before its first job wrote any)."""
        path = self.run_dir(project_id) / "state.sqlite"
        if not path.exists():
            yield None
            return
        store = Store(path)
        try:
            yield store
        finally:
            store.close()

    def _stored_order(self, project_id: int, labels: tuple[str, ...]) -> tuple[str, ...]:
        with self.stored_state(project_id) as store:
            stored = store.get_meta("labels") if store is not None else None
        return tuple(stored) if stored is not None and same_label_set(stored, labels) else labels

    def keep_lower_states_of(self, project_id: int) -> None:
        """Free the cached lower states of every other project's runs: the disk holds one project's at a
        time (2.3 GiB per 100k texts), and consecutive jobs of one project still reuse them."""
        with self._lock:
            for (pid, _, _), run in self._runs.items():
                if pid != project_id:
                    run.release_lower_states()

    def close(self) -> None:
        """Close every run and stop the embedded LLM server this process started."""
        with self._lock:
            for run in self._runs.values():
                run.close()
            self._runs.clear()
            self.llm.close()


def same_label_set(a: Sequence[str], b: Sequence[str]) -> bool:
    """The same labels, in any order (the order of a config's choices does not change what they mean)."""
    return len(a) == len(b) and sorted(a) == sorted(b)


def with_people_labels(results: list[ItemResult], gold: Mapping[int, list[str]]) -> list[ItemResult]:
    """Results whose person's annotation names several labels (a multi-label config) show them all: the run
    keeps the first as the text's label."""
    return [replace(r, probs={**r.probs, **{lab: 1.0 for lab in gold[int(r.item_id)]}})
            if r.source == "human" and len(gold.get(int(r.item_id), ())) > 1 else r for r in results]


def build_items(records: list[TaskRecord], gold: dict[int, list[str]]) -> tuple[list[Item], list[int]]:
    """Items for FreeAL and ids of tasks without text. Human labels are ``gold`` (the read's annotations with
    what webhooks said since: ``JobStore.replace_gold``); an annotation without an id counts as read."""
    items, no_text = [], []
    for rec in records:
        if not rec.text or not rec.text.strip():
            no_text.append(rec.task_id)
            continue
        labels = gold.get(rec.task_id) or (list(rec.human_labels) if rec.annotation_id is None else [])
        items.append(Item(str(rec.task_id), rec.text, human_label=labels[0] if labels else None))
    return items, no_text


def _judged(records: list[TaskRecord]) -> dict[str, tuple[str, ...] | None]:
    """Per task id, the labels of its judged prediction: None without one, () when it names no label."""
    return {str(rec.task_id): rec.judged_labels for rec in records}


def judged_labels(records: list[TaskRecord], items: list[Item]) -> dict[str, str | None]:
    """Round-0 labels of a judge job: per item without a human label, its judged prediction's first label, or
    None (no prediction of the judged version, or one naming no label of the config: unanswered)."""
    judged = _judged(records)
    return {it.item_id: (judged.get(it.item_id) or (None,))[0] for it in items if not it.human_label}


def judge_summary(version: str, records: list[TaskRecord], llm_labels: Mapping[str, str | None]) -> str:
    """The job message's opening for a judge job: what was judged and how many tasks had nothing to judge."""
    judged = _judged(records)
    missing = sum(judged.get(k) is None for k in llm_labels)
    unusable = sum(judged.get(k) == () for k in llm_labels)
    bad = f", {unusable} whose prediction names no label of the config" if unusable else ""
    return (f"judged the predictions of model version {version!r} with no LLM call: {len(llm_labels)} tasks, "
            f"{missing} without one{bad} (counted as unanswered); ")


def burst_note(burst: dict[str, int] | None) -> str | None:
    """The job message's account of a burst of human labels (``FreeALRun.burst``): LLM calls and their bound."""
    if not burst:
        return None
    n = burst["human_labels"]
    return (f"{n} new human label{'s' if n != 1 else ''}: {burst['asked']} texts they bear on asked again "
            f"(at most {burst['bound']}), the other LLM answers kept")
