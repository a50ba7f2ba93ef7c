"""Thin glue over ``label-studio-sdk``: read tasks and human labels, push predictions, keep the review view.

Everything Label Studio-specific that the background job needs lives here; it knows nothing of FreeAL.
Both token kinds work: a legacy token is sent as ``Token …``; a personal access token (a JWT
refresh token) is exchanged and refreshed by the SDK itself and sent as ``Bearer …``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.request_options import RequestOptions

from freeal_backend.labelstudio.label_config import TaskConfig
from freeal_backend.labelstudio.label_results import REVIEW_MARKER, audit_marker, human_labels, review_marker

log = logging.getLogger(__name__)

REVIEW_VIEW_TITLE = "FreeAL: needs review"
AUDIT_VIEW_TITLE = "FreeAL: audit"
FREEAL_VERSION_PREFIX = "freeal-"
INITIAL_VERSION = FREEAL_VERSION_PREFIX + "llm-only"  # /predict's answers before the first push
# Tasks are read 1000 a page with only the fields FreeAL uses: Label Studio's task list with every field
# serializes some thirty computed columns per task and read ~75-130 tasks/s here; id, data and expanded
# annotations alone read ~390 (100 a page) to ~1480 (1000 a page) tasks/s (SQLite, 3000 tasks, 2 shared cores).
PAGE_SIZE = 1000
TASK_FIELDS = "id,data,annotations"
JUDGE_TASK_FIELDS = TASK_FIELDS + ",predictions"  # predictions come whole (every version's), only when judged
# with ``include``, each annotation is cut down to its id unless it is also expanded
EXPAND_ANNOTATIONS: RequestOptions = {"additional_query_parameters": {"expand": "annotations"}}
# Label Studio 1.23 stores a request of up to 500 predictions in one transaction (its batched import writes
# 500 per transaction; its default import writes a whole request in one). The default import also recounts
# every task of the project per request, so there bigger requests would be faster: turn the batched import
# on instead (README "Scaling", docker-compose.yml), which keeps 500 one transaction and the journal exact.
IMPORT_BATCH = 500
# Label Studio 1.23 deletes a version one prediction at a time (a counter update each): 30-60 a second here
# (benchmarks/results/ls_push_n2000*_probe.md). A DELETE may wait this rate's time on top of the client's timeout.
MIN_DELETE_RATE = 10.0


class MissingCredentialsError(RuntimeError):
    """LABEL_STUDIO_URL and/or LABEL_STUDIO_API_KEY are not set."""


@dataclass(frozen=True)
class Connection:
    """Where Label Studio is and the key to use (the key is never shown in repr or logs)."""

    url: str
    api_key: str

    def __repr__(self) -> str:
        return f"Connection(url={self.url!r}, api_key=***)"


@dataclass(frozen=True)
class TaskRecord:
    """One Label Studio task as FreeAL sees it."""

    task_id: int
    text: str | None
    human_labels: tuple[str, ...] = ()
    annotation_id: int | None = None  # the annotation the human labels come from
    judged_labels: tuple[str, ...] | None = None  # labels of its prediction of the judged version (None: none)


def connection_from_env(
    env: Mapping[str, str] | None = None, *, url: str | None = None, api_key: str | None = None
) -> Connection:
    """Read LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY; ``url``/``api_key`` (what /setup handed over) fill in what
    the environment lacks.

    The operator's LABEL_STUDIO_API_KEY only ever goes to LABEL_STUDIO_URL: without that variable the
    connection is /setup's hostname with /setup's token, or none, so whoever calls /setup cannot choose
    where the operator's key is sent. Raises :class:`MissingCredentialsError` naming what is missing.
    """
    env = os.environ if env is None else env
    env_url = (env.get("LABEL_STUDIO_URL") or "").strip()
    env_key = (env.get("LABEL_STUDIO_API_KEY") or "").strip()
    if env_url:
        url, key = env_url, env_key or (api_key or "").strip()
    else:
        url, key = (url or "").strip(), (api_key or "").strip()
    missing = [name for name, value in (("LABEL_STUDIO_URL", url), ("LABEL_STUDIO_API_KEY", key)) if not value]
    if env_key and not env_url and missing:
        raise MissingCredentialsError(
            "LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the backend sends that key only to the "
            "Label Studio named by LABEL_STUDIO_URL, never to a hostname from /setup. Set LABEL_STUDIO_URL."
        )
    if missing:
        raise MissingCredentialsError(
            f"{' and '.join(missing)} not set: the backend cannot read tasks or push predictions to Label Studio. "
            "Set it in the backend's environment (the API key is under Account & Settings > Access Token; "
            "legacy tokens and personal access tokens both work). /health, /setup and /predict still answer."
        )
    return Connection(url=url.rstrip("/"), api_key=key)


class ProjectClient:
    """Label Studio operations on one project."""

    def __init__(self, conn: Connection, project_id: int, *, timeout: float = 60.0) -> None:
        self.project_id = project_id
        self.timeout = timeout
        self.client = LabelStudio(base_url=conn.url, api_key=conn.api_key, timeout=timeout)

    def label_config(self) -> str:
        """The project's labeling config XML."""
        return self.client.projects.get(id=self.project_id).label_config or ""

    def iter_tasks(self, cfg: TaskConfig, *, page_size: int = PAGE_SIZE,
                   judge_version: str | None = None) -> Iterator[TaskRecord]:
        """Yield every task page by page, with the labels of its latest submitted (non-skipped) annotation
        and, given ``judge_version``, those of its latest prediction of that model version.

        Reads pass ``review=1``: without it, a project with "Retrieve predictions automatically" on makes
        Label Studio call this backend's ``/predict`` for every page of tasks that have no prediction yet.
        """
        include = JUDGE_TASK_FIELDS if judge_version else TASK_FIELDS
        pager = self.client.tasks.list(project=self.project_id, fields="all", include=include, review=True,
                                       page_size=page_size, request_options=EXPAND_ANNOTATIONS)
        for task in pager:
            data = task.data or {}
            text = data.get(cfg.data_key)
            text = text if isinstance(text, str) else None
            labels, ann_id = latest_human_labels(cfg, _dump_list(getattr(task, "annotations", None)), text)
            judged = (version_labels(cfg, _dump_list(getattr(task, "predictions", None)), judge_version, text)
                      if judge_version else None)
            yield TaskRecord(int(task.id), text, tuple(labels), ann_id, None if judged is None else tuple(judged))

    def import_predictions(self, predictions: Sequence[dict[str, Any]], *, batch: int = IMPORT_BATCH) -> int:
        """Store predictions (``task``, ``result``, ``score``, ``model_version``) with the bulk endpoint."""
        stored = 0
        for start in range(0, len(predictions), batch):
            chunk = list(predictions[start : start + batch])
            try:
                self.client.projects.import_predictions(id=self.project_id, request=chunk)
            except ApiError as exc:  # a task deleted since the job read it makes Label Studio refuse the request
                kept = self._still_there(chunk) if exc.status_code == 400 else chunk
                if len(kept) == len(chunk):
                    raise
                log.warning("project %s: %d tasks were deleted in Label Studio since the job read them; their "
                            "predictions are left out", self.project_id, len(chunk) - len(kept))
                if kept:
                    self.client.projects.import_predictions(id=self.project_id, request=kept)
                chunk = kept
            stored += len(chunk)
        return stored

    def _still_there(self, predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The predictions whose task still exists (a request per task: only after a refused import)."""
        gone = set()
        for task_id in {int(p["task"]) for p in predictions}:
            try:
                self.client.tasks.get(id=task_id)
            except ApiError as exc:
                if exc.status_code != 404:
                    raise
                gone.add(task_id)
        return [p for p in predictions if int(p["task"]) not in gone]

    def model_versions(self) -> dict[str, int]:
        """Model versions of the project's predictions with their counts."""
        data = self._request("GET", f"api/projects/{self.project_id}/model-versions/")
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def delete_model_version(self, version: str, *, count: int = 0) -> None:
        """Delete every prediction of ``version`` in the project: ``count`` of them, which the request's
        timeout allows for (``MIN_DELETE_RATE``)."""
        self._request("DELETE", f"api/projects/{self.project_id}/model-versions/", json={"model_version": version},
                      request_options={"timeout": self.timeout + count / MIN_DELETE_RATE})

    def select_version(self, version: str) -> None:
        """Make ``version`` the project's model version: the labeling UI shows its predictions and the Data
        Manager's "Prediction score" column averages exactly these."""
        self.client.projects.update(id=self.project_id, model_version=version)

    def delete_other_freeal_versions(self, keep: str) -> list[str]:
        """Delete the predictions of every ``freeal-*`` version but ``keep``; returns the versions deleted.

        Slow in Label Studio 1.23, which updates the task's counter once per deleted prediction (a signal):
        30-60 a second on SQLite and on PostgreSQL here (2 shared cores), and people's annotation saves wait
        for it (benchmarks/results/ls_push_n2000*_probe.md), so it runs last.
        """
        old = {v: n for v, n in self.model_versions().items() if v.startswith(FREEAL_VERSION_PREFIX) and v != keep}
        for version, count in old.items():
            self.delete_model_version(version, count=count)
        return list(old)

    def upsert_review_view(self, title: str = REVIEW_VIEW_TITLE, version: str | None = None) -> int:
        """Create or update the "FreeAL: needs review" tab: exactly the tasks whose ``version`` prediction is
        flagged (any FreeAL version's when None) and that are still unannotated, least confident first.
        ``title`` may carry live state after the stable prefix (see :func:`review_view_title`); the tab is
        found by that prefix. Returns the view id."""
        return self._upsert_view(is_review_view_title, review_view_data(title, version))

    def upsert_audit_view(self, version: str, size: int) -> int:
        """Create or update the "FreeAL: audit" tab: the ``size`` random audit tasks of ``version`` that nobody
        has annotated yet (slm/audit.py). Returns the view id."""
        return self._upsert_view(lambda t: isinstance(t, str) and t.startswith(AUDIT_VIEW_TITLE),
                                 audit_view_data(version, size))

    def _upsert_view(self, is_mine: Callable[[Any], bool], data: dict[str, Any]) -> int:
        """Create the tab with ``data``, or update its title and filters (what it holds), keeping what people
        set on it (sort order, columns and their widths): the title follows a running job every few seconds."""
        for view in self.client.views.list(project=self.project_id):
            if is_mine((view.data or {}).get("title")):
                ours = {k: data[k] for k in ("title", "filters") if k in data}
                self.client.views.update(id=str(view.id), project=self.project_id, data={**(view.data or {}), **ours})
                return int(view.id)
        created = self.client.views.create(project=self.project_id, data=data)
        return int(created.id)

    def view_task_ids(self, view_id: int) -> list[int]:
        """Ids of the tasks a Data Manager view lists, in its order."""
        pager = self.client.tasks.list(project=self.project_id, view=view_id, fields="task_only", include="id",
                                       review=True, page_size=PAGE_SIZE)
        return [int(t.id) for t in pager]

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call an endpoint the SDK does not wrap, with the SDK's own auth and base URL."""
        wrapper = self.client._client_wrapper
        resp = wrapper.httpx_client.request(path, method=method, **kwargs)
        resp.raise_for_status()
        return resp.json() if resp.content else None


def review_view_title(flagged: int | None = None, state: str | None = None) -> str:
    """``FreeAL: needs review (412) · round 2/2, 43%``: the stable prefix, the flagged count, live state."""
    title = REVIEW_VIEW_TITLE + (f" ({flagged})" if flagged is not None else "")
    return f"{title} · {state}" if state else title


def is_review_view_title(title: Any) -> bool:
    """Whether a tab title is FreeAL's review tab (whatever live state follows the prefix)."""
    return isinstance(title, str) and (title == REVIEW_VIEW_TITLE or title.startswith(REVIEW_VIEW_TITLE + " "))


def review_view_data(title: str = REVIEW_VIEW_TITLE, version: str | None = None) -> dict[str, Any]:
    """Data Manager view payload: tasks whose prediction carries the FreeAL review marker of ``version``
    (of any version when None) and that nobody has annotated yet, least confident first.

    Only filters the Data Manager UI itself can show are used: 1.23's UI fails to load a project whose
    tab has an operator it does not know (the API accepts ``in_list``), and it rewrites a ``regex`` on
    the numeric id column to an empty value. "Prediction results contains <marker>" is a plain UI filter.
    """
    return {
        "title": title,
        "filters": {
            "conjunction": "and",
            "items": [
                {"filter": "filter:tasks:predictions_results", "operator": "contains", "type": "String",
                 "value": review_marker(version) if version else REVIEW_MARKER},
                {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            ],
        },
        "ordering": ["tasks:predictions_score"],
        "hiddenColumns": {"explore": ["tasks:annotations_results"], "labeling": []},
    }


def audit_view_data(version: str, size: int) -> dict[str, Any]:
    """Data Manager view payload: the unannotated audit tasks of ``version`` (their prediction carries the
    audit marker), in task order (the sample is random already)."""
    return {
        "title": f"{AUDIT_VIEW_TITLE} ({size})",  # Label Studio 1.23 shows about 16 characters of a tab title
        "filters": {
            "conjunction": "and",
            "items": [
                {"filter": "filter:tasks:predictions_results", "operator": "contains", "type": "String",
                 "value": audit_marker(version)},
                {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            ],
        },
        "ordering": ["tasks:id"],
        "hiddenColumns": {"explore": ["tasks:annotations_results", "tasks:predictions_results",
                                      "tasks:predictions_score"], "labeling": []},
    }


def is_prediction_copy(annotation: dict[str, Any]) -> bool:
    """Whether an annotation is an untouched copy of a prediction, as the Data Manager's "Create Annotations
    From Predictions" makes them (often only to export the labels): it names its ``parent_prediction`` and no
    ``lead_time``. Label Studio's editor sends the time a person spent with every annotation it saves, one
    started from a prediction included, so a person's accepted or corrected prediction still counts."""
    return annotation.get("parent_prediction") is not None and not annotation.get("lead_time")


def latest_human_labels(cfg: TaskConfig, annotations: list[dict[str, Any]], text: str | None = None
                        ) -> tuple[list[str], int | None]:
    """Labels (and annotation id) of the most recently updated submitted annotation naming a known label
    (for spans: any submitted annotation; one without regions says "no entity"); copies of predictions
    (:func:`is_prediction_copy`) are no person's labels."""
    usable = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")
              and not is_prediction_copy(a)]
    usable.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), int(a.get("id") or 0)))
    for ann in reversed(usable):
        labels = human_labels(cfg, ann.get("result") or [], text)
        if labels:
            return labels, int(ann["id"]) if str(ann.get("id", "")).isdigit() else None
    return [], None


