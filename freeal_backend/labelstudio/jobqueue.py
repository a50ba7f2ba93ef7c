"""The Redis job queue (``FREEAL_QUEUE=redis://…``): project jobs run in ``freeal worker`` processes.

Backend replicas enqueue; workers (RQ ``SimpleWorker`` processes, so the models stay loaded between jobs)
run them. Per project, under the prefix ``freeal:``:

    req:<id>     request counter: every trigger increments it
    done:<id>    the request count the last finished run served
    lock:<id>    held by the worker running the project (redis-py Lock, TTL ``FREEAL_QUEUE_LOCK_TTL``, renewed)
    queued:<id>  an RQ job for the project waits in the queue (dedupes triggers; expires after QUEUED_TTL_S)
    projects     every project ever triggered (the orphan sweep scans it)

A run serves every request counted when it starts. When it ends, one Lua script either records that
count as done and releases the lock (no newer request) or tells the run to go once more: a trigger
while a job runs makes it run again, never a second run at the same time (the RQ job such a trigger
enqueues finds the lock held and ends at once). A worker killed mid-job stops renewing its
lock; once the lock expires, the sweep every worker runs (at start and every TTL/2 seconds) finds
``req > done`` with no lock and no queued job and enqueues the project again. The new run resumes from
the run state in the shared ``FREEAL_DATA_DIR`` (finished stages, stored LLM answers, the push journal).
A run that fails to renew its lock (stalled past the TTL) is fenced: it stops at its next write, before
it pushes anything, and leaves the job to the run that took it over.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

from redis import Redis
from redis.exceptions import LockError
from redis.lock import Lock
from rq import Queue, SimpleWorker
from rq.job import Job

from freeal_backend.config import Settings
from freeal_backend.labelstudio.job_store import JobStore
from freeal_backend.labelstudio.manager import Claim, JobManager, Runner, ThreadRunner, every
from freeal_backend.labelstudio.runs import RunRegistry

log = logging.getLogger(__name__)

QUEUE_NAME = "freeal"
PREFIX = "freeal:"
QUEUED_TTL_S = 3600  # a queued marker left by a worker killed between dequeue and start blocks no longer

# Finish a run atomically: when no request came after the one served (or `force`), record it as done and
# release the lock (if still ours); return -1. Otherwise return the newest request count: run again.
SETTLE = """
local req = tonumber(redis.call('get', KEYS[2]) or '0')
if req == tonumber(ARGV[2]) or ARGV[3] == '1' then
  redis.call('set', KEYS[3], req)
  if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
  return -1
end
return req
"""


def key(kind: str, project_id: int | None = None) -> str:
    return f"{PREFIX}{kind}" if project_id is None else f"{PREFIX}{kind}:{project_id}"


class Coordinator:
    """Per-project requests, locks and the orphan sweep on one Redis."""

    def __init__(self, redis: Redis, *, lock_ttl: float) -> None:
        self.redis = redis
        self.lock_ttl = lock_ttl
        self.settle_script = redis.register_script(SETTLE)

    def request(self, project_id: int) -> bool:
        """Count a request; True when the caller must enqueue a job (none is queued)."""
        with self.redis.pipeline() as pipe:
            pipe.incr(key("req", project_id)).sadd(key("projects"), project_id)
            pipe.set(key("queued", project_id), 1, nx=True, ex=QUEUED_TTL_S)
            return bool(pipe.execute()[-1])

    def lease(self, project_id: int) -> Lease | None:
        """Take the project's lock, or None when another worker holds it (that run sees the request)."""
        self.redis.delete(key("queued", project_id))  # before the lock: a later trigger enqueues anew
        lock = Lock(self.redis, key("lock", project_id), timeout=self.lock_ttl, thread_local=False)
        return Lease(self, project_id, lock) if lock.acquire(blocking=False) else None

    def orphans(self) -> list[int]:
        """Projects with an unserved request, no running job and no queued job (their worker died)."""
        pids = sorted(int(p) for p in self.redis.smembers(key("projects")))
        with self.redis.pipeline() as pipe:
            for pid in pids:
                pipe.get(key("req", pid)).get(key("done", pid))
                pipe.exists(key("lock", pid), key("queued", pid))
            flat = pipe.execute()
        rows = [flat[i : i + 3] for i in range(0, len(flat), 3)]
        return [pid for pid, (req, done, busy) in zip(pids, rows) if int(req or 0) > int(done or 0) and not busy]


class Lease:
    """The lock on one project's job, held while its runs go on."""

    def __init__(self, coordinator: Coordinator, project_id: int, lock: Lock) -> None:
        self.coordinator = coordinator
        self.project_id = project_id
        self.lock = lock
        self.served = int(coordinator.redis.get(key("done", project_id)) or 0)

    def settle(self, *, force: bool = False) -> bool:
        """After a run: release the lock and return False, or return True to run once more (a newer
        request came). ``force`` releases in any case (a failed run is not repeated by itself)."""
        keys = [self.lock.name, key("req", self.project_id), key("done", self.project_id)]
        newest = int(self.coordinator.settle_script(keys=keys, args=[self.lock.local.token, self.served, int(force)]))
        if newest < 0:
            return False
        self.served = newest
        return True

    def renew(self) -> bool:
        """Extend the lock; False when it is no longer ours (it expired: another worker may hold it)."""
        try:
            self.lock.extend(self.coordinator.lock_ttl, replace_ttl=True)
            return True
        except LockError:
            log.error("project %s: lost the job lock (stalled past FREEAL_QUEUE_LOCK_TTL?); this run stops at its "
                      "next write and leaves the job to another worker", self.project_id)
            return False


