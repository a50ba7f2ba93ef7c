"""FreeAL for spans (NER): the loop of ``loop.py`` with a sentence's entity list as its label.

Everything but the task is :class:`~freeal_backend.loop.FreeALRun`'s: the stages, durable state, cache,
resume, refinement scope, and setting aside a refinement that looks worse. What differs:

* **Labels** are encoded span lists (``spans.encode_spans``): stored, cached and compared like class
  labels. The LLM answers a JSON entity list; mentions are located in the text by the rules of
  ``spans.locate_mentions`` (dropped mentions are counted per stage); a span's confidence is the lowest
  probability of the answer tokens that spell it, when the endpoint gives logprobs, else none.
* **Round 0**: the LLM writes sentences in the style of sampled texts *with* their entities; when it
  writes none that can be located, round 0 asks without demonstrations.
* **SLM**: a cross-fitted BIO tagger (``slm/tagger.py``) on the same split encoder; its verdict is
  ``detection.judge_span_labels`` (missing, spurious, wrong-type, wrong-boundary spans; run health, which
  also hears how the LLM's lists agree with themselves across rounds, word by word).
* **Clean agreed pool**: sentences whose label the held-out tagger reproduces exactly, least doubtful
  first, grouped by the type of their first entity (or "no entity"), so retrieved demos cover every type.
* **Final**: the LLM's spans (the tagger suggests, it never overrules an answer; each span's score averages
  the LLM's confidence in it over the rounds, 0 for a round that did not name it, with the tagger's score
  for the same span: ``detection.span_region_scores``), the sentence score
  P(spans right) (``detection.span_clean_probability``, with the LLM's own evidence weighed in:
  ``detection.span_llm_evidence``, and for an LLM known to be calibrated pooled with its spans' own scores:
  ``detection.span_list_right``), the flag, the tagger's spans as a suggestion and
  a review note naming the doubtful spans.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from freeal_backend.llm.annotate import Progress, generate_span_demos
from freeal_backend.llm.client import LLMAnswer, Parse
from freeal_backend.llm.prompts import Message
from freeal_backend.loop import IMPORTED, FreeALRun
from freeal_backend.records import Item, ItemResult
from freeal_backend.slm.detection import (SelfAgreement, SpanVerdict, judge_span_labels, review_note,
                                          span_list_right, span_region_scores, span_self_agreement)
from freeal_backend.slm.tagger import SpanSLMConfig, cross_fit
from freeal_backend.span_eval import bio_tags
from freeal_backend.spans import (PROMPT_MAX_CHARS, Span, decode_spans, encode_spans, entities_of, locate_mentions,
                                  parse_entities, span_confidences, span_key, span_messages)

log = logging.getLogger(__name__)

SPAN_ANSWER_TOKENS = 256  # max_tokens of an entity-list answer (LLM_MAX_TOKENS when larger)
SPAN_TRAIN_LAYERS = 1  # top encoder layers the tagger fine-tunes (benchmarks/results/ner_slm.md)


def span_dicts(text: str, spans: Sequence[Span]) -> list[dict[str, Any]]:
    """Spans as output records: start, end (code points, end exclusive), label, text, score."""
    return [{"start": s.start, "end": s.end, "label": s.label, "text": text[s.start:s.end], "score": s.score}
            for s in spans]


class SpanRun(FreeALRun):
    """One FreeAL run over sentences whose labels are entity spans; ``labels`` are the entity types."""

    task_type = "ner"
    zero_shot_fallback = True
    skip_one_group_pool = True
    llm_evidence = "logprobs"  # what of the LLM weighs in the score: its confidence and agreement across rounds;
    # "agreement" alone; "" nothing (ablations: benchmarks/evidence_ablation.py)
    pool_list_right = True  # with "logprobs" and a calibrated LLM: the spans' own scores assembled per sentence
    # (detection.span_list_right) pooled into the sentence score (ablations)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dropped: Counter[str] = Counter()
        self._dropped_lock = threading.Lock()

    @property
    def n_groups(self) -> int:
        return len(self.labels) + 1  # the first entity's type, or no entity

    @property
    def answer_tokens(self) -> int:  # type: ignore[override]
        return max(SPAN_ANSWER_TOKENS, self.settings.llm_max_tokens)

    @property
    def unparsed_means(self) -> str:
        return f"give no JSON list of entities of types {self.labels}"

    def _unknown_labels(self, labels: Iterable[str]) -> set[str]:
        unknown: set[str] = set()
        for lab in labels:
            try:
                unknown |= {s.label for s in decode_spans(lab) if s.label not in self.labels}
            except (ValueError, TypeError):
                unknown.add(lab)
        return unknown

    def _messages(self, item: Item, demos: Sequence[tuple[str, str]]) -> list[Message]:
        shown = [(text, entities_of(text, decode_spans(label))) for text, label in demos]
        return span_messages(item.text, self.labels, shown, self.task_description)

    def _parser(self, item: Item) -> Parse:
        def parse(value: dict[str, Any]) -> LLMAnswer:
            raw = value["content"]
            entities, stats = parse_entities(raw, self.labels)
            if not stats.parsed:
                return LLMAnswer(None, None, {}, raw)
            tokens = [(str(t), float(lp)) for t, lp in value.get("tokens") or []]
            scores = span_confidences(raw, tokens, entities)
            spans, dropped = locate_mentions(item.text, entities, scores=scores, limit=PROMPT_MAX_CHARS)
            with self._dropped_lock:
                self._dropped.update(dropped)
            probs = {span_key(s): float(s.score) for s in spans if s.score is not None}
            sure = [lp for _, lp in tokens]
            confidence = float(np.exp(min(sure))) if sure and "".join(t for t, _ in tokens) == raw else None
            return LLMAnswer(encode_spans(spans), confidence, probs, raw)
        return parse

    def _annotate(self, stage: str, todo: Sequence[Item], demos_for: Callable[[int], list[tuple[str, str]]],
                  progress: Progress, *, check_unparsed: bool = True) -> None:
        self._dropped.clear()
        super()._annotate(stage, todo, demos_for, progress, check_unparsed=check_unparsed)
        if self._dropped:
            counts = dict(self._dropped)
            log.info("%s: mentions the LLM named but that are not whole words of the text, dropped: %s", stage, counts)
            self.store.set_meta(f"dropped_mentions_{stage}", counts)

    def _write_demos(self, texts: Sequence[str]) -> tuple[list[tuple[str, str]], dict[str, int]]:
        written = generate_span_demos(self.llm, self.labels, texts, self.demos_per_label * len(self.labels),
                                      task_description=self.task_description, seed=self.settings.seed,
                                      allowance=self.allowance)
        per_type = Counter(s.label for _, spans in written for s in spans)
        if written and not per_type:  # they would teach the LLM to answer "no entity" to every sentence
            log.warning("the LLM wrote %d demonstrations without a single entity: round 0 asks without them",
                        len(written))
            return [], {"texts": 0, "without_entities": len(written), **{t: 0 for t in self.labels}}
        return ([(text, encode_spans(spans)) for text, spans in written],
                {"texts": len(written), **{t: per_type[t] for t in self.labels}})

    # the small model -------------------------------------------------------------------------------------
    @property
    def lower_split(self) -> int:
        return self.encoder.split_for(SPAN_TRAIN_LAYERS)

    def tagger_config(self, rnd: int) -> SpanSLMConfig:
        """The fold taggers' recipe in SLM round ``rnd``, from the settings (``FREEAL_SLM_MIN_STEPS`` included:
        on 200 BC5CDR sentences 2 epochs were 10 optimiser steps, and run health said 4.5-4.8 % of the lists
        were right where 17-19 % were; with 50 steps 10 and 14 % where 20 and 18.5 % were)."""
        s = self.settings
        return SpanSLMConfig(epochs=s.slm_epochs, min_steps=s.slm_min_steps, warmup_epochs=s.slm_warmup_epochs,
                             max_length=s.max_length, robust=s.slm_robust, seed=s.seed + rnd)

    def _fit_slm(self, items: Sequence[Item], labels: Sequence[str | None], rnd: int,
                 progress: Progress) -> dict[str, object]:
        lower, _ = self._lower_states(items, self.lower_split, progress)
        cfg = self.tagger_config(rnd)
        res = cross_fit(self.encoder, [it.text for it in items],
                        [decode_spans(lab) if lab is not None else [] for lab in labels], self.labels,
                        folds=self.settings.slm_folds, train_layers=SPAN_TRAIN_LAYERS, config=cfg,
                        gold=np.array([bool(it.human_label) for it in items]), lower=lower,
                        labelled=np.array([lab is not None for lab in labels]), with_embeddings=True,
                        on_fold=lambda k, n: progress("slm", k, n))
        assert res.embeddings is not None
        np.save(self.run_dir / f"slm_r{rnd}_embeddings.npy", res.embeddings)
        self.store.set_meta(f"slm_evidence_r{rnd}", res.evidence)  # for run health (detection.span_judge_evidence)
        torch.save({"types": self.labels, "folds": [m.model.state_dict() for m in res.models]},
                   self.run_dir / f"slm_r{rnd}.pt")
        self.store.set_slm(rnd, [
            (it.item_id, {"predicted": encode_spans(res.predicted[i]), "doubt": float(res.doubt[i]),
                          "words_right": None if res.words_right is None or np.isnan(res.words_right[i])
                          else float(res.words_right[i]),
                          "scores": {span_key(s): s.score for s in res.predicted[i] if s.score is not None}},
             None if np.isnan(res.losses[i]) else float(res.losses[i]), not bool(res.flagged[i]),
             float(res.clean_prob[i]) if res.clean_prob is not None else 1.0 - float(res.doubt[i]))
            for i, it in enumerate(items)])
        return {"labelled": int(sum(lab is not None for lab in labels)), "doubtful": int(res.flagged.sum()),
                "truncated_spans": res.truncated_spans}

    def _predicted(self, items: Sequence[Item], rnd: int) -> tuple[list[list[Span]], np.ndarray, np.ndarray]:
        """SLM round ``rnd``'s held-out spans, doubt and words_right (NaN where unknown) per item."""
        slm = self.store.slm(rnd)
        rows = [slm[it.item_id]["probs"] for it in items]
        return ([decode_spans(r["predicted"], r["scores"]) for r in rows], np.array([r["doubt"] for r in rows]),
                np.array([np.nan if r.get("words_right") is None else r["words_right"] for r in rows], dtype=float))

    def _judge(self, items: Sequence[Item], rnd: int, *, audit: bool = False,  # type: ignore[override]
               second: bool = True) -> SpanVerdict:
        """The tagger's verdict on round ``rnd``'s entity lists (spans have no second judge: ``second`` is
        the base class's)."""
        labels, _ = self._current(items, rnd - 1)
        predicted, doubt, words_right = self._predicted(items, rnd)
        list_right = (self._list_right(items, rnd - 1, labels, predicted)
                      if self.llm_evidence == "logprobs" and self.pool_list_right and self.llm_calibrated else None)
        texts = [it.text for it in items]
        audited = self.audit_labels if audit else {}
        person = [decode_spans(audited[it.item_id]) if it.item_id in audited else None for it in items]
        return judge_span_labels([decode_spans(lab) if lab is not None else None for lab in labels], predicted,
                                 doubt, np.array([bool(it.human_label) for it in items]),
                                 lambda i, spans: bio_tags(texts[i], spans, self.labels), words_right, person,
                                 self.store.get_meta(f"slm_evidence_r{rnd}"),
                                 self._rounds_confidence(items, rnd - 1, logprobs=self.llm_evidence == "logprobs")
                                 if self.llm_evidence else None,
                                 self._self_agreement(items, rnd - 1), list_right)

    def _list_right(self, items: Sequence[Item], upto_round: int, labels: Sequence[str | None],
                    predicted: Sequence[Sequence[Span]]) -> np.ndarray:
        """Per item, P(its entity list ``labels[i]`` is exactly right) from its spans' own scores and the
        tagger's ``predicted`` spans it lacks (``detection.span_list_right``); NaN where a span has no score
        from logprobs, and for people's labels and sentences without an answer."""
        known = self._span_scores(items, upto_round, predicted)
        region, missing = [], []
        for it, lab, pred in zip(items, labels, predicted):
            keys = {span_key(s) for s in decode_spans(lab)} if lab is not None and not it.human_label else None
            scored = known.get(it.item_id, {})
            region.append([np.nan] if keys is None else
                          [scored[k][0] if k in scored and scored[k][1] else np.nan for k in keys])
            missing.append([] if keys is None else [s.score or 0.0 for s in pred if span_key(s) not in keys])
        return span_list_right(region, missing)

    def _answers_over_rounds(self, items: Sequence[Item], upto_round: int
                             ) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
        """Every LLM answer with an entity list up to refinement ``upto_round`` to a sentence no person
        labelled, as (item id, answer, that sentence's latest answer); imported lists left out."""
        latest = self._latest_answers(items, upto_round)
        machine = {it.item_id for it in items if not it.human_label and it.item_id in latest}
        for stage in self._label_sources(upto_round):
            for item_id, ann in self.store.annotations(stage).items():
                if item_id in machine and ann["label"] is not None and ann["raw"] != IMPORTED:
                    yield item_id, ann, latest[item_id]

    def _rounds_confidence(self, items: Sequence[Item], upto_round: int, *, logprobs: bool = True) -> np.ndarray:
        """Per item the LLM's evidence on its latest entity list up to refinement ``upto_round``: over every
        round that asked the sentence, its confidence in the list it gave where that is the latest list, 0
        where it gave another list; averaged (``detection.span_llm_evidence``). NaN where a round gave the
        latest list without a confidence (no logprobs: the agreement alone did not help the ranking on two
        BC5CDR runs, evidence_ablation_ner_n200_1.5b.md), for people's labels, imported lists and sentences
        without an answer. ``logprobs=False``: the agreement alone, every confidence taken as 1 (ablations)."""
        position = {it.item_id: i for i, it in enumerate(items)}
        total, asked = np.zeros(len(items)), np.zeros(len(items))
        for item_id, ann, last in self._answers_over_rounds(items, upto_round):
            i, conf = position[item_id], ann["confidence"]
            if ann["label"] == last["label"]:
                total[i] += 1.0 if not logprobs else np.nan if conf is None else float(conf)
            asked[i] += 1
        return np.where(asked > 0, total / np.maximum(asked, 1), np.nan)

    def _region_views(self, items: Sequence[Item], upto_round: int, predicted: Sequence[Sequence[Span]], *,
                      logprobs: bool = True) -> list[tuple[str, str, float, float, bool]]:
        """Per span of each latest entity list up to refinement ``upto_round`` (people's and imported lists
        have none): (item id, ``span_key``, the LLM's view, the tagger's, whether the LLM's view is a
        confidence), as ``detection.span_region_scores`` takes them. The LLM's view: its confidence in the
        span averaged over every round that asked the sentence, 0 for a round that did not name it
        (ner_loop_n200_1.5b_regions.md: AUROC for wrong spans 0.668 -> 0.749 against the last answer's
        confidence alone), or where a round that named it gave no logprobs the share of rounds that named it.
        The tagger's: its score for the same span among ``predicted`` (held out), 0 where it predicts another.
        ``logprobs=False``: the share of rounds for every span, as an endpoint without logprobs gets (ablations)."""
        position = {it.item_id: i for i, it in enumerate(items)}
        wanted: dict[str, set[str]] = {}
        total: defaultdict[str, Counter[str]] = defaultdict(Counter)
        named: defaultdict[str, Counter[str]] = defaultdict(Counter)
        unknown: defaultdict[str, set[str]] = defaultdict(set)
        asked: Counter[str] = Counter()
        for item_id, ann, last in self._answers_over_rounds(items, upto_round):
            keys = wanted.setdefault(item_id, {span_key(s) for s in decode_spans(str(last["label"]))})
            asked[item_id] += 1
            given = {span_key(s): s.score for s in decode_spans(ann["label"], ann["probs"])}
            for key in keys & set(given):
                named[item_id][key] += 1
                if given[key] is None:
                    unknown[item_id].add(key)
                else:
                    total[item_id][key] += given[key]
        views = []
        for item_id, keys in wanted.items():
            tagger = {span_key(s): s.score for s in predicted[position[item_id]]}
            for key in sorted(keys):
                confident = logprobs and key not in unknown[item_id]
                llm = (total if confident else named)[item_id][key] / asked[item_id]
                views.append((item_id, key, llm, float(tagger.get(key) or 0.0), confident))
        return views

    def _span_scores(self, items: Sequence[Item], upto_round: int, predicted: Sequence[Sequence[Span]]
                     ) -> dict[str, dict[str, tuple[float, bool]]]:
        """Per item, per span of its latest entity list (``span_key``): its score, the LLM's view and the
        held-out tagger's ``predicted`` spans combined (``detection.span_region_scores``; see
        :meth:`_region_views`), and whether the LLM's view was a confidence."""
        views = self._region_views(items, upto_round, predicted)
        scores = span_region_scores(np.array([v[2] for v in views]), np.array([v[3] for v in views]),
                                    np.array([v[4] for v in views], dtype=bool))
        out: dict[str, dict[str, tuple[float, bool]]] = defaultdict(dict)
        for (item_id, key, _, _, confident), score in zip(views, scores):
            out[item_id][key] = (float(score), confident)
        return out

    def _agreement_of(self, pairs: Sequence[tuple[Item, str, str]]) -> SelfAgreement:
        """Two entity lists per sentence compared word by word (BIO tags: a changed boundary or type counts
        where it falls, as the tagger's kappa does)."""
        return span_self_agreement([bio_tags(it.text, decode_spans(a), self.labels) for it, a, _ in pairs],
                                   [bio_tags(it.text, decode_spans(b), self.labels) for it, _, b in pairs])

    def _slm_groups(self, items: Sequence[Item], rnd: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels, _ = self._current(items, rnd - 1)
        verdict = self._judge(items, rnd)
        y = np.array([-1 if lab is None else self._group(decode_spans(lab)) for lab in labels])
        agreed = np.array([lab is not None and not verdict.judgements[i] for i, lab in enumerate(labels)])
        return y, np.where(agreed, y, -2), verdict.scores

    def _group(self, spans: Sequence[Span]) -> int:
        return self.labels.index(min(spans).label) if spans else len(self.labels)

    def _slm_label(self, row: dict[str, object]) -> str:
        return str(row["probs"]["predicted"])  # type: ignore[index]

    def _quick_result(self, item: Item, answer: LLMAnswer | None) -> ItemResult:
        a = answer
        spans = decode_spans(a.label, a.probs) if a and a.label is not None else []
        return ItemResult(item.item_id, a.label if a else None, a.confidence if a else None, {},
                          suspicious=True, reasons=["not_yet_reviewed_by_slm"], llm_label=a.label if a else None,
                          llm_confidence=a.confidence if a else None, round=0, source="llm",
                          spans=span_dicts(item.text, spans))

    def _final(self, items: Sequence[Item], rounds: int) -> list[ItemResult]:
        labels, _ = self._current(items, rounds)
        latest = self._latest_answers(items, rounds)
        llm_conf = self._llm_confidences(items, latest)
        verdict = self._judge(items, rounds + 1, audit=True)
        self._keep_audited_health(rounds + 1, verdict)
        predicted, _, _ = self._predicted(items, rounds + 1)
        regions = {k: {key: score for key, (score, _) in spans.items()}
                   for k, spans in self._span_scores(items, rounds, predicted).items()}
        results = []
        for i, (it, lab) in enumerate(zip(items, labels)):
            in_audit = it.item_id in self.audit_ids
            person = it.human_label or self.audit_labels.get(it.item_id)
            if person:
                results.append(ItemResult(it.item_id, person, 1.0, round=rounds, source="human",
                                          llm_label=lab if in_audit else None, audit=in_audit,
                                          spans=span_dicts(it.text, decode_spans(person))))
                continue
            given = decode_spans(lab, regions.get(it.item_id)) if lab is not None else None
            pred = predicted[i]
            flagged = bool(verdict.flagged[i])
            final = given if given is not None else pred
            note = (review_note(it.text, verdict.judgements[i]) if given is not None
                    else "FreeAL: NEEDS REVIEW (the LLM gave no usable answer; the spans are the small model's).")
            if "labels_near_chance" in verdict.reasons[i]:
                doubts = note.split(": ", 2)[2] if verdict.judgements[i] else ""
                note = ("FreeAL: NEEDS REVIEW (the LLM's entity lists in this run look near chance: use a stronger "
                        "LLM or label by hand)." + (f" Small model: {doubts}" if doubts else ""))
            results.append(ItemResult(
                it.item_id, encode_spans(final), float(verdict.scores[i]), suspicious=flagged,
                reasons=verdict.reasons[i], llm_label=lab, llm_confidence=llm_conf[it.item_id],
                slm_label=encode_spans(pred), round=rounds, source="llm" if given is not None else "slm",
                spans=span_dicts(it.text, final),
                suggested_spans=span_dicts(it.text, pred) if flagged and encode_spans(pred) != encode_spans(final)
                else None, note=note if flagged else None, audit=in_audit))
        return results


RUN_TYPES: dict[str, type[FreeALRun]] = {"classification": FreeALRun, "ner": SpanRun}


def run_type(task_type: str) -> type[FreeALRun]:
    """The run class of a task type (``classification`` or ``ner``)."""
    try:
        return RUN_TYPES[task_type]
    except KeyError:
        raise ValueError(f"unknown task type {task_type!r}; use one of {sorted(RUN_TYPES)}") from None
