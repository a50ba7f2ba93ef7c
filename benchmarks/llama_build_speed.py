"""Speed of the embedded 1.5B under llama-cpp-python wheels built with different instruction sets.

    .venv/bin/python benchmarks/llama_build_speed.py portable=~/.cache/freeal-wheels/llama-portable \\
        avx512=~/.cache/freeal-wheels/llama-avx512-vbmi-vnni-bf16-avxvnni

Each ``NAME=FOLDER`` holds one llama_cpp_python wheel; it is unpacked into a temporary folder and measured in
its own process (a wheel whose instructions this CPU lacks dies there with SIGILL, which is reported): the
instruction sets it was compiled for (``llama_print_system_info``), prompt evaluation in tokens per second
(a 230-token prompt of SST-2 sentences, evaluated afresh each time) and seconds per labelling request as the
main job sends them (a system prompt, 4 SST-2 demonstrations and the text, through the chat template, the
previous request's prefix reused as llama-cpp-python's server does, logprobs with 20 alternatives), by the
library's model class (``logits_all=True``, which its logprobs need) and by freeal's server class
(``serve_embedded.fast_logprobs_llama``, without it). Two threads, as the main job on 2 cores.
Writes ``benchmarks/results/llama_build_speed.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, RESULTS, ROOT, fmt_table, loadavg, read_jsonl, write_report  # noqa: E402

from freeal_backend.llm.embedded import DEFAULT_EMBEDDED, model_path  # noqa: E402
from freeal_backend.llm.prompts import label_messages  # noqa: E402

_MEASURE = r"""
import json, statistics, sys, time
import llama_cpp
from freeal_backend.llm.serve_embedded import fast_logprobs_llama
cfg = json.loads(sys.argv[1])
load = dict(model_path=cfg["gguf"], n_threads=cfg["threads"], n_ctx=2048, verbose=False)
fast = fast_logprobs_llama()(logits_all=False, **load)
info = llama_cpp.llama_print_system_info().decode().strip()
print(json.dumps({"info": info}), flush=True)
toks = fast.tokenize(cfg["prompt"].encode())
rates = []
for _ in range(cfg["reps"]):
    fast.reset()
    t = time.perf_counter(); fast.eval(toks); rates.append(len(toks) / (time.perf_counter() - t))
def per_request(m):
    times = []
    for messages in cfg["requests"]:
        t = time.perf_counter()
        m.create_chat_completion(messages=messages, max_tokens=2, temperature=0, logprobs=True, top_logprobs=20)
        times.append(time.perf_counter() - t)
    return statistics.mean(times)
fast_s = per_request(fast)
del fast
library_s = per_request(llama_cpp.Llama(logits_all=True, **load))
print(json.dumps({"info": info, "prompt_tokens": len(toks), "prompt_tok_s": statistics.mean(rates),
                  "prompt_tok_s_sd": statistics.pstdev(rates), "library_request_s": library_s,
                  "freeal_request_s": fast_s, "requests": len(cfg["requests"])}))
"""


def measure(wheel_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Unpack the folder's wheel and measure it in a fresh interpreter; a crash is reported, not raised."""
    wheels = sorted(wheel_dir.expanduser().glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise SystemExit(f"error: no llama_cpp_python wheel in {wheel_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheels[-1]).extractall(tmp)
        proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(cfg)], capture_output=True, text=True,
                              env={"PYTHONPATH": f"{tmp}:{ROOT}", "PATH": "/usr/bin:/bin"})
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    result = dict(lines[-1]) if lines else {}
    result["exit"] = proc.returncode
    if proc.returncode:
        result["error"] = "SIGILL (illegal instruction)" if proc.returncode == -4 else proc.stderr.strip()[-300:]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheels", nargs="+", metavar="NAME=FOLDER")
    ap.add_argument("--requests", type=int, default=24, help="labelling requests timed per wheel")
    ap.add_argument("--reps", type=int, default=5, help="prompt evaluations timed per wheel")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    load_start = loadavg()
    rows = read_jsonl(DATA / "sst2" / "train.jsonl")
    demos = [(r["text"], r["label"]) for r in rows[:4]]
    texts = [r["text"] for r in rows[4:4 + args.requests]]
    labels = sorted({r["label"] for r in rows})
    task = "Classify the sentiment of the movie review."
    cfg = {"gguf": str(model_path(DEFAULT_EMBEDDED)), "threads": args.threads, "reps": args.reps,
           "prompt": " ".join(r["text"] for r in rows[100:160])[:1100],
           "requests": [label_messages(t, labels, demos, task) for t in texts]}
    results = {}
    for spec in args.wheels:
        name, _, folder = spec.partition("=")
        results[name] = measure(Path(folder), cfg)
        print(name, results[name], flush=True)
    table = [[name, r.get("info", "—").replace(" | ", ", ").removeprefix("CPU : ").rstrip(" |,"),
              f"{r['prompt_tok_s']:.1f} ± {r['prompt_tok_s_sd']:.1f}" if "prompt_tok_s" in r else "—",
              *(f"{r[k]:.2f}" if k in r else "—" for k in ("library_request_s", "freeal_request_s")),
              r.get("error", "ok")] for name, r in results.items()]
    body = (f"Model {DEFAULT_EMBEDDED}, {args.threads} threads; prompt evaluation of a "
            f"{next((r['prompt_tokens'] for r in results.values() if 'prompt_tokens' in r), '?')}-token prompt "
            f"({args.reps} times, mean ± sd); {args.requests} labelling requests of the main job's shape (4 SST-2 "
            "demonstrations and the text, the previous request's prefix reused, logprobs with 20 alternatives), "
            "mean seconds each, as llama-cpp-python's own model class answers them (it needs `logits_all`: "
            "the output layer at every prompt position) and as freeal's server class does "
            "(`serve_embedded.fast_logprobs_llama`, without `logits_all`: the same logprobs from the logits "
            "each answer token was drawn from).\n\n"
            + fmt_table(["wheel", "compiled for", "prompt tokens / s", "s per request, library's class",
                         "s per request, freeal's class", "status"], table))
    write_report(args.out_dir, "llama_build_speed", "llama.cpp builds: speed of the embedded LLM", body,
                 {"model": DEFAULT_EMBEDDED, "threads": args.threads, "results": results}, load_start)


if __name__ == "__main__":
    main()
