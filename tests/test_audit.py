"""The random audit: people's labels on a few random tasks, blind to the machine, measure the run."""
import json
from pathlib import Path

import numpy as np

from freeal_backend.cli import main
from freeal_backend.metrics import expected_calibration_error
from freeal_backend.slm.audit import AUDIT_MIN, audit_sample, wilson
from freeal_backend.slm.detection import judge
from freeal_backend.storage import Store
from tests.fixtures_llm import shared_rows
from tests.test_judge_only import _dead_endpoint

MADE_NOISE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "made_noise_n1000_plain.npz"


def test_audit_sample_is_uniform_reproducible_and_mostly_stable_as_tasks_are_added():
    ids = [str(i) for i in range(2000)]
    first = audit_sample(ids, 50, seed=0)
    assert len(first) == 50 and first == audit_sample(list(reversed(ids)), 50, seed=0)
    assert audit_sample(ids, 50, seed=1) != first and audit_sample(ids, 0) == set()
    # uniform: over many seeds every tenth of the ids gets about a tenth of the sample
    counts = np.zeros(10)
    for seed in range(100):
        for i in audit_sample(ids, 50, seed=seed):
            counts[int(i) // 200] += 1
    assert counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500
    # adding 10 % more tasks keeps most of the sample (a task leaves only when a new one hashes lower)
    grown = audit_sample(ids + [str(i) for i in range(2000, 2200)], 50, seed=0)
    assert len(first & grown) >= 40


def _made_noise(name: str = "sst2_seed0") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.load(MADE_NOISE)
    return data[f"{name}_probs"], data[f"{name}_labels"], data[f"{name}_gold"]


def test_an_audit_corrects_run_health_where_the_small_model_overrates_the_labels():
    """Made noise on SST-2: the small model learns the labeller's errors and estimates 85 % right where 76 %
    are, with ECE 0.13. Over 60 random audits of 100 tasks the estimate is off by 3-4 points on average (not
    9.5), the 90 % interval holds the truth about 90 % of the time, and the scores keep their order and are
    calibrated on the other texts to an ECE near 0.06."""
    probs, labels, gold = _made_noise()
    true = float((labels == gold).mean())
    plain = judge(probs, labels)
    assert plain.health.estimated_accuracy - true > 0.07  # the bias the audit is for
    assert plain.scores.mean() - (plain.labels == gold).mean() > 0.07
    rng = np.random.default_rng(0)
    errors, covered, score_gap, ece = [], [], [], []
    for _ in range(60):
        audit = np.full(len(labels), -1)
        rows = rng.choice(len(labels), 100, replace=False)
        audit[rows] = gold[rows]
        audited = judge(probs, labels, audit_labels=audit)
        a = audited.audit
        assert a is not None and a.audited == 100 and a.decides
        assert a.llm_right == int((labels[rows] == gold[rows]).sum())
        assert "random audit of 100 tasks" in audited.health.message
        # the scores are recalibrated on the audit (Platt): their order stays the verdict's
        assert (np.argsort(audited.scores, kind="stable") == np.argsort(plain.scores, kind="stable")).all()
        errors.append(abs(audited.health.estimated_accuracy - true))
        covered.append(a.low <= true <= a.high)
        rest = np.setdiff1d(np.arange(len(labels)), rows)
        right = audited.labels[rest] == gold[rest]
        score_gap.append(abs(audited.scores[rest].mean() - right.mean()))
        ece.append(expected_calibration_error(audited.scores[rest], right))
    assert np.mean(errors) < 0.045 and np.mean(score_gap) < 0.045
    assert np.mean(covered) >= 0.8
    assert np.mean(ece) < 0.08 < expected_calibration_error(plain.scores, plain.labels == gold)


def test_a_small_audit_is_reported_but_does_not_replace_the_estimate():
    probs, labels, gold = _made_noise()
    audit = np.full(len(labels), -1)
    audit[: AUDIT_MIN - 1] = gold[: AUDIT_MIN - 1]
    plain, few = judge(probs, labels), judge(probs, labels, audit_labels=audit)
    assert few.health.estimated_accuracy == plain.health.estimated_accuracy
    assert np.array_equal(few.scores, plain.scores)
    assert few.audit is not None and few.audit.audited == AUDIT_MIN - 1 and not few.audit.decides
    assert few.health.message.startswith(plain.health.message) and f"until {AUDIT_MIN} audited" in few.health.message


def test_wilson_interval_holds_its_level():
    """90 % intervals over 2000 binomial draws (n = 30, p = 0.85) cover p close to 90 % of the time."""
    rng = np.random.default_rng(0)
    hits = [lo <= 0.85 <= hi for lo, hi in (wilson(int(k), 30) for k in rng.binomial(30, 0.85, 2000))]
    assert 0.86 <= np.mean(hits) <= 0.96


def test_people_labels_on_audit_tasks_are_blind_and_measure_the_run(tmp_path, monkeypatch, capsys):
    """Judge-only on the FreeAL authors' gpt-3.5 labels with FREEAL_AUDIT=40. The first run marks the 40 audit
    tasks and asks for their labels; once the input gives them, the next run trains nothing again (the audit
    labels are blind: never gold, so no stage changes) and measures the LLM's labels; other people's labels
    stay gold."""
    rows = shared_rows("mr_freeal", n=160, stride=50)
    ids = [str(i) for i in range(len(rows))]
    sample = audit_sample(ids, 40, seed=0)
    other_human = next(i for i in ids if i not in sample)
    src = tmp_path / "in.jsonl"

    def write_input(audit_labels: bool) -> None:
        with src.open("w") as f:
            for i, r in zip(ids, rows):
                row = {"id": i, "text": r["text"], "label": r["label"], "llm_label": r["llm_label"]}
                if (audit_labels and i in sample) or i == other_human:
                    row["human_label"] = r["label"]
                f.write(json.dumps(row) + "\n")

    monkeypatch.setenv("LLM_BASE_URL", _dead_endpoint())
    monkeypatch.setenv("LLM_MODEL", "none")
    monkeypatch.setenv("LLM_MAX_RETRIES", "0")
    monkeypatch.setenv("FREEAL_SLM_MIN_STEPS", "50")
    monkeypatch.setenv("FREEAL_AUDIT", "40")
    out, data = tmp_path / "out.jsonl", tmp_path / "d"
    argv = ["run", str(src), "--rounds", "0", "--llm-labels", "input", "--data-dir", str(data), "--out", str(out)]
    write_input(audit_labels=False)
    assert main(argv) == 0
    first = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert {i for i, x in first.items() if x["audit"]} == sample
    assert "audit: 40 of the 40 random audit tasks" in capsys.readouterr().out
    store = Store(next(data.glob("runs/*/state.sqlite")))
    trained_at = store._read("SELECT done_at FROM stages WHERE name = 'slm_r1'")
    store.close()

    write_input(audit_labels=True)
    assert main(argv) == 0
    lines = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    by_id = dict(zip(ids, rows))
    for i in sample:  # the person's label is the output; the LLM's label beside it is what was judged
        assert lines[i]["audit"] and lines[i]["source"] == "human" and lines[i]["label"] == by_id[i]["label"]
        assert lines[i]["llm_label"] == by_id[i]["llm_label"]
    assert lines[other_human]["source"] == "human" and not lines[other_human]["audit"]
    store = Store(next(data.glob("runs/*/state.sqlite")))
    try:
        assert {it.item_id for it in store.items() if it.human_label} == {other_human}  # blind: never gold
        assert store._read("SELECT done_at FROM stages WHERE name = 'slm_r1'") == trained_at  # nothing retrained
    finally:
        store.close()
    right = sum(by_id[i]["llm_label"] == by_id[i]["label"] for i in sample)
    printed = capsys.readouterr().out
    assert f"a random audit of 40 tasks found {right} of the LLM labels right" in printed
    assert "random audit tasks" not in printed  # nothing left to ask for


def test_span_audit_measures_the_entity_lists_the_tagger_overrates():
    """Spans go through the same audit: a sentence is right when its entity list equals the person's. Here the
    word-level evidence says 95 % of the LLM's lists are right where 70 % are; 60 audited sentences bring run
    health to the audit's share, keep the ranking, and say how the flag split them."""
    from freeal_backend.slm.detection import judge_span_labels
    from freeal_backend.spans import Span

    rng = np.random.default_rng(5)
    a, b = Span(0, 5, "Chemical"), Span(10, 15, "Disease")
    n = 300
    wrong = rng.random(n) < 0.3
    labels = [[a] for _ in range(n)]
    truth = [[a, b] if w else [a] for w in wrong]
    predicted = [[a, b] if (w and rng.random() < 0.7) else [a] for w in wrong]  # the tagger sees most of them
    doubt = np.clip(np.where(wrong, rng.normal(0.6, 0.2, n), rng.normal(0.25, 0.15, n)), 0, 1)
    tags = lambda i, spans: ["B-Chemical" if a in spans else "O", "B-Disease" if b in spans else "O", "O"]  # noqa: E731
    human = np.zeros(n, dtype=bool)
    words_right = np.full(n, 0.95)
    plain = judge_span_labels(labels, predicted, doubt, human, tags, words_right)
    assert plain.health.answered_accuracy > 0.9 and plain.audit is None
    audited_rows = set(rng.choice(n, 60, replace=False).tolist())
    person = [truth[i] if i in audited_rows else None for i in range(n)]
    v = judge_span_labels(labels, predicted, doubt, human, tags, words_right, person)
    right = sum(not wrong[i] for i in audited_rows)
    assert v.audit is not None and v.audit.audited == 60 and v.audit.llm_right == right
    assert v.health.estimated_accuracy == (right + 1) / 62
    assert f"a random audit of 60 tasks found {right} of the LLM entity lists right" in v.health.message
    assert (np.argsort(v.scores, kind="stable") == np.argsort(plain.scores, kind="stable")).all()
    assert abs(v.scores.mean() - (1 - wrong.mean())) < 0.06 < abs(plain.scores.mean() - (1 - wrong.mean()))
    assert v.audit.flagged + v.audit.unflagged == 60


def test_the_review_tab_title_says_when_an_audit_set_the_figure():
    from freeal_backend.labelstudio.review_tab import health_note

    assert health_note({"verdict": "ok", "estimated_accuracy": 0.88}) == "about 88% of LLM labels right"
    assert health_note({"verdict": "ok", "estimated_accuracy": 0.88, "audit": {"audited": AUDIT_MIN - 1}}) == (
        "about 88% of LLM labels right")  # reported, not yet deciding
    assert health_note({"verdict": "poor", "estimated_accuracy": 0.6, "audit": {"audited": 30}}) == (
        "about 60% of LLM labels right (poor, audit of 30)")


def test_an_audit_that_finds_poor_labels_says_so_and_overrides_near_chance():
    """An LLM that answered one class everywhere: the small model cannot tell its labels from chance. An audit
    of 40 measures them (about half right); run health takes that figure, calls the labels poor and names the
    fix."""
    rng = np.random.default_rng(4)
    probs = rng.dirichlet([1, 1], 300)
    labels = np.zeros(300, dtype=int)
    gold = rng.integers(0, 2, 300)
    assert judge(probs, labels).health.verdict == "near_chance"
    audit = np.full(300, -1)
    audit[:40] = gold[:40]
    v = judge(probs, labels, audit_labels=audit)
    right = int((gold[:40] == 0).sum())
    assert v.health.verdict == "poor" and v.health.estimated_accuracy == (right + 1) / 42
    assert "consider a stronger LLM endpoint" in v.health.message and "random audit of 40" in v.health.message
