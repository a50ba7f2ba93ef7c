"""The Label Studio ML backend HTTP service (Flask), a thin shell around the FreeAL library.

Label Studio 1.23 calls: ``GET /health``, ``POST /setup`` (3 s timeout: nothing heavy here), ``POST /predict``
(100 s timeout: cached results at once, LLM labels for unseen tasks within a budget, the full FreeAL
job in the background), ``POST /webhook`` (1 s timeout: acknowledge at once), and ``GET /versions``.
``POST /train`` is kept for older Label Studio versions. For people: ``GET /`` lists the projects and
``GET /projects/<id>`` shows one (HTML, refreshing while a job runs); ``GET /status/<id>`` has the same numbers
as JSON.

Who may do what: with ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set every route but ``GET /health`` needs them
(only one of the two set refuses to start; neither set starts with a loud warning); ``FREEAL_PROJECTS`` limits
the backend to some projects (403 for the others); ``/setup`` bounds ``rounds`` and the task description;
``/predict`` cannot change the label set of a project's run; no answer shows a server path.
"""
from __future__ import annotations

import atexit
import hmac
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import Forbidden, HTTPException, NotFound

from freeal_backend import html_report
from freeal_backend import status as run_status
from freeal_backend.config import Settings
from freeal_backend.labelstudio.job_store import ACTIVE, JobStore, progress_text
from freeal_backend.labelstudio.jobqueue import runner_for
from freeal_backend.labelstudio.manager import JobManager
from freeal_backend.labelstudio.runs import ProjectOptions, RunRegistry
from freeal_backend.labelstudio.label_config import (
    ClassificationConfig,
    LabelConfigError,
    TaskConfig,
    human_labels,
    parse_task_config,
    render_task_prediction,
    review_results,
)
from freeal_backend.llm.client import LLMUnavailable
from freeal_backend.loop import FreeALRun, latest_health
from freeal_backend.loop_spans import span_dicts
from freeal_backend.spans import decode_spans
from freeal_backend.labelstudio.client import INITIAL_VERSION, MissingCredentialsError, project_id_from_uid
from freeal_backend.records import Item, ItemResult
from freeal_backend.storage import Store

log = logging.getLogger("freeal_backend.labelstudio.server")

PAGE_REFRESH_S = 5  # the status pages reload themselves this often while a job is queued or running
# the pages run no script and load nothing from another host
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'none'"

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
TRAIN_EVENTS = ("START_TRAINING",)
OPEN_ENDPOINTS = frozenset({"health"})  # the container healthcheck's; it answers nothing but that the server is up

MAX_ROUNDS = 5  # /setup's extra_params.rounds: 1..MAX_ROUNDS (each round is a pass of LLM calls over the project)
MAX_TASK_DESCRIPTION = 2000  # characters of /setup's extra_params.task_description (it goes into every LLM call)
# an absolute path of two or more parts that is not inside a URL (``http://host/a/b`` keeps its ``/a/b``)
_ABS_PATH = re.compile(r"(?<![\w:/.~-])~?(?:/[^\s/'\"`:,;()\[\]{}<>|]+){2,}/?")


