"""Wall time and peak memory per stage of a FreeAL run as the project grows, with fitted growth exponents.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py --full 2000,5000,10000 --encode 2000,10000,100000

Texts are the shared sentence sets (SST-2, MR, SUBJ; train and test) read in place; past their ~29k
distinct sentences each copy gets the first words of another sentence appended, so all N texts are
distinct. The LLM is the deterministic fake OpenAI-compatible server of ``tests/fake_openai.py`` (real
HTTP on 127.0.0.1, no delay): its time is the client's and the protocol's, not a model's.

Each size runs in a child process of its own, so its peak RSS (``VmHWM``, reset before every stage) is
that size's alone:

- ``--full`` sizes: ``FreeALRun.run`` (the ``freeal run`` path) with 2 rounds: demos, llm_r0 (embeddings
  + retrieval + labelling), slm_r1, llm_r1, slm_r2, llm_r2, slm_r3, then the final results.
- ``--encode`` sizes: only the encoder stages, which fix the memory of large projects: the frozen lower
  layers into the disk cache, the sentence embeddings for demo retrieval (the frozen top layers run on
  that cache), and one length-sorted read of every cached state in SLM batches (what each prediction
  pass reads).

Each finished stage prints a line (time, peak RSS, RSS left) to stderr, and a child cut short still
reports the stages it finished.

Growth exponents are least-squares slopes of log(seconds) or log(peak MiB) on log(N) over the measured
sizes (1 = linear). The appended words make the texts of big sizes longer (about 20 words a text at 10k,
25 at 100k), so whole runs also record the tokens the encoder runs on (after truncation at
``FREEAL_MAX_LENGTH``) and get a time exponent against tokens too. Writes ``scale.md`` and ``scale.json``
under ``benchmarks/results/``.

``--render A.json,B.json --out X`` writes the report again from earlier results (several files are
merged size by size, a later file's run of a size replacing an earlier one's; token counts missing from
older files are counted from the same synthetic texts).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (DATA, RESULTS, TASKS, beside, current_peak_mib, fmt_table, loadavg, read_jsonl, reset_peak_rss,
                     rss_mib, write_result)

from freeal_backend.config import Settings
from freeal_backend.loop import FreeALRun
from freeal_backend.records import Item
from freeal_backend.slm.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]
SOURCES = [("sst2", "train"), ("sst2", "test"), ("mr", "train"), ("mr", "test"), ("subj", "train"), ("subj", "test")]


def synthetic_texts(n: int) -> list[str]:
    """``n`` distinct texts: the shared sentences in file order, then copies with another sentence's first
    words appended (copy k of sentence i takes the words of sentence i + 7919 k)."""
    pool = list(dict.fromkeys(r["text"] for name, split in SOURCES for r in read_jsonl(DATA / name / f"{split}.jsonl")))
    seen: set[str] = set()
    out: list[str] = []
    i = 0
    while len(out) < n:
        k, j = divmod(i, len(pool))
        text = pool[j] if k == 0 else f"{pool[j]} {' '.join(pool[(j + 7919 * k) % len(pool)].split()[:4])}"
        if text not in seen:
            seen.add(text)
            out.append(text)
        i += 1
    return out


class MeasuredRun(FreeALRun):
    """A FreeAL run that also records each stage's peak RSS (reset before the stage) and the RSS it
    leaves behind, writing what it has after every stage to ``out`` (a run cut short keeps its stages)."""

    def __init__(self, *args: Any, out: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peaks: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.out = out

    def _timed(self, name: str, fn: Any) -> None:
        reset_peak_rss()
        super()._timed(name, fn)
        self.peaks[name] = max(self.peaks.get(name, 0.0), current_peak_mib())
        self.after[name] = rss_mib()
        self.out.write_text(json.dumps({"seconds": self.timings, "peak_mib": self.peaks, "rss_after_mib": self.after}))
        print(f"{time.strftime('%H:%M:%S')} {name}: {self.timings[name]:.1f} s, peak {self.peaks[name]:.0f} MiB, "
              f"after {self.after[name]:.0f} MiB", file=sys.stderr, flush=True)


def count_tokens(texts: list[str], encoder: Encoder, max_length: int) -> int:
    """Tokens the encoder runs on for ``texts`` (special tokens included, truncated at ``max_length``)."""
    return sum(len(ids) for ids in encoder.tokenize(texts, max_length))


def child(mode: str, n: int, out: Path, embed_upto: int) -> None:
    """One size in this process: write {stage: seconds}, {stage: peak MiB} to ``out`` as JSON."""
    import torch

    torch.set_num_threads(int(os.environ.get("FREEAL_TORCH_THREADS", "1")))
    texts = synthetic_texts(n)
    items = [Item(str(i), t) for i, t in enumerate(texts)]
    settings = Settings.from_env()
    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("FREEAL_SCALE_TMP")) as tmp:
        run_dir = Path(tmp) / "run"
        with MeasuredRun(settings.with_(data_dir=Path(tmp)), LABELS, run_dir, task_description=TASKS["sst2"],
                         out=out) as run:
            _ = run.encoder  # loaded outside the timings
            if mode == "full":
                tokens = count_tokens(texts, run.encoder, settings.max_length)  # outside the timings too
                t0 = time.perf_counter()
                run.run(items, rounds=2)
                seconds = dict(run.timings, total=time.perf_counter() - t0)
                peaks = dict(run.peaks)
                peaks["total"] = max(peaks.values())
                out.write_text(json.dumps({"seconds": seconds, "peak_mib": peaks, "rss_after_mib": run.after,
                                           "tokens": tokens}))
                return
            split = run.lower_split

            def phase(name: str, fn: Any) -> Any:
                reset_peak_rss()
                t0 = time.perf_counter()
                value = fn()
                seconds[name] = time.perf_counter() - t0
                peaks[name] = current_peak_mib()
                return value

            lower = phase("encode_lower", lambda: run._lower_states(items, split, lambda *a: None)[0])
            if n <= embed_upto:  # the top layers from the cached lower states
                phase("embed", lambda: run._embeddings(items, lambda *a: None))
            order = np.argsort(lower.lengths, kind="stable")
            batch = settings.slm_batch_size

            def read_all() -> None:
                for start in range(0, n, batch):
                    lower.batch(order[start:start + batch], run.encoder.device)

            phase("read_states", read_all)
            seconds["cache_gib"] = float(lower.lengths.sum()) * lower.hidden * 2 / 2**30
    out.write_text(json.dumps({"seconds": seconds, "peak_mib": peaks}))


def measure(mode: str, n: int, env: dict[str, str], embed_upto: int) -> dict[str, Any]:
    """Run one size in a child process (its stage lines go to stderr as they finish); its stage timings,
    stage peaks and whole-process peak RSS. A child that fails still gives the stages it finished."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n), "--child-out", str(out),
                               "--embed-upto", str(embed_upto)], env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        if not out.exists():
            raise SystemExit(f"{mode} n={n} failed (exit {proc.returncode}) before finishing a stage")
        data = json.loads(out.read_text())
    if proc.returncode != 0:
        print(f"{mode} n={n} failed (exit {proc.returncode}); keeping the stages it finished", file=sys.stderr)
    return {"mode": mode, "n": n, "wall_s": wall, "exit": proc.returncode, **data,
            "process_peak_mib": max(data["peak_mib"].values())}


