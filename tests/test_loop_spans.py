"""FreeAL for spans through the same loop, store and CLI: BC5CDR sentences labelled by a real
OpenAI-compatible server (the deterministic fake, over HTTP) through the real openai client."""
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from freeal_backend.config import Settings
from freeal_backend.dataio import infer_task_type, rows_to_items
from freeal_backend.llm.cache import ResponseCache
from freeal_backend.llm.client import LLMClient
from freeal_backend.loop_spans import SpanRun
from freeal_backend.slm.encoder import Encoder
from freeal_backend.spans import decode_spans, encode_spans, span_key
from tests.fake_openai import MODEL, FakeOpenAI, choose_entities
from tests.fixtures_llm import shared_rows

TYPES = ["Chemical", "Disease"]


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def make_run(tmp_path, fake, encoder, **overrides):
    settings = Settings(**{"slm_min_steps": 0, "data_dir": tmp_path, "llm_base_url": fake.base_url, "llm_model": MODEL,
                           "shots": 4, "demos_per_label": 2, "slm_folds": 2, **overrides})
    client = LLMClient(fake.base_url, MODEL, ResponseCache(tmp_path / "llm_cache.sqlite"), concurrency=2,
                       max_retries=0)
    return SpanRun(settings, TYPES, tmp_path / "run", llm=client, encoder=encoder)


def sentences_with_people_lists() -> list:
    """90 BC5CDR sentences, the first 3 with people's entity lists (demonstrations with entities for the
    refinement: a tagger trained on 90 sentences agrees with the LLM only where there is no entity)."""
    rows = shared_rows("bc5cdr", n=90, stride=17)
    for r in rows[:3]:
        r["human_spans"] = r["spans"]
    return rows_to_items(rows, task_type="ner")


def test_span_rows_become_encoded_labels_and_the_task_type_is_inferred():
    rows = shared_rows("bc5cdr", n=3)
    assert infer_task_type(rows) == "ner" and infer_task_type([{"text": "a", "label": "x"}]) == "classification"
    items = rows_to_items(rows, task_type="ner")
    for row, it in zip(rows, items):
        spans = decode_spans(it.gold)
        assert [(s.start, s.end, s.label) for s in spans] == sorted((d["start"], d["end"], d["label"])
                                                                   for d in row["spans"])
    with pytest.raises(ValueError, match="outside the text"):
        rows_to_items([{"text": "short", "spans": [{"start": 2, "end": 40, "label": "Chemical"}]}], task_type="ner")


def test_span_loop_labels_judges_and_refines_every_sentence_outside_the_pool(tmp_path, encoder):
    items = sentences_with_people_lists()
    human = {it.text for it in items if it.human_label}
    with FakeOpenAI() as fake, make_run(tmp_path, fake, encoder) as run:
        results = run.run(items, rounds=1)
        todo, pool_idx, _, _ = run.refinement_scope(items, 1)
        r0 = run.store.annotations("llm_r0")
        refined = run.store.annotations("llm_r1")
        asked = Counter(r.text for r in fake.records() if r.answered and r.text is not None)
        stages = run.store.stages()
        health = run.health()
        table_stages = run.stage_labels()
        slm_rows = run.store.slm(1)
    assert len(results) == len(items)
    # word-level evidence that sets the span scores' level: for the LLM's sentences, never a person's
    words_right = {i: slm_rows[it.item_id]["probs"]["words_right"] for i, it in enumerate(items)}
    assert all(words_right[i] is None for i, it in enumerate(items) if it.human_label)
    assert all(0.0 <= words_right[i] <= 1.0 for i, it in enumerate(items)
               if not it.human_label and r0[it.item_id]["label"] is not None)
    assert not human & set(asked)  # a person's spans are never sent to the LLM
    assert set(refined) == {items[i].item_id for i in todo}  # everything outside the agreed pool, re-asked
    assert 0 < len(pool_idx) and not set(pool_idx.tolist()) & set(todo)
    assert stages["demos"]["texts"] > 0  # round 0 had self-written demonstrations with entities
    # the LLM's answers are the fake's rule, located in the text, with per-span confidence from logprobs
    for it in items:
        if it.human_label:
            continue
        expected = {e["text"] for e in choose_entities(it.text, TYPES)}
        spans = decode_spans(r0[it.item_id]["label"], r0[it.item_id]["probs"])
        assert {it.text[s.start:s.end] for s in spans} <= expected
        assert all(s.score is not None and 0 < s.score <= 1 for s in spans)
    by_id = {it.item_id: it for it in items}
    scores = set()
    for res in results:
        text = by_id[res.item_id].text
        assert res.spans is not None and encode_spans(decode_spans(res.label)) == res.label
        for s in res.spans:
            assert text[s["start"]:s["end"]] == s["text"] and s["label"] in TYPES
        if by_id[res.item_id].human_label:
            assert res.source == "human" and res.label == by_id[res.item_id].human_label and not res.suspicious
            continue
        scores.add(round(res.confidence, 4))
        assert 0.0 <= res.confidence <= 1.0
        if res.suspicious:
            assert res.reasons and res.note and res.note.startswith("FreeAL: NEEDS REVIEW")
            assert set(res.reasons) <= {"missing", "spurious", "wrong_type", "wrong_boundary", "no_llm_label",
                                        "labels_near_chance"}
    assert len(scores) > 5  # scores vary with the evidence, never a constant
    assert health is not None and 0.0 <= health["estimated_accuracy"] <= 1.0 and "entity lists" in health["message"]
    assert health["p_value"] is not None  # run health took the tagger's word evidence (span_judge_evidence)
    assert {"llm_r0", "slm_r1", "llm_r1", "final"} <= set(table_stages)


