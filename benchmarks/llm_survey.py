"""Which embedded LLM can label? Zero-shot and few-shot accuracy, answer rate, confidence calibration and
seconds per text of each embedded model (llm/embedded.py) on seeded test samples of the shared data sets.

    .venv/bin/python benchmarks/llm_survey.py                              # every embedded model, sst2/trec/subj, 200 texts
    .venv/bin/python benchmarks/llm_survey.py --models qwen2.5-coder-0.5b-instruct --datasets sst2 --n 50

Per model, data set and condition (``zero-shot``: no demonstrations; ``k-shot``: the k gold-labelled
training texts nearest to the text, by the packaged encoder's embeddings, out of a seeded pool of
``--pool`` per class: what FreeAL's refinement rounds give the LLM) it reports accuracy over all texts
(an unanswered text counts as wrong), the share answered, ECE and AUROC of the LLM's logprob confidence
for wrong answers, and CPU and wall seconds per text with one request at a time on ``--llm-threads``
threads.

Each finished cell is written to the JSON at once and every answer to a cache (``--cache-dir``); a re-run
skips finished cells (``--fresh`` redoes them) and asks nothing already answered, so the survey can span
sessions. Timings of a cell are only meaningful when its load average
(recorded per cell) stayed near or below the core count.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, TASKS, beside, fmt_table, loadavg, read_jsonl, subsample, write_result  # noqa: E402

from freeal_backend.llm.cache import ResponseCache  # noqa: E402
from freeal_backend.llm.client import LazyRequests, LLMClient, label_parser  # noqa: E402
from freeal_backend.llm.embedded import EMBEDDED_MODELS, EmbeddedLLMServer  # noqa: E402
from freeal_backend.llm.prompts import label_messages  # noqa: E402
from freeal_backend.metrics import expected_calibration_error  # noqa: E402
from freeal_backend.slm.encoder import Encoder  # noqa: E402
from freeal_backend.slm.selection import nearest_demos  # noqa: E402


def demo_pool(train: list[dict[str, Any]], labels: list[str], per_class: int, seed: int) -> list[dict[str, Any]]:
    """A seeded pool of ``per_class`` gold-labelled training rows per class."""
    rng = random.Random(seed)
    pool = []
    for label in labels:
        rows = [r for r in train if r["label"] == label]
        pool += rng.sample(rows, min(per_class, len(rows)))
    return pool


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` ranking the ``positive`` rows first (NaN with one class)."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc: unlike wall time, it does not grow
    when other jobs share the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cell(client: LLMClient, server_pid: int, rows: list[dict[str, Any]], labels: list[str], task: str,
             demos: list[list[tuple[str, str]]] | None) -> dict[str, Any]:
    """Label ``rows`` (with ``demos[i]`` for row i when given) and score the answers against gold."""
    parse = label_parser(labels)
    before = client.stats.as_dict()
    cpu = cpu_seconds(server_pid)
    start = time.perf_counter()
    load = loadavg()
    answers = client.answer_many(LazyRequests(len(rows), lambda i: (
        label_messages(rows[i]["text"], labels, demos[i] if demos else (), task), parse)), check_unparsed=False)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(server_pid) - cpu
    after = client.stats.as_dict()
    gold = np.array([r["label"] for r in rows])
    given = np.array([a.label if a and a.label else "" for a in answers])
    answered = given != ""
    right = given == gold
    conf = np.array([a.confidence if a and a.confidence is not None else np.nan for a in answers])
    has_conf = answered & ~np.isnan(conf)
    calls = after["calls"] - before["calls"]
    return {
        "n": len(rows), "accuracy": float(right.mean()), "answered": float(answered.mean()),
        "accuracy_answered": float(right[answered].mean()) if answered.any() else float("nan"),
        "ece": expected_calibration_error(conf[has_conf], right[has_conf]) if has_conf.any() else float("nan"),
        "auroc_wrong": auroc(-conf[has_conf], ~right[has_conf]) if has_conf.any() else float("nan"),
        "predicted": {lab: int((given == lab).sum()) for lab in labels},
        "calls": calls, "cache_hits": after["cache_hits"] - before["cache_hits"],
        "prompt_tokens": after["prompt_tokens"] - before["prompt_tokens"],
        "seconds": round(wall, 1), "seconds_per_text": round(wall / calls, 3) if calls else None,  # fresh calls
        "cpu_seconds_per_text": round(cpu / calls, 3) if calls else None,
        "load_start": load, "load_end": loadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(EMBEDDED_MODELS), help="comma-separated embedded model names")
    ap.add_argument("--datasets", default="sst2,trec,subj", help="comma-separated folders of ../shared/data")
    ap.add_argument("--n", type=int, default=200, help="test texts per data set (seeded sample)")
    ap.add_argument("--shots", type=int, default=4, help="demonstrations per prompt in the k-shot condition")
    ap.add_argument("--pool", type=int, default=20, help="gold demonstration pool per class (k-shot)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llm-threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="redo cells already in the JSON")
    ap.add_argument("--cache-dir", default="freeal_data/llm_survey",
                    help="LLM answer cache (a re-run asks nothing already answered; delete it for fresh timings)")
    ap.add_argument("--out", default=str(RESULTS / "llm_survey"), help="result path without suffix")
    args = ap.parse_args(argv)
    out = Path(args.out)
    json_path = beside(out, ".json")
    done: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    cells = done.setdefault("cells", {})
    done["args"] = {k: v for k, v in vars(args).items() if k not in ("fresh", "out")}
    load_start = loadavg()
    encoder = Encoder(None)
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="freeal-survey-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            todo = [(d, c) for d in args.datasets.split(",") for c in ("zero-shot", f"{args.shots}-shot")
                    if args.fresh or f"{model}|{d}|{c}" not in cells]
            if not todo:
                continue
            with EmbeddedLLMServer(model, threads=args.llm_threads, log_path=Path(tmp) / "server.log") as server:
                # answers are cached (a killed survey resumes mid-cell); the timings count fresh calls only
                client = LLMClient(server.base_url, model, ResponseCache(cache_dir / f"{model}.sqlite"),
                                   concurrency=1, embedded=True)
                client.answer(label_messages("warm-up", ["a", "b"]), label_parser(["a", "b"]))
                for name, cond in todo:
                    train, test = read_jsonl(DATA / name / "train.jsonl"), read_jsonl(DATA / name / "test.jsonl")
                    labels = sorted({r["label"] for r in train})
                    rows = subsample(test, args.n, args.seed)
                    demos = None
                    if cond != "zero-shot":
                        pool = demo_pool(train, labels, args.pool, args.seed)
                        pool_emb = encoder.embed([r["text"] for r in pool])
                        emb = encoder.embed([r["text"] for r in rows])
                        demos = [[(pool[j]["text"], pool[j]["label"]) for j in nearest_demos(e, pool_emb, args.shots)]
                                 for e in emb]
                    cell = run_cell(client, server.pid, rows, labels, TASKS[name], demos)
                    cells[f"{model}|{name}|{cond}"] = dict(cell, llm_threads=args.llm_threads)
                    print(f"{model} {name} {cond}: accuracy {cell['accuracy']:.3f}, answered {cell['answered']:.3f},"
                          f" {cell['seconds_per_text']} s/text, {cell['cpu_seconds_per_text']} CPU-s/text (load {cell['load_start']} -> {cell['load_end']})",
                          flush=True)
                    json_path.parent.mkdir(parents=True, exist_ok=True)
                    json_path.write_text(json.dumps(done, indent=1))
    rows_md = []
    for key, c in sorted(cells.items()):
        model, name, cond = key.split("|")
        rows_md.append([model, name, cond, c["n"], 100 * c["accuracy"], 100 * c["answered"],
                        100 * c["accuracy_answered"], c["ece"], c["auroc_wrong"], c["cpu_seconds_per_text"],
                        c["seconds_per_text"], c.get("llm_threads"),
                        c["load_start"].split(" / ")[0] + " → " + c["load_end"].split(" / ")[0]])
    table = fmt_table(["model", "data", "condition", "texts", "accuracy %", "answered %", "acc. of answered %",
                       "ECE (logprob conf.)", "AUROC wrong", "CPU-s/text", "wall s/text",
                       "threads", "load 1-min"], rows_md)
    body = (f"Test texts: a seeded sample (seed {args.seed}) of each test split; k-shot demonstrations: the "
            f"{args.shots} nearest of {args.pool} gold-labelled training texts per class (packaged MiniLM "
            f"embeddings). One request at a time, temperature 0, llama.cpp threads as the column says. "
            "Accuracy counts unanswered texts as wrong; `acc. of answered` leaves them out. ECE/AUROC: the "
            "LLM's logprob confidence in its answer, against being right (AUROC: ranking wrong answers "
            "lowest). CPU-s/text: CPU time of the llama.cpp server process per request (it holds when other "
            "jobs share the machine); wall s/text is only comparable between cells run at a load near or below "
            f"{os.cpu_count()} (the load column).\n\n{table}\n")
    write_result(beside(out, ".md"), "Embedded LLM survey: zero-shot and few-shot labelling", body, load_start)
    print(f"wrote {beside(out, '.md')} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
