"""Background FreeAL jobs, one per Label Studio project, single-flight even across gunicorn workers.

A job fetches the project's tasks, runs the FreeAL rounds (:mod:`.runs`) and pushes each round
(:mod:`.push`), keeping its row in the job store (:mod:`.job_store`) and the review tab's title
(:mod:`.review_tab`) current. Every write of a run goes through its :class:`Claim`: a run whose job was
taken over (or whose Redis lock was lost) stops at its next write, before it pushes anything.

Where a job runs is the runner's business. :class:`ThreadRunner` (the default) runs it in a thread of
this process: a job is claimed in one ``BEGIN IMMEDIATE`` transaction; a claim whose heartbeat is older
than ``stale_s`` may be taken over; a trigger while a job runs sets ``rerun`` so the running job goes once
more with the newest annotations instead of starting a second one. A job whose process died (restart,
OOM, deploy) is resumed by the next backend process that starts, or shown failed after repeated deaths.
With ``FREEAL_QUEUE`` set, :class:`freeal_backend.labelstudio.jobqueue.QueueRunner` enqueues it to Redis
for ``freeal worker`` processes instead, with the same single-flight and rerun rules.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import httpx
from label_studio_sdk.core.api_error import ApiError

from freeal_backend.config import Settings
from freeal_backend.labelstudio.client import (FREEAL_VERSION_PREFIX, IMPORT_BATCH, Connection, ProjectClient,
                                              connection_from_env)
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.label_config import TaskConfig, parse_task_config
from freeal_backend.labelstudio.label_results import LLM
from freeal_backend.labelstudio.push import (PushJournal, flagged_ids, predictions_digest, push_results,
                                             version_for)
from freeal_backend.labelstudio.review_tab import ReviewTab, health_note
from freeal_backend.labelstudio.runs import (ProjectOptions, RunRegistry, build_items, burst_note, judge_summary,
                                            judged_labels, with_people_labels)
from freeal_backend.loop import order_note, set_aside_notes, unfinished_work
from freeal_backend.records import ItemResult
from freeal_backend.status import RoundLLMStats, save_round_flagged

log = logging.getLogger(__name__)

HOST = socket.gethostname()
_running: set[str] = set()  # owners whose job runs in this process right now
_running_lock = threading.Lock()


def failure_message(exc: BaseException) -> str:
    """A failed job's message: the error and, where Label Studio refused the backend's key, what to check."""
    status = exc.status_code if isinstance(exc, ApiError) else (
        exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None)
    message = f"{type(exc).__name__}: {exc}"
    if status in (401, 403):
        message += ("; Label Studio refused the backend's API key: set LABEL_STUDIO_API_KEY (or the token Label "
                    "Studio sends) to the key of a user who can open this project, from Account & Settings > "
                    "Access Token (legacy tokens and personal access tokens both work)")
    return message


class LostOwnership(RuntimeError):
    """The run no longer owns its job: another run took it over, or its Redis lock expired."""


class Claim:
    """One run's ownership of its project's job; every write of the run goes through :meth:`update`."""

    def __init__(self, store: JobStore, project_id: int, owner: str) -> None:
        self.store, self.project_id, self.owner = store, project_id, owner
        self.revoked = threading.Event()

    def update(self, **fields: Any) -> None:
        """Set job fields (and the heartbeat), or raise :class:`LostOwnership`: the run must stop."""
        if self.revoked.is_set() or not self.store.update(self.project_id, self.owner, **fields):
            raise LostOwnership(f"project {self.project_id}: run {self.owner} no longer owns the job")

    def revoke(self) -> None:
        """Make the run stop at its next write (the runner lost what made it the owner)."""
        self.revoked.set()


@contextmanager
def every(interval_s: float, fn: Callable[[], object]) -> Iterator[None]:
    """Call ``fn`` every ``interval_s`` seconds in a daemon thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            fn()

    thread = threading.Thread(target=loop, daemon=True, name="freeal-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Runner(Protocol):
    """Where project jobs run: :class:`ThreadRunner` here, or a queue (``freeal_backend.labelstudio.jobqueue``)."""

    def submit(self, manager: JobManager, project_id: int) -> bool:
        """Start or enqueue the project's job; False when a queued or running job will serve the request."""

    def start(self, manager: JobManager) -> None:
        """Begin looking after jobs whose process died (called once when the backend starts)."""


def check_judged_version(client: ProjectClient, version: str) -> None:
    """Refuse a ``judge_version`` no prediction of the project carries, or one of FreeAL's own (each push
    replaces those), naming the versions the project has."""
    versions = {v: n for v, n in client.model_versions().items() if n}
    if version.startswith(FREEAL_VERSION_PREFIX):
        raise ValueError(f"judge_version {version!r} is a FreeAL version, which every FreeAL push replaces; "
                         "name another model's version")
    if version not in versions:
        have = ", ".join(repr(v) for v in sorted(versions)) or "none"
        raise ValueError(f"judge_version {version!r}: no task of project {client.project_id} has a prediction of "
                         f"that model version; the project's prediction versions: {have}")


def _forget(owner: str) -> None:
    with _running_lock:
        _running.discard(owner)


def owner_is_dead(owner: str | None) -> bool:
    """Whether ``owner`` (``host:pid:id``) ran in a process of this host that is gone (or in this process,
    which does not run it: the pid was reused after a restart)."""
    host, _, rest = (owner or "").partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        with _running_lock:
            return owner not in _running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ThreadRunner:
    """Runs a project's job in a daemon thread of this process (the default, without ``FREEAL_QUEUE``).

    :meth:`start` resumes the jobs of dead processes at once (their owner's pid is gone from this host)
    and, every ``check_s`` seconds, those whose heartbeat is older than ``stale_s``; a job whose process
    died ``max_resumes`` + 1 times in a row is shown failed instead of being run into the same death. At most
    ``max_jobs`` jobs run at a time (``FREEAL_MAX_JOBS``); the others wait, queued, saying so in their stage."""

    def __init__(self, *, stale_s: float = 30.0, heartbeat_s: float = 5.0, check_s: float = 10.0,
                 max_resumes: int = 2, max_jobs: int = 1) -> None:
        if max_jobs < 1:
            raise ValueError(f"FREEAL_MAX_JOBS must be at least 1, not {max_jobs}")
        self.stale_s, self.heartbeat_s, self.check_s, self.max_resumes = stale_s, heartbeat_s, check_s, max_resumes
        self.max_jobs = max_jobs
        self._slots = threading.BoundedSemaphore(max_jobs)

    def submit(self, manager: JobManager, project_id: int) -> bool:
        owner = self._new_owner(manager)
        if not manager.store.claim(project_id, owner, stale_s=self.stale_s):
            _forget(owner)
            return False
        self._spawn(manager, project_id, owner)
        return True

    def start(self, manager: JobManager) -> None:
        self.recover(manager)

        def watch() -> None:
            while True:
                time.sleep(self.check_s)
                try:
                    self.recover(manager)
                except Exception:  # noqa: BLE001 - a failed sweep (database busy) is retried by the next
                    log.exception("looking for jobs of dead processes failed")

        threading.Thread(target=watch, daemon=True, name="freeal-job-watch").start()

    def recover(self, manager: JobManager) -> list[int]:
        """Resume (or fail) every queued or running job whose process is gone; returns their projects."""
        found = []
        for project_id, owner, heartbeat in manager.store.active():
            if not (owner_is_dead(owner) or time.time() - heartbeat > self.stale_s):
                continue
            new_owner = self._new_owner(manager)
            outcome = manager.store.resume(project_id, owner, new_owner, max_resumes=self.max_resumes)
            if outcome == "resumed":
                log.warning("project %s: the process running its job (%s) died; resuming the job", project_id, owner)
                self._spawn(manager, project_id, new_owner)
            else:
                _forget(new_owner)
            if outcome == "failed":
                log.error("project %s: the process running its job died again; the job is marked failed", project_id)
            if outcome:
                found.append(project_id)
        return found

    @staticmethod
    def _new_owner(manager: JobManager) -> str:
        """A new owner, known to run in this process before any job row names it."""
        owner = manager.new_owner()
        with _running_lock:
            _running.add(owner)
        return owner

    def _spawn(self, manager: JobManager, project_id: int, owner: str) -> None:
        threading.Thread(target=self._main, args=(manager, project_id, owner), daemon=True,
                         name=f"freeal-job-{project_id}").start()

    def _main(self, manager: JobManager, project_id: int, owner: str) -> None:
        store = manager.store
        try:
            with every(self.heartbeat_s, lambda: store.update(project_id, owner)):
                if not self._slots.acquire(blocking=False):
                    store.update(project_id, owner, stage=f"queued: waiting for another project's job to end "
                                                          f"(FREEAL_MAX_JOBS={self.max_jobs})")
                    self._slots.acquire()
                try:
                    manager.run_until_settled(Claim(store, project_id, owner),
                                              lambda state, message: store.finish(project_id, owner, state, message))
                finally:
                    self._slots.release()
        finally:
            _forget(owner)


class JobManager:
    """Starts project jobs through a :class:`Runner` (a :class:`ThreadRunner` unless given one) and runs them
    (in whatever process the runner picks)."""

    def __init__(self, settings: Settings, store: JobStore, runs: RunRegistry, runner: Runner | None = None,
                 *, push_batch: int = IMPORT_BATCH, title_every_s: float = 5.0,
                 projects: frozenset[int] | None = None) -> None:
        self.settings = settings
        self.projects = projects  # FREEAL_PROJECTS: the only projects a job may run for (None: all)
        self.store = store
        self.runs = runs
        self.runner = runner if runner is not None else ThreadRunner()
        self.push_batch = push_batch
        self.title_every_s = title_every_s
        self.owner_prefix = f"{HOST}:{os.getpid()}"

    def start(self) -> None:
        """Called once when the backend starts: the runner resumes the jobs of dead processes."""
        self.runner.start(self)

    def connection(self, project_id: int) -> Connection:
        """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, else what Label Studio's /setup handed over."""
        saved = self.store.project(project_id) or {}
        return connection_from_env(url=saved.get("ls_url"), api_key=saved.get("ls_key"))

    def new_owner(self) -> str:
        return f"{self.owner_prefix}:{uuid.uuid4().hex[:8]}"

    def trigger(self, project_id: int, reason: str) -> bool:
        """Start the project's job unless one is queued or running (then it is asked to run once more)."""
        if not self.runner.submit(self, project_id):
            log.info("project %s: job already queued or running; rerun requested (%s)", project_id, reason)
            return False
        log.info("project %s: job queued (%s)", project_id, reason)
        return True

    def run_until_settled(self, claim: Claim, finish: Callable[[str, str], bool]) -> None:
        """Run the job; again for as long as ``finish(state, message)`` says a newer request came. A run
        that lost its claim stops without finishing: the job is its new owner's."""
        project_id = claim.project_id
        while True:
            try:
                message = self.run_once(claim)
                state = "done"
            except LostOwnership as exc:
                log.warning("%s; this run stops here", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a job must end in a visible state, never die silently
                log.exception("project %s: FreeAL job failed", project_id)
                message, state = failure_message(exc), "failed"
                self._failed_title(project_id)  # while the job is still ours: no next job races this title
            if not finish(state, message):
                return
            log.info("project %s: running again with the newest annotations", project_id)

    def _failed_title(self, project_id: int) -> None:
        """Leave the review tab's title saying the job failed."""
        try:
            client = ProjectClient(self.connection(project_id), project_id)
            ReviewTab(client, self.store, project_id, "", 0.0).show(force=True, final=True, note="failed")
        except Exception as exc:  # noqa: BLE001 - Label Studio may be what failed; the job row says why
            log.warning("project %s: review tab title not updated: %s", project_id, exc)

    def run_once(self, claim: Claim) -> str:
        """Fetch every task, run the FreeAL rounds, push predictions and the review view after each round.

        A round is pushed unless Label Studio already holds exactly its predictions (same digest), or it
        is not the last round and Label Studio holds FreeAL predictions already (a job started by people's
        labels, or one resumed: each replaced version is deleted one prediction at a time while people's
        saves wait, so only the final round is), or the project is too big to replace a version every round.
        With the project option ``judge_version``, the small model judges that model version's predictions
        instead (round 0 only, no LLM call)."""
        project_id = claim.project_id
        if self.projects is not None and project_id not in self.projects:  # e.g. a job resumed after a restart
            raise ValueError(f"project {project_id} is not served by this backend (FREEAL_PROJECTS)")
        client = ProjectClient(self.connection(project_id), project_id)
        tab = ReviewTab(client, self.store, project_id, claim.owner, self.title_every_s)
        saved = self.store.project(project_id) or {}
        opts = ProjectOptions.from_extra(saved.get("extra_params"))
        cfg = parse_task_config(client.label_config(), from_name=opts.from_name)
        if opts.judge_version:
            check_judged_version(client, opts.judge_version)
        claim.update(state="running", stage="fetching tasks", done=0, total=0)
        read_since = time.time()
        records = list(client.iter_tasks(cfg, judge_version=opts.judge_version))
        self.store.replace_gold(project_id, [(r.annotation_id, r.task_id, list(r.human_labels))
                                             for r in records if r.human_labels and r.annotation_id is not None],
                                read_since)
        gold = self.store.gold(project_id)
        items, no_text = build_items(records, gold)
        if not items:
            raise ValueError(f"no task has text in data[{cfg.data_key!r}] (the label config's <Text value>)")
        relabelled = self.runs.start_over(project_id, cfg.task_type, cfg.labels)  # the label config changed
        run = self.runs.get(project_id, cfg.labels, opts.task_description, task_type=cfg.task_type)
        chosen = opts.over(self.settings)
        run.start_call_budget(chosen.max_llm_calls)  # counts this job's requests
        run.audit_size, run.target_error = chosen.audit, chosen.target_error
        self.runs.keep_lower_states_of(project_id)
        llm_labels = judged_labels(records, items) if opts.judge_version else None
        who = f"model version {opts.judge_version!r}" if opts.judge_version else LLM  # for the review notes
        texts = {it.item_id: it.text for it in items}
        rounds = 0 if llm_labels is not None else opts.rounds if opts.rounds is not None else self.settings.rounds
        claim.update(rounds=rounds, tasks=len(items))
        results: list[ItemResult] = []
        pushed, pushed_digest = self.store.model_version(project_id), self.store.pushed_digest(project_id)
        shows_ours = pushed is not None and relabelled is None  # Label Studio shows labels of this label set
        cost = RoundLLMStats(run.store, lambda: run.llm_started)  # what the LLM cost, per round, for the status page
        for rnd in range(rounds + 1):
            def progress(stage: str, done: int, total: int, rnd: int = rnd) -> None:
                claim.update(stage=stage, done=done, total=total, round=rnd)
                tab.show()

            cost.switch(rnd)
            claim.update(round=rnd, stage=f"round {rnd} of {rounds}")
            results = with_people_labels(run.run(items, rounds=rnd, on_progress=progress, llm_labels=llm_labels),
                                         gold)
            cost.finish()
            save_round_flagged(run.store, rnd, len(flagged_ids(results)))
            version = run.model_version()
            if rnd < rounds and (shows_ours or len(items) > self.settings.push_every_round_max_tasks):
                continue  # Label Studio shows FreeAL's labels already; a big project gets the final round only
            digest = predictions_digest(cfg, results, texts, who)
            if digest == pushed_digest:
                continue  # Label Studio holds exactly these predictions already
            version = version_for(version, digest, pushed)
            self.push(client, cfg, results, version, digest, claim, texts, who)
            pushed, pushed_digest, shows_ours = version, digest, True
            tab.show(force=True)
        claim.update(flagged=len(flagged_ids(results)))
        health = run.health()
        tab.show(force=True, final=True, note=health_note(health))
        skipped = f"; {len(no_text)} tasks without text skipped: {no_text[:20]}" if no_text else ""
        unfinished = unfinished_work(run.store, items, rounds)
        retried = "; ".join(unfinished) + ("; the next job (Start Training in the model settings, or an annotation) "
                                           "retries them" if unfinished else "")
        undone = "; ".join(x for x in (burst_note(run.burst), retried, *set_aside_notes(run.store),
                                        order_note(run, items)) if x)
        verdict = f"; label health: {health['message']}" if health else ""
        judged = "" if llm_labels is None else judge_summary(str(opts.judge_version), records, llm_labels)
        restarted = f"{relabelled}; " if relabelled else ""
        return (f"{restarted}{judged}{len(results)} tasks labelled, {len(flagged_ids(results))} flagged for review"
                f"{skipped}{'; ' + undone if undone else ''}{verdict}")

    def push(self, client: ProjectClient, cfg: TaskConfig, results: list[ItemResult], version: str, digest: str,
             claim: Claim, texts: Mapping[str, str], who: str) -> None:
        """Push one round's results (resuming an interrupted push) and record the version, its digest and the
        flag count; stops (:class:`LostOwnership`) before any batch once the run lost its job."""
        claim.update(stage=f"pushing {version}", done=0, total=len(results))

        def progress(done: int) -> None:
            claim.update(done=done)

        journal = PushJournal(self.store, claim.project_id)
        keep = self.settings.keep_old_versions

        def cleanup() -> None:
            claim.update(model_version=version, pushed_digest=digest)  # in and selected: what people see now
            if not keep:
                claim.update(stage=f"pushed {version}; deleting the previous versions")

        flagged = push_results(client, cfg, results, version, journal, texts=texts, batch=self.push_batch,
                               on_progress=progress, on_cleanup=cleanup, delete_old=not keep, who=who)
        claim.update(model_version=version, pushed_digest=digest, flagged=flagged, done=len(results))
        log.info("project %s: pushed %d predictions (%s), %d flagged", claim.project_id, len(results), version,
                 flagged)
        audit = sum(r.audit for r in results)
        if audit:
            try:
                client.upsert_audit_view(version, audit)
            except Exception as exc:  # noqa: BLE001 - Label Studio unreachable for a moment: the next push retries
                log.warning("project %s: audit tab not updated: %s", claim.project_id, exc)
