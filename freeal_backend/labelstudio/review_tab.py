"""The review tab's title in Label Studio, kept on the job's live state and left with its end state."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from freeal_backend.labelstudio.client import INITIAL_VERSION, ProjectClient, review_view_title
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.slm.audit import AUDIT_MIN
from freeal_backend.status import job_summary, live_title_state

log = logging.getLogger(__name__)


class ReviewTab:
    """Keeps the review tab's title on the job's live state (``… (412) · round 2/2, 43%``), throttled."""

    def __init__(self, client: ProjectClient, store: JobStore, project_id: int, owner: str, every_s: float) -> None:
        self.client, self.store, self.project_id, self.owner, self.every_s = client, store, project_id, owner, every_s
        self._last = 0.0
        self._lock = threading.Lock()

    def show(self, *, force: bool = False, final: bool = False, note: str | None = None) -> None:
        """Retitle the tab from the job row (at most every ``every_s`` unless ``force``); ``final`` replaces the
        live part with ``note`` (the job ended well). Failures are logged: a title never fails the job."""
        if not force and time.monotonic() - self._last < self.every_s:
            return
        if not self._lock.acquire(blocking=force):
            return  # another thread is retitling right now
        try:
            self._last = time.monotonic()
            row = self.store.status(self.project_id) or {}
            job = job_summary(row)
            live = note if final else live_title_state(job)
            version = row.get("model_version") or INITIAL_VERSION
            view_id = self.client.upsert_review_view(review_view_title(job["flagged"], live), version)
            if self.owner:
                self.store.update(self.project_id, self.owner, view_id=view_id)
        except Exception as exc:  # noqa: BLE001 - Label Studio unreachable for a moment: the next call retries
            log.warning("project %s: review tab title not updated: %s", self.project_id, exc)
        finally:
            self._lock.release()


def health_note(health: dict[str, Any] | None) -> str | None:
    """The run health in a few words for the review tab's title ("labels look near chance", ...; "audit of
    50" when a random audit set the figure)."""
    if not health:
        return None
    if health["verdict"] == "near_chance":
        return "LLM labels look near chance: use a stronger LLM"
    audited = int((health.get("audit") or {}).get("audited") or 0)
    notes = ["poor"] if health["verdict"] == "poor" else []
    notes += [f"audit of {audited}"] if audited >= AUDIT_MIN else []
    return f"about {float(health['estimated_accuracy']):.0%} of LLM labels right" + (
        f" ({', '.join(notes)})" if notes else "")