class QueueRunner:
    """Runs project jobs through RQ: :meth:`submit` enqueues; ``freeal worker`` processes run them."""

    def __init__(self, settings: Settings) -> None:
        assert settings.queue_url, "QueueRunner needs FREEAL_QUEUE"
        self.redis = Redis.from_url(settings.queue_url)
        self.coordinator = Coordinator(self.redis, lock_ttl=settings.queue_lock_ttl)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)

    def submit(self, manager: JobManager, project_id: int) -> bool:
        if not self.coordinator.request(project_id):
            return False  # a queued job will serve it, or the running one runs once more
        manager.store.mark_queued(project_id)
        self.enqueue(project_id)
        return True

    def start(self, manager: JobManager) -> None:
        """Nothing to do: the workers' sweep resumes the jobs of dead workers."""

    def enqueue(self, project_id: int) -> Job:
        # no RQ timeout: liveness is the renewed lock; results are in Label Studio and the job store
        return self.queue.enqueue(run_project, project_id, job_timeout=-1, result_ttl=600, failure_ttl=7 * 86400,
                                  description=f"freeal project {project_id}")

    def sweep(self) -> list[int]:
        """Enqueue the orphaned projects again (their queued marker dedupes with other sweepers)."""
        found = [pid for pid in self.coordinator.orphans()
                 if self.redis.set(key("queued", pid), 1, nx=True, ex=QUEUED_TTL_S)]
        for pid in found:
            log.warning("project %s: its job lost its worker; enqueued again to resume", pid)
            self.enqueue(pid)
        return found


_worker_manager: JobManager | None = None


def worker_manager() -> JobManager:
    """This worker process's job manager (models load once per process, on the first job)."""
    global _worker_manager
    if _worker_manager is None:
        settings = Settings.from_env()
        store = JobStore(settings.data_dir / "backend.sqlite")
        _worker_manager = JobManager(settings, store, RunRegistry(settings), QueueRunner(settings))
    return _worker_manager


def run_project(project_id: int) -> str:
    """The RQ job: run the project's FreeAL job until no request is left unserved."""
    manager = worker_manager()
    runner = manager.runner
    assert isinstance(runner, QueueRunner)
    lease = runner.coordinator.lease(project_id)
    if lease is None:
        return "another worker runs this project; it will run once more"
    owner = manager.new_owner()
    store = manager.store
    claim = Claim(store, project_id, owner)

    def finish(state: str, message: str) -> bool:
        if lease.settle(force=state != "done"):
            return True
        store.finish(project_id, owner, state, message)
        return False

    def beat() -> None:
        if not lease.renew():
            claim.revoke()
        store.update(project_id, owner)

    if not lease.settle():  # anything left to serve? (released when not)
        return "nothing to do"
    store.take(project_id, owner)
    with every(lease.coordinator.lock_ttl / 3, beat):
        manager.run_until_settled(claim, finish)
    return (store.status(project_id) or {}).get("message") or ""


class FreeALWorker(SimpleWorker):
    """RQ's non-forking worker (models stay loaded between jobs), plus what its forking sibling has:
    heartbeats while a job runs (else RQ deems a job longer than the worker TTL abandoned), and the
    orphan sweep as a maintenance task."""

    def __init__(self, *args: Any, runner: QueueRunner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.job_monitoring_interval + 60

    def execute_job(self, job: Job, queue: Queue) -> None:
        with every(self.job_monitoring_interval, lambda: self.maintain_heartbeats(job)):
            super().execute_job(job, queue)

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        self.runner.sweep()


def work(settings: Settings, *, burst: bool = False, name: str | None = None) -> bool:
    """Run one worker process on FREEAL_QUEUE until stopped (SIGTERM: after the current job)."""
    runner = QueueRunner(settings)
    sweep_s = max(1, int(settings.queue_lock_ttl // 2))
    worker = FreeALWorker([runner.queue], connection=runner.redis, runner=runner,
                          name=name or f"freeal-{uuid.uuid4().hex[:8]}", maintenance_interval=sweep_s,
                          worker_ttl=sweep_s + 15, job_monitoring_interval=max(1, min(30, sweep_s)))
    return worker.work(burst=burst, logging_level=logging.getLevelName(logging.getLogger().level))


def runner_for(settings: Settings) -> Runner:
    """The Redis queue when ``FREEAL_QUEUE`` is set, else a thread of this process."""
    return QueueRunner(settings) if settings.queue_url else ThreadRunner(max_jobs=settings.max_jobs)
