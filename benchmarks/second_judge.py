"""A second judge beside the small model: a logistic regression on frozen sentence embeddings, alone,
averaged with the SLM's out-of-sample probabilities, and that average's ranking at the SLM's level (the i-th
lowest-scored text by the average gets the SLM verdict's i-th lowest score), re-judged on saved runs (no SLM
training, no LLM).

    .venv/bin/python benchmarks/second_judge.py                      # made noise n1000 + the MR replay
    .venv/bin/python benchmarks/second_judge.py --made-noise /work/runs/made_noise_n1000_naive
    .venv/bin/python benchmarks/second_judge.py --encoder all-mpnet-base-v2 --name second_judge_mpnet

Reads the saved out-of-sample SLM probabilities of ``made_noise.py`` (``<stem>.npz``; the texts are rebuilt
from the same seeds and checked against the saved labels) and of ``replay_mr.py`` (every SLM variant and seed
in its ``.npz``). The probe is cross-fitted like the SLM (3 folds grouped by normalised text, so copies
share a fold); texts the LLM left unanswered get the probe trained on every label. Each variant goes through
the same verdict (``detection.judge``) as the run would; the probe and the ranked rule are the product's
(``slm/second_judge.py``, run by ``FREEAL_SECOND_JUDGE``). Writes ``benchmarks/results/second_judge.md``/``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, RESULTS, beside, fmt_table, loadavg, mean_sd, read_jsonl, subsample,  # noqa: E402
                     write_report)
import made_noise  # noqa: E402
import replay_mr  # noqa: E402

from freeal_backend.slm.detection import Judgement, judge  # noqa: E402
from freeal_backend.slm.encoder import Encoder  # noqa: E402
from freeal_backend.slm.second_judge import probe_oof, ranked_at_level  # noqa: E402

ROWS = [  # (key in made_noise / replay_mr metrics, title, percent?)
    ("auroc", "ranking of wrong labels: AUROC", False),
    ("ece", "ECE of the score", False),
    ("flag_share", "review tab: share of tasks", True),
    ("flag_answered_wrong_recall", "review tab: recall of wrong labels", True),
    ("flag_answered_wrong_precision", "review tab: precision", True),
    ("top", "first 10 % (replay) / 15 % (made noise) of the review order: recall", True),
    ("health_off", "run health minus the true share right, points", False),
    ("final_accuracy", "final labels right", True),
]

RANKED = "mean's ranking, SLM's level"


def variants(slm: np.ndarray, probe: np.ndarray) -> dict[str, np.ndarray]:
    return {"SLM alone": slm, "probe alone": probe, "SLM + probe (mean)": (slm + probe) / 2}


def judged(slm: np.ndarray, probe: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, Judgement]]:
    """Each variant's probabilities and verdict; the ranked one reuses the SLM's and the mean's verdicts."""
    out = {name: (probs, judge(probs, labels)) for name, probs in variants(slm, probe).items()}
    out[RANKED] = (slm, ranked_at_level(out["SLM alone"][1], out["SLM + probe (mean)"][1]))
    return out


def made_noise_runs(stem: Path, encoder: Encoder, c: float) -> dict[str, dict[str, list[dict[str, float]]]]:
    saved, meta = np.load(beside(stem, ".npz")), json.loads(beside(stem, ".json").read_text())
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for ds in meta["per_seed"]:
        rows = read_jsonl(DATA / ds / "train.jsonl")
        labels = sorted({r["label"] for r in rows})
        for seed in meta["seeds"]:
            picked, noisy = made_noise.made_labels(rows, labels, meta["n"], meta["seed_n"], seed)
            if not (noisy == saved[f"{ds}_seed{seed}_labels"]).all():
                raise SystemExit(f"{stem}: {ds} seed {seed}: the rebuilt labels differ from the saved ones")
            gold, slm = saved[f"{ds}_seed{seed}_gold"], saved[f"{ds}_seed{seed}_probs"]
            texts = [r["text"] for r in picked]
            probe = probe_oof(encoder.embed(texts), noisy, len(labels), texts, c=c, seed=seed)
            for name, (probs, verdict) in judged(slm, probe, noisy).items():
                m = made_noise.verdict_metrics(probs, noisy, gold, verdict)
                m["top"] = m["top15pct_answered_wrong_recall"]
                m["health_off"] = 100 * (m["estimated_accuracy"] - m["round0_accuracy"])
                out.setdefault(f"made noise {ds}", {}).setdefault(name, []).append(m)
            print(f"  made noise {ds} seed {seed}: done", flush=True)
    return out


