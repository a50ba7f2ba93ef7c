"""The FreeAL loop with durable state: round 0 LLM labels, then per round SLM training + LLM refinement.

Stages, each persisted before the next starts (a crash or Ctrl-C resumes at the first unfinished one;
LLM answers are stored one by one and cached, so nothing paid for is asked twice):

    [zero_shot]   optional baseline: the LLM without demonstrations
    demos         round 0: the LLM writes demonstrations per label in the style of sampled texts
    llm_r0        every text labelled with its nearest demonstrations (frozen encoder embeddings)
    slm_r{r}      the SLM is cross-fitted on the current labels; its out-of-sample verdict (detection.py)
                  gives the run's health and the clean agreed pool
    llm_r{r}      the LLM re-labels every text outside that pool, with demos chosen and retrieved by the SLM
    slm_r{R+1}    after the last of R refinement rounds, the SLM judges the final labels
    final         label, calibrated score and review flag per text
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import torch

from freeal_backend.llm.annotate import Progress, annotate_items, generate_demos
from freeal_backend.config import Settings
from freeal_backend.dataio import clean_text
from freeal_backend.slm.audit import audit_sample
from freeal_backend.slm.budget import review_set
from freeal_backend.slm.detection import Judgement, SelfAgreement, SpanVerdict, judge, self_agreement
from freeal_backend.slm.second_judge import probe_oof, ranked_at_level
from freeal_backend.llm.embedded import confidence_calibrated
from freeal_backend.slm.encoder import Encoder, LowerStates, encoder_path
from freeal_backend.llm.client import NOT_SENT, CallAllowance, LazyRequests, LLMAnswer, LLMClient, Parse, label_parser
from freeal_backend.llm.prompts import Message, label_messages, mask_label_orders
from freeal_backend.llm.provider import LLMProvider
from freeal_backend.records import Item, ItemResult
from freeal_backend.slm.selection import (clean_agreed_pool, demo_pool, nearest_demos, retrieve_demos,
                                          shared_prefix_order)
from freeal_backend.slm.classifier import SLMConfig, SLMOutput, SmallModel, text_groups
from freeal_backend.status import latest_health, stage_title
from freeal_backend.storage import Store

log = logging.getLogger(__name__)

REJECT_MARGIN = 0.01  # a refinement whose answers that changed are less sure by more than this is set aside
REJECT_MIN_CHANGED = 5  # fewer changed answers with a confidence on both sides: the refinement is kept
ONE_GROUP_NOTE = ("refinement round %d was skipped: the clean agreed pool holds only sentences without an entity, "
                  "whose demonstrations would teach the LLM to answer no entity")
IMPORTED = "imported"  # the raw answer stored with an imported round-0 label (``run(llm_labels=...)``)
REASK_STAGE = "llm_reask"  # answers to texts re-asked after people labelled tasks (count after every round)
REASK_PER_HUMAN_LABEL = 2  # people's new labels: LLM calls per new label at most (their nearest texts re-asked)


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class RefinementScope(NamedTuple):
    """A refinement round's texts to re-annotate and its demo pool (indices and class of each demo); classes
    whose demos were filled without the SLM's agreement."""
    todo: list[int]
    pool_idx: np.ndarray
    pool_cls: np.ndarray
    filled: list[str]