class BadRequest(ValueError):
    """The request is malformed; the message says how."""


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side knobs, read from the environment."""

    basic_auth_user: str | None = None  # BASIC_AUTH_USER (with BASIC_AUTH_PASS: require HTTP basic auth)
    basic_auth_pass: str | None = None  # BASIC_AUTH_PASS
    predict_budget_s: float = 60.0  # FREEAL_PREDICT_BUDGET_S: LLM time per /predict (Label Studio waits 100 s)
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
        """Refuse a /predict whose labels differ from the project's: those of its FreeAL run when it has one,
        else those of the label config /setup stored. /predict would otherwise create the run with its own
        labels, and the job, which reads the config from Label Studio, could never use that run."""
        mine = (cfg.task_type, list(cfg.labels))
        with self.run_store(project_id) as store:
            stored = store.get_meta("labels") if store is not None else None
            kind = (store.get_meta("task_type") if store is not None else None) or cfg.task_type
        if stored is not None:
            theirs, whose = (kind, list(stored)), "its FreeAL run"
        else:
            saved = (self.store.project(project_id) or {}).get("label_config")
            if not saved:
                return
            setup_cfg = parse_task_config(saved, from_name=opts.from_name)
            theirs, whose = (setup_cfg.task_type, list(setup_cfg.labels)), "the label config /setup stored"
        if theirs != mine:
            raise BadRequest(f"project {project_id}: this label_config has the {mine[0]} labels {mine[1]}, but "
                             f"{whose} has the {theirs[0]} labels {theirs[1]}; /predict cannot change a project's "
                             "label set (Label Studio calls /setup with a changed config first)")

    @contextmanager
    def run_store(self, project_id: int) -> Iterator[Store | None]:
        """The project's FreeAL state, opened for reading (None before its first job wrote any)."""
        path = self.runs.run_dir(project_id) / "state.sqlite"
        if not path.exists():
            yield None
            return
        store = Store(path)
        try:
            yield store
        finally:
            store.close()

    def project_status(self, project_id: int, row: dict[str, Any] | None) -> dict[str, Any]:
        """The numbers ``/status/<id>`` and ``/projects/<id>`` show, for the job row ``row``."""
        try:
            ls_url: str | None = self.jobs.connection(project_id).url
        except MissingCredentialsError:
            ls_url = None
        with self.run_store(project_id) as store:
            data = run_status.project_status(project_id, row, store, ls_url,
                                             target_error=self.settings.target_error)
            data["health"] = latest_health(store) if store is not None else None
            return data

    def version(self, project_id: int) -> str:
        return self.store.model_version(project_id) or INITIAL_VERSION

    def maybe_start_job(self, project_id: int, reason: str) -> None:
        if not self.server.auto_job:
            return
        try:
            self.jobs.connection(project_id)
        except MissingCredentialsError as exc:
            log.warning("project %s: background job not started: %s", project_id, exc)
            return
        self.jobs.trigger(project_id, reason)

    def predict(self, project_id: int, cfg: TaskConfig, opts: ProjectOptions,
                tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Exactly one prediction per task, in task order, and how many tasks FreeAL had not seen."""
        texts = task_texts(cfg, tasks)
        version = self.version(project_id)
        gold = self.store.gold(project_id)
        try:
            run = self.runs.get(project_id, cfg.labels, opts.task_description, task_type=cfg.task_type)
        except ValueError as exc:  # e.g. the project's label set changed since its FreeAL run
            raise BadRequest(self.public(str(exc))) from exc
        cached = run.results([str(t["id"]) for t in tasks])  # only these tasks: cost independent of project size
        out: dict[int, dict[str, Any]] = {}
        unseen: list[Item] = []
        for task in tasks:
            tid = int(task["id"])
            human = human_result(cfg, str(tid), gold[tid][0], texts[tid]) if tid in gold else None
            if human is not None:
                out[tid] = render_task_prediction(cfg, human, texts[tid], version)
            elif str(tid) in cached and cached[str(tid)].label is not None:
                out[tid] = render_task_prediction(cfg, cached[str(tid)], texts[tid], version)
            else:
                unseen.append(Item(str(tid), texts[tid][: self.settings.max_chars]))
        if unseen:
            for res in self.quick_label(run, unseen):
                out[int(res.item_id)] = render_task_prediction(cfg, res, texts[int(res.item_id)], version)
        for item in unseen:
            if int(item.item_id) not in out:
                note = "FreeAL: queued; the background job will label this task."
                out[int(item.item_id)] = {"result": review_results(cfg, suspicious=True, note=note), "score": 0.0,
                                          "model_version": version}
        return [out[int(t["id"])] for t in tasks], len(unseen)

    def quick_label(self, run: FreeALRun, items: list[Item]) -> list[ItemResult]:
        """LLM labels for unseen tasks, in chunks, until the time budget is spent or the LLM fails."""
        deadline = time.monotonic() + self.server.predict_budget_s
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


def human_result(cfg: TaskConfig, task_id: str, label: str, text: str) -> ItemResult | None:
    """A person's label as a result to show back (None when it no longer fits the config's labels)."""
    if isinstance(cfg, ClassificationConfig):
        if label not in cfg.labels:
            return None
        return ItemResult(task_id, label, 1.0, {lab: float(lab == label) for lab in cfg.labels}, source="human")
    try:
        spans = decode_spans(label)
    except (ValueError, TypeError):
        return None
    if any(s.label not in cfg.labels or s.end > len(text) for s in spans):
        return None
    return ItemResult(task_id, label, 1.0, source="human", spans=span_dicts(text, spans))


def task_texts(cfg: TaskConfig, tasks: list[dict[str, Any]]) -> dict[int, str]:
    """The text of each task, or :class:`BadRequest` naming the tasks that lack it."""
    texts, missing = {}, []
    for task in tasks:
        value = (task.get("data") or {}).get(cfg.data_key)
        if isinstance(value, str) and value.strip():
            texts[int(task["id"])] = value
        else:
            missing.append(task["id"])
    if missing:
        raise BadRequest(f"tasks {missing[:20]} have no text in data[{cfg.data_key!r}] "
                         f"(named by <Text value=\"${cfg.data_key}\"> in the label config)")
    return texts


def json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def valid_extra(value: Any) -> dict[str, Any]:
    """/setup's extra_params, with ``rounds`` and ``task_description`` in bounds (else :class:`BadRequest`)."""
    extra = value if isinstance(value, dict) else {}
    rounds = extra.get("rounds")
    if rounds is not None:
        number = rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else (
            int(rounds) if isinstance(rounds, str) and rounds.strip().isdigit() else None)
        if number is None or not 1 <= number <= MAX_ROUNDS:
            raise BadRequest(f"extra_params.rounds must be a whole number from 1 to {MAX_ROUNDS}, "
                             f"not {str(rounds)[:20]!r}")
    task = extra.get("task_description")
    if task is not None and not isinstance(task, str):
        raise BadRequest("extra_params.task_description must be a string")
    if isinstance(task, str) and len(task) > MAX_TASK_DESCRIPTION:
        raise BadRequest(f"extra_params.task_description has {len(task)} characters; at most "
                         f"{MAX_TASK_DESCRIPTION} are allowed")
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


