"""LLM-side stages: self-generated demonstrations (round 0, labels or spans) and resumable batch annotation."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import openai

from freeal_backend.llm.client import (CallAllowance, LazyRequests, LLMAnswer, LLMClient, LLMUnavailable,
                                       MalformedResponse, Parse)
from freeal_backend.llm.prompts import Message, demo_generation_messages, parse_generated_texts
from freeal_backend.records import Item
from freeal_backend.spans import Span, parse_generated_span_demos, span_demo_generation_messages
from freeal_backend.storage import Store

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def generate_demos(client: LLMClient, labels: Sequence[str], texts: Sequence[str], per_label: int, *,
                   task_description: str | None = None, seed: int = 0, style_examples: int = 4,
                   attempts: int = 4, allowance: CallAllowance | None = None) -> dict[str, list[str]]:
    """Round 0: the LLM writes ``per_label`` example texts per label, imitating sampled unlabeled texts."""
    rng = np.random.default_rng(seed)
    demos: dict[str, list[str]] = {}
    for label in labels:
        found: list[str] = []
        for attempt in range(attempts):
            if len(found) >= per_label:
                break
            sample = [texts[i] for i in rng.choice(len(texts), size=min(style_examples, len(texts)), replace=False)]
            messages = demo_generation_messages(label, labels, sample, per_label - len(found), task_description)
            try:
                answer = client.chat(messages, temperature=0.8, max_tokens=40 * (per_label - len(found)),
                                     seed=seed + attempt, allowance=allowance)
            except (openai.APIError, MalformedResponse) as exc:  # retries are spent: stop with a clear status
                raise LLMUnavailable(f"the LLM endpoint failed while writing demonstrations ({type(exc).__name__}: "
                                     f"{exc}); finished answers are saved, re-run to resume") from exc
            copied = {t.strip().lower() for t in sample}  # a copied style example is not a demonstration
            for text in parse_generated_texts(answer["content"], per_label, labels):
                if text.lower() not in copied | {f.lower() for f in found} and len(found) < per_label:
                    found.append(text)
        if not found:
            log.warning("the LLM wrote no usable demonstration for label %r", label)
        demos[label] = found
    return demos


def generate_span_demos(client: LLMClient, types: Sequence[str], texts: Sequence[str], count: int, *,
                        task_description: str | None = None, seed: int = 0, style_examples: int = 4,
                        attempts: int | None = None, per_request: int = 4, tokens_per_text: int = 96,
                        allowance: CallAllowance | None = None) -> list[tuple[str, list[Span]]]:
    """Round 0 for spans: the LLM writes ``count`` texts in the style of sampled unlabeled texts, with
    their entities located in them (a text whose entities cannot all be located is dropped); at most
    ``per_request`` texts per request, ``attempts`` requests (default: twice the requests needed)."""
    rng = np.random.default_rng(seed)
    found: list[tuple[str, list[Span]]] = []
    for attempt in range(attempts or 2 * -(-count // per_request)):
        if len(found) >= count:
            break
        sample = [texts[i] for i in rng.choice(len(texts), size=min(style_examples, len(texts)), replace=False)]
        ask = min(per_request, count - len(found))
        messages = span_demo_generation_messages(types, sample, ask, task_description)
        try:
            answer = client.chat(messages, temperature=0.8, max_tokens=tokens_per_text * ask, seed=seed + attempt,
                                 allowance=allowance)
        except (openai.APIError, MalformedResponse) as exc:
            raise LLMUnavailable(f"the LLM endpoint failed while writing demonstrations ({type(exc).__name__}: "
                                 f"{exc}); finished answers are saved, re-run to resume") from exc
        copied = {t.strip().casefold() for t in sample} | {t.casefold() for t, _ in found}
        for text, spans in parse_generated_span_demos(answer["content"], types, ask):
            if text.casefold() not in copied:
                found.append((text, spans))
                copied.add(text.casefold())
    if not found:
        log.warning("the LLM wrote no usable demonstration with entities of %s", list(types))
    return found


def annotate_items(client: LLMClient, store: Store, stage: str, items: Sequence[Item],
                   build: Callable[[int], list[Message]], parser: Callable[[int], Parse], *,
                   on_progress: Progress | None = None, check_unparsed: bool = True, max_tokens: int | None = None,
                   expected: str = "give no usable answer", allowance: CallAllowance | None = None) -> None:
    """Annotate ``items`` (``build(i)`` gives item i's messages, ``parser(i)`` reads its answer), storing
    each answer as it lands.

    Items with a stored answer for ``stage`` are skipped, so an interrupted stage resumes where it
    stopped; failed requests are stored with their error and retried on the next run. Prompts are built
    only as requests are sent, and answers are not kept in memory: the store has them.
    """
    done = {k for k, v in store.annotations(stage).items() if not v["error"]}
    todo = [i for i, it in enumerate(items) if it.item_id not in done]
    del done
    total, finished = len(items), len(items) - len(todo)
    if on_progress:
        on_progress(stage, finished, total)

    def landed(j: int, answer: LLMAnswer) -> None:
        nonlocal finished
        store.add_annotation(stage, items[todo[j]].item_id, answer.label, answer.confidence, answer.probs,
                             answer.raw, answer.error)
        finished += 1
        if on_progress:
            on_progress(stage, finished, total)

    client.answer_many(LazyRequests(len(todo), lambda j: (build(todo[j]), parser(todo[j]))), on_answer=landed,
                       check_unparsed=check_unparsed, max_tokens=max_tokens, expected=expected, collect=False,
                       allowance=allowance)
