"""The Label Studio ML backend HTTP service (Flask), a thin shell around the FreeAL library.

Label Studio 1.23 calls: ``GET /health``, ``POST /setup`` (3 s timeout: nothing heavy here; it retries a failed
job, see ``FAILED_JOB_RETRY_AFTER_S``, and starts one when the project's label set changed), ``POST /predict``
(100 s timeout: cached results at once, LLM labels for unseen tasks within a budget, the full FreeAL
job in the background), ``POST /webhook`` (1 s timeout: acknowledge at once), and ``GET /versions``.
``POST /train`` is kept for older Label Studio versions. For people: ``GET /`` lists the projects and
``GET /projects/<id>`` shows one (HTML, refreshing while a job runs); ``GET /status/<id>`` has the same numbers
as JSON.

Who may do what: with ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set every route but ``GET /health`` needs them
(only one of the two set refuses to start; neither set starts with a loud warning); ``FREEAL_PROJECTS`` limits
the backend to some projects (403 for the others); ``/setup`` bounds ``rounds``, the task description and
``target_error``;
``/predict`` cannot change a project's label set (only the config Label Studio sends /setup does); no answer
shows a server path.
"""
from __future__ import annotations

import atexit
import hmac
import logging
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, NotFound

from freeal_backend import html_report
from freeal_backend import status as run_status
from freeal_backend.config import Settings
from freeal_backend.labelstudio.backend import Backend, ServerSettings
from freeal_backend.labelstudio.client import INITIAL_VERSION, is_prediction_copy
from freeal_backend.labelstudio.job_store import ACTIVE, progress_text
from freeal_backend.labelstudio.label_config import LabelConfigError, parse_task_config
from freeal_backend.labelstudio.label_results import human_labels
from freeal_backend.labelstudio.request_checks import BadRequest, valid_extra, valid_tasks
from freeal_backend.labelstudio.runs import ProjectOptions

log = logging.getLogger("freeal_backend.labelstudio.server")

PAGE_REFRESH_S = 5  # the status pages reload themselves this often while a job is queued or running
PAGE_FLAGGED = 100  # flagged tasks a project's page lists, least confident first
# the pages run no script and load nothing from another host
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'none'"

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
TRAIN_EVENTS = ("START_TRAINING",)
FAILED_JOB_RETRY_AFTER_S = 15.0  # /setup retries a job that failed at least this long ago. Label Studio calls /setup
#   before every Retrieve Predictions and sends /predict no task holding a prediction of the version /setup names,
#   which the placeholders of a failed job's tasks do: that retrieval is the user's way to retry. Not sooner:
#   Label Studio also calls /setup (with the old settings) as someone opens the model settings to fix them.
OPEN_ENDPOINTS = frozenset({"health"})  # the container healthcheck's; it answers nothing but that the server is up


def json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


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
        return _html(html_report.project_page(data, backend.flagged_items(project_id, PAGE_FLAGGED),
                                              refresh_s=PAGE_REFRESH_S if active else None))

    @app.post("/setup")
    def setup() -> Response:
        body = json_body()
        pid = backend.project_id(body.get("project"))
        extra = valid_extra(body.get("extra_params"))
        schema = body.get("schema")
        opts = ProjectOptions.from_extra(extra)
        cfg = parse_task_config(schema if isinstance(schema, str) else "", from_name=opts.from_name)
        hostname = body.get("hostname") if isinstance(body.get("hostname"), str) else None
        token = body.get("access_token") if isinstance(body.get("access_token"), str) else None
        backend.store.save_project(pid, label_config=schema, extra_params=extra, ls_url=hostname, ls_key=token)
        log.info("LS setup project=%s extra_params=%s", pid, sorted(extra))
        row = backend.store.status(pid) or {}
        if row.get("state") == "failed" and time.time() - (row.get("finished") or 0.0) >= FAILED_JOB_RETRY_AFTER_S:
            backend.maybe_start_job(pid, "setup after a failed job")
        elif backend.runs.relabelled(pid, cfg.task_type, cfg.labels) is not None:
            # every task holds FreeAL's version, so Retrieve Predictions would send none: the job starts over now
            backend.maybe_start_job(pid, "the label config's label set changed")
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
        if action == "ANNOTATIONS_DELETED" and project is None and not body.get("annotations"):
            # Label Studio deletes a converted-to-draft annotation before serialising the event: no project,
            # no ids. The next job's read of the project drops its label (JobStore.replace_gold).
            log.info("LS webhook %s without project or annotations: left to the next job's read", action)
            return jsonify(status="ignored", action=action,
                           reason="no project or annotation ids; the next job's read of the project catches up")
        pid = backend.project_id(project.get("id") if isinstance(project, dict) else project)
        log.info("LS webhook action=%s project=%s", action, pid)
        if action in ANNOTATION_EVENTS:
            if _record_annotations(backend, pid, body):
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


def _is_id(value: Any) -> bool:
    """An integer id as Label Studio sends it (JSON true/false are not ids)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _record_annotations(backend: Backend, pid: int, body: dict[str, Any]) -> int:
    """Store the human labels of an annotation event as gold (a skipped annotation removes them) and return
    how many annotations counted. ``ANNOTATIONS_CREATED`` (the Data Manager's bulk actions) carries lists of
    annotations and tasks; its copies of predictions are no person's labels (``is_prediction_copy``)."""
    anns, tasks = body.get("annotation"), body.get("task")
    if isinstance(anns, list):
        by_id = {t["id"]: t for t in tasks if isinstance(t, dict) and _is_id(t.get("id"))} if isinstance(
            tasks, list) else {}
        people = [a for a in anns if not (isinstance(a, dict) and is_prediction_copy(a))]
        for ann in people:
            _record_annotation(backend, pid, body, ann, by_id.get(ann.get("task")) if isinstance(ann, dict) else None)
        return len(people)
    if isinstance(anns, dict) and is_prediction_copy(anns):
        return 0
    _record_annotation(backend, pid, body, anns, tasks if isinstance(tasks, dict) else None)
    return 1


def _record_annotation(backend: Backend, pid: int, body: dict[str, Any], ann: Any, task_obj: dict[str, Any] | None
                       ) -> None:
    """Store one annotation's human labels as gold (``task_obj``: its task as the event sends it)."""
    if not isinstance(ann, dict) or not _is_id(ann.get("id")):
        raise BadRequest("annotation event without an 'annotation' object with an integer 'id'")
    task_obj = task_obj or {}
    task = ann.get("task") if _is_id(ann.get("task")) else task_obj.get("id")
    if not _is_id(task):
        raise BadRequest("annotation event without a task id")
    project = body.get("project") if isinstance(body.get("project"), dict) else {}
    cfg, _ = backend.config_for(pid, project.get("label_config"))
    data = task_obj.get("data")
    text = data.get(cfg.data_key) if isinstance(data, dict) else None
    labels = [] if ann.get("was_cancelled") else human_labels(cfg, ann.get("result") or [],
                                                               text if isinstance(text, str) else None)
    backend.store.set_gold(pid, ann["id"], task, labels)
