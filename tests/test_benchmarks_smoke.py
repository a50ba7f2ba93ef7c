"""The benchmark scripts run end to end on a tiny slice (so they cannot rot); numbers are not checked."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from freeal_backend.slm.budget import CALIBRATION_SD
from tests.fixtures_llm import DATA, shared_rows
from tests.fixtures_ls import LabelStudioServer

ROOT = Path(__file__).resolve().parents[1]
TINY_SLM = {"FREEAL_SLM_EPOCHS": "2", "FREEAL_SLM_WARMUP": "1", "FREEAL_DEMOS_PER_LABEL": "2", "FREEAL_SLM_MIN_STEPS": "0"}


def _run(args: list[str], tmp_path: Path, **env: str) -> str:
    if not (DATA / "mr" / "train.jsonl").exists():
        pytest.skip(f"shared data sets are not available at {DATA}")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FREEAL_", "LLM_"))}
    full_env.update(TINY_SLM, FREEAL_DATA_DIR=str(tmp_path / "data"), **env)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_replay_mr_tiny(tmp_path: Path) -> None:
    stem = tmp_path / "replay_v1.5"  # a dot in a stem: the files are <stem>.md/.json/.npz
    _run(["benchmarks/replay_mr.py", "--n", "60", "--test-n", "20", "--seeds", "0,1", "--out", str(stem)], tmp_path)
    text = stem.with_name(stem.name + ".md").read_text()
    for row in ["robust SLM (mean ± sd, 2 seeds)", "naive SLM", "answered-but-wrong", "expected calibration error",
                "Command (from the repository root)", "load average"]:
        assert row in text, row
    data = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert len(data["per_seed"]["robust"]) == 2 and "llm_auroc" in data["mean"]["naive"]
    assert data["mean"]["robust"]["llm_accuracy"] == pytest.approx(
        float(re.search(r"gpt-3.5 labels right[^|]*\| ([\d.]+)", text).group(1)) / 100, abs=1e-3)


LOOP_RUN_KEYS = {"stages", "stage_order", "llm_total", "loop_wall_s", "final_accuracy", "answered_wrong", "unanswered",
                 "llm_conf_ece", "llm_conf_auroc_wrong", "score_ece", "score_auroc_wrong", "flagged_share",
                 "flag_precision", "flag_recall", "health_estimate", "health_true_accuracy", "chance_sd", "config", "extras"}
LOOP_STAGE_KEYS = {"accuracy", "macro_f1", "coverage", "calls", "cache_hits", "prompt_tokens", "completion_tokens",
                   "wall_s"}


def test_quality_tiny(tmp_path: Path, llm_base_url: str, llm_model: str) -> None:
    """Two seeds on the same 12 texts, with the extras; the zero-shot answers are shared across seeds, and a
    re-run re-reads the finished runs' records without asking the LLM."""
    args = ["benchmarks/quality.py", "--datasets", "mr", "--n", "12", "--test-n", "10", "--rounds", "1", "--seeds",
            "0,1", "--extras", "--base-url", llm_base_url, "--model", llm_model, "--out-dir", str(tmp_path),
            "--data-dir", str(tmp_path / "bench")]
    stdout = _run(args, tmp_path, FREEAL_SHOTS="2")
    md, js = (tmp_path / "loop_mr_n12_smollm2-135m-instruct.md"), (tmp_path / "loop_mr_n12_smollm2-135m-instruct.json")
    text = md.read_text()
    for stage in ["LLM zero-shot", "LLM + self-generated demos", "naive SLM", "SLM round 1", "refined LLM round 1",
                  "SLM round 2", "| final |", "review flag", "run health", "chance alone", "unanswered", "ECE",
                  "Command (from the repository root)", "--seeds 0,1"]:
        assert stage in text, stage
    data = json.loads(js.read_text())
    assert data["seeds_finished"] == [0, 1] and data["stage_order"] == [
        "zero_shot", "llm_r0", "slm_r1", "llm_r1", "slm_r2", "final"]
    runs = data["per_seed"]
    for rec in runs.values():
        assert LOOP_RUN_KEYS <= set(rec), LOOP_RUN_KEYS - set(rec)
        assert all(LOOP_STAGE_KEYS <= set(st) for st in rec["stages"].values())
        assert rec["final_accuracy"] is not None and rec["n"] == 12 and rec["stages"]["llm_r0"]["calls"] > 0
        assert set(rec["extras"]["test_accuracy"]) >= {"naive", "slm_r1"} and rec["extras"]["test_n"] == 10
        assert 0.0 <= rec["chance_sd"] <= 0.5 / 12 ** 0.5  # the sd of a mean of 12 Bernoullis is at most this
    # the same texts for both seeds; the zero-shot pass was asked once, then came from the cache
    assert runs["0"]["stages"]["zero_shot"]["calls"] == 12 and runs["0"]["stages"]["zero_shot"]["cache_hits"] == 0
    assert runs["1"]["stages"]["zero_shot"]["calls"] == 0 and runs["1"]["stages"]["zero_shot"]["cache_hits"] == 12
    assert runs["0"]["config"]["seed"] == 0 and runs["1"]["config"]["seed"] == 1
    mean = data["mean_sd"]["final_accuracy"]
    assert mean["values"] == [runs["0"]["final_accuracy"], runs["1"]["final_accuracy"]]
    assert mean["mean"] == pytest.approx(sum(mean["values"]) / 2)
    summary = json.loads((tmp_path / "loop_summary_n12_smollm2-135m-instruct.json").read_text())["datasets"]["mr"]
    assert summary["seeds_finished"] == [0, 1] and summary["gain_exceeds_one_sd"] in (True, False)
    assert summary["llm_requests_per_stage"]["zero_shot"]["values"] == [12, 12]
    # a re-run only re-reads the finished runs
    again = _run(args, tmp_path, FREEAL_SHOTS="2")
    assert again.count("finished earlier: re-read") == 2 and " done: " not in again, again
    assert json.loads(js.read_text())["per_seed"] == runs
    # --report-only rewrites the reports from the finished seeds and runs none of the others
    only = _run([*args[:args.index("--seeds") + 1], "0,1,2", *args[args.index("--seeds") + 2:], "--report-only"],
                tmp_path, FREEAL_SHOTS="2")
    assert "[mr s2] not finished: left out of the report" in only and " done: " not in only, only
    assert not (tmp_path / "bench" / "runs" / "loop-mr-n12-ss0-s2-smollm2-135m-instruct").exists()
    assert json.loads(js.read_text())["seeds_finished"] == [0, 1]
    # a run whose record is gone resumes from its state: no stage asks again, and the cost booked per stage
    # in the earlier session stays
    (tmp_path / "bench" / "runs" / "loop-mr-n12-ss0-s1-smollm2-135m-instruct" / "loop_result.json").unlink()
    _run(args, tmp_path, FREEAL_SHOTS="2")
    resumed = json.loads(js.read_text())["per_seed"]["1"]
    assert resumed["llm_total"] == runs["1"]["llm_total"] and resumed["final_accuracy"] == runs["1"]["final_accuracy"]
    # which rule would have set the refinement aside, read from the finished run (nothing trained or asked)
    run_dir = tmp_path / "bench" / "runs" / "loop-mr-n12-ss0-s0-smollm2-135m-instruct"
    _run(["benchmarks/refinement_rule.py", str(run_dir), "--name", "tiny", "--out-dir", str(tmp_path)], tmp_path)
    rule = json.loads((tmp_path / "refinement_rule_tiny.json").read_text())
    assert [r["round"] for r in rule] == [1] and rule[0]["n"] == 12
    assert isinstance(rule[0]["llm_rule_sets_aside"], bool) and isinstance(rule[0]["slm_rule_sets_aside"], bool)
    assert "LLM-confidence rule" in (tmp_path / "refinement_rule_tiny.md").read_text()
    # why the refinement helped or not: the same two finished runs, pooled over seeds
    _run(["benchmarks/refinement_why.py", str(run_dir), str(run_dir.with_name(run_dir.name.replace("-s0-", "-s1-"))),
          "--name", "tiny", "--out-dir", str(tmp_path)], tmp_path)
    why = json.loads((tmp_path / "refinement_why_tiny.json").read_text())["runs"]
    assert [(r["dataset"], r["seed"]) for r in why] == [("mr", 0), ("mr", 1)]
    for r in why:
        (entry,) = r["rounds"]
        assert entry["asked_not_stored"] == 0 and entry["kept"] + entry["asked"] == 12
        assert entry["after"] == pytest.approx(runs[str(r["seed"])]["stages"]["llm_r1"]["accuracy"])
        assert 0.0 <= entry["with_zero_shot"] <= 1.0  # quality.py asks the zero-shot baseline: one more vote
    assert "| mr | 1 | 2 |" in (tmp_path / "refinement_why_tiny.md").read_text()
    # the refinement asked again on copies of the same runs, with the demos in each order
    _run(["benchmarks/refinement_order.py", str(run_dir), str(run_dir.with_name(run_dir.name.replace("-s0-", "-s1-"))),
          "--work", str(tmp_path / "order"), "--name", "tiny", "--out-dir", str(tmp_path)], tmp_path, FREEAL_SHOTS="2")
    order = json.loads((tmp_path / "refinement_order_tiny.json").read_text())["runs"]
    assert [(r["seed"], r["order"]) for r in order] == [(0, "drawn"), (0, "most_shared_first"),
                                                         (1, "drawn"), (1, "most_shared_first")]
    for r in order:
        assert r["round0"] == pytest.approx(runs[str(r["seed"])]["stages"]["llm_r0"]["accuracy"])
        if r["order"] == "drawn":  # the default: the run's own prompts: its cache answers them, as it did
            assert r["calls"] == 0 and r["cache_hits"] == r["asked"] > 0 and r["final_minus_first"] == 0
            assert r["refined"] == pytest.approx(runs[str(r["seed"])]["stages"]["llm_r1"]["accuracy"])
    assert "| mr | most_shared_first | 2 |" in (tmp_path / "refinement_order_tiny.md").read_text()
    again = _run(["benchmarks/refinement_order.py", str(run_dir), "--work", str(tmp_path / "order"), "--name", "again",
                  "--out-dir", str(tmp_path)], tmp_path, FREEAL_SHOTS="2")  # finished copies: re-read, not re-run
    assert json.loads((tmp_path / "refinement_order_again.json").read_text())["runs"] == order[:2], again


