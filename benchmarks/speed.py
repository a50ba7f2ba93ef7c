"""Speed of FreeAL's two halves: LLM annotation throughput and one SLM round, with peak memory.

1. Annotation against the embedded server (SmolLM2-135M via llama-cpp-python, 127.0.0.1):
   the server's raw throughput by a direct sequential HTTP loop, then ``LLMClient.label_many`` with its
   concurrency (LLM_CONCURRENCY) on the same prompts, both in this run; their ratio; then the same
   prompts again through the response cache (must make 0 calls).
2. One SLM round (no LLM: round-0 labels are the FreeAL authors' gpt-3.5 labels for MR, replayed;
   texts repeated with a suffix when a size exceeds the 8662 MR texts): encode (frozen lower layers),
   robust SLM training, clean/agreed pool + k-medoids demo pool. Samples/s of the plain (warm-up) and
   robust epochs, wall time of the round, peak RSS.

    .venv/bin/python benchmarks/speed.py                                 # 40 prompts; SLM 1k/5k/10k texts
    .venv/bin/python benchmarks/speed.py --llm-n 20 --sizes 1000 --skip-llm

The /predict latency of the Label Studio backend is measured by benchmarks/load_predict.py.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DATA, RESULTS, TASKS, current_peak_mib, fmt_table, loadavg, peak_rss_of,  # noqa: E402
                     read_jsonl, reset_peak_rss, rss_mib, write_result)

from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.llm.embedded import EmbeddedLLMServer  # noqa: E402
from freeal_backend.slm.encoder import Encoder  # noqa: E402
from freeal_backend.llm.cache import ResponseCache  # noqa: E402
from freeal_backend.llm.client import TOP_LOGPROBS, LLMClient  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.llm.prompts import label_messages  # noqa: E402
from freeal_backend.records import Item  # noqa: E402
from freeal_backend.slm.selection import clean_agreed_pool, demo_pool  # noqa: E402

LABELS = ["negative", "positive"]


def bench_llm(n: int, settings: Settings, tmp: Path, llm_threads: int) -> tuple[str, dict[str, float]]:
    rows = read_jsonl(DATA / "mr" / "train.jsonl")[: 2 * n + 2]
    prompts = [label_messages(r["text"], LABELS, task_description=TASKS["mr"]) for r in rows]
    warm, raw_prompts, client_prompts = prompts[:2], prompts[2:n + 2], prompts[n + 2:2 * n + 2]
    out: dict[str, float] = {}
    with EmbeddedLLMServer(settings.llm_model, threads=llm_threads, log_path=tmp / "server.log") as server:
        url = f"{server.base_url}/chat/completions"
        body = {"temperature": 0.0, "max_tokens": settings.llm_max_tokens, "model": settings.llm_model}
        if settings.llm_logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        with httpx.Client(timeout=120) as http:
            for msgs in warm:  # load the model pages, fill the server's caches
                http.post(url, json=dict(body, messages=msgs)).raise_for_status()
            t = time.perf_counter()
            tokens = 0
            for msgs in raw_prompts:  # the server's raw throughput: one request after the other, no client
                r = http.post(url, json=dict(body, messages=msgs))
                r.raise_for_status()
                tokens += r.json().get("usage", {}).get("total_tokens", 0)
            out["raw_s"] = time.perf_counter() - t
        out["raw_tps"] = n / out["raw_s"]
        out["raw_tokens"] = tokens
        # different texts for the client so that no llama.cpp prompt cache favours either side
        cache = ResponseCache(tmp / "llm_cache.sqlite")
        client = LLMClient(server.base_url, settings.llm_model, cache, concurrency=settings.llm_concurrency,
                           logprobs=settings.llm_logprobs)
        t = time.perf_counter()
        answers = client.label_many(client_prompts, LABELS)
        out["client_s"] = time.perf_counter() - t
        out["client_tps"] = n / out["client_s"]
        out["client_calls"] = client.stats.calls
        out["client_tokens"] = client.stats.prompt_tokens + client.stats.completion_tokens
        out["client_failed"] = sum(a is None or a.error is not None for a in answers)
        # the same prompts again: every answer must come from the cache
        again = LLMClient(server.base_url, settings.llm_model, cache, concurrency=settings.llm_concurrency,
                          logprobs=settings.llm_logprobs)
        t = time.perf_counter()
        again.label_many(client_prompts, LABELS)
        out["cached_s"] = time.perf_counter() - t
        out["cached_calls"] = again.stats.calls
        out["cached_hits"] = again.stats.cache_hits
        out["server_peak_rss"] = peak_rss_of(server._proc.pid) if server._proc else float("nan")
    ratio = out["client_tps"] / out["raw_tps"]
    table = fmt_table(
        ["path", "prompts", "wall s", "texts/s", "LLM calls", "tokens"],
        [["server raw (direct sequential HTTP loop)", n, out["raw_s"], out["raw_tps"], n, int(out["raw_tokens"])],
         [f"LLMClient.label_many (concurrency {settings.llm_concurrency})", n, out["client_s"], out["client_tps"],
          int(out["client_calls"]), int(out["client_tokens"])],
         ["same prompts again (response cache)", n, out["cached_s"], n / out["cached_s"], int(out["cached_calls"]),
          0]])
    text = (f"### LLM annotation (embedded SmolLM2-135M, {llm_threads} server threads, MR zero-shot label prompts, "
            f"max_tokens {settings.llm_max_tokens}, logprobs {'on' if settings.llm_logprobs else 'off'})"
            f"\n\n{table}\n\n"
            f"- client / raw throughput ratio: **{ratio:.2f}** (the client adds concurrency, parsing, logprob "
            "confidence and the SQLite cache write per answer).\n"
            f"- cache-hit re-run: {int(out['cached_calls'])} calls, {int(out['cached_hits'])} cache hits "
            f"({'OK' if out['cached_calls'] == 0 else 'FAILED: calls were made'}).\n"
            f"- failed/unusable requests through the client: {int(out['client_failed'])}.\n"
            f"- peak RSS of the embedded server process: {out['server_peak_rss']:.0f} MiB.")
    out["ratio"] = ratio
    return text, out


def bench_slm(sizes: list[int], settings: Settings, tmp: Path) -> tuple[str, list[dict[str, float]]]:
    base = read_jsonl(DATA / "mr_freeal" / "train.jsonl")
    encoder = Encoder(settings.encoder)  # loaded once, outside the timings
    results = []
    for size in sizes:
        rows = [(f"{i}", base[i % len(base)]) for i in range(size)]
        # repeated texts get a suffix so that they are distinct inputs of the same length class
        items = [Item(k, r["text"] + ("" if int(k) < len(base) else f" ({int(k) // len(base)})"), gold=r["label"],
                      augmented=r.get("backtranslation") or None) for k, r in rows]
        llm = [r.get("llm_label") or None for _, r in rows]
        gc.collect()
        reset_peak_rss()
        rss_before = rss_mib()
        run_dir = tmp / f"slm-{size}"
        with FreeALRun(settings.with_(data_dir=run_dir), LABELS, run_dir, encoder=encoder) as run:
            t0 = time.perf_counter()
            split = run.lower_split
            run._lower_states(items, split, lambda *a: None)
            t_enc = time.perf_counter() - t0
            t1 = time.perf_counter()
            model, out = run.train_slm(items, llm, seed_offset=1)
            t_train = time.perf_counter() - t1
            t2 = time.perf_counter()
            y = np.array([LABELS.index(x) if x else -1 for x in llm])
            pred, conf = out.probs.argmax(1), out.probs.max(1)
            pool = clean_agreed_pool(y, pred, conf, 2, ratio=settings.select_ratio)
            demo_pool(pool, out.embeddings, max(1, settings.demo_pool_size // 2), seed=settings.seed)
            t_sel = time.perf_counter() - t2
        peak = current_peak_mib()
        # per fold model: epochs [0, warm-up) are plain, the rest robust; each fold trains on (K-1)/K of the texts
        warm, folds = settings.slm_warmup_epochs, settings.slm_folds
        plain = [s for e, s in enumerate(out.epoch_seconds) if e % settings.slm_epochs < warm]
        robust = [s for e, s in enumerate(out.epoch_seconds) if e % settings.slm_epochs >= warm]
        per_fold = size * (folds - 1) / folds
        res = {"size": size, "encode_s": t_enc, "train_s": t_train, "select_s": t_sel,
               "round_s": t_enc + t_train + t_sel, "plain_sps": per_fold / np.mean(plain) if plain else float("nan"),
               "robust_sps": per_fold / np.mean(robust) if robust else float("nan"),
               "train_sps": per_fold * len(out.epoch_seconds) / t_train, "peak_rss": peak, "rss_before": rss_before,
               "plain_epoch_s": float(np.mean(plain)) if plain else float("nan"),
               "robust_epoch_s": float(np.mean(robust)) if robust else float("nan")}
        results.append(res)
        print(f"  SLM round on {size} texts: " + ", ".join(f"{k} {float(v):.1f}" for k, v in res.items()), flush=True)
        del model, out, run
    rows = [[r["size"], r["encode_s"], r["plain_sps"], r["robust_sps"], r["train_sps"], r["train_s"],
             r["select_s"], r["round_s"], r["rss_before"], r["peak_rss"]] for r in results]
    table = fmt_table(["texts", "encode s", "plain epoch samples/s", "robust epoch samples/s",
                       "training samples/s (all fold epochs)", "training s (all folds, held-out scoring included)",
                       "selection s", "round wall s", "RSS before MiB", "peak RSS MiB"], rows)
    text = (f"### One SLM round (no LLM; MR texts with the replayed gpt-3.5 labels and back-translations)\n\n"
            f"Measured with {settings.slm_folds} cross-fitted fold models of {settings.slm_epochs} epochs "
            f"({settings.slm_warmup_epochs} warm-up) each, top {settings.slm_train_layers} layers trained, batch "
            f"{settings.slm_batch_size}. Each fold model trains on (K-1)/K of the texts; a robust epoch costs more "
            "than a plain one (it runs the augmented view too).\n\n" + table)
    return text, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-n", type=int, default=40, help="prompts per annotation measurement")
    ap.add_argument("--llm-threads", type=int, default=2, help="CPU threads of the embedded server")
    ap.add_argument("--sizes", default="1000,5000,10000", help="texts per SLM round measurement")
    ap.add_argument("--threads", type=int, help="torch CPU threads for the SLM (1 is faster on a busy machine)")
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--skip-slm", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "speed.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    load_start = loadavg()
    settings = Settings.from_env()
    parts = []
    with tempfile.TemporaryDirectory(prefix="freeal-speed-") as tmp:
        if not args.skip_llm:
            text, _ = bench_llm(args.llm_n, settings, Path(tmp), args.llm_threads)
            print(text, flush=True)
            parts.append(text)
        if not args.skip_slm:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
            text, _ = bench_slm(sizes, settings, Path(tmp))
            print(text, flush=True)
            parts.append(text)
    parts.append("The /predict latency for a batch of 100 cached tasks is measured by benchmarks/load_predict.py.")
    write_result(Path(args.out), "FreeAL speed", "\n\n".join(parts), load_start)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
