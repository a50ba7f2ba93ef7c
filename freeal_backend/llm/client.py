"""OpenAI-compatible chat client: bounded concurrency, retries, response cache, logprob confidence."""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import openai

from freeal_backend.llm.cache import ResponseCache, cache_key
from freeal_backend.llm.prompts import LabelMatcher, Message, label_token_prefixes, strip_thinking

log = logging.getLogger(__name__)

TOP_LOGPROBS = 10
LOGPROB_POSITIONS = 8  # answer tokens whose alternatives are kept (labels may share several leading tokens)


class LLMUnavailable(RuntimeError):
    """The endpoint kept failing after retries; the run stops here and can be resumed."""


NOT_SENT = "not sent:"  # how the error of a request held back by a spent allowance begins


class CallLimitReached(LLMUnavailable):
    """The job's LLM call allowance (``FREEAL_MAX_LLM_CALLS``) is spent: the request was not sent."""


class CallAllowance:
    """At most ``limit`` LLM requests sent, for the requests of one job (answers from the cache are free)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        """Count one request about to be sent; :class:`CallLimitReached` when none is left."""
        with self._lock:
            if self.sent >= self.limit:
                raise CallLimitReached(f"{NOT_SENT} this job's {self.limit} LLM calls (FREEAL_MAX_LLM_CALLS) are spent")
            self.sent += 1


class DeadlinePassed(RuntimeError):
    """The caller's deadline passed before this request could be sent."""


class MalformedResponse(RuntimeError):
    """The endpoint answered 200 with a body that is not a chat completion (not JSON, no choices)."""


@dataclass
class LLMAnswer:
    """One labelling answer: the parsed label (None when unparseable) and its confidence."""

    label: str | None
    confidence: float | None
    probs: dict[str, float]
    raw: str | None
    error: str | None = None


