"""Replay the FreeAL authors' gpt-3.5-turbo labels on MR and measure the small-model (SLM) side alone.

Rows, each against gold, on the MR training texts (transductive) and on the MR test split (inductive):
  - the replayed gpt-3.5 labels (no answer counts as wrong);
  - an SLM trained naively on them (plain cross-entropy on every label, no selection);
  - the FreeAL SLM round 1 (robust training: warm-up, GMM small-loss split, mixup, consistency with the
    authors' back-translations as the augmented view);
  - the labels FreeAL keeps after round 1 without asking an LLM again (LLM label where the SLM judged it
    clean, SLM label where it judged it noisy or the LLM gave none);
  - the same encoder trained on the gold labels (the supervised upper bound).
Plus the precision/recall of the SLM's noisy set against the LLM's actual errors.

    .venv/bin/python benchmarks/replay_mr.py            # all 8662 texts, full test split
    .venv/bin/python benchmarks/replay_mr.py --n 2000   # a seeded subsample (settings search)

SLM settings come from the usual environment variables (FREEAL_SLM_TRAIN_LAYERS, FREEAL_SLM_LR, ...).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, RESULTS, current_peak_mib, fmt_table, loadavg, pct, read_jsonl,  # noqa: E402
                     reset_peak_rss, subsample, write_result)

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.metrics import flag_scores, label_scores  # noqa: E402
from freeal_backend.records import Item  # noqa: E402
from freeal_backend.slm import SLMOutput  # noqa: E402

LABELS = ["negative", "positive"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=0, help="training texts: seeded subsample size (0 = all 8662)")
    ap.add_argument("--test-n", type=int, default=0, help="test texts: seeded subsample size (0 = all 2000)")
    ap.add_argument("--seed", type=int, default=0, help="subsample and training seed")
    ap.add_argument("--no-augment", action="store_true",
                    help="ignore the back-translations (the SLM then uses token dropout as its augmented view)")
    ap.add_argument("--skip-gold", action="store_true", help="do not train the gold upper bound")
    ap.add_argument("--skip-naive", action="store_true", help="do not train the naive baseline")
    ap.add_argument("--skip-freeal", action="store_true", help="do not train the FreeAL (robust) SLM")
    ap.add_argument("--out", help="result Markdown file (default benchmarks/results/replay_mr[_nN].md)")
    ap.add_argument("--summary", help="also append one summary row to this Markdown file (settings search)")
    ap.add_argument("--label", default="", help="name of this setting in the --summary row")
    ap.add_argument("--run-dir", help="state directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a busy shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    load_start = loadavg()
    t_start = time.perf_counter()

    rows = subsample(read_jsonl(DATA / "mr_freeal" / "train.jsonl"), args.n, args.seed)
    test = subsample(read_jsonl(DATA / "mr" / "test.jsonl"), args.test_n, args.seed)
    items = [Item(r["id"], r["text"], gold=r["label"],
                  augmented=None if args.no_augment else (r.get("backtranslation") or None)) for r in rows]
    llm = {r["id"]: r.get("llm_label") or None for r in rows}
    gold = {r["id"]: r["label"] for r in rows}
    test_gold = {str(i): r["label"] for i, r in enumerate(test)}
    settings = Settings.from_env(seed=args.seed)
    print(f"MR replay: {len(items)} training texts, {len(test)} test texts; SLM: {settings.slm_train_layers} "
          f"trainable layers, lr {settings.slm_lr}, {settings.slm_epochs} epochs ({settings.slm_warmup_epochs} "
          f"warm-up), batch {settings.slm_batch_size}, clean threshold {settings.clean_threshold}; "
          f"augmented view: {'none (token dropout)' if args.no_augment else 'back-translation'}", flush=True)

    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}
    table_rows: list[list[object]] = []
    summary: dict[str, float] = {}
    tmp = tempfile.TemporaryDirectory(prefix="freeal-replay-")
    run_dir = Path(args.run_dir) if args.run_dir else Path(tmp.name)
    with FreeALRun(settings.with_(data_dir=run_dir), LABELS, run_dir) as run:
        llm_list = [llm[it.item_id] for it in items]
        sc = label_scores(llm, gold, LABELS)
        table_rows.append(["gpt-3.5-turbo labels (replayed)", pct(sc["accuracy"]), pct(sc["macro_f1"]),
                           "—", f"{sc['coverage']:.1%} labelled", "—"])
        summary["llm"] = sc["accuracy"]

        def progress(stage: str, done: int, total: int) -> None:
            if done == total:
                print(f"  {stage}: {done}/{total} ({time.perf_counter() - t_start:.0f} s)", flush=True)

        t = time.perf_counter()
        reset_peak_rss()
        split = max(0, run.encoder.num_layers - settings.slm_train_layers)
        run._lower_states(items, split, progress)  # cached lower-layer states, shared by every model below
        timings["encode train texts (frozen lower layers)"] = time.perf_counter() - t
        t = time.perf_counter()
        test_lower = run.encoder.lower_states([r["text"] for r in test], split, max_length=settings.max_length)
        timings["encode test texts"] = time.perf_counter() - t
        peaks["encode"] = current_peak_mib()

        def fit(name: str, key: str, title: str, labels: list[str | None], robust: bool
                ) -> tuple[dict[str, str], SLMOutput]:
            """Train one SLM on ``labels``, add its table row and summary entries; its training-text predictions."""
            t0 = time.perf_counter()
            reset_peak_rss()
            model, out = run.train_slm(items, labels, robust=robust, seed_offset=1, progress=progress)
            timings[f"train {name}"] = time.perf_counter() - t0
            peaks[name] = current_peak_mib()
            probs, _ = model.evaluate(test_lower)
            train_pred = {it.item_id: LABELS[int(np.argmax(p))] for it, p in zip(items, out.probs)}
            test_pred = {str(i): LABELS[int(np.argmax(p))] for i, p in enumerate(probs)}
            a, b = label_scores(train_pred, gold, LABELS), label_scores(test_pred, test_gold, LABELS)
            table_rows.append([title, pct(a["accuracy"]), pct(a["macro_f1"]), pct(b["accuracy"]), "—",
                               f"{timings[f'train {name}']:.0f}"])
            summary.update({f"{key}_train": a["accuracy"], f"{key}_test": b["accuracy"]})
            return train_pred, out

        if not args.skip_naive:
            fit("naive SLM", "naive", "naive SLM on the gpt-3.5 labels (plain CE)", llm_list, robust=False)

        if not args.skip_freeal:
            tr, out = fit("FreeAL SLM", "freeal", "FreeAL SLM round 1 (robust)", llm_list, robust=True)
            noisy = {it.item_id: bool(llm[it.item_id] is None or not out.clean[i]) for i, it in enumerate(items)}
            kept = {k: (tr[k] if noisy[k] else llm[k]) for k in gold}
            c = label_scores(kept, gold, LABELS)
            fl = flag_scores(noisy, llm, gold)
            table_rows.append(["LLM label where clean, SLM label where noisy/missing", pct(c["accuracy"]),
                               pct(c["macro_f1"]), "—",
                               f"noisy set {fl['flagged']:.1%}: precision {pct(fl['precision'])}, recall "
                               f"{pct(fl['recall'])} of the {fl['errors']} LLM errors", "—"])
            summary.update(kept=c["accuracy"], flag_p=fl["precision"], flag_r=fl["recall"], flagged=fl["flagged"])
            filled = {k: (llm[k] if llm[k] is not None else tr[k]) for k in gold}
            d = label_scores(filled, gold, LABELS)
            table_rows.append(["LLM label, SLM label where the LLM gave none "
                               "(the final rule without an LLM refinement)",
                               pct(d["accuracy"]), pct(d["macro_f1"]), "—", "—", "—"])
            summary.update(filled=d["accuracy"])

        if not args.skip_gold:
            fit("gold SLM", "gold", "same SLM trained on gold labels (upper bound)",
                [gold[it.item_id] for it in items], robust=False)
    tmp.cleanup()
    total = time.perf_counter() - t_start

    table = fmt_table(["labels", "train acc %", "train macro-F1 %", "test acc %", "notes", "train s"], table_rows)
    body = [
        f"MR training texts: {len(items)}{' (seeded subsample, seed %d)' % args.seed if args.n else ' (all)'}; "
        f"test texts: {len(test)}. SLM: {Path(str(run.encoder.path)).name}, top {settings.slm_train_layers} "
        f"layers trained, lr {settings.slm_lr}, {settings.slm_epochs} epochs ({settings.slm_warmup_epochs} "
        f"warm-up), batch {settings.slm_batch_size}, max length {settings.max_length}, clean threshold "
        f"{settings.clean_threshold}; augmented view: "
        f"{'token dropout' if args.no_augment else 'the authors back-translations'}.",
        "",
        "Accuracy against gold (a missing label counts as wrong). The paper's reference point "
        "(../shared/docs/PAPER_RESULTS.md): the gpt-3.5 labels are right on 89.56% of all 8662 texts.",
        "",
        table,
        "",
        "Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f}.",
        "Peak RSS (MiB, per phase): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + ".",
    ]
    text = "\n".join(body)
    print()
    print(text)
    out_path = Path(args.out) if args.out else RESULTS / (f"replay_mr_n{args.n}.md" if args.n else "replay_mr.md")
    write_result(out_path, "MR replay of the FreeAL authors' gpt-3.5-turbo labels", text, load_start)
    print(f"\nwrote {out_path}")
    if args.summary:
        _append_summary(Path(args.summary), args, settings, summary, len(items), total, load_start)
    return 0


def _append_summary(path: Path, args: argparse.Namespace, s: Settings, summary: dict[str, float], n: int,
                    total: float, load_start: str) -> None:
    header = ("| setting | n | layers | lr | epochs | warm-up | clean thr | aug | LLM % | naive train % | "
              "naive test % | FreeAL train % | FreeAL test % | kept % | filled % | noisy flagged % | "
              "flag P % | flag R % | "
              "gold train % | gold test % | wall s | load start→end |")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "\n" + "|---" * (header.count("|") - 1) + "|\n", encoding="utf-8")
    g = summary.get
    row = [args.label or "-", n, s.slm_train_layers, s.slm_lr, s.slm_epochs, s.slm_warmup_epochs,
           s.clean_threshold, "no" if args.no_augment else "bt", pct(g("llm", float("nan"))),
           pct(g("naive_train", float("nan"))), pct(g("naive_test", float("nan"))),
           pct(g("freeal_train", float("nan"))), pct(g("freeal_test", float("nan"))), pct(g("kept", float("nan"))),
           pct(g("filled", float("nan"))),
           pct(g("flagged", float("nan"))), pct(g("flag_p", float("nan"))), pct(g("flag_r", float("nan"))),
           pct(g("gold_train", float("nan"))), pct(g("gold_test", float("nan"))), f"{total:.0f}",
           f"{load_start.split(' / ')[0]}→{loadavg().split(' / ')[0]}"]
    with path.open("a", encoding="utf-8") as f:
        f.write("| " + " | ".join(str(x) for x in row) + " |\n")


if __name__ == "__main__":
    sys.exit(main())
