"""Helpers shared by the benchmark scripts: shared data, machine description, peak memory, result files."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import random
import resource
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("FREEAL_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"

from freeal_backend.config import ENV_NAMES  # noqa: E402  (needs the sys.path line above)
from freeal_backend.metrics import markdown_table  # noqa: E402

# benchmarks/quality.py's record of a finished loop run, in its run folder: its config (data set, seed, ...)
# and numbers; refinement_why.py and refinement_order.py read it
LOOP_RECORD = "loop_result.json"

# one line per data set telling the LLM what the labels mean
TASKS = {
    "mr": "Classify the sentiment of the movie review sentence.",
    "sst2": "Classify the sentiment of the movie review sentence.",
    "subj": "Is the sentence a subjective opinion or an objective statement of fact?",
    "trec": "Classify what kind of answer the question asks for.",
}

# environment variables that change a benchmark's result (printed with every result)
# every setting's variable (a result must say how it was made; FREEAL_SEED was once left out), but the data
# folder and the queue's URL (where, not how)
SETTING_VARS = [v for v in ENV_NAMES.values() if v not in ("FREEAL_DATA_DIR", "FREEAL_QUEUE")] + [
    "LS_FAST_PREDICTION_IMPORT"]


def loop_env() -> dict[str, str]:
    """The setting variables set now, as a loop run's record keeps them (its config's ``env``; the endpoint
    and model are kept apart in the config)."""
    return {v: os.environ[v] for v in SETTING_VARS if os.environ.get(v) and v not in ("LLM_BASE_URL", "LLM_MODEL")}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise SystemExit(f"error: {path} not found (shared data sets are read in place from {DATA}; "
                         "set FREEAL_SHARED_DATA to their folder)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def subsample(rows: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded random subsample of ``n`` rows (all rows, in file order, when n is 0/None or too big).

    Each row keeps its file row number as ``id`` so runs on different subsamples stay comparable."""
    rows = [dict(r, id=str(i)) for i, r in enumerate(rows)]
    if not n or n >= len(rows):
        return rows
    picked = random.Random(seed).sample(range(len(rows)), n)
    return [rows[i] for i in sorted(picked)]


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mib(pid: int | str, field: str) -> float:
    """One memory field (``VmRSS``, ``VmHWM``) of /proc/<pid>/status in MiB; NaN when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mib(pid: int | None = None) -> float:
    """Current resident memory of a process (this one by default) from /proc."""
    return _proc_status_mib(pid or "self", "VmRSS")


def peak_rss_of(pid: int) -> float:
    """Peak resident memory (VmHWM) of another process, from /proc."""
    return _proc_status_mib(pid, "VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM of this process (Linux >= 4.0: write 5 to clear_refs) so the next peak is per phase."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def current_peak_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), or since start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def machine(load_start: str) -> str:
    """A short Markdown description of the machine and software (with the load average at start/end)."""
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    lines = [
        f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {os.cpu_count()} CPU cores ({cpu}), {mem_total_gib():.1f} GiB RAM, {platform.platform()}",
        f"- Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'})",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {loadavg()}. The machine is shared: "
        "a load above the core count means other jobs ran at the same time and wall times are inflated.",
    ]
    settings = {v: os.environ[v] for v in SETTING_VARS if os.environ.get(v)}
    lines.append("- settings from the environment: " + (", ".join(f"{k}={v}" for k, v in settings.items())
                                                       if settings else "none (defaults)"))
    return "\n".join(lines)


def command_line() -> str:
    """The exact command that produced a result, with the environment variables that matter."""
    env = " ".join(f"{v}={shlex.quote(os.environ[v])}" for v in SETTING_VARS if os.environ.get(v))
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", script, *sys.argv[1:]])
    return (env + " " + cmd).strip()


def beside(stem: Path, ext: str) -> Path:
    """``<stem><ext>``: an output file named by its stem. Not ``with_suffix``, which cuts a stem holding a dot
    (``loop_sst2_n300_1.5b`` became ``loop_sst2_n300_1.md``)."""
    return stem.with_name(stem.name + ext)


def write_result(path: Path, title: str, body: str, load_start: str) -> None:
    """Write one result file (atomically) with the machine description and the exact command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\nCommand (from the repository root):\n\n```\n{command_line()}\n```\n\n"
            f"{machine(load_start)}\n\n{body.rstrip()}\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(out_dir: str | Path, stem: str, title: str, body: str, data: Any, load_start: str) -> None:
    """``<out_dir>/<stem>.md`` (:func:`write_result`) and the same numbers as ``<stem>.json``; prints the body."""
    out = Path(out_dir) / f"{stem}.md"
    write_result(out, title, body, load_start)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(body)


def pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.2f}"


def mean_sd(values: Sequence[float], percent: bool) -> str:
    """A table cell over seeds: ``mean ± sd`` (the single value for one seed), in % when ``percent``."""
    import numpy as np

    arr = np.array(values, dtype=float) * (100 if percent else 1)
    digits = 2 if percent or np.nanmean(arr) > 10 else 3
    return f"{np.nanmean(arr):.{digits}f} ± {np.nanstd(arr):.{digits}f}" if len(arr) > 1 else f"{arr[0]:.{digits}f}"


def cell(records: Sequence[Mapping[str, Any]], path: Sequence[str], percent: bool) -> str:
    """mean ± sd over ``records`` of the number at ``path`` (a dash when none has it); counts (whole numbers,
    not percent) as ``12`` for one record, ``12.3 ± 0.5`` for more."""
    import numpy as np

    vals = []
    for r in records:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, Mapping) else None
        vals.append(math.nan if v is None else float(v))
    if all(math.isnan(v) for v in vals):
        return "—"
    if not percent and all(v.is_integer() for v in vals):
        return f"{vals[0]:.0f}" if len(vals) == 1 else f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"
    return mean_sd(vals, percent)


def fmt_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The core's Markdown table with two decimals."""
    return markdown_table(header, rows, digits=2)


def averaged_vote(labels: Sequence[str], given: Sequence[str | None], probs: Any) -> Any:
    """Per text, the class the LLM's per-class probabilities averaged over rounds favour (``probs`` from
    ``FreeALRun._current``), else the label ``given`` (a row of zeros: no answer with probabilities)."""
    import numpy as np

    return np.array([labels[int(row.argmax())] if row.sum() > 0 else g for row, g in zip(probs, given)], dtype=object)


@contextmanager
def finished_run(run_dir: Path, task_types: tuple[str, ...] = ("classification",), **settings: Any
                 ) -> Iterator[tuple[Any, list[Any], int]]:
    """A finished run whose items carry gold, opened from its state to be read (no training, no LLM call):
    the run (``FreeALRun``, or ``SpanRun`` for spans, as its state records), its items and the refinement
    rounds it finished. ``task_types``: the kinds of run the caller reads; ``settings`` override the
    environment's (e.g. the run's seed)."""
    from freeal_backend.config import Settings
    from freeal_backend.loop_spans import run_type
    from freeal_backend.storage import Store

    store = Store(run_dir / "state.sqlite")
    labels_set, rounds = store.get_meta("labels"), int(store.get_meta("rounds_done") or 0)
    kind = store.get_meta("task_type") or "classification"
    store.close()
    if not labels_set:
        raise SystemExit(f"error: {run_dir} holds no finished run")
    if kind not in task_types:
        raise SystemExit(f"error: {run_dir} holds a {kind} run; this script reads {' or '.join(task_types)} runs")
    with run_type(kind)(Settings.from_env(data_dir=run_dir.parent.parent, **settings), list(labels_set),
                        run_dir) as run:
        items = run.store.items()
        if any(it.gold is None for it in items):
            raise SystemExit(f"error: {run_dir} has texts without gold")
        yield run, items, rounds


def run_evidence(run_dir: Path) -> dict[str, Any]:
    """What the verdict of a finished classification run judged, from its state (no training, no LLM call):
    the out-of-sample SLM probabilities of its last SLM round, the labels judged (index, -1: none), gold
    (index), people's labels (bool), the LLM's per-class probabilities averaged over rounds, and whether that
    LLM's confidence is known to be calibrated (the run's LLM as its state records it, else LLM_MODEL)."""
    import numpy as np

    with finished_run(run_dir) as (run, items, rounds):
        slm = run.store.slm(rounds + 1)
        given, averaged = run._current(items, rounds)
        calibrated = run.llm_calibrated
    return {"probs": np.array([slm[it.item_id]["probs"] for it in items]),
            "labels": np.array([run.labels.index(g) if g is not None else -1 for g in given]),
            "gold": np.array([run.labels.index(str(it.gold)) for it in items]),
            "human": np.array([bool(it.human_label) for it in items]), "llm_probs": averaged,
            "llm_calibrated": calibrated}