def test_main_job_tiny(tmp_path: Path, llm_base_url: str, llm_model: str) -> None:
    """The README's first command on 12 texts, scored; the layout of results/main_job_sst2_n160.json."""
    _run(["benchmarks/main_job.py", "--limit", "12", "--out-dir", str(tmp_path)], tmp_path,
         LLM_BASE_URL=llm_base_url, LLM_MODEL=llm_model, FREEAL_SHOTS="2", FREEAL_ROUNDS="1")
    data = json.loads((tmp_path / "main_job_sst2_n12.json").read_text())
    layout = json.loads((ROOT / "benchmarks" / "results" / "main_job_sst2_n160.json").read_text())
    assert set(layout) <= set(data), set(layout) - set(data)
    assert set(layout["stages"][0]) <= set(data["stages"][0])
    readme = (ROOT / "README.md").read_text()
    assert data["readme_command"] in readme and "--limit 12" in data["command"] and "--out" in data["command"]
    assert [s["id"] for s in data["stages"]] == ["llm_r0", "slm_r1", "llm_r1", "slm_r2", "final"]
    assert data["n"] == 12 and data["llm_calls"] > 0 and data["stages"][0]["llm_calls"] > 0
    assert data["cpu_user_s"] > 0 and data["peak_rss_mib_cli"] > 0 and data["wall_s"] >= data["run_wall_s"] > 0
    # the output file and the run's state agree on the final labels' accuracy
    assert data["stages"][-1]["accuracy"] == pytest.approx(data["final_accuracy"])
    assert set(data["stage_seconds"]) >= {"demos", "llm_r0", "slm_r1", "llm_r1", "slm_r2"}
    text = (tmp_path / "main_job_sst2_n12.md").read_text()
    assert 0.0 <= data["chance_sd"] <= 0.5 / 12 ** 0.5
    for row in ("| refined LLM round 1", "| final |", "Run health", "Chance alone", "Review flag", "peak RSS",
                "Command (from the repository root)"):
        assert row in text, row


