"""The backend's process-wide state and what it does for the HTTP layer (no Flask): its settings from the
environment (:class:`ServerSettings`), the projects it serves, path-free messages, a project's status, and
/predict's answers (cached results, people's labels, LLM labels within a time budget).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from werkzeug.exceptions import Forbidden

from freeal_backend import status as run_status
from freeal_backend.config import Settings
from freeal_backend.labelstudio.client import INITIAL_VERSION, MissingCredentialsError, project_id_from_uid
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.jobqueue import runner_for
from freeal_backend.labelstudio.label_config import ClassificationConfig, TaskConfig, parse_task_config
from freeal_backend.labelstudio.label_results import render_task_prediction, review_results
from freeal_backend.labelstudio.manager import JobManager
from freeal_backend.labelstudio.request_checks import BadRequest, no_text_note, task_texts
from freeal_backend.labelstudio.runs import ProjectOptions, RunRegistry, same_label_set
from freeal_backend.llm.client import LLMUnavailable
from freeal_backend.loop import FreeALRun
from freeal_backend.loop_spans import span_dicts
from freeal_backend.records import Item, ItemResult
from freeal_backend.spans import decode_spans

log = logging.getLogger(__name__)

# an absolute path of two or more parts that is not inside a URL (``http://host/a/b`` keeps its ``/a/b``)
_ABS_PATH = re.compile(r"(?<![\w:/.~-])~?(?:/[^\s/'\"`:,;()\[\]{}<>|]+){2,}/?")


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side knobs, read from the environment."""

    basic_auth_user: str | None = None  # BASIC_AUTH_USER (with BASIC_AUTH_PASS: require HTTP basic auth)
    basic_auth_pass: str | None = None  # BASIC_AUTH_PASS
    predict_budget_s: float = 60.0  # FREEAL_PREDICT_BUDGET_S: LLM time per /predict (Label Studio waits 100 s)
    open_task_budget_s: float = 10.0  # FREEAL_OPEN_TASK_BUDGET_S: the same for a /predict of one task (a person
    # opening a task waits for it: Label Studio asks before it shows a task without predictions)
    max_request_mb: float = 64.0  # FREEAL_MAX_REQUEST_MB: larger request bodies get 413
    auto_job: bool = True  # FREEAL_AUTO_JOB: /predict and annotation webhooks start the background job
    projects: frozenset[int] | None = None  # FREEAL_PROJECTS: the only project ids served (None: all)

    def __post_init__(self) -> None:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            have, lack = (("BASIC_AUTH_USER", "BASIC_AUTH_PASS") if self.basic_auth_user
                          else ("BASIC_AUTH_PASS", "BASIC_AUTH_USER"))
            raise ValueError(f"{have} is set but {lack} is not: set both to require HTTP basic auth, or neither. "
                             "Refusing to start without the auth that was asked for.")

    @property
    def auth(self) -> bool:
        """Whether every route but /health requires HTTP basic auth."""
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @classmethod
    def from_env(cls) -> "ServerSettings":
        env = os.environ
        return cls(
            basic_auth_user=env.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=env.get("BASIC_AUTH_PASS") or None,
            predict_budget_s=float(env.get("FREEAL_PREDICT_BUDGET_S") or 60.0),
            open_task_budget_s=float(env.get("FREEAL_OPEN_TASK_BUDGET_S") or 10.0),
            max_request_mb=float(env.get("FREEAL_MAX_REQUEST_MB") or 64.0),
            auto_job=(env.get("FREEAL_AUTO_JOB") or "true").lower() not in {"0", "false", "no", "off"},
            projects=parse_projects(env.get("FREEAL_PROJECTS") or ""),
        )


def parse_projects(raw: str) -> frozenset[int] | None:
    """``FREEAL_PROJECTS``: comma-separated project ids; empty means every project."""
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        return None
    bad = [p for p in parts if not p.isdigit() or int(p) <= 0]
    if bad:
        raise ValueError(f"FREEAL_PROJECTS={raw!r}: {bad[0]!r} is not a Label Studio project id "
                         "(expected comma-separated positive integers, e.g. 3,7)")
    return frozenset(int(p) for p in parts)