def start_fake() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    m = re.match(r"PORT (\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the fake LLM server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{m.group(1)}/v1"


def slope(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(n) over the sizes measured; NaN with fewer than two."""
    pairs = [(n, v) for n, v in zip(ns, values) if v == v]
    if len(pairs) < 2:
        return float("nan")
    x, y = np.log([n for n, _ in pairs]), np.log([max(v, 1e-6) for _, v in pairs])
    return float(np.polyfit(x, y, 1)[0])


def table(runs: list[dict[str, Any]], key: str, stages: list[str]) -> str:
    """One row per stage: each size's seconds / peak MiB, then the exponents (against N, and against tokens
    when every run counted them)."""
    ns = [r["n"] for r in runs]
    tokens = [r["tokens"] for r in runs] if all("tokens" in r for r in runs) else None
    rows = []
    for stage in stages:
        secs = [r["seconds"].get(stage, float("nan")) for r in runs]
        peaks = [r["peak_mib"].get(stage, float("nan")) for r in runs]
        rows.append([stage, *[f"{s:.1f} s / {p:.0f} MiB" if s == s else "not run" for s, p in zip(secs, peaks)],
                     f"{slope(ns, secs):.2f}", *([f"{slope(tokens, secs):.2f}"] if tokens else []),
                     f"{slope(ns, peaks):.2f}"])
    return fmt_table([key, *[f"N = {n}" for n in ns], "time exponent",
                      *(["time exponent per token"] if tokens else []), "memory exponent"], rows)


def report(data: dict[str, Any]) -> str:
    parts = [f"Settings: {data['settings']}. Every number below is **measured**, one child process per size; "
             "nothing is extrapolated except where a line says so. A cell is wall seconds / peak RSS of that "
             "stage (the process's high-water mark, reset at the stage's start, so it includes the loaded "
             "encoder and what earlier stages left in memory)."]
    full, enc = data["full"], data["encode"]
    if full:
        stages = [*dict.fromkeys(s for r in full for s in r["seconds"] if s != "total"), "total"]  # all sizes' stages
        parts.append("## Whole run (`FreeALRun.run`, 2 rounds, fake LLM)\n\n" + table(full, "stage", stages))
        parts.append("RSS left after each stage (MiB): " + "; ".join(
            f"N = {r['n']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.get("rss_after_mib", {}).items())
            for r in full) + ".")
        if all("tokens" in r for r in full):
            parts.append("Tokens the encoder runs on (after truncation, special tokens included): " + "; ".join(
                f"N = {r['n']}: {r['tokens']:,} ({r['tokens'] / r['n']:.1f} a text)" for r in full) + ".")
        cut = [f"N = {r['n']} (exit {r['exit']})" for r in full if r.get("exit")]
        if cut:
            parts.append("**Not finished:** " + ", ".join(cut) + "; its row shows the stages it finished.")
    if enc:
        parts.append("## Encoder stages and the disk-backed lower-state cache\n\n"
                     + table(enc, "phase", ["encode_lower", "embed", "read_states"])
                     + "\n\nCache file (float16, on disk, unlinked): "
                     + ", ".join(f"{r['n']}: {r['seconds']['cache_gib']:.2f} GiB" for r in enc)
                     + ". Peak RSS of the whole child process: "
                     + ", ".join(f"{r['n']}: {r['process_peak_mib']:.0f} MiB" for r in enc) + ".")
    done = [r for r in full if "total" in r["seconds"]]
    if done and done[-1]["n"] < 100_000:
        per_text = {s: done[-1]["seconds"][s] / done[-1]["n"] for s in done[-1]["seconds"]}
        parts.append("**Extrapolated, not measured** — a whole run at 100k texts at the largest measured size's "
                     "per-text rate (valid where the time exponent is about 1): "
                     f"{per_text['total'] * 100_000 / 3600:.1f} h in all, of which SLM stages "
                     f"{sum(v for k, v in per_text.items() if k.startswith('slm')) * 100_000 / 3600:.1f} h.")
    return "\n\n".join(parts)


def rendered(paths: list[Path]) -> dict[str, Any]:
    """Merge earlier results size by size, smallest first (a later file's run of a size replaces an earlier
    file's; one settings line for all, else an error) and count the tokens of whole runs that lack them,
    from the same synthetic texts and the default encoder's tokenizer."""
    files = [json.loads(p.read_text()) for p in paths]
    settings = {f["settings"] for f in files}
    if len(settings) != 1:
        raise SystemExit(f"the results were measured with different settings: {sorted(settings)}")
    data: dict[str, Any] = {mode: sorted({r["n"]: r for f in files for r in f[mode]}.values(), key=lambda r: r["n"])
                            for mode in ("full", "encode")}  # a later file's run of a size replaces an earlier one
    data.update(settings=settings.pop(), rendered_from=[str(p) for p in paths])
    missing = [r for r in data["full"] if "tokens" not in r]
    if missing:
        encoder, max_length = Encoder(), Settings.from_env().max_length
        if f"max_length {max_length}," not in data["settings"]:
            raise SystemExit(f"set FREEAL_MAX_LENGTH to the results' max_length ({data['settings']})")
        for r in missing:
            r["tokens"] = count_tokens(synthetic_texts(r["n"]), encoder, max_length)
    return data


def write(out: Path, data: dict[str, Any], load_start: str) -> None:
    """The report as ``out``.md and the data as ``out``.json."""
    write_result(beside(out, ".md"), "Scale: time and memory per stage as the project grows", report(data),
                 load_start)
    beside(out, ".json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {beside(out, '.md')} and .json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", default="2000,5000,10000", help="sizes for whole runs (comma-separated; '' = none)")
    ap.add_argument("--encode", default="2000,10000,100000", help="sizes for the encoder stages only")
    ap.add_argument("--embed-upto", type=int, default=20000,
                    help="measure the sentence embeddings of --encode sizes up to this many texts")
    ap.add_argument("--out", help="result path without suffix (default benchmarks/results/scale)")
    ap.add_argument("--render", help="comma-separated result JSON files to report again instead of measuring")
    ap.add_argument("--child", choices=["full", "encode"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n, Path(args.child_out), args.embed_upto)
        return 0
    out = Path(args.out) if args.out else RESULTS / "scale"
    load_start = loadavg()
    if args.render:
        write(out, rendered([Path(x) for x in args.render.split(",") if x]), load_start)
        return 0
    fake, base_url = start_fake()
    env = dict(os.environ, LLM_BASE_URL=base_url, LLM_MODEL="fake-gpt", LLM_API_KEY="none",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               FREEAL_TORCH_THREADS=os.environ.get("FREEAL_TORCH_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    data: dict[str, Any] = {"full": [], "encode": []}
    try:
        for mode, sizes in (("encode", args.encode), ("full", args.full)):
            for n in [int(x) for x in sizes.split(",") if x]:
                r = measure(mode, n, env, args.embed_upto)
                data[mode].append(r)
                print(f"{mode} n={n}: {json.dumps(r['seconds'])} peaks {json.dumps(r['peak_mib'])}", flush=True)
    finally:
        fake.kill()
        fake.wait()
    s = Settings.from_env()
    data["settings"] = (f"FREEAL_TORCH_THREADS={env['FREEAL_TORCH_THREADS']}, "
                        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
                        f"SLM epochs {s.slm_epochs}, folds {s.slm_folds}, trained layers {s.slm_train_layers}, "
                        f"batch {s.slm_batch_size}, max_length {s.max_length}, LLM concurrency {s.llm_concurrency}")
    write(out, data, load_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
