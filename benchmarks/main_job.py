"""The README's first command, run and scored: FreeAL's main job with the LLM it is configured for.

    .venv/bin/python benchmarks/main_job.py                 # the README's `freeal run ...` line, as it stands
    .venv/bin/python benchmarks/main_job.py --limit 50      # the same command on fewer texts

The command is read from README.md (the first `.venv/bin/freeal run ...` line of its set-up-and-run block),
so the two cannot drift. It runs as a subprocess under ``/usr/bin/time -v`` (when present) with
``FREEAL_DATA_DIR`` in a fresh temporary folder and ``--out FILE`` added; then the output labels are scored
against gold (the input's ``label`` field): per stage accuracy / macro-F1 / share answered and LLM calls
(from the run's state), the final labels' ECE and AUROC (wrong first) of the LLM's confidence and of the
final score, the review flag's share / precision / recall, the run-health estimate against the truth, the
texts the LLM left unanswered, wall time, CPU time (the CLI and the processes it waited for, the embedded
LLM server among them) and peak RSS (the largest of those processes). Writes
``benchmarks/results/main_job_<data>_n<N>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, beside, fmt_table, loadavg, mem_total_gib, pct, write_result  # noqa: E402
from quality import final_metrics, judged_stage, rejected_rounds, write_json  # noqa: E402

from freeal_backend.cli import build_parser  # noqa: E402
from freeal_backend.config import Settings  # noqa: E402
from freeal_backend.dataio import read_rows  # noqa: E402
from freeal_backend.llm.client import in_flight  # noqa: E402
from freeal_backend.loop import FreeALRun  # noqa: E402
from freeal_backend.metrics import label_scores  # noqa: E402
from freeal_backend.storage import Store  # noqa: E402

TIME = Path("/usr/bin/time")
_FREEAL_RUN = re.compile(r"(\.venv/bin/freeal run .*)$")


def readme_command(readme: Path = ROOT / "README.md") -> str:
    """The first ``.venv/bin/freeal run ...`` line inside a fenced block of the README (without set-up)."""
    fenced = False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and (match := _FREEAL_RUN.search(line.strip())):
            return match.group(1)
    raise SystemExit(f"error: {readme} has no `.venv/bin/freeal run ...` line in a fenced block")


def with_limit(argv: list[str], limit: int) -> list[str]:
    """``argv`` with its ``--limit`` value replaced (or added)."""
    if "--limit" in argv:
        i = argv.index("--limit")
        return [*argv[:i + 1], str(limit), *argv[i + 2:]]
    return [*argv, "--limit", str(limit)]


def time_stats(path: Path) -> dict[str, float]:
    """User and system CPU seconds and peak RSS (MiB) from ``/usr/bin/time -v -o path``."""
    text = path.read_text(encoding="utf-8")

    def field(name: str) -> float:
        match = re.search(rf"{re.escape(name)}: ([\d.]+)", text)
        return float(match.group(1)) if match else float("nan")

    return {"cpu_user_s": field("User time (seconds)"), "cpu_sys_s": field("System time (seconds)"),
            "peak_rss_mib_cli": field("Maximum resident set size (kbytes)") / 1024}


def cli_output(stdout: str) -> dict[str, Any]:
    """What ``freeal run`` prints at the end: its wall time, the LLM client's counters, seconds per stage."""
    out: dict[str, Any] = {"run_wall_s": float("nan"), "llm": {}, "stage_seconds": {}}
    match = re.search(r"wall time ([\d.]+) s; LLM: (\{.*\}|not used)", stdout)
    if match:
        out["run_wall_s"] = float(match.group(1))
        out["llm"] = json.loads(match.group(2)) if match.group(2).startswith("{") else {}
    match = re.search(r"^stage seconds: (.*)$", stdout, re.M)
    if match:
        for part in match.group(1).split(", "):
            name, _, secs = part.rpartition(" ")
            if name:
                out["stage_seconds"][name] = round(float(secs), 1)
    return out


def run_command(argv: list[str], data_dir: Path, stats_file: Path) -> tuple[str, float, dict[str, float]]:
    """Run ``argv`` from the repository root with FREEAL_DATA_DIR=data_dir (under /usr/bin/time -v when
    present), echoing its output; returns stdout, wall seconds and CPU/RSS figures."""
    timed = [str(TIME), "-v", "-o", str(stats_file), *argv] if TIME.exists() else argv
    env = dict(os.environ, FREEAL_DATA_DIR=str(data_dir))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(timed, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"error: the command exited with {code}")
    if TIME.exists():
        stats = time_stats(stats_file)
    else:  # resource usage of the waited-for children (the same figures, less exact for RSS)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stats = {"cpu_user_s": after.ru_utime - before.ru_utime, "cpu_sys_s": after.ru_stime - before.ru_stime,
                 "peak_rss_mib_cli": after.ru_maxrss / 1024}
    return "".join(lines), wall, stats


