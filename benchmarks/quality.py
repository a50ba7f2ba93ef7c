"""Label quality of FreeAL at each stage, per shared data set, against the gold labels.

For each data set (../shared/data/<name>/train.jsonl, test.jsonl) it runs FreeAL on a seeded subsample of
the training texts and prints one Markdown table: accuracy and macro-F1 of the labels on the training
texts at each stage (LLM zero-shot, LLM with self-generated demos, a naive SLM trained with plain
cross-entropy on the round-0 LLM labels, FreeAL SLM round r, refined LLM round r, final), the SLMs'
accuracy on a test subsample (inductive), precision/recall of the SLM's noisy set and of the final
review flag against the true errors, LLM calls and tokens, and wall time per stage.

    .venv/bin/python benchmarks/quality.py                       # mr, sst2, subj, trec; 300 texts each; embedded LLM
    .venv/bin/python benchmarks/quality.py --datasets mr --n 1000 --base-url http://host:8000/v1 --model NAME

The embedded model (LLM_MODEL, by default Qwen2.5-Coder-0.5B) is slow on 2 cores: use --base-url/--model
(and LLM_API_KEY) for a real LLM. Each run starts from an empty state and an empty LLM cache unless
--data-dir names a folder to keep them in (then a re-run reuses cached answers: calls show as cache hits).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, RESULTS, TASKS, current_peak_mib, fmt_table, loadavg, pct, read_jsonl,  # noqa: E402
                     reset_peak_rss, subsample, write_result)

from freeal_backend.cli import stage_title  # noqa: E402
from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.llm.embedded import EmbeddedLLMServer  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.metrics import flag_scores, label_scores  # noqa: E402
from freeal_backend.records import Item  # noqa: E402
from freeal_backend.slm.classifier import SmallModel  # noqa: E402

STAT_KEYS = ("calls", "cache_hits", "prompt_tokens", "completion_tokens", "failures", "unparsed")


class BenchRun(FreeALRun):
    """A FreeALRun that also records the LLM cost of every stage (calls, tokens), for the table."""

    stage_stats: dict[str, dict[str, int]]

    def _timed(self, name: str, fn: Any) -> None:
        if not hasattr(self, "stage_stats"):
            self.stage_stats = {}
        before = self.llm.stats.as_dict()
        super()._timed(name, fn)
        after = self.llm.stats.as_dict()
        self.stage_stats[name] = {k: after[k] - before[k] for k in STAT_KEYS}


def run_dataset(name: str, args: argparse.Namespace, base_url: str, model: str, data_dir: Path) -> str:
    load_start = loadavg()
    train_all = read_jsonl(DATA / name / "train.jsonl")
    labels = sorted({r["label"] for r in train_all})
    rows = subsample(train_all, args.n, args.seed)
    test = subsample(read_jsonl(DATA / name / "test.jsonl"), args.test_n, args.seed)
    items = [Item(r["id"], r["text"], gold=r["label"]) for r in rows]
    gold = {r["id"]: r["label"] for r in rows}
    test_gold = {str(i): r["label"] for i, r in enumerate(test)}
    settings = Settings.from_env(data_dir=data_dir, llm_base_url=base_url, llm_model=model, rounds=args.rounds,
                                 seed=args.seed, task_description=TASKS.get(name),
                                 llm_concurrency=args.concurrency)
    if args.embedded and not settings.shots:
        settings = settings.with_(shots=4)  # what FreeALRun uses with its own embedded server
    run_dir = data_dir / "runs" / f"{name}-n{len(items)}-s{args.seed}-{int(time.time())}"
    print(f"\n== {name}: {len(items)} training texts, {len(test)} test texts, labels {labels}, rounds {args.rounds}, "
          f"LLM {model} at {base_url}", flush=True)
    t_start = time.perf_counter()
    last = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 30:
            last[0] = now
            print(f"  [{name}] {stage}: {done}/{total} ({now - t_start:.0f} s)", flush=True)

    reset_peak_rss()
    with BenchRun(settings, labels, run_dir, zero_shot_baseline=True) as run:
        run.run(items, rounds=args.rounds, on_progress=progress)
        stages = run.stage_labels()
        timings = dict(run.timings)
        stage_stats = run.stage_stats
        peak_loop = current_peak_mib()
        # naive baseline: plain cross-entropy on the round-0 LLM labels (no selection, no regularisers)
        t = time.perf_counter()
        r0 = [stages["llm_r0"].get(it.item_id) for it in items]
        naive, naive_out = run.train_slm(items, r0, robust=False, seed_offset=1, progress=progress)
        timings["naive SLM (extra)"] = time.perf_counter() - t
        naive_train = {it.item_id: labels[int(np.argmax(p))] for it, p in zip(items, naive_out.probs)}
        # inductive: SLMs applied to the test subsample
        test_lower = run.encoder.lower_states([r["text"] for r in test], naive.split, max_length=settings.max_length)

        def test_acc(model: SmallModel) -> float:
            probs, _ = model.evaluate(test_lower)
            return label_scores({str(i): labels[int(np.argmax(p))] for i, p in enumerate(probs)}, test_gold,
                                labels)["accuracy"]

        test_scores = {"naive": test_acc(naive)}
        for rnd in range(1, args.rounds + 1):
            slm = SmallModel(run.encoder, len(labels), train_layers=settings.slm_train_layers,
                             config=run.slm_config(seed_offset=rnd))
            slm.load(run_dir / f"slm_r{rnd}.pt")
            test_scores[f"slm_r{rnd}"] = test_acc(slm)
        results = run.results()
        refined = set(run.store.annotations("llm_r1")) if args.rounds else None
        peak_all = current_peak_mib()

    # one row per stage, in the order the labels were produced
    order = ["zero_shot", "llm_r0", "naive"] + [s for r in range(1, args.rounds + 1)
                                                  for s in (f"slm_r{r}", f"llm_r{r}")] + [
        f"slm_r{args.rounds + 1}", "final"]
    cost_stage = {"zero_shot": "zero_shot", "llm_r0": "llm_r0", "naive": "naive SLM (extra)"}
    table = []
    for stage in order:
        pred = naive_train if stage == "naive" else stages.get(stage)
        if pred is None:
            continue
        sc = label_scores(pred, gold, labels)
        timing_key = cost_stage.get(stage, stage)
        st = stage_stats.get(timing_key, {})
        if stage == "llm_r0" and "demos" in stage_stats:  # the self-generated demonstrations belong to round 0
            st = {k: st.get(k, 0) + stage_stats["demos"].get(k, 0) for k in STAT_KEYS}
        wall = timings.get(timing_key, float("nan")) + (timings.get("demos", 0.0) if stage == "llm_r0" else 0.0)
        title = "naive SLM (plain CE on round-0 LLM labels)" if stage == "naive" else stage_title(stage)
        if stage == "llm_r0":
            title += " (incl. writing the demos)"
        test_cell = pct(test_scores["naive"]) if stage == "naive" else (
            pct(test_scores[stage]) if stage in test_scores else "—")
        calls = f"{st['calls']} (+{st['cache_hits']} cached)" if st else "—"
        tokens = f"{st['prompt_tokens'] + st['completion_tokens']}" if st else "—"
        table.append([title, pct(sc["accuracy"]), pct(sc["macro_f1"]), f"{sc['coverage']:.0%}", test_cell, calls,
                      tokens, "—" if wall != wall else f"{wall:.1f}"])
    md = fmt_table(["stage", "train acc %", "train macro-F1 %", "labelled", "SLM test acc %", "LLM calls",
                    "LLM tokens", "wall s"], table)
    notes = []
    if refined is not None:
        asked = {k: k in refined for k in gold}
        fl = flag_scores(asked, stages["llm_r0"], gold)
        notes.append(f"- refinement round 1 re-asked {fl['flagged']:.1%} of the texts (all but the clean agreed pool "
                     f"and human labels); they hold {pct(fl['recall'])}% of the {fl['errors']} wrong round-0 labels.")
    if results:
        fl = flag_scores({k: r.suspicious for k, r in results.items()}, {k: r.label for k, r in results.items()}, gold)
        notes.append(f"- final review flag: {fl['flagged']:.1%} of the texts flagged; "
                     f"precision {pct(fl['precision'])}%, "
                     f"recall {pct(fl['recall'])}% for the {fl['errors']} wrong final labels.")
    total = time.perf_counter() - t_start
    notes.append(f"- wall time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
                 + f"; total {total:.1f}. Peak RSS of the benchmark process: {peak_loop:.0f} MiB for the loop, "
                 f"{peak_all:.0f} MiB with the extra naive SLM and test evaluation (the embedded LLM server is "
                 "a separate process, not included).")
    notes.append(f"- SLM: top {settings.slm_train_layers} encoder layers trained, lr {settings.slm_lr}, "
                 f"{settings.slm_epochs} epochs ({settings.slm_warmup_epochs} warm-up); shots per prompt "
                 f"{settings.shots or 10}; LLM concurrency {settings.llm_concurrency}.")
    text = (f"Data set **{name}** ({len(labels)} classes): {len(items)} training texts (seeded subsample of "
            f"{len(train_all)}, seed {args.seed}), {len(test)} test texts; LLM `{model}`"
            f"{' (embedded, on this machine)' if args.embedded else ''}; rounds {args.rounds}.\n\n"
            f"{md}\n\n" + "\n".join(notes))
    print(text, flush=True)
    out = Path(args.out_dir) / f"quality_{name}_n{len(items)}{'' if args.embedded else '_' + _slug(model)}.md"
    write_result(out, f"FreeAL label quality per stage: {name}", text, load_start)
    print(f"wrote {out}", flush=True)
    return text


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)[:40]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mr,sst2,subj,trec", help="comma-separated folders of ../shared/data")
    ap.add_argument("--n", type=int, default=300, help="training texts per data set (seeded subsample; 0 = all)")
    ap.add_argument("--test-n", type=int, default=500, help="test texts per data set (seeded subsample; 0 = all)")
    ap.add_argument("--rounds", type=int, default=1, help="FreeAL refinement rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint (default: LLM_BASE_URL, else the embedded model)")
    ap.add_argument("--model", help="model name at --base-url (default: LLM_MODEL)")
    ap.add_argument("--concurrency", type=int, help="requests in flight (default: LLM_CONCURRENCY or 4)")
    ap.add_argument("--llm-threads", type=int, default=2, help="CPU threads of the embedded LLM server")
    ap.add_argument("--threads", type=int, help="torch CPU threads for the SLM (1 is faster on a busy machine)")
    ap.add_argument("--data-dir", help="keep run state and the LLM cache here (default: a fresh temporary folder)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the result Markdown files go")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    env = Settings.from_env()
    base_url = args.base_url or env.llm_base_url
    model = args.model or env.llm_model
    args.embedded = not base_url
    tmp = tempfile.TemporaryDirectory(prefix="freeal-quality-")
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp.name)
    server = None
    try:
        if args.embedded:
            server = EmbeddedLLMServer(model, threads=args.llm_threads,
                                       log_path=data_dir / "embedded_llm.log").start()
            base_url = server.base_url
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            run_dataset(name, args, base_url, model, data_dir)
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
