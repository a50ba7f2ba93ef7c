"""Loopback load test of ``POST /predict`` answered from cached FreeAL results, under gunicorn.

Bounded in count and time, 127.0.0.1 only:

    .venv/bin/python benchmarks/load_predict.py --requests 2000 --concurrency 8 --tasks-per-request 10

It pre-fills a data dir with the stored results of one finished FreeAL run (``--cached-tasks`` tasks of
project 1), starts ``gunicorn -c gunicorn.conf.py freeal_backend.labelstudio.wsgi:app`` on a free loopback port (no
LLM is reachable and no background job is started, so every answer must come from the cache), sends
the fixed number of requests from ``--concurrency`` client threads (keep-alive connections) or stops at
``--time-cap-s``, checks every answer (one prediction per task, in order, score in [0, 1]) and writes
requests/s and p50/p90/p99 latency to ``benchmarks/results/load_predict.md``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freeal_backend.llm.embedded import stop_process  # noqa: E402
from freeal_backend.records import ItemResult  # noqa: E402
from freeal_backend.storage import Store  # noqa: E402

LABELS = ["positive", "negative"]
PROJECT = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefill(data_dir: Path, n: int, seed: int = 0) -> None:
    """The state a finished FreeAL run of project 1 leaves: labels and one stored result per task."""
    rng = random.Random(seed)
    store = Store(data_dir / f"project-{PROJECT}" / "state.sqlite")
    store.set_meta("labels", LABELS)
    results = []
    for tid in range(1, n + 1):
        p = rng.random()
        label = LABELS[int(p < 0.5)]
        conf = max(p, 1 - p)
        suspicious = conf < 0.6
        results.append(ItemResult(str(tid), label, conf, {label: conf, LABELS[label == LABELS[0]]: 1 - conf},
                                  suspicious=suspicious, reasons=["label_issue"] if suspicious else [],
                                  suggested_label=LABELS[label == LABELS[0]] if suspicious else None,
                                  llm_label=label, llm_confidence=conf, slm_label=label, slm_prob=conf, round=1))
    store.set_results(results)
    store.close()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    return (f"{cpu}, {os.cpu_count()} logical CPUs{mem}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def start_gunicorn(data_dir: Path, port: int, workers: int, threads: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), WORKERS=str(workers), THREADS=str(threads),
               FREEAL_DATA_DIR=str(data_dir), FREEAL_AUTO_JOB="0", LOG_LEVEL="WARNING",
               LLM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",  # nothing listens: the cache must answer
               LLM_MODEL="none", LLM_MAX_RETRIES="0", LLM_TIMEOUT="2", HF_HUB_OFFLINE="1")
    for var in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env.pop(var, None)
    gunicorn = Path(sys.executable).with_name("gunicorn")
    cmd = [str(gunicorn), "-c", str(ROOT / "gunicorn.conf.py"), "--access-logfile", "/dev/null",
           "freeal_backend.labelstudio.wsgi:app"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)


def wait_up(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("gunicorn did not answer /health in time")


def post(conn: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def load(port: int, *, requests: int, concurrency: int, per_request: int, cached: int, time_cap_s: float,
         seed: int) -> dict:
    """Send ``requests`` /predict calls from ``concurrency`` threads; stop early at ``time_cap_s``."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    counter = {"next": 0}
    deadline = time.monotonic() + time_cap_s

    def worker(w: int) -> None:
        rng = random.Random(seed + w)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                if counter["next"] >= requests or time.monotonic() >= deadline:
                    break
                counter["next"] += 1
            ids = rng.sample(range(1, cached + 1), per_request)
            tasks = [{"id": i, "data": {"text": f"cached review {i}"}} for i in ids]
            start = time.perf_counter()
            try:
                status, body = post(conn, "/predict", {"project": f"{PROJECT}.1700000000", "tasks": tasks})
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - start
            ok = (status == 200 and len(body.get("results", [])) == per_request
                  and all(0.0 <= float(r.get("score", -1)) <= 1.0 and r.get("result") for r in body["results"]))
            with lock:
                latencies.append(elapsed)
                if not ok:
                    errors.append(f"HTTP {status}: {str(body)[:200]}")
        conn.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"sent": len(lat) + sum(e.startswith(("OSError", "Remote", "Connection")) for e in errors),
            "answered": len(lat), "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
            "rps": len(lat) / wall if wall else 0.0, "tasks_per_s": len(lat) * per_request / wall if wall else 0.0,
            "p50_ms": percentile(lat, 50) * 1000, "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000, "max_ms": (lat[-1] * 1000) if lat else float("nan"),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"),
            "capped": counter["next"] < requests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per configuration (fixed count)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--tasks-per-request", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--cached-tasks", type=int, default=5000, help="tasks with stored FreeAL results")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker")
    parser.add_argument("--time-cap-s", type=float, default=60.0, help="stop a configuration after this long")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_predict.md"))
    args = parser.parse_args(argv)
    command = "python benchmarks/load_predict.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    host = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="freeal-load-") as tmp:
        data_dir = Path(tmp) / "data"
        prefill(data_dir, args.cached_tasks, args.seed)
        port = free_port()
        proc = start_gunicorn(data_dir, port, args.workers, args.threads, Path(tmp) / "gunicorn.log")
        try:
            wait_up(port, proc, 120)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            schema = (ROOT / "label_config" / "sentiment.xml").read_text(encoding="utf-8")
            status, body = post(conn, "/setup", {"project": f"{PROJECT}.1700000000", "schema": schema})
            if status != 200:
                raise RuntimeError(f"/setup failed: {status} {body}")
            conn.close()
            for per in args.tasks_per_request:
                load(port, requests=args.warmup, concurrency=args.concurrency, per_request=per,
                     cached=args.cached_tasks, time_cap_s=args.time_cap_s, seed=args.seed + 999)
                res = load(port, requests=args.requests, concurrency=args.concurrency, per_request=per,
                           cached=args.cached_tasks, time_cap_s=args.time_cap_s, seed=args.seed)
                res["per_request"] = per
                rows.append(res)
                print(json.dumps(res), flush=True)
        finally:
            stop_process(proc, timeout=20)
            log_tail = (Path(tmp) / "gunicorn.log").read_text(errors="replace")[-1500:]
    if any(r["errors"] for r in rows):
        print("gunicorn log tail:\n" + log_tail, file=sys.stderr)
    lines = [
        "# `/predict` load test (cached results, loopback)",
        "",
        f"- command: `{command}`",
        f"- machine: {host}",
        f"- server: gunicorn (`gunicorn.conf.py`), {args.workers} worker(s) x {args.threads} threads, on 127.0.0.1; "
        f"project 1 pre-filled with {args.cached_tasks} stored FreeAL results; no LLM reachable and no background "
        "job, so every prediction comes from the stored results",
        f"- client: {args.concurrency} threads with keep-alive connections on the same machine, "
        f"{args.requests} requests per row after {args.warmup} warm-up requests, time cap {args.time_cap_s:.0f} s "
        "per row; every answer checked (one prediction per task, score in [0, 1])",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| tasks/request | requests | errors | wall s | requests/s | tasks/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['per_request']} | {r['answered']}{' (capped)' if r['capped'] else ''} | {r['errors']} | "
                     f"{r['wall_s']:.1f} | {r['rps']:.1f} | {r['tasks_per_s']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |")
    lines += ["", "Client and server share the machine's cores, so these are lower bounds for a dedicated host."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
