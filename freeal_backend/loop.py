"""The FreeAL loop with durable state: round 0 LLM labels, then per round SLM training + LLM refinement.

Stages, each persisted before the next starts (a crash or Ctrl-C resumes at the first unfinished one;
LLM answers are stored one by one and cached, so nothing paid for is asked twice):

    [zero_shot]   optional baseline: the LLM without demonstrations
    demos         round 0: the LLM writes demonstrations per label in the style of sampled texts
    llm_r0        every text labelled with its nearest demonstrations (frozen encoder embeddings)
    slm_r{r}      the SLM is trained on the current labels; GMM small-loss split into clean / noisy
    llm_r{r}      the LLM re-labels the noisy texts only, with demos chosen and retrieved by the SLM
    final         label, confidence and review flag per text
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from .annotate import Progress, annotate_items, generate_demos
from .config import Settings
from .dataio import clean_text
from .embedded_llm import EmbeddedLLMServer
from .encoder import Encoder, LowerStates
from .llm_cache import ResponseCache
from .llm_client import LLMClient
from .prompts import label_messages
from .records import Item, ItemResult
from .selection import clean_agreed_pool, demo_pool, nearest_demos, retrieve_demos
from .slm import SLMConfig, SLMOutput, SmallModel
from .storage import Store

log = logging.getLogger(__name__)

LOW_CONFIDENCE = 0.7  # below this final confidence, a high-loss item is flagged for review


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class FreeALRun:
    """One FreeAL run over one data set (a CLI input file or a Label Studio project), in ``run_dir``."""

    def __init__(self, settings: Settings, labels: Sequence[str], run_dir: Path, task_description: str | None = None,
                 *, llm: LLMClient | None = None, encoder: Encoder | None = None,
                 zero_shot_baseline: bool = False) -> None:
        if len(set(labels)) < 2:
            raise ValueError(f"FreeAL needs at least two distinct labels, got {list(labels)}")
        self.settings = settings
        self.labels = list(labels)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.task_description = task_description or settings.task_description
        self.zero_shot_baseline = zero_shot_baseline
        self.store = Store(self.run_dir / "state.sqlite")
        stored = self.store.get_meta("labels")
        if stored is not None and stored != self.labels:
            raise ValueError(f"{self.run_dir} holds a run with labels {stored}, not {self.labels}; "
                             "use another run directory")
        self.store.set_meta("labels", self.labels)
        self._llm = llm
        self._encoder = encoder
        self._server: EmbeddedLLMServer | None = None
        self._lower: tuple[str, LowerStates, LowerStates | None] | None = None
        self.timings: dict[str, float] = {}

    # resources ----------------------------------------------------------------------------------------
    @property
    def llm(self) -> LLMClient:
        """The LLM client; starts the embedded offline server when no LLM_BASE_URL is configured."""
        if self._llm is None:
            s = self.settings
            base_url = s.llm_base_url
            model = s.llm_model
            if not base_url:
                self._server = EmbeddedLLMServer(threads=s.llm_threads, log_path=s.data_dir / "embedded_llm.log")
                self._server.start()
                base_url, model = self._server.base_url, "smollm2-135m-instruct"
            cache = ResponseCache(s.data_dir / "llm_cache.sqlite")
            self._llm = LLMClient(base_url, model, cache, api_key=s.llm_api_key, concurrency=s.llm_concurrency,
                                  timeout=s.llm_timeout, max_retries=s.llm_max_retries, logprobs=s.llm_logprobs)
        return self._llm

    @property
    def shots(self) -> int:
        """Demonstrations per prompt: FREEAL_SHOTS, else 10 (4 with the slow embedded model)."""
        if self.settings.shots:
            return self.settings.shots
        return 4 if not self.settings.llm_base_url else 10

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            self._encoder = Encoder(self.settings.encoder)
        return self._encoder

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
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
        if llm_labels:
            self._import_llm_labels(items, llm_labels)
        progress = on_progress or (lambda stage, done, total: None)
        if self.zero_shot_baseline:
            todo = self._unlabelled(items)
            self._timed("zero_shot", lambda: annotate_items(
                self.llm, self.store, "zero_shot", todo,
                lambda i: label_messages(todo[i].text, self.labels, task_description=self.task_description),
                self.labels, on_progress=progress))
        self._timed("demos", lambda: self._stage_demos(items))
        self._timed("llm_r0", lambda: self._stage_llm_r0(items, progress))
        for rnd in range(1, rounds + 1):
            self._timed(f"slm_r{rnd}", lambda: self._stage_slm(items, rnd, progress))
            self._timed(f"llm_r{rnd}", lambda: self._stage_refine(items, rnd, progress))
        results = self._final(items, rounds)
        self.store.set_results(results)
        self.store.set_meta("rounds_done", rounds)
        self.store.mark_stage("final", {"rounds": rounds, "version": self.model_version()})
        return results

    def results(self, item_ids: Sequence[str] | None = None) -> dict[str, ItemResult]:
        """The latest stored results, by item id (all, or only ``item_ids``)."""
        return self.store.results(item_ids)

    def model_version(self) -> str:
        """``freeal-r<rounds>-<hash of data and settings>``: one stable version per finished round."""
        return f"freeal-r{self.store.get_meta('rounds_done') or 0}-{(self.store.get_meta('data_hash') or '')[:8]}"

    def quick_label(self, items: Sequence[Item], deadline: float | None = None) -> list[ItemResult]:
        """LLM-only labels for texts not seen by a full run (round-0 demos when they exist, else zero-shot).

        Texts not answered by ``deadline`` (a ``time.monotonic()`` value) get no label.
        """
        items = [Item(it.item_id, clean_text(it.text), it.human_label, it.gold, it.augmented) for it in items]
        demos = self.store.demos()
        demo_emb = self.encoder.embed([d[0] for d in demos]) if demos else None
        emb = self.encoder.embed([it.text for it in items]) if demos else None

        def build(i: int) -> list[dict[str, str]]:
            chosen = ([demos[j] for j in nearest_demos(emb[i], demo_emb, self.shots)]
                      if demos and emb is not None and demo_emb is not None else [])
            return label_messages(items[i].text, self.labels, chosen, self.task_description)

        answers = self.llm.label_many([build(i) for i in range(len(items))], self.labels, deadline=deadline)
        return [ItemResult(it.item_id, a.label if a else None, a.confidence if a else None,
                           dict(a.probs) if a else {}, suspicious=True, reasons=["not_yet_reviewed_by_slm"],
                           llm_label=a.label if a else None, llm_confidence=a.confidence if a else None,
                           round=0, source="llm")
                for it, a in zip(items, answers)]

    def stage_labels(self) -> dict[str, dict[str, str | None]]:
        """Labels per stage (for evaluation): zero_shot, llm_r0, slm_rN, llm_rN (refined), final."""
        out: dict[str, dict[str, str | None]] = {}
        items = self.store.items()
        ids = [it.item_id for it in items]
        zero_shot = self.store.annotations("zero_shot")
        if zero_shot:
            out["zero_shot"] = {it.item_id: it.human_label or zero_shot.get(it.item_id, {}).get("label")
                                for it in items}
        if self.store.annotations("llm_r0"):
            out["llm_r0"] = dict(zip(ids, self._current_labels(items, 0)))
        rnd = 1
        while self.store.stage_done(f"slm_r{rnd}"):
            slm = self.store.slm(rnd)
            out[f"slm_r{rnd}"] = {k: self.labels[int(np.argmax(v["probs"]))] for k, v in slm.items()}
            if self.store.stage_done(f"llm_r{rnd}"):
                out[f"llm_r{rnd}"] = dict(zip(ids, self._current_labels(items, rnd)))
            rnd += 1
        results = self.store.results()
        if results:
            out["final"] = {k: r.label for k, r in results.items()}
        return out

    # stages -------------------------------------------------------------------------------------------
    def _prepare(self, items: Sequence[Item]) -> list[Item]:
        ids = [it.item_id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique")
        if not items:
            raise ValueError("no items to label")
        unknown = {it.human_label for it in items if it.human_label and it.human_label not in self.labels}
        if unknown:
            raise ValueError(f"human labels {sorted(unknown)} are not in the label set {self.labels}")
        limit = self.settings.max_chars
        long = sum(len(it.text) > limit for it in items)
        if long:
            log.warning("%d texts are longer than %d characters and were truncated (FREEAL_MAX_CHARS)", long, limit)
        items = [Item(it.item_id, clean_text(it.text)[:limit], it.human_label, it.gold,
                      clean_text(it.augmented)[:limit] if it.augmented else None) for it in items]
        s = self.settings
        data_hash = _hash({"labels": self.labels, "task": self.task_description,
                           "items": [[it.item_id, it.text, it.human_label, it.augmented] for it in items],
                           "settings": [s.llm_model, self.shots, s.demos_per_label, s.demo_pool_size, s.encoder,
                                        s.slm_epochs, s.slm_warmup_epochs, s.slm_train_layers, s.slm_lr,
                                        s.clean_threshold, s.select_ratio, s.seed, s.max_length]})
        r0_hash = _hash([self.labels, self.task_description, s.llm_model, self.shots, s.demos_per_label,
                         s.encoder, s.seed, s.max_length])
        if self.store.get_meta("r0_hash") != r0_hash:  # round-0 answers would differ: start afresh
            self.store.reset_stages()
            self.store.set_meta("r0_hash", r0_hash)
        if self.store.get_meta("data_hash") != data_hash:  # per-item round-0 answers stay valid
            self.store.replace_items(items)
            self.store.reset_stages(keep=["demos", "zero_shot", "llm_r0"])
            self.store.set_meta("data_hash", data_hash)
            self.store.set_meta("rounds_done", 0)
        return items

    def _timed(self, name: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    @staticmethod
    def _unlabelled(items: Sequence[Item]) -> list[Item]:
        return [it for it in items if not it.human_label]

    def _import_llm_labels(self, items: Sequence[Item], llm_labels: dict[str, str | None]) -> None:
        unknown = {lab for lab in llm_labels.values() if lab is not None and lab not in self.labels}
        if unknown:
            raise ValueError(f"precomputed LLM labels {sorted(unknown)} are not in the label set {self.labels}")
        have = self.store.annotations("llm_r0")
        for it in self._unlabelled(items):
            if it.item_id in llm_labels and it.item_id not in have:
                self.store.add_annotation("llm_r0", it.item_id, llm_labels[it.item_id], None, {}, "imported", None)

    def _stage_demos(self, items: Sequence[Item]) -> None:
        if self.store.stage_done("demos"):
            return
        have = self.store.annotations("llm_r0")
        if all(it.item_id in have for it in self._unlabelled(items)):
            return  # every text already has a round-0 label (imported): no demonstrations needed
        texts = [it.text for it in items]
        demos = generate_demos(self.llm, self.labels, texts, self.settings.demos_per_label,
                               task_description=self.task_description, seed=self.settings.seed)
        for label, written in demos.items():
            self.store.set_demos(label, written)
        self.store.mark_stage("demos", {label: len(v) for label, v in demos.items()})

    def _embeddings(self, items: Sequence[Item]) -> np.ndarray:
        """Frozen-encoder embeddings of the items, cached on disk by content."""
        key = _hash([str(self.encoder.path), [it.text for it in items]])[:16]
        path = self.run_dir / f"embeddings-{key}.npy"
        if path.exists():
            return np.load(path)
        emb = self.encoder.embed([it.text for it in items], max_length=self.settings.max_length)
        np.save(path, emb)
        return emb

    def _stage_llm_r0(self, items: Sequence[Item], progress: Progress) -> None:
        demos = self.store.demos() + [(it.text, it.human_label) for it in items if it.human_label]
        have = self.store.annotations("llm_r0")
        todo = [it for it in self._unlabelled(items) if it.item_id not in have or have[it.item_id]["error"]]
        if not todo:
            return
        if not demos:
            raise RuntimeError("round 0 has no demonstrations: the LLM wrote none and no human labels exist")
        emb = self._embeddings(todo)
        demo_emb = self.encoder.embed([d[0] for d in demos], max_length=self.settings.max_length)

        def build(i: int) -> list[dict[str, str]]:
            chosen = [(demos[j][0], demos[j][1]) for j in nearest_demos(emb[i], demo_emb, self.shots)]
            return label_messages(todo[i].text, self.labels, chosen, self.task_description)

        annotate_items(self.llm, self.store, "llm_r0", todo, build, self.labels, on_progress=progress)

    def _current_labels(self, items: Sequence[Item], upto_round: int) -> list[str | None]:
        """Human label, else the latest LLM label up to refinement round ``upto_round``."""
        current = {it.item_id: it.human_label for it in items}
        for stage in ["llm_r0"] + [f"llm_r{r}" for r in range(1, upto_round + 1)]:
            for item_id, ann in self.store.annotations(stage).items():
                if ann["label"] is not None and item_id in current:
                    current[item_id] = ann["label"]
        for it in items:
            if it.human_label:
                current[it.item_id] = it.human_label
        return [current[it.item_id] for it in items]

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

            lower = self.encoder.lower_states([it.text for it in items], split,
                                              max_length=self.settings.max_length, on_batch=tick)
            aug = None
            if any(it.augmented for it in items):
                aug = self.encoder.lower_states([it.augmented or it.text for it in items], split,
                                                max_length=self.settings.max_length, on_batch=tick)
            self._lower = (key, lower, aug)
        return self._lower[1], self._lower[2]

    def slm_config(self, *, robust: bool = True, seed_offset: int = 0) -> SLMConfig:
        s = self.settings
        return SLMConfig(epochs=s.slm_epochs, warmup_epochs=s.slm_warmup_epochs, lr=s.slm_lr,
                         batch_size=s.slm_batch_size, clean_threshold=s.clean_threshold, robust=robust,
                         seed=s.seed + seed_offset)

    def train_slm(self, items: Sequence[Item], labels: Sequence[str | None], *, robust: bool = True,
                  seed_offset: int = 0, progress: Progress | None = None) -> tuple[SmallModel, SLMOutput]:
        """Train one SLM on ``labels`` (None = unlabelled); human labels are gold."""
        progress = progress or (lambda stage, done, total: None)
        split = max(0, self.encoder.num_layers - self.settings.slm_train_layers)
        lower, aug = self._lower_states(items, split, progress)
        y = np.array([self.labels.index(lab) if lab is not None else -1 for lab in labels])
        gold = np.array([bool(it.human_label) for it in items])
        model = SmallModel(self.encoder, len(self.labels), train_layers=self.settings.slm_train_layers,
                           config=self.slm_config(robust=robust, seed_offset=seed_offset))
        out = model.fit(lower, y, gold=gold, augmented=aug,
                        on_epoch=lambda e, n, m: progress("slm" if robust else "slm_naive", e, n))
        return model, out

    def _stage_slm(self, items: Sequence[Item], rnd: int, progress: Progress) -> None:
        if self.store.stage_done(f"slm_r{rnd}"):
            return
        labels = self._current_labels(items, rnd - 1)
        model, out = self.train_slm(items, labels, seed_offset=rnd, progress=progress)
        np.save(self.run_dir / f"slm_r{rnd}_embeddings.npy", out.embeddings)
        model.save(self.run_dir / f"slm_r{rnd}.pt")
        self.store.set_slm(rnd, [(it.item_id, out.probs[i].tolist(),
                                  None if np.isnan(out.losses[i]) else float(out.losses[i]),
                                  bool(out.clean[i]), float(out.clean_prob[i])) for i, it in enumerate(items)])
        labelled = ~np.isnan(out.losses)
        self.store.mark_stage(f"slm_r{rnd}", {"clean": int(out.clean[labelled].sum()), "labelled": int(labelled.sum())})

    def _stage_refine(self, items: Sequence[Item], rnd: int, progress: Progress) -> None:
        if self.store.stage_done(f"llm_r{rnd}"):
            return
        slm = self.store.slm(rnd)
        emb = np.load(self.run_dir / f"slm_r{rnd}_embeddings.npy")
        probs = np.array([slm[it.item_id]["probs"] for it in items])
        clean = np.array([slm[it.item_id]["clean"] for it in items])
        gold = np.array([bool(it.human_label) for it in items])
        current = self._current_labels(items, rnd - 1)
        y = np.array([self.labels.index(lab) if lab is not None else -1 for lab in current])
        pred, conf = probs.argmax(1), probs.max(1)
        n_cls = len(self.labels)
        pool = clean_agreed_pool(y, pred, conf, n_cls, ratio=self.settings.select_ratio, gold=gold)
        chosen = demo_pool(pool, emb, max(1, self.settings.demo_pool_size // n_cls), seed=self.settings.seed,
                           gold=gold)
        pool_idx = np.concatenate([chosen[j] for j in range(n_cls)]).astype(int)
        pool_cls = np.concatenate([np.full(len(chosen[j]), j) for j in range(n_cls)]).astype(int)
        noisy = [i for i in range(len(items)) if not gold[i] and (not clean[i] or y[i] < 0)]
        todo = [items[i] for i in noisy]

        def build(k: int) -> list[dict[str, str]]:
            i = noisy[k]
            picks = retrieve_demos(emb[i], emb[pool_idx], pool_cls, self.shots, n_cls,
                                   exclude=np.flatnonzero(pool_idx == i))
            demos = [(items[pool_idx[p]].text, self.labels[pool_cls[p]]) for p in picks]
            return label_messages(items[i].text, self.labels, demos, self.task_description)

        if todo:
            annotate_items(self.llm, self.store, f"llm_r{rnd}", todo, build, self.labels, on_progress=progress)
        self.store.mark_stage(f"llm_r{rnd}", {"reannotated": len(todo), "demo_pool": len(pool_idx)})

    def _final(self, items: Sequence[Item], rounds: int) -> list[ItemResult]:
        """Combine the last SLM with the refined LLM labels; flag what a person should look at."""
        labels = self._current_labels(items, rounds)
        slm = self.store.slm(rounds) if rounds else {}
        llm_ann: dict[str, dict[str, object]] = {}
        for stage in ["llm_r0"] + [f"llm_r{r}" for r in range(1, rounds + 1)]:
            for k, v in self.store.annotations(stage).items():
                if v["label"] is not None or k not in llm_ann:
                    llm_ann[k] = v
        results = []
        for it, lab in zip(items, labels):
            if it.human_label:
                results.append(ItemResult(it.item_id, it.human_label, 1.0,
                                          {x: float(x == it.human_label) for x in self.labels},
                                          round=rounds, source="human", llm_label=None))
                continue
            ann = llm_ann.get(it.item_id, {})
            llm_conf = ann.get("confidence")
            llm_probs = dict(ann.get("probs") or {})
            row = slm.get(it.item_id)
            if row is None:  # no SLM ran (rounds == 0): the LLM's word only
                results.append(ItemResult(it.item_id, lab, llm_conf, llm_probs, suspicious=lab is None,
                                          reasons=["no_llm_label"] if lab is None else [], llm_label=lab,
                                          llm_confidence=llm_conf, round=0, source="llm"))
                continue
            p_slm = np.array(row["probs"])
            if lab is not None:
                q = np.array([llm_probs.get(x, 0.0) for x in self.labels]) if llm_probs else np.eye(len(self.labels))[
                    self.labels.index(lab)]
                combined = (p_slm + q) / 2
            else:
                combined = p_slm
            best = int(np.argmax(combined))
            final = self.labels[best]
            slm_label = self.labels[int(np.argmax(p_slm))]
            confidence = float(combined[best])
            reasons = []
            if lab is None:
                reasons.append("no_llm_label")
            elif slm_label != lab:
                reasons.append("llm_slm_disagree")
            if not row["clean"]:
                reasons.append("high_loss")
            if confidence < LOW_CONFIDENCE:
                reasons.append("low_confidence")
            suspicious = ("no_llm_label" in reasons or "llm_slm_disagree" in reasons
                          or ("high_loss" in reasons and "low_confidence" in reasons))
            results.append(ItemResult(
                it.item_id, final, confidence, {x: float(v) for x, v in zip(self.labels, combined)},
                suspicious=suspicious, reasons=reasons if suspicious else [],
                suggested_label=slm_label if suspicious else None, llm_label=lab,
                llm_confidence=float(llm_conf) if isinstance(llm_conf, (int, float)) else None,
                slm_label=slm_label, slm_prob=float(p_slm.max()), round=rounds,
                source="llm" if final == lab else "slm"))
        return results