def score(out_file: Path, input_file: Path, data_dir: Path) -> dict[str, Any]:
    """The output labels against the input's gold; per stage scores and LLM calls from the run's state."""
    rows = read_rows(input_file)
    gold_all = {str(r.get("id", n)): str(r["label"]) for n, r in enumerate(rows) if r.get("label") is not None}
    results = {str(r["id"]): r for r in read_rows(out_file)}
    gold = {k: gold_all[k] for k in results if k in gold_all}
    if not gold:
        raise SystemExit(f"error: {input_file} has no gold 'label' for the labelled texts")
    run_dirs = sorted((data_dir / "runs").glob("*/state.sqlite"))
    if len(run_dirs) != 1:
        raise SystemExit(f"error: expected one run in {data_dir / 'runs'}, found {len(run_dirs)}")
    run_dir = run_dirs[0].parent
    store = Store(run_dir / "state.sqlite")
    labels, rounds = list(store.get_meta("labels")), int(store.get_meta("rounds_done") or 0)
    store.close()
    with FreeALRun(Settings.from_env(data_dir=data_dir), labels, run_dir) as run:
        stages = run.stage_labels()
        titles = {stage: run.stage_title(stage) for stage in stages}
        health = run.health()
        shots = run.shots
        round_llm = {r: (run.store.get_meta(f"round_stats_r{r}") or {}).get("llm") or {} for r in range(rounds + 1)}
        rejected = rejected_rounds(run, rounds)
    rows_out = []
    for stage, pred in stages.items():
        sc = label_scores(pred, gold, labels)
        llm = round_llm[0] if stage == "llm_r0" else round_llm.get(int(stage[5:])) if stage.startswith("llm_r") else {}
        rows_out.append({"id": stage, "stage": titles[stage] + (" (round 0)" if stage == "llm_r0" else ""),
                         "accuracy": sc["accuracy"], "macro_f1": sc["macro_f1"], "coverage": sc["coverage"],
                         "llm_calls": int(llm.get("calls", 0)), "llm_cache_hits": int(llm.get("cache_hits", 0))})
    judged = judged_stage(stages, rounds, rejected)
    metrics = final_metrics(results, gold, stages[judged], health)
    return {"rounds": rounds, "labels": labels, "shots": shots, "stages": rows_out, "health_judged_stage": judged,
            "zero_shot_in_round0_calls": "zero_shot" in stages, **metrics}