def test_span_run_resumes_without_asking_again_and_keeps_long_documents_in_bounds(tmp_path, encoder, caplog):
    rows = shared_rows("bc5cdr", n=40, stride=31)
    long_doc = " ".join(r["text"] for r in shared_rows("bc5cdr", n=400))[:20_000]  # a 20k-character document
    items = rows_to_items(rows + [{"text": long_doc}], task_type="ner")
    with FakeOpenAI() as fake:
        with make_run(tmp_path, fake, encoder) as run:
            first = run.run(items, rounds=1)
        calls = fake.answered()
        with make_run(tmp_path, fake, encoder) as run:
            second = run.run(items, rounds=1)
        assert fake.answered() == calls  # cached and stored: nothing paid for is asked twice
    assert [r.label for r in first] == [r.label for r in second]
    assert "truncated" in caplog.text
    long_result = first[-1]
    assert long_result.spans and max(s["end"] for s in long_result.spans) <= 4000  # FREEAL_MAX_CHARS
    assert all(long_doc[s["start"]:s["end"]] == s["text"] for s in long_result.spans)
    with pytest.raises(ValueError, match="labels"):  # the <Labels> changed after a run: a clear refusal
        SpanRun(Settings(slm_min_steps=0, data_dir=tmp_path), ["Chemical", "Gene"], tmp_path / "run")


def test_the_tagger_takes_its_recipe_from_the_settings(tmp_path, encoder):
    """FREEAL_SLM_MIN_STEPS reaches the span tagger as it reaches the class SLM (it used to be dropped: 2 epochs
    over 200 sentences were 10 optimiser steps)."""
    settings = Settings(slm_min_steps=50, slm_epochs=2, seed=3, data_dir=tmp_path)
    with SpanRun(settings, TYPES, tmp_path / "run") as run:
        cfg = run.tagger_config(1)
    assert (cfg.min_steps, cfg.epochs, cfg.seed, cfg.max_length) == (50, 2, 4, settings.max_length)


def test_a_classification_run_dir_refuses_a_span_run(tmp_path, encoder):
    from freeal_backend.loop import FreeALRun
    FreeALRun(Settings(slm_min_steps=0, data_dir=tmp_path), TYPES, tmp_path / "run").close()
    with pytest.raises(ValueError, match="classification run, not ner"):
        SpanRun(Settings(slm_min_steps=0, data_dir=tmp_path), TYPES, tmp_path / "run")