def replay_runs(stem: Path, encoder: Encoder, c: float) -> dict[str, dict[str, list[dict[str, float]]]]:
    saved = np.load(beside(stem, ".npz"))
    rows = subsample(read_jsonl(DATA / "mr_freeal" / "train.jsonl"), 0, 0)
    llm, gold = saved["labels"], saved["gold"]
    texts = [r["text"] for r in rows]
    emb = encoder.embed(texts)
    out: dict[str, list[dict[str, float]]] = {}
    for key in (k for k in saved.files if k not in ("labels", "gold")):
        seed = int(key.rsplit("seed", 1)[1])
        probe = probe_oof(emb, llm, 2, texts, c=c, seed=seed)
        for name, (probs, verdict) in judged(saved[key], probe, llm).items():
            m = replay_mr.verdict_metrics(probs, llm, gold, verdict)
            m["auroc"] = m["llm_auroc"]
            m["top"] = m["top10pct_answered_wrong_recall"]
            m["health_off"] = 100 * (m["estimated_accuracy"] - m["llm_accuracy"])
            out.setdefault(name, []).append(m)
        print(f"  MR replay {key}: done", flush=True)
    return {f"MR replay (gpt-3.5; {', '.join(k for k in saved.files if k not in ('labels', 'gold'))})": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--made-noise", default=str(RESULTS / "made_noise_n1000"), help="made_noise.py result stem")
    ap.add_argument("--replay", default=str(RESULTS / "replay_mr"), help="replay_mr.py result stem ('' to skip)")
    ap.add_argument("--C", type=float, default=1.0, help="inverse regularisation of the probe")
    ap.add_argument("--encoder", help="the probe's frozen encoder (as FREEAL_ENCODER: a packaged encoder's name "
                                      "or a directory; default the packaged MiniLM)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default="second_judge")
    args = ap.parse_args(argv)
    load_start = loadavg()
    encoder = Encoder(args.encoder)
    sets = made_noise_runs(Path(args.made_noise), encoder, args.C)
    if args.replay:
        sets.update(replay_runs(Path(args.replay), encoder, args.C))
    parts = []
    for title, per in sets.items():
        names = list(per)
        seeds = len(per[names[0]])
        parts.append(f"### {title}\n\n" + fmt_table(
            ["measure (% where a share)"] + [f"{n} (mean ± sd, {seeds} seeds)" for n in names],
            [[t] + [mean_sd([m[k] for m in per[n]], pct) for n in names] for k, t, pct in ROWS]))
    body = (f"The probe: a logistic regression (C = {args.C}) on the frozen encoder's ({encoder.path.name}) "
            f"mean-pooled sentence "
            f"embeddings, cross-fitted on the labels it judges; 'SLM + probe' averages the two out-of-sample "
            f"probabilities; '{RANKED}' is the verdict on that average with the SLM verdict's own scores handed "
            f"out in its order (health stays the SLM's estimate). "
            f"Inputs: `{args.made_noise}` and `{args.replay or 'no replay'}`.\n\n"
            + "\n\n".join(parts))
    data: dict[str, Any] = {"args": vars(args), "sets": sets, "load_start": load_start, "load_end": loadavg()}
    write_report(args.out_dir, args.name, "A second judge: a frozen-embedding probe beside the small model",
                 body, data, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