def report(data: dict[str, Any]) -> str:
    """The Markdown body of a main-job result."""
    table = fmt_table(["stage", "accuracy % (against gold)", "macro-F1 %", "labelled %", "LLM calls"],
                      [[s["stage"], pct(s["accuracy"]), pct(s["macro_f1"]), pct(s["coverage"]),
                        s["llm_calls"] if s["id"].startswith("llm_r") else "—"] for s in data["stages"]])
    per_round = " + ".join(f"{s['llm_calls']}" for s in data["stages"] if s["id"].startswith("llm_r"))
    return "\n".join([
        "The README's first command (README.md, the set-up-and-run block), run with a fresh data dir "
        "(`FREEAL_DATA_DIR`) and `--out` added so its labels can be scored; gold (the input's `label`) is used "
        "only for this file.", "", "Run as:", "", "```", data["command"], "```", "",
        f"- date (UTC): {data['date']}; machine: {data['machine']}.",
        f"- LLM: {data['model']}; {data['rounds']} refinement round(s); {data['n']} texts of `{data['input']}`.", "",
        table, "",
        f"- LLM calls: {data['llm_calls']} in all ({per_round} per round; round 0 includes writing the demonstrations"
        f"{' and the zero-shot pass' if data['zero_shot_in_round0_calls'] else ''}), {data['llm_cache_hits']} cache "
        f"hits; {data['llm_prompt_tokens']:,} prompt + {data['llm_completion_tokens']:,} completion tokens; "
        f"{data['failures']} failed, {data['unparsed']} unparsed.",
        f"- Final labels: {pct(data['final_accuracy'])} % right; {data['answered_wrong']} wrong answers of the LLM, "
        f"{data['unanswered']} texts the LLM left unanswered (labelled by the small model; "
        f"{data['unanswered_wrong']} of them wrong).",
        f"- Run health (no gold): estimated {pct(data['health_estimate'])} % of the labels right "
        f"({data['health_verdict']}); true {pct(data['health_true_accuracy'])} % (stage "
        f"`{data['health_judged_stage']}`, the labels it judged); final {pct(data['final_accuracy'])} %. Chance alone "
        f"moves the true accuracy of labels right with their final scores by {pct(data['chance_sd'])} points (sd).",
        f"- Review flag: {pct(data['flagged_share'])} % of the texts flagged; precision {pct(data['flag_precision'])} %, "
        f"recall {pct(data['flag_recall'])} % of the wrong final labels. The 10 % lowest-scored texts hold "
        f"{pct(data['top10pct_recall'])} % of them.",
        f"- Final score: AUROC {data['score_auroc_wrong']:.3f} for ranking the wrong labels first, ECE "
        f"{data['score_ece']:.3f}. The LLM's own logprob confidence in its final answer ({data['llm_conf_n']} "
        f"answers): AUROC {data['llm_conf_auroc_wrong']:.3f}, ECE {data['llm_conf_ece']:.3f}.",
        f"- Time: {data['wall_s'] / 60:.1f} min wall ({', '.join(f'{k} {v:.0f} s' for k, v in data['stage_seconds'].items())}); "
        f"CPU {data['cpu_user_s']:,.0f} s user + {data['cpu_sys_s']:,.0f} s system (the CLI and the processes it "
        f"waited for); peak RSS {data['peak_rss_mib_cli']:.0f} MiB (the largest single process).",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, help="replace the command's --limit (texts labelled)")
    ap.add_argument("--command", help="run this `freeal run ...` command instead of the README's")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the result files go")
    ap.add_argument("--keep", metavar="DIR", help="run in this new folder and keep it (the run's state, for "
                    "evidence_ablation.py or refinement_rule.py) instead of a temporary one")
    args = ap.parse_args(argv)
    command = args.command or readme_command()
    cli_argv = shlex.split(command)
    if args.limit:
        cli_argv = with_limit(cli_argv, args.limit)
    try:
        parsed = build_parser().parse_args(cli_argv[1:])
    except SystemExit:
        raise SystemExit(f"error: not a `freeal run` command: {command}")
    if parsed.command != "run" or parsed.out or parsed.data_dir or parsed.run_dir:
        raise SystemExit("error: the command must be `freeal run` without --out, --data-dir or --run-dir")
    load_start = loadavg()
    began = dt.datetime.now(dt.timezone.utc)
    if args.keep and Path(args.keep).exists():
        raise SystemExit(f"error: --keep {args.keep} exists: name a new folder")
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="freeal-main-job-")
          ) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        data_dir, out_file = Path(tmp) / "data", Path(tmp) / "labels.jsonl"
        cli_argv = [*cli_argv, "--out", str(out_file)]
        shown = (f"{TIME} -v " if TIME.exists() else "") + f"env FREEAL_DATA_DIR={data_dir} " + shlex.join(cli_argv)
        print(f"running: {shown}", flush=True)
        stdout, wall, usage = run_command(cli_argv, data_dir, Path(tmp) / "time.txt")
        scores = score(out_file, (ROOT / parsed.input).resolve(), data_dir)
    cli = cli_output(stdout)
    llm = cli["llm"]
    env = Settings.from_env()
    endpoint = env.llm_base_url or "embedded"
    data = {
        "command": shown, "readme_command": command,
        "date": f"{began:%Y-%m-%d %H:%M}-{dt.datetime.now(dt.timezone.utc):%H:%M} UTC",
        "machine": f"{os.cpu_count()} CPU cores, {mem_total_gib():.1f} GiB; load average at start {load_start}, "
                   f"at end {loadavg()}",
        "model": f"{env.llm_model} ({endpoint}), LLM_THREADS={env.llm_threads}, shots {scores['shots']}, "
                 f"concurrency {in_flight(env.llm_concurrency, embedded=not env.llm_base_url)}",
        "input": parsed.input, "wall_s": round(wall, 1), "run_wall_s": cli["run_wall_s"], **usage,
        "llm_calls": llm.get("calls", 0), "llm_cache_hits": llm.get("cache_hits", 0),
        "llm_prompt_tokens": llm.get("prompt_tokens", 0), "llm_completion_tokens": llm.get("completion_tokens", 0),
        "unparsed": llm.get("unparsed", 0), "failures": llm.get("failures", 0),
        "stage_seconds": cli["stage_seconds"], **scores,
    }
    publish(Path(args.out_dir) / f"main_job_{Path(parsed.input).parent.name}_n{data['n']}",
            f"The README's first command: {data['n']} texts of {parsed.input}", report(data), data, load_start)
    return 0


def publish(stem: Path, title: str, body: str, data: dict[str, Any], load_start: str) -> None:
    """Write a result as ``<stem>.md`` (``body`` under ``title``) and ``<stem>.json`` (``data``), and print it."""
    write_result(beside(stem, ".md"), title, body, load_start)
    write_json(beside(stem, ".json"), data)
    print(body)
    print(f"wrote {stem}.md and .json", flush=True)


if __name__ == "__main__":
    sys.exit(main())