def test_cli_runs_and_evaluates_a_span_file(tmp_path):
    rows = shared_rows("bc5cdr", n=40, stride=29)
    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "spans": r["spans"]}) + "\n" for r in rows))
    with FakeOpenAI() as fake:
        env = {"LLM_BASE_URL": fake.base_url, "LLM_MODEL": MODEL, "FREEAL_SHOTS": "4", "FREEAL_SLM_FOLDS": "2",
               "FREEAL_SLM_MIN_STEPS": "0", "FREEAL_TORCH_THREADS": "1", "PATH": "/usr/bin:/bin"}  # see conftest
        run_dir = tmp_path / "run"
        out = subprocess.run([sys.executable, "-m", "freeal_backend.cli", "run", str(data), "--rounds", "1",
                              "--run-dir", str(run_dir), "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        ev = subprocess.run([sys.executable, "-m", "freeal_backend.cli", "eval", str(run_dir)],
                            capture_output=True, text=True, env=env, timeout=300)
        rep = subprocess.run([sys.executable, "-m", "freeal_backend.cli", "report", str(run_dir)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert rep.returncode == 0, rep.stderr[-3000:]
    html = (run_dir / "report.html").read_text()
    assert "Chemical" in html and "[[" not in html  # sentences counted by entity type, not by raw span lists
    assert "F1 Chemical" in out.stdout and "F1 Disease" in ev.stdout and "wrong final sentences" in ev.stdout
    lines = [json.loads(x) for x in (run_dir / "labels.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows)
    for line in lines:
        for s in line["spans"]:
            assert line["text"][s["start"]:s["end"]] == s["text"]


def test_written_demonstrations_without_a_single_entity_are_not_used(tmp_path, encoder, monkeypatch):
    """The embedded 0.5B wrote 11 BC5CDR-style sentences and no entity in any: as demonstrations they teach the
    LLM to answer "no entity" to every sentence (F1 0). Round 0 then asks without demonstrations."""
    import tests.fake_openai as fake_openai

    entities = fake_openai.choose_entities
    monkeypatch.setattr(fake_openai, "choose_entities",  # the demo writer names no entity; labelling works
                        lambda text, types: [] if text.count(" ") == 1 else entities(text, types))
    items = rows_to_items(shared_rows("bc5cdr", n=30, stride=17), task_type="ner")
    with FakeOpenAI() as fake, make_run(tmp_path, fake, encoder) as run:
        run.run(items, rounds=0)
        info, demos = run.store.stage_done("demos"), run.store.demos()
        r0 = run.store.annotations("llm_r0")
    assert info["texts"] == 0 and info["without_entities"] > 0 and demos == []
    assert len(r0) == len(items) and any(decode_spans(a["label"]) for a in r0.values())  # asked zero-shot


def test_people_spans_on_audit_sentences_are_blind_and_measure_the_entity_lists(tmp_path, encoder):
    """FREEAL_AUDIT on a span run: the person's spans on the audit sentences are not gold (the LLM is asked
    about those sentences, the tagger never trains on them); the output keeps them; run health says how
    many of the LLM's entity lists there were right."""
    from freeal_backend.slm.audit import audit_sample

    rows = shared_rows("bc5cdr", n=90, stride=17)
    items = rows_to_items(rows, task_type="ner")
    sample = audit_sample([it.item_id for it in items], 25, seed=0)
    for r, it in zip(rows, items):
        if it.item_id in sample:
            r["human_spans"] = r["spans"]
    items = rows_to_items(rows, task_type="ner")
    with FakeOpenAI() as fake, make_run(tmp_path, fake, encoder, audit_size=25) as run:
        results = {r.item_id: r for r in run.run(items, rounds=0)}
        asked = {r.text for r in fake.records() if r.answered and r.text is not None}
        answers = run.store.annotations("llm_r0")
        health = run.health()
        stored_human = [it for it in run.store.items() if it.human_label]
    audited = [it for it in items if it.item_id in sample]
    assert len(audited) == 25 and not stored_human
    assert {it.text for it in audited} <= asked  # blind: asked like any other sentence
    right = 0
    for it in audited:
        res = results[it.item_id]
        assert res.audit and res.source == "human" and res.label == it.human_label
        assert res.llm_label == answers[it.item_id]["label"]
        right += answers[it.item_id]["label"] == it.human_label
    assert sum(r.audit for r in results.values()) == 25
    assert health["audit"]["audited"] == 25 and health["audit"]["llm_right"] == right
    assert f"a random audit of 25 tasks found {right} of the LLM entity lists right" in health["message"]


def test_the_llms_agreement_across_rounds_weighs_in_span_scores_and_run_health(tmp_path, encoder):
    """An LLM that names only the first mention of some sentences (chosen by the whole prompt, so the
    same sentence is answered otherwise under other demonstrations): the sentences whose entity list changed
    between round 0 and the refinement lose far more of their score to the LLM's evidence than the others,
    and run health records how the lists agree word by word (``llm_self_kappa``). Each span's own score
    ranks by the LLM's confidence in it averaged over the rounds that asked the sentence (0 where a round
    did not name it; not the last answer's confidence alone) plus the held-out tagger's score for the same
    span (0 where it predicts another), at the level of the LLM's confidence. Those scores, assembled per
    sentence, weigh in its score only for an LLM whose confidence is known to be calibrated."""
    items = sentences_with_people_lists()
    with FakeOpenAI(fickle=0.3) as fake, make_run(tmp_path, fake, encoder, slm_min_steps=50) as run:
        results = run.run(items, rounds=1)  # 50 steps: a tagger that finds some of the entities
        r0, r1 = run.store.annotations("llm_r0"), run.store.annotations("llm_r1")
        health = run.health()
        with_llm = run._judge(items, 2).scores
        evidence = run._rounds_confidence(items, 1)
        predicted = dict(zip((it.item_id for it in items), run._predicted(items, 2)[0]))
        run.llm_evidence = ""
        tagger_alone = run._judge(items, 2).scores
    changed = np.array([it.item_id in r1 and r1[it.item_id]["label"] != r0[it.item_id]["label"] for it in items])
    kept = np.array([it.item_id in r1 and not changed[i] for i, it in enumerate(items)])
    assert changed.sum() >= 10 and kept.sum() >= 10
    assert (evidence[changed] <= 0.5 + 1e-9).all() and evidence[kept].mean() > 0.8
    moved = with_llm - tagger_alone  # seen: changed -0.19 (0.20 -> 0.01), kept -0.05 (0.56 -> 0.51)
    assert moved[changed].mean() < moved[kept].mean() - 0.1
    assert 0.0 < health["llm_self_kappa"] < 1.0
    once, score, llm, tagger = 0, [], [], []
    for res in results:
        if res.source != "llm":
            continue
        asked = [a[res.item_id] for a in (r0, r1) if res.item_id in a and a[res.item_id]["label"] is not None]
        found = {span_key(s): s.score for s in predicted[res.item_id]}
        for span in res.spans or []:
            key = f"{span['start']}:{span['end']}:{span['label']}"
            score.append(span["score"])
            llm.append(sum(a["probs"].get(key, 0.0) for a in asked) / len(asked))
            tagger.append(found.get(key, 0.0))
            once += sum(key in a["probs"] for a in asked) < len(asked)
    assert once >= 5  # spans only one round named: half the confidence of the round that did
    score, llm, tagger = np.array(score), np.array(llm), np.array(tagger)
    assert 0 < (tagger > 0).sum() < len(tagger)  # the tagger predicts some of the LLM's spans, not all
    assert score.mean() == pytest.approx(llm.mean(), abs=1e-6)
    assert np.array_equal(np.argsort(score, kind="stable"), np.argsort(llm + tagger, kind="stable"))
    # an endpoint's confidence is not known to be calibrated: the spans' own scores stayed out of the sentence
    # scores above; taken as calibrated (FREEAL_LLM_CALIBRATED=1) they are pooled in, where every span has one
    with FakeOpenAI() as fake, make_run(tmp_path, fake, encoder, llm_calibrated=True) as calibrated:
        pooled = calibrated._judge(items, 2).scores
        list_right = calibrated._list_right(items, 1, calibrated._current(items, 1)[0],
                                            calibrated._predicted(items, 2)[0])
    known = np.isfinite(list_right)
    assert known.sum() >= 40 and not known[[bool(it.human_label) for it in items]].any()
    assert np.allclose(pooled[known], (with_llm[known] + list_right[known]) / 2)
    assert np.array_equal(pooled[~known], with_llm[~known])


def test_without_logprobs_the_llms_rounds_leave_the_sentence_scores_to_the_tagger(tmp_path, encoder):
    """An endpoint that gives no logprobs (a 400 for them; the client asks on without): the LLM's agreement
    with itself across rounds alone did not help the ranking of sentences on two BC5CDR runs
    (benchmarks/results/evidence_ablation_ner_n200_1.5b.md), so it moves no sentence score. Each span still
    gets a score: the share of the rounds that named it averaged with the held-out tagger's score for the
    same span (0 where it predicts another), which ranked wrong spans as well as the LLM's logprobs on four
    BC5CDR runs (benchmarks/results/evidence_ablation_ner_regions.md)."""
    items = sentences_with_people_lists()
    with FakeOpenAI(fickle=0.3, refuse_logprobs=True) as fake, make_run(tmp_path, fake, encoder,
                                                                        slm_min_steps=50) as run:
        results = run.run(items, rounds=1)
        r0, r1 = run.store.annotations("llm_r0"), run.store.annotations("llm_r1")
        with_llm = run._judge(items, 2).scores
        predicted = dict(zip((it.item_id for it in items), run._predicted(items, 2)[0]))
        run.llm_evidence = ""
        tagger_alone = run._judge(items, 2).scores
    assert sum(k in r0 and r1[k]["label"] != r0[k]["label"] for k in r1) >= 10  # lists did change
    assert np.array_equal(with_llm, tagger_alone)
    shares, tagged = set(), 0
    for res in results:
        if res.source != "llm":
            continue
        asked = [a[res.item_id]["label"] for a in (r0, r1) if res.item_id in a and a[res.item_id]["label"] is not None]
        found = {span_key(s): s.score for s in predicted[res.item_id]}
        for span in res.spans or []:
            key = f"{span['start']}:{span['end']}:{span['label']}"
            share = sum(key in {span_key(s) for s in decode_spans(a)} for a in asked) / len(asked)
            assert span["score"] == pytest.approx((share + found.get(key, 0.0)) / 2)
            shares.add(share)
            tagged += key in found
    assert shares == {0.5, 1.0}  # spans named by one round of two, and by both
    assert 0 < tagged