def create_app(settings: Settings | None = None, server: ServerSettings | None = None) -> Flask:
    """The Flask app; one :class:`Backend` per process."""
    backend = Backend(settings or Settings.from_env(), server or ServerSettings.from_env())
    app = Flask("freeal_backend")
    app.config["MAX_CONTENT_LENGTH"] = int(backend.server.max_request_mb * 1024 * 1024)
    app.extensions["freeal"] = backend
    atexit.register(backend.runs.close)  # stops an embedded LLM server this process started
    if not backend.server.auth:
        log.warning("!!! NO AUTH: BASIC_AUTH_USER and BASIC_AUTH_PASS are not set, so anyone who can reach this "
                    "port can start FreeAL jobs on your Label Studio projects, spend LLM calls and rewrite the task "
                    "description. Set both (README, 'Security') and give Label Studio the same pair. !!!")

    @app.before_request
    def _auth_and_log() -> Response | tuple[Response, int] | None:
        log.info("LS call %s %s", request.method, request.path)
        user, password = backend.server.basic_auth_user, backend.server.basic_auth_pass
        if user and password and request.endpoint not in OPEN_ENDPOINTS:
            auth = request.authorization
            ok = auth is not None and _same(auth.username, user) and _same(auth.password, password)
            if not ok:
                resp = jsonify(error="HTTP basic auth required (BASIC_AUTH_USER / BASIC_AUTH_PASS)")
                resp.headers["WWW-Authenticate"] = 'Basic realm="freeal"'
                return resp, 401
        return None

    @app.errorhandler(BadRequest)
    @app.errorhandler(LabelConfigError)
    def _bad(exc: ValueError) -> tuple[Response, int]:
        return jsonify(error=backend.public(str(exc))), 400

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=backend.public(exc.description or exc.name)), exc.code or 500

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s", request.path)
        return jsonify(error=f"internal error ({type(exc).__name__}); see the backend log"), 500

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="UP")

    @app.get("/")
    def index() -> Response:
        now = time.time()
        projects = [{"project": pid, "job": run_status.job_summary(row, now)}
                    for pid, row in backend.job_rows().items()]
        active = any(p["job"]["state"] in ACTIVE for p in projects)
        return _html(html_report.index_page(projects, refresh_s=PAGE_REFRESH_S if active else None))

    @app.get("/projects/<int:project_id>")
    def project_page(project_id: int) -> Response:
        backend.check_allowed(project_id)
        data = backend.project_status(project_id, backend.job_row(project_id))
        if data["job"]["state"] == "none" and data["run"] is None and backend.store.project(project_id) is None:
            raise NotFound(f"the backend knows no project {project_id}")
        active = data["job"]["state"] in ACTIVE
        return _html(html_report.project_page(data, refresh_s=PAGE_REFRESH_S if active else None))

    @app.post("/setup")
    def setup() -> Response:
        body = json_body()
        pid = backend.project_id(body.get("project"))
        extra = valid_extra(body.get("extra_params"))
        schema = body.get("schema")
        opts = ProjectOptions.from_extra(extra)
        parse_task_config(schema if isinstance(schema, str) else "", from_name=opts.from_name)
        hostname = body.get("hostname") if isinstance(body.get("hostname"), str) else None
        token = body.get("access_token") if isinstance(body.get("access_token"), str) else None
        backend.store.save_project(pid, label_config=schema, extra_params=extra, ls_url=hostname, ls_key=token)
        log.info("LS setup project=%s extra_params=%s", pid, sorted(extra))
        return jsonify(model_version=backend.version(pid))

    @app.post("/predict")
    def predict() -> Response:
        body = json_body()
        pid = backend.project_id(body.get("project"))
        tasks = valid_tasks(body.get("tasks"))
        cfg, opts = backend.config_for(pid, body.get("label_config"))
        backend.check_label_set(pid, cfg, opts)
        log.info("LS predict project=%s tasks=%d", pid, len(tasks))
        results, unseen = backend.predict(pid, cfg, opts, tasks) if tasks else ([], 0)
        if unseen or backend.store.status(pid) is None:
            backend.maybe_start_job(pid, f"predict: {unseen} unseen tasks")
        return jsonify(results=results, model_version=backend.version(pid))

    @app.post("/webhook")
    def webhook() -> Response:
        body = json_body()
        action = str(body.get("action") or "")
        project = body.get("project")
        pid = backend.project_id(project.get("id") if isinstance(project, dict) else project)
        log.info("LS webhook action=%s project=%s", action, pid)
        if action in ANNOTATION_EVENTS:
            _record_annotation(backend, pid, body)
            backend.maybe_start_job(pid, action)
        elif action == "ANNOTATIONS_DELETED":
            anns = body.get("annotations")
            ids = [a.get("id") for a in anns if isinstance(a, dict)] if isinstance(anns, list) else []
            backend.store.delete_gold(pid, [int(i) for i in ids if isinstance(i, int)])
            backend.maybe_start_job(pid, action)
        elif action in TRAIN_EVENTS:
            backend.maybe_start_job(pid, action)
        return jsonify(status="ok", action=action)

    @app.post("/train")
    def train() -> Response:
        body = json_body()
        pid = backend.project_id(body.get("project"))
        backend.maybe_start_job(pid, "train")
        return jsonify(status="ok", job=f"freeal-project-{pid}")

    @app.get("/versions")
    def versions() -> Response:
        # Label Studio 1.23 sends this GET without a body, so the project is unknown: list every project's
        # latest version (a ?project=<id> query narrows it to one).
        raw = request.args.get("project")
        if raw is not None:
            return jsonify(versions=[backend.version(backend.project_id(raw))])
        if backend.server.projects is not None:
            return jsonify(versions=[backend.version(pid) for pid in sorted(backend.server.projects)])
        return jsonify(versions=backend.store.versions() or [INITIAL_VERSION])

    @app.get("/status/<int:project_id>")
    def status(project_id: int) -> Response | tuple[Response, int]:
        backend.check_allowed(project_id)
        row = backend.job_row(project_id)
        if row is None:
            return jsonify(error=f"no FreeAL job for project {project_id} yet"), 404
        return jsonify(progress=progress_text(row), **row, **backend.project_status(project_id, row))

    return app


