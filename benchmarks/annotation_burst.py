"""What a burst of people's labels, or of new tasks, costs: LLM calls and wall time, incremental path versus
a full re-run.

    .venv/bin/python benchmarks/annotation_burst.py --n 1000 --labels 50            # fake LLM (calls counted)
    .venv/bin/python benchmarks/annotation_burst.py --n 500 --added 25               # tasks imported instead
    .venv/bin/python benchmarks/annotation_burst.py --base-url http://host:8000/v1 --model NAME

A project of ``--n`` SST-2 training texts is labelled with 2 rounds; then ``--labels`` of its texts get a
person's label (their gold), or with ``--added`` that many other SST-2 training texts join the project, and
the project is run again, twice from the same saved state and LLM cache:

- **incremental** (what runs do): the refinement answers stay, the small model learns the new labels, and each
  new label's nearest texts are asked again (``REASK_PER_HUMAN_LABEL`` per label at most); new texts get round 0
  and each refinement asks the texts it has no answer for;
- **full re-run** (before): the state is told that the labels, task or settings changed too, so every SLM round
  and refinement round is run again, as every burst of annotations or imported tasks did before.

The LLM is the deterministic OpenAI-compatible test server on a real socket (``tests/fake_openai.py``), so LLM
calls are exact and wall time is the small model's and the client's; ``--base-url`` points it at a real LLM.
Writes ``benchmarks/results/annotation_burst_n<N>_k<K>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, TASKS, beside, fmt_table, loadavg, read_jsonl, subsample, write_result  # noqa: E402

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.llm.cache import ResponseCache  # noqa: E402
from freeal_backend.llm.client import LLMClient  # noqa: E402
from freeal_backend.loop import REASK_PER_HUMAN_LABEL, REASK_STAGE, FreeALRun  # noqa: E402
from freeal_backend.records import Item  # noqa: E402
from freeal_backend.slm.encoder import Encoder  # noqa: E402
from freeal_backend.storage import Store  # noqa: E402
from tests.fake_openai import MODEL, FakeOpenAI  # noqa: E402

LABELS = ["negative", "positive"]


def run_once(state: Path, items: list[Item], base_url: str, model: str, encoder: Encoder,
             settings: Settings) -> dict[str, Any]:
    client = LLMClient(base_url, model, ResponseCache(state / "llm_cache.sqlite"), concurrency=4)
    start = time.perf_counter()
    with FreeALRun(settings.with_(data_dir=state), LABELS, state / "run", TASKS["sst2"], llm=client,
                   encoder=encoder) as run:
        results = run.run(items, rounds=2)
        reask = run.store.stage_done(REASK_STAGE)
    wall = time.perf_counter() - start
    stats = client.stats.as_dict()
    right = sum(r.label == it.gold for r, it in zip(results, items)) / len(items)
    return {"llm_calls": stats["calls"], "cache_hits": stats["cache_hits"], "wall_s": round(wall, 1),
            "final_accuracy": right, "reask": reask}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="texts in the project (seeded subsample of SST-2 train)")
    ap.add_argument("--labels", type=int, default=50, help="texts people label in the burst")
    ap.add_argument("--added", type=int, default=0,
                    help="instead of people's labels, this many other texts join the project (imported tasks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", help="a real OpenAI-compatible endpoint (default: the fake test server)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    load_start = loadavg()
    rows = subsample(read_jsonl(DATA / "sst2" / "train.jsonl"), args.n + args.added, args.seed)
    every = [Item(r["id"], r["text"], gold=r["label"]) for r in rows]
    order = random.Random(args.seed).sample(range(len(every)), len(every))
    items = [every[i] for i in sorted(order[: args.n])]
    if args.added:
        burst, what = every, f"{args.added} texts added"  # the project with the new texts in file order
    else:
        people = set(random.Random(args.seed).sample([it.item_id for it in items], args.labels))
        burst = [dataclasses.replace(it, human_label=it.gold if it.item_id in people else None) for it in items]
        what = f"{args.labels} human labels"
    settings = Settings.from_env(shots=4, seed=args.seed)
    encoder = Encoder()
    out: dict[str, Any] = {"n": args.n, "labels": 0 if args.added else args.labels, "added": args.added,
                           "llm": args.base_url or "fake test server",
                           "reask_per_label": REASK_PER_HUMAN_LABEL}
    with tempfile.TemporaryDirectory(prefix="freeal-burst-") as tmp, FakeOpenAI() as fake:
        base_url = args.base_url or fake.base_url
        first = Path(tmp) / "first"
        print(f"labelling {args.n} texts, 2 rounds ...", flush=True)
        out["project"] = run_once(first, items, base_url, args.model, encoder, settings)
        for variant in ("incremental", "full re-run"):
            state = Path(tmp) / variant.replace(" ", "_")
            shutil.copytree(first, state)
            if variant == "full re-run":  # the state no longer matches: every round is run again
                store = Store(state / "run" / "state.sqlite")
                store.set_meta("base_hash", None)
                store.set_meta("setup_hash", None)
                store.close()
            print(f"{variant}: {what} ...", flush=True)
            out[variant] = run_once(state, burst, base_url, args.model, encoder, settings)
    project_calls = out["project"]["llm_calls"]
    table = [[name, out[name]["llm_calls"], f"{100 * out[name]['llm_calls'] / project_calls:.1f}",
              out[name]["cache_hits"], out[name]["wall_s"], f"{100 * out[name]['final_accuracy']:.2f}"]
             for name in ("project", "incremental", "full re-run")]
    then = (f"{args.added} other SST-2 training texts added to it (imported tasks)" if args.added else
            f"{args.labels} of them labelled by people (their gold)")
    body = (f"{args.n} SST-2 texts (seeded subsample, seed {args.seed}), 2 rounds, then {then}; LLM: {out['llm']}; "
            + ("on the incremental path new texts get round 0 and each refinement asks the texts it has no answer "
               "for; final accuracy over all the texts then in the project.\n\n" if args.added else
               f"at most {REASK_PER_HUMAN_LABEL} texts re-asked per new label on the incremental path.\n\n")
            + fmt_table(["run", "LLM calls", "% of the project's calls", "cache hits", "wall s", "final acc %"], table)
            + ("" if args.added else f"\n\nIncremental path: {json.dumps(out['incremental']['reask'])}.")
            + "\n\nWall times are the small model's and the client's (the fake server answers at once); the "
              "machine's load is printed above.")
    stem = Path(args.out_dir) / (f"annotation_burst_n{args.n}_added{args.added}" if args.added
                                 else f"annotation_burst_n{args.n}_k{args.labels}")
    title = "New tasks" if args.added else "A burst of people's labels"
    write_result(beside(stem, ".md"), f"{title}: incremental path versus a full re-run", body, load_start)
    beside(stem, ".json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