def version_labels(cfg: TaskConfig, predictions: list[dict[str, Any]], version: str, text: str | None = None
                   ) -> list[str] | None:
    """Labels of the most recently updated prediction of model ``version``, parsed as an annotation's are
    (none naming a known label: ``[]``); None when the task has no prediction of that version."""
    mine = [p for p in predictions if isinstance(p, dict) and p.get("model_version") == version]
    if not mine:
        return None
    latest = max(mine, key=lambda p: (str(p.get("updated_at") or p.get("created_at") or ""), int(p.get("id") or 0)))
    return human_labels(cfg, latest.get("result") or [], text)


def project_id_from_uid(uid: Any) -> int:
    """Label Studio sends ``project`` as ``"<id>.<created-timestamp>"`` (or an int in webhooks)."""
    if isinstance(uid, bool):
        raise ValueError("project must be a project id")
    if isinstance(uid, int):
        pid = uid
    elif isinstance(uid, str) and uid.split(".", 1)[0].isdigit():
        pid = int(uid.split(".", 1)[0])
    else:
        raise ValueError(f"project {str(uid)[:40]!r} is not a Label Studio project id")
    if pid <= 0:
        raise ValueError("project id must be positive")
    return pid


def _dump_list(values: Any) -> list[dict[str, Any]]:
    out = []
    for v in values or []:
        if hasattr(v, "model_dump"):
            out.append(v.model_dump())
        elif isinstance(v, dict):
            out.append(v)
        elif isinstance(v, str):
            out.append(json.loads(v))
    return out