def _html(text: str) -> Response:
    resp = Response(text, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison that also accepts non-ASCII input (compare_digest refuses such str)."""
    def raw(s: str) -> bytes:
        return s.encode("utf-8", "surrogatepass")

    return hmac.compare_digest(raw(given or ""), raw(expected))


def _record_annotation(backend: Backend, pid: int, body: dict[str, Any]) -> None:
    """Store the human labels of an annotation event as gold (a skipped annotation removes them)."""
    ann = body.get("annotation")
    if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
        raise BadRequest("annotation event without an 'annotation' object with an integer 'id'")
    task = ann.get("task") if isinstance(ann.get("task"), int) else (body.get("task") or {}).get("id")
    if not isinstance(task, int):
        raise BadRequest("annotation event without a task id")
    project = body.get("project") if isinstance(body.get("project"), dict) else {}
    cfg, _ = backend.config_for(pid, project.get("label_config"))
    data = (body.get("task") or {}).get("data") if isinstance(body.get("task"), dict) else None
    text = data.get(cfg.data_key) if isinstance(data, dict) else None
    labels = [] if ann.get("was_cancelled") else human_labels(cfg, ann.get("result") or [],
                                                               text if isinstance(text, str) else None)
    backend.store.set_gold(pid, ann["id"], task, labels)