class FreeALRun:
    """One FreeAL run over one data set (a CLI input file or a Label Studio project), in ``run_dir``."""

    def __init__(self, settings: Settings, labels: Sequence[str], run_dir: Path, task_description: str | None = None,
                 *, llm: LLMClient | LLMProvider | None = None,
                 encoder: Encoder | Callable[[], Encoder] | None = None, zero_shot_baseline: bool = False) -> None:
        if len(set(labels)) < 2:
            raise ValueError(f"FreeAL needs at least two distinct labels, got {list(labels)}")
        # one parser for every request; building it refuses labels no answer could tell apart ("Positive" /
        # "positive") before any call
        self._label_parse = label_parser(labels)
        self.settings = settings
        self.labels = list(labels)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.task_description = task_description or settings.task_description
        self.zero_shot_baseline = zero_shot_baseline
        # refinement prompts: demos in one seeded draw of the pool; True: most-shared first (the prompt cache's
        # best, but it puts the demos closest to the text last; the draw was as good or better on 8 of 9 seeds of
        # benchmarks/refinement_order.py, and on TREC alone the two are within noise)
        self.refine_most_shared_first = False
        self.store = Store(self.run_dir / "state.sqlite")
        stored = self.store.get_meta("labels")
        if stored is not None and stored != self.labels:
            raise ValueError(f"{self.run_dir} holds a run with labels {stored}, not {self.labels}; "
                             "use another run directory")
        self.store.set_meta("labels", self.labels)
        kind = self.store.get_meta("task_type")
        if kind is not None and kind != self.task_type:
            raise ValueError(f"{self.run_dir} holds a {kind} run, not {self.task_type}; use another run directory")
        self.store.set_meta("task_type", self.task_type)
        self._owns_llm = not isinstance(llm, LLMProvider)  # shared from another run: that run stops its server
        self.llm_provider = llm if isinstance(llm, LLMProvider) else LLMProvider(settings, llm)
        # an encoder, or where to get one when first used (RunRegistry's, shared by its runs)
        self._encoder, self._encoder_from = (None, encoder) if callable(encoder) else (encoder, None)
        self._encoder_lock = threading.Lock()  # a job and /predict (RunRegistry.get) may ask for it at once
        self._lower: tuple[str, LowerStates, LowerStates | None] | None = None
        self._demo_emb: tuple[str, np.ndarray] | None = None
        self.timings: dict[str, float] = {}
        self.burst: dict[str, int] | None = None  # this run's re-asks for new human labels (``_stage_reask``)
        self.allowance: CallAllowance | None = None  # FREEAL_MAX_LLM_CALLS, counted from start_call_budget()
        self.audit_size = settings.audit_size  # FREEAL_AUDIT (a Label Studio project may set its own)
        self.target_error = settings.target_error  # FREEAL_TARGET_ERROR (likewise)
        self.audit_ids: set[str] = set()  # the random audit tasks (slm/audit.py)
        self.audit_labels: dict[str, str] = {}  # people's labels on them, kept from the machine (blind)
        self.second_judge = bool(settings.second_judge) and self.task_type == "classification"
        if self.second_judge:  # not installed: say so now, not after the LLM's round
            encoder_path(settings.second_judge, "FREEAL_SECOND_JUDGE")
        elif settings.second_judge:
            log.warning("FREEAL_SECOND_JUDGE judges class labels only; this %s run goes without it", self.task_type)

    # resources ----------------------------------------------------------------------------------------
    @property
    def llm(self) -> LLMClient:
        """The LLM client; starts the embedded offline server when no LLM_BASE_URL is configured."""
        return self.llm_provider.get()

    @property
    def llm_started(self) -> LLMClient | None:
        """The LLM client if it exists (reading it starts no server)."""
        return self.llm_provider.started

    def start_call_budget(self, limit: int | None = None) -> None:
        """Count LLM requests against ``limit`` (default ``FREEAL_MAX_LLM_CALLS``) from now (a job's start, a
        command's): once spent, the requests left are stored unanswered, as failed ones are, and the next job
        asks them."""
        limit = limit or self.settings.max_llm_calls
        self.allowance = CallAllowance(limit) if limit else None

    @property
    def shots(self) -> int:
        """Demonstrations per prompt: FREEAL_SHOTS, else 10 (4 with the slow embedded model)."""
        if self.settings.shots:
            return self.settings.shots
        return 4 if not self.settings.llm_base_url else 10

    @property
    def demos_per_label(self) -> int:
        """FREEAL_DEMOS_PER_LABEL, else enough self-written demos for a round-0 pool of 3 x shots (>= 6 each)."""
        if self.settings.demos_per_label:
            return self.settings.demos_per_label
        return max(6, -(-3 * self.shots // len(self.labels)))

    @property
    def encoder(self) -> Encoder:
        """The encoder, loaded (or taken from the getter given, a shared one) on first use, once however many
        threads ask."""
        with self._encoder_lock:
            if self._encoder is None:
                if self.settings.torch_threads:
                    torch.set_num_threads(self.settings.torch_threads)
                self._encoder = self._encoder_from() if self._encoder_from else Encoder(self.settings.encoder)
            return self._encoder

    @property
    def lower_split(self) -> int:
        """Encoder layers below the SLM's trained ones: their output is the cached lower states."""
        return self.encoder.split_for(self.settings.slm_train_layers)

    def release_lower_states(self) -> None:
        """Free the cached lower states (their anonymous file, ≈ tokens × 768 bytes) until a run needs them."""
        self._lower = None

    def close(self) -> None:
        if self._owns_llm:
            self.llm_provider.close()
        self.store.close()

    def __enter__(self) -> "FreeALRun":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # public API ---------------------------------------------------------------------------------------
    def run(self, items: Sequence[Item], rounds: int | None = None, on_progress: Progress | None = None,
            llm_labels: dict[str, str | None] | None = None) -> list[ItemResult]:
        """Run (or resume) every stage on ``items`` and return one result per item, in order.

        ``llm_labels`` (item id -> label or None) are precomputed round-0 LLM labels, used instead of
        asking the LLM (labels already paid for, or a replay of published ones).
        """
        rounds = self.settings.rounds if rounds is None else rounds
        items = self._prepare(items)
        self._import_llm_labels(items, llm_labels)
        progress = on_progress or (lambda stage, done, total: None)
        if self.zero_shot_baseline:
            todo = self._unlabelled(items)
            self._timed("zero_shot", lambda: self._annotate("zero_shot", todo, lambda i: [], progress,
                                                            check_unparsed=False))
        self._timed("demos", lambda: self._stage_demos(items))
        self._timed("llm_r0", lambda: self._stage_llm_r0(items, progress))
        if self.second_judge:
            self._timed("second_judge", lambda: self._second_embeddings(items, progress))
        for rnd in range(1, rounds + 1):
            self._timed(f"slm_r{rnd}", lambda: self._stage_slm(items, rnd, progress))
            self._timed(f"llm_r{rnd}", lambda: self._stage_refine(items, rnd, progress))
        if rounds:
            self._timed(REASK_STAGE, lambda: self._stage_reask(items, rounds, progress))
        # the SLM judges the final labels (with rounds=0: the round-0 or imported labels, no LLM call more):
        # label, score, flag and health come from it
        self._timed(f"slm_r{rounds + 1}", lambda: self._stage_slm(items, rounds + 1, progress))
        results = self._within_budget(self._final(items, rounds))
        self.store.set_results(results)
        self.store.set_meta("rounds_done", rounds)
        self.store.mark_stage("final", {"rounds": rounds, "version": self.model_version()})
        return results

    def _within_budget(self, results: list[ItemResult]) -> list[ItemResult]:
        """With ``FREEAL_TARGET_ERROR``, the flag also holds the smallest set of lowest-scored texts whose review
        brings the estimated error of all labels to the target (with ``FREEAL_TARGET_CONFIDENCE``: its upper
        bound at that confidence; reason ``review_budget``); see slm/budget.py."""
        target = self.target_error
        if target is None:
            return results
        reviewable = [r.source != "human" for r in results]
        confidence = self.settings.target_confidence
        picked, estimate = review_set([r.confidence for r in results], target, reviewable, confidence)
        log.info("review budget: %d texts to review for an estimated error of %.1f%% (target %.1f%%%s)",
                 len(picked), 100 * (1 - estimate.accuracy), 100 * target,
                 f" with {100 * confidence:.0f}% confidence" if confidence else "")
        out = list(results)
        for i in picked:
            r = out[i]
            if not r.suspicious:
                out[i] = dataclasses.replace(r, suspicious=True, reasons=[*r.reasons, "review_budget"])
        return out

    def results(self, item_ids: Sequence[str] | None = None) -> dict[str, ItemResult]:
        """The latest stored results, by item id (all, or only ``item_ids``)."""
        return self.store.results(item_ids)

    def changed_texts(self, texts: dict[str, str]) -> set[str]:
        """Ids among ``texts`` (item id -> text) whose text differs from the one this run holds for them (a task
        edited since, or another project under a reused id): their stored results are not theirs."""
        held = self.store.item_texts(texts)
        limit = self.settings.max_chars
        return {i for i, text in texts.items() if i in held and held[i] != clean_text(text)[:limit]}

    def model_version(self) -> str:
        """``freeal-r<rounds>-<hash of data and settings>``: one stable version per finished round."""
        return f"freeal-r{self.store.get_meta('rounds_done') or 0}-{(self.store.get_meta('data_hash') or '')[:8]}"

    def quick_label(self, items: Sequence[Item], deadline: float | None = None) -> list[ItemResult]:
        """LLM-only labels for texts not seen by a full run (round-0 demos when they exist, else zero-shot).

        Texts not answered by ``deadline`` (a ``time.monotonic()`` value) get no label.
        """
        items = [Item(it.item_id, clean_text(it.text), it.human_label, it.gold, it.augmented) for it in items]
        demos, demo_emb = self._round0_demos(self.store.items())  # round 0's own prompts: the job hits the cache
        sets: list[list[int]] = [[] for _ in items]
        if demos and demo_emb is not None:
            emb = self.encoder.embed([it.text for it in items], max_length=self.settings.max_length)
            sets = self._round0_sets(emb, demo_emb)[1]

        def build(i: int) -> list[Message]:
            return self._messages(items[i], [demos[j] for j in sets[i]])

        answers = self.llm.answer_many(LazyRequests(len(items), lambda i: (build(i), self._parser(items[i]))),
                                       deadline=deadline, max_tokens=self.answer_tokens, expected=self.unparsed_means)
        return [self._quick_result(it, a) for it, a in zip(items, answers)]

    def stage_labels(self) -> dict[str, dict[str, str | None]]:
        """Labels per stage (for evaluation): zero_shot, llm_r0, slm_rN, llm_rN (refined; for a round set
        aside, the labels it would have given: ``stage_title``), final."""
        out: dict[str, dict[str, str | None]] = {}
        items = self.store.items()
        ids = [it.item_id for it in items]
        zero_shot = self.store.annotations("zero_shot")
        if zero_shot:
            out["zero_shot"] = {it.item_id: it.human_label or zero_shot.get(it.item_id, {}).get("label")
                                for it in items}
        if self.store.annotations("llm_r0"):
            out["llm_r0"] = dict(zip(ids, self._current(items, 0)[0]))
        rnd = 1
        while self.store.stage_done(f"slm_r{rnd}"):
            slm = self.store.slm(rnd)
            out[f"slm_r{rnd}"] = {k: self._slm_label(v) for k, v in slm.items()}
            if self.store.stage_done(f"llm_r{rnd}"):  # a round set aside: the labels it would have given
                labels = dict(zip(ids, self._current(items, rnd)[0]))
                if self.store.get_meta(f"rejected_r{rnd}"):
                    labels.update({k: a["label"] for k, a in self.store.annotations(f"llm_r{rnd}").items()
                                   if a["label"] is not None and k in labels})
                out[f"llm_r{rnd}"] = labels
            rnd += 1
        results = self.store.results()
        if results:
            out["final"] = {k: r.label for k, r in results.items()}
        return out

    # the task: class labels (span tasks override these, see loop_spans.py) ------------------------------
    task_type = "classification"
    zero_shot_fallback = False  # round 0 without demonstrations when the LLM wrote none (else an error)
    skip_one_group_pool = False  # skip a refinement whose pool holds one group (spans: "no entity" only); classes
    #   keep the paper's refinement and fill a class the SLM agrees on nowhere (a small project's weak SLM
    #   often agrees on one class only)
    answer_tokens: int | None = None  # max_tokens of an annotation request (None: LLM_MAX_TOKENS)

    @property
    def n_groups(self) -> int:
        """Groups the clean agreed pool and the retrieved demos are balanced over (here: the classes)."""
        return len(self.labels)

    @property
    def unparsed_means(self) -> str:
        return f"name no label {self.labels}"

    def _unknown_labels(self, labels: Iterable[str]) -> set[str]:
        """The labels (as stored) that name something outside the label set."""
        return {lab for lab in labels if lab not in self.labels}

    def _messages(self, item: Item, demos: Sequence[tuple[str, str]]) -> list[Message]:
        """The annotation request for ``item`` with ``(text, label)`` demonstrations."""
        return label_messages(item.text, self.labels, demos, self.task_description)

    def _parser(self, item: Item) -> Parse:
        return self._label_parse

    def _annotate(self, stage: str, todo: Sequence[Item], demos_for: Callable[[int], list[tuple[str, str]]],
                  progress: Progress, *, check_unparsed: bool = True) -> None:
        """Annotate ``todo`` for ``stage``, item i with the demonstrations ``demos_for(i)``."""
        annotate_items(self.llm, self.store, stage, todo, lambda i: self._messages(todo[i], demos_for(i)),
                       lambda i: self._parser(todo[i]), on_progress=progress, check_unparsed=check_unparsed,
                       max_tokens=self.answer_tokens, expected=self.unparsed_means, allowance=self.allowance)

    def _write_demos(self, texts: Sequence[str]) -> tuple[list[tuple[str, str]], dict[str, int]]:
        """Round 0: the LLM's own ``(text, label)`` demonstrations, and how many per label (and how many it
        wrote but, asked zero-shot, labelled otherwise: ``dropped``).

        A written text the LLM itself labels otherwise is dropped: a small model writes texts of the wrong
        class ("careless and unfocused" as a positive review), and a wrong demonstration misleads every
        prompt it appears in. A label whose every text was dropped keeps them (no label goes without)."""
        demos = generate_demos(self.llm, self.labels, texts, self.demos_per_label,
                               task_description=self.task_description, seed=self.settings.seed,
                               allowance=self.allowance)
        pairs = [(text, label) for label, written in demos.items() for text in written]
        answers = self.llm.label_many([label_messages(t, self.labels, (), self.task_description) for t, _ in pairs],
                                      self.labels, check_unparsed=False, allowance=self.allowance)
        agreed = [a is None or a.label is None or a.label == label for (_, label), a in zip(pairs, answers)]
        confirmed = {label for (_, label), ok in zip(pairs, agreed) if ok}  # labels that keep some text
        kept = [pair for pair, ok in zip(pairs, agreed) if ok or pair[1] not in confirmed]
        return kept, {**{label: sum(lab == label for _, lab in kept) for label in self.labels},
                      "dropped": len(pairs) - len(kept)}

    def _fit_slm(self, items: Sequence[Item], labels: Sequence[str | None], rnd: int,
                 progress: Progress) -> dict[str, object]:
        """Cross-fit SLM round ``rnd`` on ``labels``; store its out-of-sample output, model and embeddings."""
        model, out = self.train_slm(items, labels, seed_offset=rnd, progress=progress)
        np.save(self.run_dir / f"slm_r{rnd}_embeddings.npy", out.embeddings)
        model.save(self.run_dir / f"slm_r{rnd}.pt")
        self.store.set_slm(rnd, [(it.item_id, out.probs[i].tolist(),
                                  None if np.isnan(out.losses[i]) else float(out.losses[i]),
                                  bool(out.clean[i]), float(out.clean_prob[i])) for i, it in enumerate(items)])
        labelled = ~np.isnan(out.losses)
        return {"epoch_seconds": [round(x, 2) for x in out.epoch_seconds],
                "clean": int(out.clean[labelled].sum()), "labelled": int(labelled.sum())}

    def _slm_groups(self, items: Sequence[Item], rnd: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per item: group of its current label (-1: none), the SLM's group, and how likely the SLM finds the
        label (its probability; where they agree, its confidence)."""
        slm = self.store.slm(rnd)
        probs = np.array([slm[it.item_id]["probs"] for it in items])
        labels, _ = self._current(items, rnd - 1)
        y = np.array([self.labels.index(lab) if lab is not None else -1 for lab in labels])
        return y, probs.argmax(1), probs[np.arange(len(items)), np.maximum(y, 0)]

    def _slm_label(self, row: dict[str, object]) -> str:
        """The label an SLM round's stored row predicts."""
        return self.labels[int(np.argmax(row["probs"]))]  # type: ignore[arg-type]

    def _quick_result(self, item: Item, answer: LLMAnswer | None) -> ItemResult:
        """A result from the LLM's answer alone (``quick_label``)."""
        a = answer
        return ItemResult(item.item_id, a.label if a else None, a.confidence if a else None,
                          dict(a.probs) if a else {}, suspicious=True, reasons=["not_yet_reviewed_by_slm"],
                          llm_label=a.label if a else None, llm_confidence=a.confidence if a else None,
                          round=0, source="llm")

    # stages -------------------------------------------------------------------------------------------
    def _prepare(self, items: Sequence[Item]) -> list[Item]:
        ids = [it.item_id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique")
        if not items:
            raise ValueError("no items to label")
        unknown = self._unknown_labels(it.human_label for it in items if it.human_label)
        if unknown:
            raise ValueError(f"human labels {sorted(unknown)} are not in the label set {self.labels}")
        limit = self.settings.max_chars
        long = sum(len(it.text) > limit for it in items)
        if long:
            log.warning("%d texts are longer than %d characters and were truncated (FREEAL_MAX_CHARS)", long, limit)
        self.audit_ids = audit_sample(ids, self.audit_size, self.settings.seed)
        self.audit_labels = {it.item_id: it.human_label for it in items
                             if it.item_id in self.audit_ids and it.human_label}
        items = [Item(it.item_id, clean_text(it.text)[:limit],
                      None if it.item_id in self.audit_labels else it.human_label,  # blind: measures, never teaches
                      it.gold, clean_text(it.augmented)[:limit] if it.augmented else None) for it in items]
        s = self.settings
        settings = [s.llm_model, self.shots, self.demos_per_label, s.demo_pool_size, s.encoder, s.slm_epochs,
                    s.slm_min_steps, s.slm_warmup_epochs, s.slm_folds, s.slm_robust, s.slm_train_layers, s.slm_lr,
                    s.clean_threshold, s.select_ratio, s.refine_share, s.seed, s.max_length]
        settings += ["set_aside_less_sure"] if s.set_aside_less_sure else []  # off: the hashes runs had before it
        data_hash = _hash({"labels": self.labels, "task": self.task_description,
                           "items": [[it.item_id, it.text, it.human_label, it.augmented] for it in items],
                           "settings": settings})
        base_hash = _hash({"labels": self.labels, "task": self.task_description,  # all but the human labels
                           "items": [[it.item_id, it.text, it.augmented] for it in items], "settings": settings})
        setup_hash = _hash({"labels": self.labels, "task": self.task_description, "settings": settings})  # no items
        r0_hash = _hash([self.labels, self.task_description, s.llm_model, self.shots, self.demos_per_label,
                         s.encoder, s.seed, s.max_length])
        if self.store.get_meta("r0_hash") != r0_hash:  # round-0 answers would differ: start afresh
            self.store.reset_stages()
            self.store.set_meta("r0_hash", r0_hash)
        self.store.set_meta("llm", {"model": s.llm_model, "endpoint": bool(s.llm_base_url)})  # who answered
        if self.store.get_meta("data_hash") != data_hash:  # per-item round-0 answers stay valid
            before = {it.item_id: it.human_label for it in self.store.items()}
            keep = ["demos", "zero_shot", "llm_r0"]
            rejected: list[str] = []
            labels_only = self.store.get_meta("base_hash") == base_hash  # only people's labels changed
            # or texts added, edited or removed: the refinements keep their answers to the texts kept, ask the others
            texts_only = not labels_only and self.store.get_meta("setup_hash") == setup_hash
            if labels_only or texts_only:  # incremental
                if labels_only:
                    refinements, rejected = self._kept_refinements()
                    keep += refinements
                keep.append(REASK_STAGE)
                new = [it.item_id for it in items if it.human_label and it.human_label != before.get(it.item_id)]
                pending = set(self.store.get_meta("reask_pending") or []) | set(new)
                self.store.set_meta("reask_pending", sorted(pending))
            else:
                self.store.set_meta("reask_pending", [])
                self.store.set_meta("reask_targets", [])
            self.store.replace_items(items)  # forgets the answers to texts edited or removed
            self.store.reset_stages(keep=keep, keep_answers=texts_only)
            for name in rejected:  # a rejected refinement stays rejected: the rounds it stopped stay skipped
                self.store.set_meta(name, True)
            self.store.set_meta("data_hash", data_hash)
            self.store.set_meta("base_hash", base_hash)
            self.store.set_meta("setup_hash", setup_hash)
            self.store.set_meta("rounds_done", 0)
        return items

    def _kept_refinements(self) -> tuple[list[str], list[str]]:
        """The finished refinement stages, whose answers stay valid when only people's labels change (kept,
        rejected or skipped alike), and the rejection marks to restore with them."""
        rnd, kept, rejected = 1, [], []
        while self.store.stage_done(f"llm_r{rnd}"):
            kept.append(f"llm_r{rnd}")
            if self.store.get_meta(f"rejected_r{rnd}"):
                rejected.append(f"rejected_r{rnd}")
            rnd += 1
        return kept, rejected

    def _timed(self, name: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    @staticmethod
    def _unlabelled(items: Sequence[Item]) -> list[Item]:
        return [it for it in items if not it.human_label]

    def _import_llm_labels(self, items: Sequence[Item], llm_labels: dict[str, str | None] | None) -> None:
        """Make the stored round-0 labels this run's: the imported ``llm_labels``, or the LLM's when None.

        Round-0 labels of the other kind (a project switched between judging labels and asking the LLM) and
        imported ones that changed are dropped, with every stage after round 0 (their inputs are not hashed);
        then each text without a round-0 label gets its imported one."""
        have = self.store.annotations("llm_r0")
        if llm_labels is None:
            stale = [k for k, ann in have.items() if ann["raw"] == IMPORTED]
        else:
            unknown = self._unknown_labels(lab for lab in llm_labels.values() if lab is not None)
            if unknown:
                raise ValueError(f"precomputed LLM labels {sorted(unknown)} are not in the label set {self.labels}")
            stale = [k for k, label in llm_labels.items()
                     if k in have and (have[k]["raw"] != IMPORTED or have[k]["label"] != label)]
        if stale:
            self.store.forget_annotations("llm_r0", stale)
            self.store.reset_stages(keep=["demos", "zero_shot", "llm_r0"])
            have = self.store.annotations("llm_r0")
        if llm_labels is None:
            return
        for it in self._unlabelled(items):
            if it.item_id in llm_labels and it.item_id not in have:
                self.store.add_annotation("llm_r0", it.item_id, llm_labels[it.item_id], None, {}, IMPORTED, None)

    def _stage_demos(self, items: Sequence[Item]) -> None:
        if self.store.stage_done("demos"):
            return
        have = self.store.annotations("llm_r0")
        if all(it.item_id in have for it in self._unlabelled(items)):
            return  # every text already has a round-0 label (imported): no demonstrations needed
        demos, info = self._write_demos([it.text for it in items])
        self.store.set_demos(demos)
        self.store.mark_stage("demos", info)

    def _embeddings(self, items: Sequence[Item], progress: Progress) -> np.ndarray:
        """Frozen-encoder embeddings of the items, cached on disk by content; computed from the lower
        states the SLM trains on (:meth:`_lower_states`), so the lower layers run once per run."""
        key = _hash([str(self.encoder.path), [it.text for it in items]])[:16]
        path = self.run_dir / f"embeddings-{key}.npy"
        if path.exists():
            return np.load(path)
        split = self.lower_split
        lower, _ = self._lower_states(items, split, progress)
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            progress("embed", done, len(items))

        emb = self.encoder.embed_lower(lower, split, on_batch=tick)
        np.save(path, emb)
        return emb

    def _round0_demos(self, items: Sequence[Item]) -> tuple[list[tuple[str, str]], np.ndarray | None]:
        """Round 0's demonstrations, the LLM's own then people's labels among ``items``, and their embeddings
        (kept while the demonstrations stay the same: ``/predict`` asks in chunks)."""
        demos = self.store.demos() + [(it.text, it.human_label) for it in items if it.human_label]
        if not demos:
            return demos, None
        key = _hash([str(self.encoder.path), self.settings.max_length, demos])
        if self._demo_emb is None or self._demo_emb[0] != key:
            self._demo_emb = (key, self.encoder.embed([d[0] for d in demos], max_length=self.settings.max_length))
        return demos, self._demo_emb[1]

    def _round0_sets(self, emb: np.ndarray, demo_emb: np.ndarray) -> tuple[list[int], list[list[int]]]:
        """Request order and each text's nearest demos, in the shared-prefix order of round 0's prompts."""
        return shared_prefix_order([nearest_demos(e, demo_emb, self.shots) for e in emb], len(demo_emb),
                                   self.settings.seed)

    def _stage_llm_r0(self, items: Sequence[Item], progress: Progress) -> None:
        demos, demo_emb = self._round0_demos(items)
        have = self.store.annotations("llm_r0")
        todo = [it for it in self._unlabelled(items) if it.item_id not in have or have[it.item_id]["error"]]
        if not todo:
            return
        if not demos and not self.zero_shot_fallback:
            raise RuntimeError("round 0 has no demonstrations: the LLM wrote none and no human labels exist")
        if not demos:
            log.warning("round 0 has no demonstrations (the LLM wrote none that could be used): asking without")
            self._annotate("llm_r0", todo, lambda i: [], progress)
            return
        position = {it.item_id: i for i, it in enumerate(items)}
        emb = self._embeddings(items, progress)[[position[it.item_id] for it in todo]]
        order, sets = self._round0_sets(emb, demo_emb)
        self._annotate("llm_r0", [todo[i] for i in order], lambda k: [demos[j] for j in sets[order[k]]], progress)

    def _label_sources(self, upto_round: int) -> list[str]:
        """The LLM stages whose labels count up to refinement ``upto_round`` (rejected rounds left out; the
        answers re-asked after people labelled tasks count last, from round 1 on)."""
        return ["llm_r0"] + [f"llm_r{r}" for r in range(1, upto_round + 1)
                             if not self.store.get_meta(f"rejected_r{r}")] + ([REASK_STAGE] if upto_round else [])

    def _latest_answers(self, items: Sequence[Item], upto_round: int) -> dict[str, dict[str, object]]:
        """Per item, the latest LLM answer that gave a label, up to refinement ``upto_round``."""
        latest: dict[str, dict[str, object]] = {}
        for stage in self._label_sources(upto_round):
            for item_id, ann in self.store.annotations(stage).items():
                if ann["label"] is not None:
                    latest[item_id] = ann
        return latest

    def _current(self, items: Sequence[Item], upto_round: int, *, sources: Sequence[str] | None = None
                 ) -> tuple[list[str | None], np.ndarray]:
        """Human label, else the latest LLM label up to refinement ``upto_round``; and the LLM's per-class
        probabilities, averaged over every round that asked the text (each with other demonstrations, so an
        answer that changed between rounds lowers the label's share); a row of zeros where it gave none.
        ``sources``: other LLM stages to read instead of the round's (a benchmark's what-if), oldest first."""
        position = {it.item_id: i for i, it in enumerate(items)}
        latest: dict[str, dict[str, object]] = {}
        total = np.zeros((len(items), len(self.labels)))
        asked = np.zeros(len(items))
        for stage in sources or self._label_sources(upto_round):  # one read per stage: both from the same pass
            for item_id, ann in self.store.annotations(stage).items():
                if ann["label"] is None:
                    continue
                latest[item_id] = ann
                given = ann.get("probs")
                if item_id in position and given:
                    total[position[item_id]] += [float(given.get(x, 0.0)) for x in self.labels]
                    asked[position[item_id]] += 1
        labels: list[str | None] = []
        probs = np.zeros((len(items), len(self.labels)))
        for i, it in enumerate(items):
            ann = latest.get(it.item_id)
            labels.append(it.human_label or (str(ann["label"]) if ann else None))
            if ann and not it.human_label and asked[i]:
                probs[i] = total[i] / asked[i]
        return labels, probs

    def _self_agreement(self, items: Sequence[Item], upto_round: int) -> SelfAgreement | None:
        """How the LLM's answers agree with its answers before them, each asking with other demonstrations:
        up to refinement ``upto_round`` >= 1, its latest answers (a set-aside refinement's included: it is the
        same LLM answering) against its round-0 answers; at round 0, its round-0 answers against its zero-shot
        ones (``zero_shot_baseline``). None where no text was asked twice. Imported labels are not the LLM's."""
        before, stages = ("llm_r0", [f"llm_r{r}" for r in range(1, upto_round + 1)] + [REASK_STAGE]) if upto_round \
            else ("zero_shot", ["llm_r0"])

        def answers(stage: str) -> dict[str, str]:
            return {k: str(a["label"]) for k, a in self.store.annotations(stage).items()
                    if a["label"] is not None and a["raw"] != IMPORTED}

        first, again = answers(before), dict[str, str]()
        for stage in stages:
            again.update(answers(stage))
        pairs = [(it, first[it.item_id], again[it.item_id]) for it in items
                 if not it.human_label and it.item_id in first and it.item_id in again]
        return self._agreement_of(pairs) if pairs else None

    def _agreement_of(self, pairs: Sequence[tuple[Item, str, str]]) -> SelfAgreement:
        """The agreement of two labels per item (item, first, again)."""
        return self_agreement(np.array([self.labels.index(a) for _, a, _ in pairs]),
                              np.array([self.labels.index(b) for _, _, b in pairs]))

    @staticmethod
    def _llm_confidences(items: Sequence[Item], latest: dict[str, dict[str, object]]) -> dict[str, float | None]:
        """Per item, the LLM's confidence in its latest answer (``_latest_answers``), or None."""
        out: dict[str, float | None] = {}
        for it in items:
            conf = latest.get(it.item_id, {}).get("confidence")
            out[it.item_id] = float(conf) if isinstance(conf, (int, float)) else None
        return out

    def _lower_states(self, items: Sequence[Item], split: int, progress: Progress
                      ) -> tuple[LowerStates, LowerStates | None]:
        key = _hash([split, [it.text for it in items], [it.augmented for it in items]])
        if self._lower is None or self._lower[0] != key:
            total = len(items) * (2 if any(it.augmented for it in items) else 1)
            done = 0

            def tick(n: int) -> None:
                nonlocal done
                done += n
                progress("encode", done, total)

            lower = self.encoder.lower_states([it.text for it in items], split, max_length=self.settings.max_length,
                                              on_batch=tick, directory=self.run_dir)
            aug = None
            if any(it.augmented for it in items):
                aug = self.encoder.lower_states([it.augmented or it.text for it in items], split,
                                                max_length=self.settings.max_length, on_batch=tick,
                                                directory=self.run_dir)
            self._lower = (key, lower, aug)
        return self._lower[1], self._lower[2]

    def slm_config(self, *, robust: bool | None = None, seed_offset: int = 0) -> SLMConfig:
        s = self.settings
        return SLMConfig(epochs=s.slm_epochs, min_steps=s.slm_min_steps, warmup_epochs=s.slm_warmup_epochs,
                         folds=s.slm_folds, lr=s.slm_lr, batch_size=s.slm_batch_size, clean_threshold=s.clean_threshold,
                         robust=s.slm_robust if robust is None else robust, seed=s.seed + seed_offset)

    def train_slm(self, items: Sequence[Item], labels: Sequence[str | None], *, robust: bool | None = None,
                  seed_offset: int = 0, progress: Progress | None = None) -> tuple[SmallModel, SLMOutput]:
        """Cross-fit one SLM on ``labels`` (None = unlabelled); human labels are gold. ``robust``: the
        paper's robust recipe (default: FREEAL_SLM_ROBUST)."""
        progress = progress or (lambda stage, done, total: None)
        lower, aug = self._lower_states(items, self.lower_split, progress)
        y = np.array([self.labels.index(lab) if lab is not None else -1 for lab in labels])
        gold = np.array([bool(it.human_label) for it in items])
        model = SmallModel(self.encoder, len(self.labels), train_layers=self.settings.slm_train_layers,
                           config=self.slm_config(robust=robust, seed_offset=seed_offset))
        out = model.fit(lower, y, gold=gold, augmented=aug, groups=text_groups([it.text for it in items]),
                        on_epoch=lambda e, n, m: progress("slm", e, n))
        return model, out

    @property
    def llm_calibrated(self) -> bool:
        """Whether the confidence of the LLM that answered (as the run's state records it; runs made before
        that record: the configured one) sets the level of the scores (FREEAL_LLM_CALIBRATED; by default: an
        embedded model measured calibrated, never an endpoint freeal knows nothing of)."""
        s = self.settings
        llm = self.store.get_meta("llm") or {"model": s.llm_model, "endpoint": bool(s.llm_base_url)}
        return confidence_calibrated(llm["model"], llm["endpoint"], s.llm_calibrated)

    def _judge(self, items: Sequence[Item], rnd: int, *, audit: bool = False, second: bool = True) -> Judgement:
        """SLM round ``rnd``'s verdict on the labels it was trained on (those after refinement ``rnd - 1``);
        ``audit``: with people's labels on the random audit tasks (the final verdict); ``second=False``: the
        small model's own verdict only, where the caller needs no more than its health (which the second
        judge leaves as it is)."""
        slm = self.store.slm(rnd)
        labels, llm_probs = self._current(items, rnd - 1)
        y = np.array([self.labels.index(lab) if lab is not None else -1 for lab in labels])
        probs = np.array([slm[it.item_id]["probs"] for it in items])
        human = np.array([bool(it.human_label) for it in items])
        person = self.audit_labels if audit else {}
        truth = np.array([self.labels.index(person[it.item_id]) if it.item_id in person else -1 for it in items])
        llm_self = self._self_agreement(items, rnd - 1)
        own = judge(probs, y, human, llm_probs, audit_labels=truth, llm_calibrated=self.llm_calibrated,
                    llm_self=llm_self)
        if not (self.second_judge and second):
            return own
        probe = probe_oof(self._second_embeddings(items), y, len(self.labels), [it.text for it in items],
                          human=human, seed=self.settings.seed + rnd, fallback=probs)
        both = judge((probs + probe) / 2, y, human, llm_probs, audit_labels=truth, llm_calibrated=self.llm_calibrated,
                     llm_self=llm_self)
        return ranked_at_level(own, both)

    def _second_embeddings(self, items: Sequence[Item], progress: Progress | None = None) -> np.ndarray:
        """The second judge's frozen-encoder embeddings of the items (FREEAL_SECOND_JUDGE), cached on disk by
        content; the encoder is loaded only to compute them."""
        name = str(self.settings.second_judge)
        key = _hash([name, self.settings.max_length, [it.text for it in items]])[:16]
        path = self.run_dir / f"second_judge-{key}.npy"
        if path.exists():
            return np.load(path)
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("second_judge", done, len(items))

        emb = Encoder(name).embed([it.text for it in items], max_length=self.settings.max_length, on_batch=tick)
        np.save(path, emb)
        return emb

    def _stage_slm(self, items: Sequence[Item], rnd: int, progress: Progress) -> None:
        """Cross-fit the SLM on the current labels and record its verdict on them (the run's health).

        Every refinement replaces the labels before it (the paper). With ``FREEAL_SET_ASIDE_LESS_SURE``, one
        that looks worse than the labels it would replace (:meth:`_refinement_worse`) does not: its labels are
        set aside and this round reuses the previous SLM round's output.
        """
        if self.store.stage_done(f"slm_r{rnd}"):
            return
        if self._refinement_stopped(rnd):  # no label changed since round rnd - 1: reuse it
            self._reuse_slm(rnd - 1, rnd, self.store.get_meta(f"health_r{rnd - 1}"))
            self.store.mark_stage(f"slm_r{rnd}", {"reused_round": rnd - 1})
            return
        worse = self._refinement_worse(items, rnd - 1) if rnd > 1 and self.settings.set_aside_less_sure else None
        if worse:
            self.store.set_meta(f"rejected_r{rnd - 1}", True)
            self._reuse_slm(rnd - 1, rnd, self.store.get_meta(f"health_r{rnd - 1}"))
            self.store.mark_stage(f"slm_r{rnd}", {"reused_round": rnd - 1, "rejected_refinement": rnd - 1, **worse})
            return
        labels, _ = self._current(items, rnd - 1)
        info = self._fit_slm(items, labels, rnd, progress)
        health = self._judge(items, rnd, second=False).health
        self.store.set_meta(f"health_r{rnd}", health.as_dict())
        info.update(estimated_accuracy=health.estimated_accuracy, verdict=health.verdict)
        self.store.mark_stage(f"slm_r{rnd}", info)
        if health.verdict != "ok":
            log.warning("SLM round %d: %s", rnd, health.message)

    def _refinement_worse(self, items: Sequence[Item], rnd: int) -> dict[str, float] | None:
        """Why refinement ``rnd`` looks worse than the labels it would replace, or None: on the texts whose
        answer it changed, the LLM is on average less sure of its new answers than it was of the old ones (by
        more than ``REJECT_MARGIN``); returns the count and both mean confidences. Kept, as the paper keeps
        every refinement, where fewer than ``REJECT_MIN_CHANGED`` changed answers carry a confidence on both
        sides (an endpoint without logprobs, imported labels).

        The small model's estimate does not decide: trained on each label set in turn, it agrees most with
        the one it learnt (on the live SST-2 run it preferred round 0's answer on 61 % of the 31 texts the
        refinement changed, where the refined answer was right on 90 %:
        ``benchmarks/results/refinement_rule_live_s0.md``)."""
        before = self._latest_answers(items, rnd - 1)
        old: list[float] = []
        new: list[float] = []
        for item_id, ann in self.store.annotations(f"llm_r{rnd}").items():
            prev = before.get(item_id)
            if ann["label"] is None or prev is None or prev["label"] == ann["label"]:
                continue
            if isinstance(ann["confidence"], (int, float)) and isinstance(prev["confidence"], (int, float)):
                old.append(float(prev["confidence"]))
                new.append(float(ann["confidence"]))
        if len(new) < REJECT_MIN_CHANGED or np.mean(new) >= np.mean(old) - REJECT_MARGIN:
            return None
        evidence = {"changed": len(new), "confidence_before": float(np.mean(old)),
                    "confidence_after": float(np.mean(new))}
        log.warning(set_aside_note(rnd, evidence))
        return evidence

    def _reuse_slm(self, src: int, dst: int, health: dict[str, object] | None) -> None:
        """SLM round ``dst`` takes round ``src``'s output (its labels are the same)."""
        self.store.copy_slm(src, dst)
        self.store.set_meta(f"slm_evidence_r{dst}", self.store.get_meta(f"slm_evidence_r{src}"))
        shutil.copyfile(self.run_dir / f"slm_r{src}_embeddings.npy", self.run_dir / f"slm_r{dst}_embeddings.npy")
        self.store.set_meta(f"health_r{dst}", health)

    def _refinement_stopped(self, rnd: int) -> bool:
        """An earlier refinement was rejected: round ``rnd`` would rebuild the same pool, demos and prompts from
        the same SLM output, and get the rejected answers again (from the cache, or a deterministic LLM)."""
        return any(self.store.get_meta(f"rejected_r{r}") for r in range(1, rnd))

    def refinement_scope(self, items: Sequence[Item], rnd: int) -> RefinementScope:
        """Round ``rnd``'s refinement: the texts to re-annotate and the demo pool.

        The clean agreed pool (per class: out-of-sample SLM prediction == label, top ``select_ratio`` by
        SLM confidence) and human labels keep their labels; every other text is re-annotated (the paper),
        or only a ``refine_share`` of them (a budget knob for endpoints paid per call): those the LLM left
        unanswered first, then the lowest-scored.
        A class the SLM agrees on nowhere is filled with its labelled texts the SLM finds likeliest, so the
        LLM still sees demos of every class it answered (spans instead skip a one-group pool).
        """
        emb = np.load(self.run_dir / f"slm_r{rnd}_embeddings.npy")
        gold = np.array([bool(it.human_label) for it in items])
        y, pred, conf = self._slm_groups(items, rnd)
        n_cls = self.n_groups
        fill = not self.skip_one_group_pool
        pool = clean_agreed_pool(y, pred, conf, n_cls, ratio=self.settings.select_ratio, gold=gold,
                                 label_scores=conf if fill else None)
        filled = [self.labels[j] for j in range(n_cls) if fill and len(pool[j])
                  and not ((y == j) & (pred == j) & ~gold).any()]
        chosen = demo_pool(pool, emb, max(1, self.settings.demo_pool_size // n_cls), seed=self.settings.seed,
                           gold=gold)
        pool_idx = np.concatenate([chosen[j] for j in range(n_cls)]).astype(int)
        pool_cls = np.concatenate([np.full(len(chosen[j]), j) for j in range(n_cls)]).astype(int)
        kept = np.zeros(len(items), dtype=bool)
        kept[np.concatenate([pool[j] for j in range(n_cls)]).astype(int)] = True
        todo = np.flatnonzero(~kept & ~gold)
        share = self.settings.refine_share
        if share < 1.0 and len(todo):
            scores = self._judge(items, rnd).scores  # texts with no LLM label first, then the lowest scores
            todo = todo[np.lexsort((scores[todo], y[todo] >= 0))[:int(np.ceil(share * len(todo)))]]
            todo = np.sort(todo)
        return RefinementScope(todo.tolist(), pool_idx, pool_cls, filled)

    def _stage_refine(self, items: Sequence[Item], rnd: int, progress: Progress) -> None:
        """Re-annotate every text outside the clean agreed pool with demos retrieved by SLM embeddings.

        Requests that fail leave the stage unfinished: the next run retries them (as in round 0) and
        redoes the later rounds if any label came in.
        """
        stage = f"llm_r{rnd}"
        if self.store.stage_done(stage):
            return
        if self._refinement_stopped(rnd):
            log.warning("refinement round %d skipped: an earlier round's refinement was rejected, and the same "
                        "demonstrations would give the same answers", rnd)
            self.store.mark_stage(stage, {"skipped": "an earlier refinement was rejected", "reannotated": 0})
            return
        todo_idx, pool_idx, pool_cls, filled = self.refinement_scope(items, rnd)
        if filled:
            log.warning("refinement round %d: the small model agrees with no %s label; their demos are the "
                        "texts so labelled that it finds likeliest", rnd, ", ".join(map(repr, filled)))
        if self.skip_one_group_pool and len(todo_idx) and len(np.unique(pool_cls)) < 2:  # one answer in demos
            log.warning(ONE_GROUP_NOTE, rnd)
            self.store.set_meta(f"rejected_r{rnd}", True)  # later rounds: the same pool, the same demos
            self.store.mark_stage(stage, {"skipped": "one_group", "reannotated": 0})
            return
        todo = [items[i] for i in todo_idx]
        before = {k for k, v in self.store.annotations(stage).items() if not v["error"]}
        self._ask_with_pool(stage, items, todo_idx, pool_idx, pool_cls, rnd, progress)
        answers = self.store.annotations(stage)
        failed = sum(1 for it in todo if answers.get(it.item_id, {}).get("error"))
        if any(answers.get(it.item_id, {}).get("label") is not None and it.item_id not in before for it in todo):
            self.store.reopen_rounds_after(rnd)  # new labels: later rounds run again (asking what they have not)
        if failed:
            log.warning("refinement round %d unfinished (%s); re-run to ask them", rnd,
                        _why_unanswered(answers, [it.item_id for it in todo]))
            return
        self.store.mark_stage(stage, {"reannotated": len(todo), "kept": len(items) - len(todo),
                                      "demo_pool": len(pool_idx), **({"filled": filled} if filled else {})})

    def _ask_with_pool(self, stage: str, items: Sequence[Item], todo_idx: Sequence[int], pool_idx: np.ndarray,
                       pool_cls: np.ndarray, rnd: int, progress: Progress) -> None:
        """Ask the LLM about ``items[todo_idx]`` for ``stage``, each with its most similar demos per class from
        round ``rnd``'s pool (SLM embeddings; labels after refinement ``rnd - 1``), in shared-prefix order
        (``refine_most_shared_first``)."""
        if not len(todo_idx):
            return
        emb = np.load(self.run_dir / f"slm_r{rnd}_embeddings.npy")
        labels, _ = self._current(items, rnd - 1)
        pool_emb = emb[pool_idx]
        order, picks = shared_prefix_order([retrieve_demos(emb[i], pool_emb, pool_cls, self.shots, self.n_groups,
                                                           exclude=np.flatnonzero(pool_idx == i))
                                            for i in todo_idx], len(pool_idx), self.settings.seed,
                                           most_shared_first=self.refine_most_shared_first)

        def demos_for(k: int) -> list[tuple[str, str]]:
            return [(items[pool_idx[p]].text, str(labels[pool_idx[p]])) for p in picks[order[k]]]

        self._annotate(stage, [items[todo_idx[i]] for i in order], demos_for, progress)

    def reask_targets(self, items: Sequence[Item], rnd: int, new_human: Iterable[str]) -> list[int]:
        """The texts people's new labels bear on: per new human label, its ``REASK_PER_HUMAN_LABEL`` nearest
        texts without one (cosine on round ``rnd``'s SLM embeddings), so a burst of k labels costs at most
        ``REASK_PER_HUMAN_LABEL * k`` LLM calls."""
        position = {it.item_id: i for i, it in enumerate(items)}
        anchors = [position[k] for k in new_human if k in position]
        free = np.array([not it.human_label for it in items])
        if not anchors or not free.any():
            return []
        emb = np.load(self.run_dir / f"slm_r{rnd}_embeddings.npy")
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        sims = unit[anchors] @ unit.T
        sims[:, ~free] = -np.inf
        picked: set[int] = set()
        for row in sims:
            picked.update(int(j) for j in np.argsort(-row, kind="stable")[:REASK_PER_HUMAN_LABEL] if free[j])
        return sorted(picked)

    def _stage_reask(self, items: Sequence[Item], rnd: int, progress: Progress) -> None:
        """People labelled tasks since the refinement rounds ran: instead of re-running them (about one LLM
        call per text and round), re-ask only the texts their labels bear on (:meth:`reask_targets`), with
        demos from round ``rnd``'s pool, where the people's labels now come first. Resumable: the targets are
        stored once per burst and failed requests are retried on the next run."""
        pending = self.store.get_meta("reask_pending") or []
        targets = self.store.get_meta("reask_targets") or []
        if pending:
            targets = sorted(set(targets) | {items[i].item_id for i in self.reask_targets(items, rnd, pending)})
            self.store.forget_annotations(REASK_STAGE, targets)
            self.store.set_meta("reask_targets", targets)
            self.store.set_meta("reask_pending", [])
            self.burst = {"human_labels": len(pending), "asked": len(targets),
                          "bound": REASK_PER_HUMAN_LABEL * len(pending)}
            self.store.mark_stage(REASK_STAGE, self.burst)
        if not targets:
            return
        position = {it.item_id: i for i, it in enumerate(items)}
        todo_idx = [position[k] for k in targets if k in position and not items[position[k]].human_label]
        _, pool_idx, pool_cls, _ = self.refinement_scope(items, rnd)
        self._ask_with_pool(REASK_STAGE, items, todo_idx, pool_idx, pool_cls, rnd, progress)
        answers = self.store.annotations(REASK_STAGE)
        if any(answers.get(items[i].item_id, {}).get("error") for i in todo_idx):
            log.warning("re-asking the texts people's labels bear on: some requests failed; re-run to retry them")
            return
        self.store.set_meta("reask_targets", [])

    def _final(self, items: Sequence[Item], rounds: int) -> list[ItemResult]:
        """Label, calibrated score and review flag per text, from the last SLM round's verdict on the
        final labels (see detection.py)."""
        labels, _ = self._current(items, rounds)
        llm_conf = self._llm_confidences(items, self._latest_answers(items, rounds))
        verdict = self._judge(items, rounds + 1, audit=True)
        self._keep_audited_health(rounds + 1, verdict)
        slm = self.store.slm(rounds + 1)
        results = []
        for i, (it, lab) in enumerate(zip(items, labels)):
            final = self.labels[int(verdict.labels[i])]
            p_slm = np.array(slm[it.item_id]["probs"])
            slm_label = self.labels[int(np.argmax(p_slm))]
            in_audit = it.item_id in self.audit_ids
            person = it.human_label or self.audit_labels.get(it.item_id)
            if person:
                results.append(ItemResult(it.item_id, person, 1.0, {x: float(x == person) for x in self.labels},
                                          round=rounds, source="human", llm_label=lab if in_audit else None,
                                          audit=in_audit))
                continue
            flagged = bool(verdict.flagged[i])
            results.append(ItemResult(
                it.item_id, final, float(verdict.scores[i]),
                {x: float(v) for x, v in zip(self.labels, verdict.posterior[i])},
                suspicious=flagged, reasons=verdict.reasons[i] if flagged else [],
                suggested_label=slm_label if flagged and slm_label != final else None, llm_label=lab,
                llm_confidence=llm_conf[it.item_id], slm_label=slm_label, slm_prob=float(p_slm.max()),
                round=rounds, audit=in_audit,
                source="llm" if final == lab or "llm_rounds_disagree" in verdict.reasons[i] else "slm"))
        return results

    def _keep_audited_health(self, rnd: int, verdict: Judgement | SpanVerdict) -> None:
        """Store the final verdict's health with what the audit found (people label audit tasks between runs
        without changing any stage, so the stage's stored health is replaced each run)."""
        health: dict[str, object] = verdict.health.as_dict()
        if verdict.audit is not None:
            health["audit"] = verdict.audit.as_dict()
        if self.audit_ids:
            health["audit_tasks"] = len(self.audit_ids)
        if self.store.get_meta(f"health_r{rnd}") != health:
            self.store.set_meta(f"health_r{rnd}", health)

    def health(self) -> dict[str, object] | None:
        """The latest SLM round's verdict on the labels (estimated accuracy, kappa, verdict, message)."""
        return latest_health(self.store)

    def stage_title(self, stage: str) -> str:
        """``status.stage_title``, with "(set aside)" after a refinement round this run set aside."""
        aside = stage.startswith("llm_r") and stage[5:].isdigit() and self.store.get_meta(f"rejected_{stage[4:]}")
        return stage_title(stage) + (" (set aside)" if aside else "")


def set_aside_note(rnd: int, evidence: dict[str, float]) -> str:
    """What a user reads about refinement ``rnd`` set aside (``FreeALRun._refinement_worse``'s evidence)."""
    return (f"refinement round {rnd} was set aside: the LLM was less sure of the {int(evidence['changed'])} answers "
            f"it changed (mean confidence {evidence['confidence_after']:.2f}, against "
            f"{evidence['confidence_before']:.2f} for the answers they would replace), so the labels before it stay")


def unfinished_work(store: Store, items: Sequence[Item], rounds: int) -> list[str]:
    """What the run left undone because LLM requests failed or were held back by ``FREEAL_MAX_LLM_CALLS`` (a
    later run asks them), with counts; [] when nothing is left."""
    parts = []
    round0 = store.annotations("llm_r0")
    no_label = [it.item_id for it in items if not it.human_label
                and (it.item_id not in round0 or round0[it.item_id]["error"])]
    if no_label:
        parts.append(f"{len(no_label)} texts without an LLM label ({_why_unanswered(round0, no_label)})")
    for rnd in range(1, rounds + 1):
        if not store.stage_done(f"llm_r{rnd}"):
            answers = store.annotations(f"llm_r{rnd}")
            parts.append(f"refinement round {rnd} unfinished ({_why_unanswered(answers, answers)})")
    return parts


def order_note(run: FreeALRun, items: Sequence[Item]) -> str | None:
    """Which machine-labelled texts order the labeller to answer a label (the LLM saw those names masked:
    ``prompts.mask_label_orders``), for the run's message; None where none does, and for spans, whose
    prompts are not masked."""
    if run.task_type != "classification":
        return None
    ids = [it.item_id for it in items if not it.human_label and mask_label_orders(it.text, run.labels) != it.text]
    if not ids:
        return None
    return (f"{len(ids)} texts order the labeller to answer a label (ids: {', '.join(ids[:10])}"
            f"{' …' if len(ids) > 10 else ''}): the LLM saw those label names masked; check where such texts come "
            "from")


def _why_unanswered(answers: dict[str, dict[str, Any]], ids: Iterable[str]) -> str:
    """"N requests failed", "M not sent: ..." or both, for the stored answers of ``ids``."""
    errors = [str(answers[k]["error"]) for k in ids if k in answers and answers[k]["error"]]
    held = sum(e.startswith(NOT_SENT) for e in errors)
    failed = [f"{len(errors) - held} requests failed"] if len(errors) > held or not errors else []
    return ", ".join(failed + ([f"{held} not sent: FREEAL_MAX_LLM_CALLS were spent"] if held else []))


def set_aside_notes(store: Store) -> list[str]:
    """One note per refinement round a run set aside or skipped for a one-label pool, in round order."""
    notes, rnd = [], 1
    while (refined := store.stage_done(f"llm_r{rnd}")) is not None:
        info = store.stage_done(f"slm_r{rnd + 1}") or {}
        if refined.get("skipped") == "one_group":
            notes.append(ONE_GROUP_NOTE % rnd)
        elif "rejected_refinement" in info and "changed" in info:
            notes.append(set_aside_note(int(info["rejected_refinement"]), info))
        rnd += 1
    return notes