class Backend:
    """Process-wide state: settings, the job store, loaded FreeAL runs and the job manager."""

    def __init__(self, settings: Settings, server: ServerSettings) -> None:
        self.settings = settings
        self.server = server
        self.store = JobStore(settings.data_dir / "backend.sqlite")
        self.runs = RunRegistry(settings)
        roots = sorted({str(settings.data_dir), str(settings.data_dir.resolve())}, key=len, reverse=True)
        # the data dir as configured (when relative: only where a path goes on) and resolved
        self._data_dir_re = re.compile("|".join(
            rf"(?<![\w/.-])(?:\./)?{re.escape(r)}" + (r"(?![\w.-])" if r.startswith("/") else "(?=/)")
            for r in roots))
        self.jobs = JobManager(settings, self.store, self.runs, runner_for(settings), projects=server.projects)
        self.jobs.start()  # resumes the jobs of a backend process that died

    def project_id(self, value: Any) -> int:
        """The project id a request names (400 when it names none, 403 when FREEAL_PROJECTS leaves it out)."""
        try:
            pid = project_id_from_uid(value)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        self.check_allowed(pid)
        return pid

    def allowed(self, project_id: int) -> bool:
        return self.server.projects is None or project_id in self.server.projects

    def check_allowed(self, project_id: int) -> None:
        if not self.allowed(project_id):
            raise Forbidden(f"project {project_id} is not served by this backend (FREEAL_PROJECTS)")

    def public(self, text: str | None) -> str | None:
        """``text`` without server filesystem paths (error messages go to people and to Label Studio)."""
        if not text:
            return text
        return _ABS_PATH.sub("<path>", self._data_dir_re.sub("<data dir>", text))

    def job_row(self, project_id: int) -> dict[str, Any] | None:
        """The project's job row as answers show it (its message without server paths)."""
        return self._public_row(self.store.status(project_id))

    def job_rows(self) -> dict[int, dict[str, Any] | None]:
        """The job rows of every project this backend serves, as answers show them."""
        return {pid: self._public_row(row) for pid, row in self.store.statuses().items() if self.allowed(pid)}

    def _public_row(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if row is None else {**row, "message": self.public(row.get("message"))}

    def config_for(self, project_id: int, label_config: Any) -> tuple[TaskConfig, ProjectOptions]:
        saved = self.store.project(project_id) or {}
        opts = ProjectOptions.from_extra(saved.get("extra_params"))
        xml = label_config if isinstance(label_config, str) and label_config.strip() else saved.get("label_config")
        if not xml:
            raise BadRequest("label_config is missing and /setup has not been called for this project")
        return parse_task_config(xml, from_name=opts.from_name), opts

    def check_label_set(self, project_id: int, cfg: TaskConfig, opts: ProjectOptions) -> None:
        """Refuse a /predict whose labels differ from the project's: those of the label config /setup stored
        (Label Studio calls /setup with the project's config before it predicts), else those of its FreeAL run.
        /predict would otherwise create the run with its own labels, and the job, which reads the config from
        Label Studio, could never use that run. A run whose labels are not /setup's (the project's labels
        changed) is set aside by the project's next job (``RunRegistry.start_over``)."""
        mine = (cfg.task_type, list(cfg.labels))
        saved = (self.store.project(project_id) or {}).get("label_config")
        if saved:
            setup_cfg = parse_task_config(saved, from_name=opts.from_name)
            theirs, whose = (setup_cfg.task_type, list(setup_cfg.labels)), "the label config /setup stored"
        else:
            with self.runs.stored_state(project_id) as store:
                stored = store.get_meta("labels") if store is not None else None
                kind = (store.get_meta("task_type") if store is not None else None) or cfg.task_type
            if stored is None:
                return
            theirs, whose = (kind, list(stored)), "its FreeAL run"
        if theirs[0] != mine[0] or not same_label_set(theirs[1], mine[1]):
            raise BadRequest(f"project {project_id}: this label_config has the {mine[0]} labels {mine[1]}, but "
                             f"{whose} has the {theirs[0]} labels {theirs[1]}; /predict cannot change a project's "
                             "label set (Label Studio calls /setup with a changed config first)")

    def project_status(self, project_id: int, row: dict[str, Any] | None) -> dict[str, Any]:
        """The numbers ``/status/<id>`` and ``/projects/<id>`` show, for the job row ``row``."""
        try:
            ls_url: str | None = self.jobs.connection(project_id).url
        except MissingCredentialsError:
            ls_url = None
        opts = ProjectOptions.from_extra((self.store.project(project_id) or {}).get("extra_params")).over(self.settings)
        with self.runs.stored_state(project_id) as store:
            data = run_status.project_status(project_id, row, store, ls_url, target_error=opts.target_error,
                                             target_confidence=self.settings.target_confidence)
            data["health"] = run_status.latest_health(store) if store is not None else None
            return data

    def flagged_items(self, project_id: int, limit: int) -> list[dict[str, Any]]:
        """The project's ``limit`` least-confident flagged tasks with label, suggestion and reasons ([] before
        its first job)."""
        with self.runs.stored_state(project_id) as store:
            return run_status.flagged_items(store, limit) if store is not None else []

    def version(self, project_id: int) -> str:
        return self.store.model_version(project_id) or INITIAL_VERSION

    def no_job_because(self, project_id: int) -> str | None:
        """Why no background job can run for the project (None: one can)."""
        if not self.server.auto_job:
            return "FREEAL_AUTO_JOB is off"
        try:
            self.jobs.connection(project_id)
        except MissingCredentialsError as exc:
            return str(exc)
        return None

    def maybe_start_job(self, project_id: int, reason: str) -> None:
        why = self.no_job_because(project_id)
        if why is not None:
            if self.server.auto_job:
                log.warning("project %s: background job not started: %s", project_id, why)
            return
        self.jobs.trigger(project_id, reason)

    def predict(self, project_id: int, cfg: TaskConfig, opts: ProjectOptions,
                tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Exactly one prediction per task, in task order, and how many tasks FreeAL had not seen."""
        texts = task_texts(cfg, tasks)
        version = self.version(project_id)
        if self.runs.relabelled(project_id, cfg.task_type, cfg.labels) is not None:  # the job starts over
            return [placeholder(cfg, RELABEL_NOTE if int(t["id"]) in texts else no_text_note(cfg), version)
                    for t in tasks], len(tasks)
        gold = self.store.gold(project_id)
        try:
            run = self.runs.get(project_id, cfg.labels, opts.task_description, task_type=cfg.task_type)
        except ValueError as exc:  # e.g. the project's label set changed since its FreeAL run
            raise BadRequest(self.public(str(exc))) from exc
        cached = run.results([str(t["id"]) for t in tasks])  # only these tasks: cost independent of project size
        changed = run.changed_texts({str(tid): text for tid, text in texts.items()})
        if changed:
            log.warning("project %s: %d tasks hold other texts than FreeAL labelled under their ids (edited, or a "
                        "new project under a reused id): labelled again", project_id, len(changed))
        out: dict[int, dict[str, Any]] = {}
        unseen: list[Item] = []
        for task in tasks:
            tid = int(task["id"])
            if tid not in texts:
                out[tid] = placeholder(cfg, no_text_note(cfg), version)
                continue
            stale = str(tid) in changed
            human = human_result(cfg, str(tid), gold[tid], texts[tid]) if tid in gold and not stale else None
            if human is not None:
                out[tid] = render_task_prediction(cfg, human, texts[tid], version)
            elif str(tid) in cached and cached[str(tid)].label is not None and not stale:
                out[tid] = render_task_prediction(cfg, cached[str(tid)], texts[tid], version)
            else:
                unseen.append(Item(str(tid), texts[tid][: self.settings.max_chars]))
        if unseen and not opts.judge_version:  # a judge project makes no LLM call: its job judges them
            budget = self.server.predict_budget_s
            if len(tasks) == 1:  # most likely a person opening the task, waiting with the labelling page
                budget = min(budget, self.server.open_task_budget_s)
            for res in self.quick_label(run, unseen, budget):
                out[int(res.item_id)] = render_task_prediction(cfg, res, texts[int(res.item_id)], version)
        no_job = self.no_job_because(project_id) if len(out) < len(tasks) else None
        for item in unseen:
            if int(item.item_id) not in out:
                out[int(item.item_id)] = placeholder(cfg, waiting_note(opts, no_job), version)
        return [out[int(t["id"])] for t in tasks], len(unseen)

    def quick_label(self, run: FreeALRun, items: list[Item], budget_s: float) -> list[ItemResult]:
        """LLM labels for unseen tasks, in chunks, until ``budget_s`` seconds are spent or the LLM fails."""
        deadline = time.monotonic() + budget_s
        if not llm_up_by(run, deadline):
            log.info("the LLM is still starting: %d unseen tasks left to the background job", len(items))
            return []
        chunk = max(4, 2 * self.settings.llm_concurrency)
        done: list[ItemResult] = []
        for start in range(0, len(items), chunk):
            if time.monotonic() >= deadline:
                log.info("predict budget spent: %d of %d unseen tasks left to the background job",
                         len(items) - start, len(items))
                break
            try:
                labelled = run.quick_label(items[start : start + chunk], deadline=deadline)
            except LLMUnavailable as exc:  # the endpoint is down: answer now, the job retries later
                log.warning("LLM unavailable during /predict (%s): %d of %d unseen tasks left to the background job",
                            exc, len(items) - start, len(items))
                break
            done.extend(r for r in labelled if r.label is not None)
        return done


def llm_up_by(run: FreeALRun, deadline: float) -> bool:
    """Whether ``run``'s LLM is up by ``deadline`` (a ``time.monotonic()`` value). Its first start (the embedded
    server after a restart: seconds to a minute) runs in a thread of its own, waited for only until the deadline,
    so that it never makes Label Studio's /predict call run past its timeout; the next call finds it up."""
    if run.llm_started is not None:
        return True

    def start() -> None:
        try:
            run.llm  # noqa: B018 - the property starts it; concurrent starters wait for one server
        except Exception as exc:  # noqa: BLE001 - /predict answers anyway; the job retries and reports it
            log.warning("the LLM did not start during /predict: %s", exc)

    starter = threading.Thread(target=start, daemon=True, name="freeal-llm-start")
    starter.start()
    starter.join(max(0.0, deadline - time.monotonic()))
    return run.llm_started is not None


RELABEL_NOTE = ("FreeAL: the project's labels changed since FreeAL labelled it: the background job labels every task "
                "again with the new labels.")


def placeholder(cfg: TaskConfig, note: str, version: str) -> dict[str, Any]:
    """The prediction of a task /predict gives no label: empty but for the review cue (``note``), score 0."""
    return {"result": review_results(cfg, suspicious=True, note=note), "score": 0.0, "model_version": version}


def waiting_note(opts: ProjectOptions, no_job: str | None) -> str:
    """What a task /predict could not label in time is told: why no job will (``no_job``), or that one will."""
    if no_job:
        return (f"FreeAL: not labelled: no background job runs for this project ({no_job}). Once one can, Start "
                "Training in the model settings starts it.")
    if opts.judge_version:
        return f"FreeAL: queued; the background job will judge model version {opts.judge_version!r} on this task."
    return "FreeAL: queued; the background job will label this task."


def human_result(cfg: TaskConfig, task_id: str, labels: Sequence[str], text: str) -> ItemResult | None:
    """A person's labels (several for a multi-label config; spans: one encoded list) as a result to show back
    (None when they no longer fit the config's labels)."""
    if isinstance(cfg, ClassificationConfig):
        chosen = [lab for lab in labels if lab in cfg.labels]
        if not chosen:
            return None
        return ItemResult(task_id, chosen[0], 1.0, {lab: float(lab in chosen) for lab in cfg.labels}, source="human")
    if not labels:
        return None
    label = labels[0]
    try:
        spans = decode_spans(label)
    except (ValueError, TypeError):
        return None
    if any(s.label not in cfg.labels or s.end > len(text) for s in spans):
        return None
    return ItemResult(task_id, label, 1.0, source="human", spans=span_dicts(text, spans))
