"""How a push works: one round's results become the project's only FreeAL version in Label Studio.

The predictions go in batches, each journalled in the job store before and after its request, so a push
cut short by a crash resumes with no duplicate and no lost prediction; the new version is then selected
and the review tab switched to it, and only then are the previous versions deleted. That deletion cannot
fail the push: Label Studio deletes a prediction at a time, so each request's timeout grows with the
number it deletes, and a version left undeleted (Label Studio down or slower still) is deleted by the next
push. A version name stands for one set of predictions: :func:`version_for` names new predictions for the
same data and settings apart, and :func:`predictions_digest` tells whether a push would change anything.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from freeal_backend.labelstudio.client import IMPORT_BATCH, ProjectClient, review_view_title
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.label_config import TaskConfig
from freeal_backend.labelstudio.label_results import LLM, render_task_prediction
from freeal_backend.records import ItemResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushJournal:
    """One project's push journal in the job store."""

    store: JobStore
    project_id: int

    def resume_point(self, client: ProjectClient, version: str) -> set[int]:
        """Task ids whose ``version`` prediction is in Label Studio exactly once; the rest must be sent.

        Batches go one at a time and each is journalled as sent before its request and confirmed after,
        so at most one batch is in doubt after a crash; Label Studio's count for the version tells
        whether it landed (Label Studio stores a request of up to 500 predictions in one transaction).
        A count that fits neither case (a bigger batch stored in part; predictions deleted meanwhile)
        makes the whole version go again: deleted, then pushed afresh.
        """
        confirmed, sent = self.store.pushed(self.project_id, version)
        in_ls = client.model_versions().get(version, 0)
        if confirmed or sent:
            if in_ls == len(confirmed):
                self.store.forget_push(self.project_id, version=version, unconfirmed_only=True)
                return confirmed
            if in_ls == len(confirmed) + len(sent):
                self.stored(version, sorted(sent))
                return confirmed | sent
            log.warning("project %s: Label Studio holds %d predictions of %s, the journal %d (+%d in doubt); "
                        "pushing the version afresh", self.project_id, in_ls, version, len(confirmed), len(sent))
        self.store.forget_push(self.project_id, version=version)
        if in_ls:
            client.delete_model_version(version, count=in_ls)  # same version, no journal: no duplicates
        return set()

    def sent(self, version: str, task_ids: Sequence[int]) -> None:
        self.store.record_push(self.project_id, version, task_ids, confirmed=False)

    def stored(self, version: str, task_ids: Sequence[int]) -> None:
        self.store.record_push(self.project_id, version, task_ids, confirmed=True)

    def keep_only(self, version: str) -> None:
        """Forget the other versions (Label Studio no longer has them)."""
        self.store.forget_push(self.project_id, keep=version)


def push_results(client: ProjectClient, cfg: TaskConfig, results: list[ItemResult], version: str,
                 journal: PushJournal | None = None, *, texts: Mapping[str, str] | None = None,
                 batch: int = IMPORT_BATCH, on_progress: Callable[[int], None] | None = None,
                 on_cleanup: Callable[[], None] | None = None, delete_old: bool = True, who: str = LLM) -> int:
    """Make ``version`` the project's only FreeAL predictions, refresh the review view; returns #flagged.

    The new version is selected and the review view switched to it before the previous versions are
    deleted, which Label Studio does one prediction at a time (tens a second).

    Predictions go in batches of ``batch``. With a ``journal``, a push interrupted by a crash resumes
    where it stopped, with no duplicate and no lost prediction; without one, the version is pushed whole.
    ``texts`` (task id -> text) are needed for span tasks: every region's offsets are checked against them.
    ``on_cleanup`` is called once the new version is in and shown, before the old ones are deleted;
    ``delete_old=False`` leaves them in Label Studio (not selected, so neither shown nor in the review tab).
    ``who`` gave the labels judged (the review notes name it).
    """
    preds = render_predictions(cfg, results, texts, version, who)
    if journal is not None:
        done = journal.resume_point(client, version)
    else:
        done = set()
        count = client.model_versions().get(version, 0)
        if count:
            client.delete_model_version(version, count=count)
    todo = [p for p in preds if p["task"] not in done]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        ids = [p["task"] for p in chunk]
        if journal is not None:
            journal.sent(version, ids)
        client.import_predictions(chunk, batch=batch)
        if journal is not None:
            journal.stored(version, ids)
        if on_progress is not None:
            on_progress(len(done) + start + len(chunk))
    client.select_version(version)
    flagged = len(flagged_ids(results))
    client.upsert_review_view(review_view_title(flagged), version)  # right now, whatever is deleted below
    if on_cleanup is not None:
        on_cleanup()
    if delete_old:
        try:
            client.delete_other_freeal_versions(keep=version)
        except httpx.HTTPError as exc:  # the new version is in and shown; the next push deletes what is left
            log.warning("project %s: previous FreeAL versions not deleted yet (%s: %s); the next push deletes "
                        "them", client.project_id, type(exc).__name__, exc)
    if journal is not None:
        journal.keep_only(version)
    return flagged


def flagged_ids(results: list[ItemResult]) -> list[int]:
    """Task ids FreeAL flags for review (never the human-labelled ones)."""
    return [int(r.item_id) for r in results if r.suspicious and r.source != "human"]



def render_predictions(cfg: TaskConfig, results: list[ItemResult], texts: Mapping[str, str] | None,
                       version: str, who: str = LLM) -> list[dict[str, Any]]:
    """The Label Studio predictions (with their ``task`` id) of ``results`` as ``version``."""
    if texts is None and cfg.task_type != "classification":
        raise ValueError("span predictions need the task texts to check their offsets")
    texts = texts or {}
    return [{"task": int(r.item_id), **render_task_prediction(cfg, r, texts.get(r.item_id, ""), version, who)}
            for r in results]


def predictions_digest(cfg: TaskConfig, results: list[ItemResult], texts: Mapping[str, str] | None,
                       who: str = LLM) -> str:
    """A digest of the predictions a push of ``results`` would send, whatever the version is called."""
    preds = render_predictions(cfg, results, texts, "", who)
    return hashlib.sha256(json.dumps(preds, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def version_for(base: str, digest: str, pushed: str | None) -> str:
    """The name for predictions with ``digest`` of run version ``base`` (``freeal-r<k>-<hash of data and
    settings>``): ``base``, unless the last push (``pushed``) used that name for other predictions (a job
    that retried failed LLM requests), then ``base-<6 hex of the predictions>``."""
    return base if base != pushed else f"{base}-{digest[:6]}"