@dataclass
class LLMStats:
    """Counters a user can read to see what the LLM cost."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0
    unparsed: int = 0
    thinking_cut: int = 0  # answers cut off inside <think>: raise LLM_MAX_TOKENS or set LLM_NO_THINK
    logprobs_refused: int = 0  # 1 once the endpoint refused logprobs and the client asked on without them
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("calls", "cache_hits", "prompt_tokens", "completion_tokens",
                                              "failures", "unparsed", "thinking_cut", "logprobs_refused")}


def _answer_head(text: str) -> str:
    return text.lstrip(" \t\n\"'`*").lower()


def label_probs_from_logprobs(top_logprobs: list[list[tuple[str, float]]], labels: Sequence[str]) -> dict[str, float]:
    """Probability of each label from the answer's top logprobs, normalised over the label set.

    Walks the answer's tokens (the first alternative at each position is the one generated): a candidate
    token that, after the text generated so far, can only be the start of one label gives that label its
    probability times the probability of the text before it. So labels sharing leading tokens ("very
    positive" / "very negative") are told apart where they diverge, and a label split into several tokens
    ("pos" + "itive") counts once. Empty when no position names a label: then the answer has no
    confidence (None), never a constant.
    """
    names = label_token_prefixes(labels)

    def owners(text: str) -> list[str]:
        head = _answer_head(text)
        if not head.strip():
            return list(names)
        return [lab for lab, name in names.items() if name.startswith(head.rstrip()) or head.startswith(name)]

    mass = {lab: 0.0 for lab in labels}
    prefix, path = "", 1.0
    for position in top_logprobs:
        if not position:
            continue
        for rank, (token, logprob) in enumerate(position):
            if not _answer_head(prefix + token).strip():
                continue
            who = owners(prefix + token)
            if len(who) == 1 or (who and rank > 0):  # an untaken shared branch: split evenly among its labels
                for lab in who:
                    mass[lab] += path * math.exp(logprob) / len(who)
        token, logprob = position[0]
        if len(owners(prefix + token)) <= 1 and _answer_head(prefix + token).strip():
            break  # the generated answer has settled on one label (or on none)
        prefix, path = prefix + token, path * math.exp(logprob)
    total = sum(mass.values())
    return {lab: m / total for lab, m in mass.items()} if total > 0 else {}


Parse = Callable[[dict[str, Any]], LLMAnswer]  # a chat completion (see LLMClient.chat) -> answer


def label_parser(labels: Sequence[str]) -> Parse:
    """Parse a class-label answer; its confidence and per-label probabilities come from logprobs.

    Raises ValueError at once when two labels cannot be told apart (see :class:`LabelMatcher`).
    """
    matcher = LabelMatcher(labels)

    def parse(value: dict[str, Any]) -> LLMAnswer:
        raw = value["content"]
        label = matcher.parse(raw)
        probs = label_probs_from_logprobs([[tuple(t) for t in pos] for pos in value["top_logprobs"]], labels)
        if label is None:
            return LLMAnswer(None, None, probs, raw)
        return LLMAnswer(label, probs.get(label) if probs else None, probs, raw)
    return parse


EMBEDDED_IN_FLIGHT = 2  # the embedded server's requests in flight: one answered, the next one waiting


def in_flight(concurrency: int, embedded: bool) -> int:
    """Requests a client keeps in flight: ``concurrency`` (LLM_CONCURRENCY), at most
    :data:`EMBEDDED_IN_FLIGHT` to the embedded server."""
    return max(1, min(concurrency, EMBEDDED_IN_FLIGHT) if embedded else concurrency)


class LLMClient:
    """Talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint through the ``openai`` client.

    Retries with exponential back-off on 429 (honouring Retry-After), 5xx, timeouts and refused
    connections are done by the ``openai`` client itself (``max_retries``). Every successful response is
    cached, keyed by ``base_url`` as well as ``model`` (``embedded=True``: by model alone, for the bundled
    server's changing port), so a re-run with the same prompts makes zero calls. That server answers one
    request at a time, so there at most :data:`EMBEDDED_IN_FLIGHT` requests are in flight (more would wait
    for its lock and be answered out of order, undoing the shared-prefix order its prompt cache relies on),
    and ``timeout`` is per request in flight: ``timeout`` x ``concurrency`` each.
    """

    def __init__(self, base_url: str, model: str, cache: ResponseCache, *, api_key: str | None = None,
                 concurrency: int = 4, timeout: float = 60.0, max_retries: int = 5, logprobs: bool = True,
                 max_consecutive_failures: int = 3, max_tokens: int = 16, no_think: bool = False,
                 max_same_rejections: int = 5, max_unparsed_share: float | None = 0.9,
                 min_answers_judged: int = 50, embedded: bool = False) -> None:
        self.model = model
        self.endpoint: str | None = None if embedded else base_url
        self.cache = cache
        self.concurrency = in_flight(concurrency, embedded)
        self.logprobs = logprobs
        self._logprobs_lock = threading.Lock()  # the first refusal turns them off once, whichever thread sees it
        self.max_consecutive_failures = max_consecutive_failures
        self.label_params: dict[str, Any] = {"temperature": 0.0, "max_tokens": max_tokens}
        if no_think:  # vLLM / SGLang chat templates (Qwen3, DeepSeek-R1 distills) read this
            self.label_params["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
        self.max_same_rejections = max_same_rejections
        self.max_unparsed_share = max_unparsed_share
        self.min_answers_judged = min_answers_judged
        self.stats = LLMStats()
        if embedded:  # it answers one request at a time: a request also waits for those queued before it
            timeout *= self.concurrency
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout,
                                     max_retries=max_retries)

    def chat(self, messages: list[Message], *, logprobs: bool = False, deadline: float | None = None,
             allowance: CallAllowance | None = None, **params: Any) -> dict[str, Any]:
        """One chat completion (cached): ``{"content", "top_logprobs", "tokens", "usage"}`` (``tokens``: every
        answer token with its logprob; ``top_logprobs``: the alternatives at the first positions).

        With a ``deadline`` (a ``time.monotonic()`` value) the request gets only the time left, without
        retries, and raises :class:`DeadlinePassed` when none is left. With an ``allowance`` a request not
        answered from the cache takes one of its calls (:class:`CallLimitReached` when none is left).
        """
        request: dict[str, Any] = dict(params)
        if logprobs:
            request.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        key = cache_key(self.model, messages, request, endpoint=self.endpoint)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add(cache_hits=1)
            return cached
        client = self._client
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlinePassed("no time left for this request")
            client = client.with_options(timeout=remaining, max_retries=0)
        if allowance is not None:
            allowance.take()
        try:
            response = client.chat.completions.create(model=self.model, messages=messages, **request)
        except json.JSONDecodeError as exc:  # e.g. a proxy's HTML page sent as application/json
            raise MalformedResponse(f"malformed response from the LLM endpoint (not JSON: {exc})") from exc
        if not response.choices or getattr(response.choices[0], "message", None) is None:
            raise MalformedResponse("malformed response from the LLM endpoint (no choices[0].message)")
        choice = response.choices[0]
        top: list[list[tuple[str, float]]] = []
        tokens: list[tuple[str, float]] = []
        if choice.logprobs is not None and choice.logprobs.content:
            for tok in choice.logprobs.content[:LOGPROB_POSITIONS]:
                alts = [(alt.token, alt.logprob) for alt in (tok.top_logprobs or [])]
                top.append(alts or [(tok.token, tok.logprob)])
            tokens = [(tok.token, tok.logprob) for tok in choice.logprobs.content]
        usage = response.usage
        value = {"content": choice.message.content or "", "top_logprobs": top, "tokens": tokens,
                 "usage": {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                           "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}}
        self.stats.add(calls=1, prompt_tokens=value["usage"]["prompt_tokens"],
                       completion_tokens=value["usage"]["completion_tokens"])
        self.cache.put(key, self.model, value)
        return value

    def answer(self, messages: list[Message], parse: Parse, *, deadline: float | None = None,
               max_tokens: int | None = None, allowance: CallAllowance | None = None) -> LLMAnswer:
        """Ask once and ``parse`` the completion (see :meth:`chat`); an answer whose ``label`` is None
        counts as unparsed."""
        params = dict(self.label_params) if max_tokens is None else {**self.label_params, "max_tokens": max_tokens}
        asked = self.logprobs
        try:
            value = self.chat(messages, logprobs=asked, deadline=deadline, allowance=allowance, **params)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            if not (asked and "logprob" in str(exc).lower()):
                raise
            self._without_logprobs(exc)
            value = self.chat(messages, logprobs=False, deadline=deadline, allowance=allowance, **params)
        answer = parse(value)
        if answer.label is None:
            self.stats.add(unparsed=1)
            if strip_thinking(value["content"] or "") is None:
                self.stats.add(thinking_cut=1)
        return answer

    def _without_logprobs(self, exc: Exception) -> None:
        """The endpoint refused the request for its logprobs (OpenAI's reasoning models, some proxies): ask on
        without them, once saying what that costs."""
        with self._logprobs_lock:
            if not self.logprobs:
                return
            self.logprobs = False
        self.stats.add(logprobs_refused=1)
        log.warning("the LLM endpoint refuses logprobs (%s); asking without them from now on: its answers carry "
                    "no confidence, so each score comes from the small model alone (LLM_LOGPROBS=0 skips this "
                    "first refusal)", exc)

    def label(self, messages: list[Message], labels: Sequence[str], *, deadline: float | None = None) -> LLMAnswer:
        """Ask for one label; confidence from logprobs when the endpoint returns them, else None."""
        return self.answer(messages, label_parser(labels), deadline=deadline)

    def label_many(self, requests: Sequence[list[Message]], labels: Sequence[str], *,
                   on_answer: Callable[[int, LLMAnswer], None] | None = None,
                   deadline: float | None = None, check_unparsed: bool = True,
                   allowance: CallAllowance | None = None) -> list[LLMAnswer | None]:
        """Label many prompts (see :meth:`answer_many`)."""
        parse = label_parser(labels)
        return self.answer_many([(m, parse) for m in requests], on_answer=on_answer, deadline=deadline,
                                check_unparsed=check_unparsed, expected=f"name no label {list(labels)}",
                                allowance=allowance)

    def answer_many(self, requests: Sequence[tuple[list[Message], Parse]], *,
                    on_answer: Callable[[int, LLMAnswer], None] | None = None,
                    deadline: float | None = None, check_unparsed: bool = True, max_tokens: int | None = None,
                    expected: str = "give no usable answer", collect: bool = True,
                    allowance: CallAllowance | None = None) -> list[LLMAnswer | None]:
        """Ask many ``(messages, parse)`` requests with bounded concurrency; ``on_answer(i, answer)`` runs as
        each one lands.

        ``requests`` may be a lazy sequence (see :class:`LazyRequests`): at most ``4 * concurrency`` are
        taken from it and in flight at a time, so memory does not grow with the number of requests. With
        ``collect=False`` the answers are only handed to ``on_answer`` and the returned list is empty.

        With a ``deadline`` (``time.monotonic()`` value; for callers that must answer in time, like
        ``/predict``) every request is cut at it, without retries; prompts not answered by then stay None.

        A request that still fails after the client's retries yields an answer with ``error`` set, as does one
        not sent because the ``allowance`` is spent (see :meth:`chat`; not counted as a failure).
        Raises :class:`LLMUnavailable` after ``max_consecutive_failures`` such failures in a row, after
        ``max_same_rejections`` identical 4xx answers in a row (the endpoint refuses the request shape, e.g.
        ``logprobs``), or once more than ``max_unparsed_share`` of at least ``min_answers_judged`` answers
        are unparsed (set ``check_unparsed=False`` for a baseline expected to fail); answers already
        delivered through ``on_answer`` are kept by the caller. ``expected`` completes the error message
        ("N of M LLM answers <expected>").
        """
        results: list[LLMAnswer | None] = [None] * len(requests) if collect else []
        consecutive = 0
        rejections: list[str] = []
        answered = unparsed = 0
        window = 4 * self.concurrency
        pending: dict[Future[LLMAnswer], int] = {}
        submitted = 0
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            try:
                while submitted < len(requests) or pending:
                    while submitted < len(requests) and len(pending) < window:
                        msgs, parse = requests[submitted]
                        pending[pool.submit(self.answer, msgs, parse, deadline=deadline,
                                            max_tokens=max_tokens, allowance=allowance)] = submitted
                        submitted += 1
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = pending.pop(future)
                        try:
                            answer = future.result()
                            consecutive = 0
                        except DeadlinePassed:
                            continue
                        except CallLimitReached as exc:
                            answer = LLMAnswer(None, None, {}, None, error=str(exc))
                        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:  # prompt refused
                            self.stats.add(failures=1)
                            answer = LLMAnswer(None, None, {}, None, error=f"{type(exc).__name__}: {exc}")
                            rejections = (rejections + [str(exc)])[-self.max_same_rejections:]
                            if len(rejections) == self.max_same_rejections and len(set(rejections)) == 1:
                                raise LLMUnavailable(f"the LLM endpoint rejected {len(rejections)} requests in a "
                                                     f"row with the same error: {exc}") from exc
                        except (openai.APIError, MalformedResponse) as exc:
                            if deadline is not None and time.monotonic() >= deadline:
                                continue  # cut by the caller's deadline, not a failure of the endpoint
                            self.stats.add(failures=1)
                            consecutive += 1
                            answer = LLMAnswer(None, None, {}, None, error=f"{type(exc).__name__}: {exc}")
                            log.warning("LLM request failed after retries: %s", answer.error)
                            if consecutive >= self.max_consecutive_failures:
                                raise LLMUnavailable(
                                    f"the LLM endpoint failed {consecutive} requests in a row ({answer.error}); "
                                    "finished answers are saved, re-run to resume") from exc
                        else:
                            rejections = []
                        if collect:
                            results[i] = answer
                        if on_answer is not None:
                            on_answer(i, answer)
                        if answer.error is None:
                            answered += 1
                            unparsed += answer.label is None
                            if (check_unparsed and self.max_unparsed_share is not None
                                    and answered >= self.min_answers_judged
                                    and unparsed > self.max_unparsed_share * answered):
                                hint = ("; answers were cut off while thinking: raise LLM_MAX_TOKENS or set "
                                        "LLM_NO_THINK=1" if self.stats.thinking_cut else f"; e.g. {answer.raw!r}")
                                raise LLMUnavailable(f"{unparsed} of {answered} LLM answers {expected}{hint}")
            finally:
                for future in pending:
                    future.cancel()
        return results


class LazyRequests(Sequence[tuple[list[Message], Parse]]):
    """``(messages, parse)`` for request i, built only when :meth:`LLMClient.answer_many` takes it."""

    def __init__(self, n: int, build: Callable[[int], tuple[list[Message], Parse]]) -> None:
        self._n = n
        self._build = build

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[list[Message], Parse]:  # type: ignore[override]
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._build(i)