def test_injection_tiny(tmp_path: Path, llm_base_url: str, llm_model: str) -> None:
    """The README's first command on 12 texts, 4 of them with an instruction naming a wrong label: each
    template used, every injected text scored, the injected copy written outside ../shared/data."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from injection import TEMPLATES, inject, sampled_rows

    rows = sampled_rows(DATA / "sst2" / "train.jsonl", 12, 0)
    again, injected = inject(rows, ["negative", "positive"], 1 / 3, 0)
    assert len(injected) == 4 and {v["template"] for v in injected.values()} == set(range(len(TEMPLATES)))
    for row, new in zip(rows, again):
        target = injected.get(str(row["id"]), {}).get("target")
        assert new["text"] == (row["text"] if target is None else row["text"] + TEMPLATES[
            injected[str(row["id"])]["template"]].format(label=target)) and target != row["label"]
    _run(["benchmarks/injection.py", "--limit", "12", "--share", str(1 / 3), "--out-dir", str(tmp_path)], tmp_path,
         LLM_BASE_URL=llm_base_url, LLM_MODEL=llm_model, FREEAL_SHOTS="2", FREEAL_ROUNDS="1")
    data = json.loads((tmp_path / "injection_sst2_n12.json").read_text())
    assert data["injected_ids"] == injected and data["n"] == 12
    groups = data["groups"]
    assert groups["all injected"]["texts"] == 4 and groups["not injected"]["texts"] == 8
    assert sum(groups[f"template {t}"]["texts"] for t in range(len(TEMPLATES))) == 4
    assert all(g["final_wrong_flagged"] <= g["final_wrong"] <= g["texts"] for g in groups.values())
    assert "| all injected |" in (tmp_path / "injection_sst2_n12.md").read_text()


def test_llm_survey_tiny(tmp_path: Path) -> None:
    stem = tmp_path / "survey_0.5b"
    args = ["benchmarks/llm_survey.py", "--models", "smollm2-135m-instruct", "--datasets", "sst2,trec", "--n", "4",
            "--shots", "2", "--pool", "2", "--out", str(stem), "--cache-dir", str(tmp_path / "cache")]
    _run(args, tmp_path)
    cells = json.loads(stem.with_name(stem.name + ".json").read_text())["cells"]
    assert set(cells) == {f"smollm2-135m-instruct|{d}|{c}" for d in ("sst2", "trec") for c in ("zero-shot", "2-shot")}
    assert all(c["n"] == 4 and c["calls"] == 4 and c["cpu_seconds_per_text"] > 0 for c in cells.values())
    text = stem.with_name(stem.name + ".md").read_text()
    assert "CPU-s/text" in text and "Command (from the repository root)" in text
    _run([*args, "--datasets", "sst2,trec,subj"], tmp_path)  # resumes: only the new data set's cells are asked
    again = json.loads(stem.with_name(stem.name + ".json").read_text())["cells"]
    assert {k: v for k, v in again.items() if "|subj|" not in k} == cells and len(again) == 6


def test_speed_tiny(tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    _run(["benchmarks/speed.py", "--llm-n", "3", "--sizes", "40", "--out", str(out)], tmp_path,
         LLM_MODEL="smollm2-135m-instruct")
    text = out.read_text()
    assert "client / raw throughput ratio" in text
    assert "cache-hit re-run: 0 calls, 3 cache hits (OK)" in text
    assert re.search(r"^\| 40 \|", text, re.M), text


def test_status_page_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "status_page.md"
    proc = subprocess.run([sys.executable, "benchmarks/status_page.py", "--n", "300", "--repeat", "2", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| /projects/1 |" in out.read_text() and "| /status/1 |" in out.read_text()


@pytest.mark.ls
def test_ls_push_tiny(tmp_path: Path, label_studio: LabelStudioServer) -> None:
    out = tmp_path / "ls_push"
    _run(["benchmarks/ls_push.py", "--tasks", "12", "--batches", "5,12", "--ls-url", label_studio.url,
          "--ls-token", label_studio.token, "--out", str(out)], tmp_path)
    text = out.with_suffix(".md").read_text()
    assert "Command (from the repository root)" in text and "**extrapolation**" in text
    assert re.search(r"^\| 5 \| no \|", text, re.M) and re.search(r"^\| 12 \| yes \|", text, re.M), text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["tasks"] == 12 and [p["batch"] for p in data["pushes"]] == [5, 12]


def test_ner_loop_tiny(tmp_path: Path) -> None:
    from tests.fake_openai import MODEL, FakeOpenAI

    stem = tmp_path / "ner_loop_n16_1.5b"  # a dot in the name: the files are <stem>.md/.json, not <stem minus .5b>
    run_dir = tmp_path / "data" / "runs" / "ner"
    with FakeOpenAI() as fake:
        _run(["benchmarks/ner_loop.py", "--n", "16", "--stride", "50", "--out", str(stem), "--run-dir", str(run_dir)],
             tmp_path, LLM_BASE_URL=fake.base_url, LLM_MODEL=MODEL, FREEAL_SLM_FOLDS="2", FREEAL_SHOTS="2")
    text = stem.with_name(stem.name + ".md").read_text()
    for row in ["Entities per stage", "| llm_r0 |", "| final |", "Review flag", "ECE", "Region scores",
                "Command (from the repository root)"]:
        assert row in text, row
    data = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert data["n"] == 16 and set(data["stages"]) >= {"llm_r0", "slm_r1", "llm_r1", "final"}
    assert 0 < data["regions"]["scored"] <= data["regions"]["regions"]  # the fake LLM gives logprobs
    # the finished span run re-judged with and without the LLM's evidence (no LLM call: none is reachable)
    _run(["benchmarks/evidence_ablation.py", str(run_dir), "--name", "spans", "--out-dir", str(tmp_path)], tmp_path,
         LLM_BASE_URL="http://127.0.0.1:9/v1", LLM_MODEL=MODEL)
    ablation = json.loads((tmp_path / "evidence_ablation_spans.json").read_text())[0]
    assert ablation["n"] == 16 and set(ablation["variants"]) >= {
        "tagger alone", "tagger + LLM agreement over rounds",
        "tagger + LLM confidence and agreement over rounds (as before)",
        "the same + the spans' own scores assembled per sentence (what runs use with a calibrated LLM)"}
    assert "exactly gold" in (tmp_path / "evidence_ablation_spans.md").read_text()
    regions = ablation["regions"]  # each span's own score, from the LLM, the tagger and both
    assert len(regions) == 5 and len({r["spans"] for r in regions.values()}) == 1
    assert all(0 <= r["auroc"] <= 1 and 0 <= r["mean_score"] <= 1 for r in regions.values())
    assert "region score in Label Studio" in (tmp_path / "evidence_ablation_spans.md").read_text()


def test_scale_tiny(tmp_path: Path) -> None:
    stem = tmp_path / "scale_v1.0"
    _run(["benchmarks/scale.py", "--full", "40,80", "--encode", "40,80", "--out", str(stem)], tmp_path,
         FREEAL_SLM_EPOCHS="1", FREEAL_SLM_TRAIN_LAYERS="1", OMP_NUM_THREADS="1")
    text = stem.with_name(stem.name + ".md").read_text()
    for row in ["| slm_r1 |", "| total |", "time exponent", "encode_lower", "RSS left after each stage",
                "Command (from the repository root)"]:
        assert row in text, row
    data = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert [r["n"] for r in data["full"]] == [40, 80] and [r["n"] for r in data["encode"]] == [40, 80]
    assert all(r["seconds"]["total"] > 0 and r["peak_mib"]["slm_r1"] > 0 for r in data["full"])


def test_health_is_checked_against_the_labels_it_judged_not_a_refinement_set_aside(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refinement set aside keeps its stage (what it would have given), but run health judged the labels
    before it: the main job had compared its estimate with the set-aside round's 85.0 % instead of 84.4 %."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from quality import judged_stage

    stages = dict.fromkeys(["zero_shot", "llm_r0", "slm_r1", "llm_r1", "slm_r2", "llm_r2", "slm_r3"], {})
    assert judged_stage(stages, 2) == "llm_r2"
    assert judged_stage(stages, 2, rejected=[2]) == "llm_r1"
    assert judged_stage(stages, 1, rejected=[1]) == "llm_r0"
    assert judged_stage({"llm_r0": {}, "slm_r1": {}}, 0) == "llm_r0"


def test_scale_report_lists_every_sizes_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first child cut short must not hide the stages of the children after it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from scale import report

    cut = {"n": 200, "exit": -15, "seconds": {"demos": 0.1, "llm_r0": 20.0}, "peak_mib": {"demos": 5, "llm_r0": 9},
           "rss_after_mib": {"demos": 5, "llm_r0": 8}}
    done = {"n": 100, "exit": 0, "seconds": {"demos": 0.1, "llm_r0": 10.0, "slm_r1": 4.0, "total": 14.1},
            "peak_mib": {"demos": 5, "llm_r0": 8, "slm_r1": 9, "total": 9}, "rss_after_mib": {"demos": 5}}
    text = report({"full": [cut, done], "encode": [], "settings": "test"})
    assert "| slm_r1 | not run | 4.0 s / 9 MiB |" in text
    assert "| total | not run | 14.1 s / 9 MiB |" in text
    assert "**Not finished:** N = 200 (exit -15)" in text


def test_scale_report_gives_the_exponent_per_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Longer texts at bigger sizes: the time exponent against tokens is reported beside the one against N,
    and results from two files are merged size by size, the later file's run of a size winning (with one
    settings line, else an error)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from scale import rendered, report

    def run(n: int, tokens: int, secs: float) -> dict[str, object]:
        return {"n": n, "exit": 0, "tokens": tokens, "seconds": {"slm_r1": secs, "total": secs},
                "peak_mib": {"slm_r1": n // 10, "total": n // 10}, "rss_after_mib": {"slm_r1": 8}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"full": [run(200, 9999, 99.0), run(100, 1000, 10.0)], "encode": [], "settings": "s"}))
    b.write_text(json.dumps({"full": [run(200, 4000, 40.0)], "encode": [], "settings": "s"}))
    data = rendered([a, b])
    assert [(r["n"], r["tokens"]) for r in data["full"]] == [(100, 1000), (200, 4000)]
    text = report(data)
    assert "| stage | N = 100 | N = 200 | time exponent | time exponent per token | memory exponent |" in text
    assert "| slm_r1 | 10.0 s / 10 MiB | 40.0 s / 20 MiB | 2.00 | 1.00 | 1.00 |" in text
    assert "N = 200: 4,000 (20.0 a text)" in text
    b.write_text(json.dumps({"full": [run(200, 4000, 40.0)], "encode": [], "settings": "other"}))
    with pytest.raises(SystemExit, match="different settings"):
        rendered([a, b])


def test_evidence_ablation_tiny(tmp_path: Path) -> None:
    rows = shared_rows("mr_freeal", n=80, stride=100)  # the FreeAL authors' gpt-3.5 labels: judged, no LLM call
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({k: r[k] for k in ("text", "label", "llm_label")}) + "\n" for r in rows))
    _run(["-m", "freeal_backend.cli", "run", str(src), "--rounds", "0", "--llm-labels", "input"], tmp_path,
         LLM_BASE_URL="http://127.0.0.1:9/v1", LLM_MODEL="none")
    run_dir = tmp_path / "data" / "runs" / f"{tmp_path.name}-in"
    _run(["benchmarks/evidence_ablation.py", str(run_dir), "--name", "tiny", "--out-dir", str(tmp_path)], tmp_path)
    text = (tmp_path / "evidence_ablation_tiny.md").read_text()
    for row in ("SLM alone", "SLM + LLM over rounds", "AUROC wrong", "Command (from the repository root)"):
        assert row in text, row
    data = json.loads((tmp_path / "evidence_ablation_tiny.json").read_text())
    assert data[0]["n"] == len(rows) and set(data[0]["variants"]) >= {"SLM alone", "SLM + LLM last answer"}
    noise = [v for v in data[0]["variants"] if v.startswith("SLM + uniform noise")]  # the control, 3 draws
    assert len(noise) == 3 and all(0 <= data[0]["variants"][v]["auroc"] <= 1 for v in noise)
    # the same finished run re-judged by the other two benchmarks that read a run's stored evidence
    _run(["benchmarks/health_estimators.py", str(run_dir), "--name", "tiny", "--out-dir", str(tmp_path)], tmp_path)
    live = json.loads((tmp_path / "health_estimators_tiny.json").read_text())[-1]
    assert live["run"] == f"live: {run_dir.name}" and live["n"] == len(rows) and 0 < live["health"] <= 1
    _run(["benchmarks/budget_check.py", "--npz", "--rejudge-run", str(run_dir), "--out", str(tmp_path / "budget")],
         tmp_path)
    cases = json.loads((tmp_path / "budget.json").read_text())["cases"]
    assert [c["case"] for c in cases] == [f"re-judged run {run_dir}"] and cases[0]["texts"] == len(rows)
    assert cases[0]["true_accuracy"] == pytest.approx(data[0]["variants"]["SLM alone"]["final_accuracy"])
    assert 0 <= cases[0]["interval_coverage"] <= 1 and 0 <= cases[0]["chance_interval_coverage"] <= 1
    assert cases[0]["calibration_sd"] == CALIBRATION_SD and "truth_offset_logits" in cases[0]
    _run(["benchmarks/audit_check.py", "--npz", "--rejudge-run", str(run_dir), "--sizes", "20", "--draws", "3",
          "--out", str(tmp_path / "audit_1.5b")], tmp_path)
    audited = json.loads((tmp_path / "audit_1.5b.json").read_text())["cases"]
    assert len(audited) == 1 and audited[0]["texts"] == len(rows) and audited[0]["draws"] == 3
    assert [r["size"] for r in audited[0]["sizes"]] == [0, 20]
    assert 0 <= audited[0]["sizes"][1]["interval_coverage"] <= 1
    assert all(0 <= r["budget_interval_coverage"] <= 1 for r in audited[0]["sizes"])


def test_health_estimators_on_the_stored_probabilities(tmp_path: Path) -> None:
    _run(["benchmarks/health_estimators.py", "--name", "tiny", "--out-dir", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "health_estimators_tiny.json").read_text())
    assert len(rows) == 10 and {"true", "health", "anchor"} <= set(rows[0])
    assert "within 2 points" in (tmp_path / "health_estimators_tiny.md").read_text()


def test_a_result_names_every_setting_it_was_made_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """The main job's seeds 1 and 2 ran with FREEAL_SEED, which their reports' command and header left out:
    every setting's variable counts (not the data folder or the queue's URL)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import command_line, machine

    monkeypatch.setenv("FREEAL_SEED", "2")
    monkeypatch.setenv("FREEAL_SET_ASIDE_LESS_SURE", "1")
    monkeypatch.setenv("FREEAL_DATA_DIR", "/tmp/somewhere")
    line, header = command_line(), machine("0 / 0 / 0")
    for text in (line, header):
        assert "FREEAL_SEED=2" in text and "FREEAL_SET_ASIDE_LESS_SURE=1" in text and "/tmp/somewhere" not in text
