"""A real, deterministic OpenAI-compatible HTTP server that misbehaves on command (for fault tests).

It speaks the chat-completions protocol over real sockets on 127.0.0.1, so the real ``openai`` client
(retries, timeouts, connection handling included) is what gets tested, never a patched function:

    POST /v1/chat/completions   ``choices[0].message.content``, ``logprobs.content[].top_logprobs``, ``usage``
    GET  /v1/models             the one model it serves

Answers are deterministic. A labelling request (the system prompt lists the labels, the last user turn is
``Text: ...\\nLabel:``) is answered by a keyword rule (sentiment words, a label named in the text, else a
hash of the text), with per-token ``top_logprobs``: the label is split into 3-character tokens and the
answer's certainty varies with the text (see :func:`label_logprobs`). A demo-generation request gets the asked
number of distinct example lines.

Faults are queued with :meth:`FakeOpenAI.inject` and each one is consumed by one chat request, in order:

    status      an HTTP error (429 with ``Retry-After`` / ``retry-after-ms``, 500, 503, ...)
    slow        answer only after ``seconds`` (beyond the client timeout)
    drop        close the connection without any response
    content     a 200 whose answer text is ``content`` ("I think maybe", "", ...), no logprobs
    garbage     a 200 whose body is not JSON at all
    truncated   a 200 whose body stops half-way (Content-Length promises more), then the socket closes

and, for the whole server: ``fickle`` (the share of labelling answers that are the first label whatever the
text, chosen by a hash of the whole prompt: an LLM that does not know the task, leans to one class and
answers the same text differently under other demonstrations; for spans: the first mention only),
``refuse_logprobs`` (a 400 for any request
that asks for logprobs, in the words of OpenAI's reasoning models), ``delay`` (seconds added to every answer),
``serial`` (answer one request at a time, the rest waiting their turn, as llama.cpp's server with one slot
does), :meth:`hold_after` (answer ``n`` requests, then keep every further one waiting until :meth:`release`)
and :meth:`die_after` (answer ``n`` requests, then close the listening socket and drop every request:
connection refused from then on).

A span request (system prompt ``Entity types: ...``, last user turn ``Text: ...\nEntities:``) is answered
with a JSON entity list by a suffix rule (:func:`choose_entities`), with per-token logprobs when asked; a
span demo-generation request gets sentences with their entities.
:meth:`stop` / :meth:`start` take the server away and bring it back on the same port.

Every request is recorded (:attr:`log`): the key of its messages, the labelled text, the retry count the
client reports (``X-Stainless-Retry-Count``), the time and what was done, so tests can assert that retries
happened and that nothing already answered was asked again.

Run alone (``python -m tests.fake_openai --port 0 --delay 0.05``) it prints ``PORT <n>`` and serves until
killed; ``GET /_stats`` then returns its request log as JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "fake-gpt"

POSITIVE_WORDS = {"good", "great", "best", "fun", "funny", "love", "lovely", "wonderful", "beautiful", "moving",
                  "excellent", "enjoyable", "charming", "delightful", "brilliant", "stirring", "smart", "touching",
                  "entertaining", "powerful", "fresh", "remarkable", "warm", "engaging", "compelling"}
NEGATIVE_WORDS = {"bad", "worst", "dull", "boring", "awful", "terrible", "mess", "stupid", "poor", "lame", "tedious",
                  "flat", "waste", "fails", "bland", "unfunny", "pointless", "tiresome", "mediocre", "ugly",
                  "n't", "not", "no", "never", "nothing"}

_LABELS = re.compile(r"from this list: (.*?)\. Reply with the label only", re.DOTALL)
_DEMO_LABEL = re.compile(r'whose label is "(.*?)"')
_DEMO_COUNT = re.compile(r"Write (\d+) new")
_TYPES = re.compile(r"Entity types: (.*?)\. Answer with a JSON list")
_SPAN_DEMO = re.compile(r"Together they should contain entities of every type \((.*?)\)")
# the span rule (a crude, deterministic "LLM"): suffixes of chemical and disease names
_CHEMICAL = re.compile(r"^[a-z][a-z-]*(ine|ol|ide|ate|one|in|am|il|an)$")
_DISEASE = re.compile(r"^[a-z][a-z-]*(itis|emia|osis|pathy|oma|algia|ia|ure|ity)$")


def request_key(messages: list[dict[str, Any]]) -> str:
    """A stable key of one request's messages (the same prompt always gets the same key)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def labelled_text(messages: list[dict[str, Any]]) -> str | None:
    """The text being labelled (the last user turn without its ``Text:``/``Label:`` frame), else None."""
    for msg in reversed(messages):
        if msg.get("role") == "user":
            content = str(msg.get("content") or "")
            m = re.match(r"^Text: (.*)\n(?:Label|Entities):$", content, re.DOTALL)
            return m.group(1) if m else None
    return None


def choose_label(text: str, labels: list[str]) -> str:
    """The deterministic keyword rule: sentiment words, else a label named in the text, else a hash."""
    words = re.findall(r"[\w']+", text.lower())
    lower = {lab.lower(): lab for lab in labels}
    if "positive" in lower and "negative" in lower:
        score = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        if score:
            return lower["positive"] if score > 0 else lower["negative"]
    named = [lab for lab in labels if lab.lower() in words]
    if len(named) == 1:
        return named[0]
    return labels[int(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), 16) % len(labels)]


def certainty(text: str) -> float:
    """How sure the fake is of its answer for ``text``: between 0.55 and 0.98, varying with the text."""
    return 0.55 + 0.43 * (int(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), 16) % 1000) / 999


def tokens_of(label: str) -> list[str]:
    """The fake tokenizer: labels are split into pieces of 3 characters ("pos", "iti", "ve")."""
    return [label[i:i + 3] for i in range(0, len(label), 3)]


def label_logprobs(label: str, labels: list[str], sure: float, top: int) -> list[dict[str, Any]]:
    """Per-token logprobs of answering ``label`` under P(label) = ``sure`` (the rest spread evenly): at
    each position the alternatives are the next pieces of the labels that share the pieces so far, each
    with its conditional probability, so labels sharing leading tokens diverge later."""
    others = [lab for lab in labels if lab != label]
    dist = {lab: (sure if lab == label else (1 - sure) / max(1, len(others))) for lab in labels}
    chosen = tokens_of(label)
    out = []
    for t, piece in enumerate(chosen):
        alive = {lab: p for lab, p in dist.items() if tokens_of(lab)[:t] == chosen[:t]}
        total = sum(alive.values())
        nxt: dict[str, float] = {}
        for lab, p in alive.items():
            pieces = tokens_of(lab)
            if len(pieces) > t:
                nxt[pieces[t]] = nxt.get(pieces[t], 0.0) + p / total
        alts = sorted(nxt.items(), key=lambda kv: (kv[0] != piece, -kv[1]))[:top]
        out.append({"token": piece, "logprob": math.log(nxt[piece]), "bytes": list(piece.encode()),
                    "top_logprobs": [{"token": tok, "logprob": math.log(p), "bytes": list(tok.encode())}
                                     for tok, p in alts]})
    return out


def choose_entities(text: str, types: list[str]) -> list[dict[str, str]]:
    """The span rule: lower-case words with chemical-like or disease-like endings, typed by the first
    entity type whose name mentions chemicals / diseases (else the first / second type); each mention once."""
    lower = [t.lower() for t in types]
    chem = next((types[i] for i, t in enumerate(lower) if "chem" in t or "drug" in t), types[0])
    dis = next((types[i] for i, t in enumerate(lower) if "dis" in t), types[-1])
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for word in re.findall(r"[A-Za-z][A-Za-z-]+", text):
        w = word.lower()
        kind = dis if _DISEASE.match(w) else chem if _CHEMICAL.match(w) and len(w) > 5 else None
        if kind and word not in seen:
            seen.add(word)
            out.append({"text": word, "type": kind})
    return out


def text_logprobs(content: str, sure: float) -> list[dict[str, Any]]:
    """Per-token logprobs of a free-text answer (3-character tokens): letters at ``sure``, the rest certain."""
    out = []
    for piece in tokens_of(content):
        p = sure if any(ch.isalpha() for ch in piece) else 0.999
        out.append({"token": piece, "logprob": math.log(p), "bytes": list(piece.encode()),
                    "top_logprobs": [{"token": piece, "logprob": math.log(p), "bytes": list(piece.encode())}]})
    return out


@dataclass
class Fault:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """One chat request as the server saw it."""

    key: str
    text: str | None
    retry_count: int
    at: float
    outcome: str  # "ok" | the fault kind | "held" | "dead"
    answered: bool = False  # a complete 200 answer was written back
    authorization: str = ""  # the Authorization header the client sent


class FakeOpenAI:
    """The misbehaving OpenAI-compatible server; a context manager that starts and stops it."""

    def __init__(self, *, port: int = 0, delay: float = 0.0, model: str = MODEL, serial: bool = False,
                 fickle: float = 0.0, refuse_logprobs: bool = False) -> None:
        self.port = port
        self.delay = delay
        self.fickle = fickle
        self.refuse_logprobs = refuse_logprobs
        self.serial = threading.Lock() if serial else None  # held while one request is answered
        self.model = model
        self.log: list[Record] = []
        self.served: list[str | None] = []  # with ``serial``: labelled texts in the order they were answered
        self.demo_requests = 0
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._answered = 0
        self._admitted = 0  # requests let through to be answered normally (holds and deaths count these)
        self._hold_after: int | None = None
        self._die_after: int | None = None
        self._released = threading.Event()
        self._held = 0
        self.dead = False

    # life cycle -------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        """Serve on 127.0.0.1 (the same port again after :meth:`stop`)."""
        owner = self

        class Handler(_Handler):
            server_owner = owner

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:  # dropped sockets are expected
                pass

        self._httpd = Server(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        with self._lock:
            self.dead = False
            self._die_after = None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-openai-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: new connections are refused until :meth:`start`."""
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # commands ---------------------------------------------------------------------------------------
    def inject(self, kind: str, times: int = 1, **options: Any) -> None:
        """Queue ``times`` faults of one kind; each chat request consumes the next one that applies to it.

        ``text_contains="..."`` makes a fault apply only to labelling requests whose text contains it.
        """
        if kind not in {"status", "slow", "drop", "content", "garbage", "truncated"}:
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._faults.extend(Fault(kind, dict(options)) for _ in range(times))

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def hold_after(self, n: int | None) -> None:
        """Answer ``n`` more requests normally, then hold every further one until :meth:`release`."""
        with self._lock:
            self._hold_after = None if n is None else self._admitted + n
            self._released.clear()

    def release(self) -> None:
        with self._lock:
            self._hold_after = None
        self._released.set()

    def held(self) -> int:
        with self._lock:
            return self._held

    def die_after(self, n: int) -> None:
        """Answer ``n`` more requests, then die: drop every request and refuse new connections."""
        with self._lock:
            self._die_after = self._admitted + n

    def reset_log(self) -> None:
        with self._lock:
            self.log = []

    # what happened ----------------------------------------------------------------------------------
    def records(self, outcome: str | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self.log if outcome is None or r.outcome == outcome]

    def answered_keys(self) -> Counter[str]:
        """How many times each request key got a complete answer."""
        return Counter(r.key for r in self.records() if r.answered)

    def answered_texts(self) -> Counter[str]:
        """How many times each labelled text got a complete answer."""
        return Counter(r.text for r in self.records() if r.answered and r.text is not None)

    def label_requests(self) -> Counter[str]:
        """How many labelling requests (any outcome) each text got."""
        return Counter(r.text for r in self.records() if r.text is not None)

    def answered(self) -> int:
        with self._lock:
            return self._answered

    # request handling (called from handler threads) ------------------------------------------------
    def _admit(self, messages: list[dict[str, Any]], retry_count: int,
               authorization: str = "") -> tuple[str, Fault | None, Record]:
        """Decide what to do with one chat request and record it."""
        with self._lock:
            if self.dead:
                outcome, fault = "dead", None
            elif (pick := self._next_fault(messages)) is not None:
                fault = self._faults.pop(pick)
                outcome = fault.kind
            elif self._die_after is not None and self._admitted >= self._die_after:
                self.dead = True
                outcome, fault = "dead", None
            elif self._hold_after is not None and self._admitted >= self._hold_after:
                outcome, fault = "held", None
                self._held += 1
            else:
                outcome, fault = "ok", None
                self._admitted += 1
            record = Record(request_key(messages), labelled_text(messages), retry_count, time.time(), outcome,
                            authorization=authorization)
            self.log.append(record)
        if outcome == "dead":
            threading.Thread(target=self._die, daemon=True).start()
        return outcome, fault, record

    def _next_fault(self, messages: list[dict[str, Any]]) -> int | None:
        """Index of the first queued fault that applies to this request (``text_contains`` filters)."""
        text = labelled_text(messages)
        for i, fault in enumerate(self._faults):
            needle = fault.options.get("text_contains")
            if needle is None or (text is not None and needle in text):
                return i
        return None

    def _die(self) -> None:
        httpd = self._httpd
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def _count_answer(self, record: Record) -> None:
        with self._lock:
            self._answered += 1
            record.answered = True

    def completion(self, body: dict[str, Any], content_override: str | None = None) -> dict[str, Any]:
        """The chat-completion object answering ``body``."""
        messages = body.get("messages") or []
        system = next((str(m.get("content")) for m in messages if m.get("role") == "system"), "")
        last_user = next((str(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        logprobs = None
        match = _LABELS.search(system)
        text = labelled_text(messages)
        if content_override is not None:
            content = content_override
        elif match and text is not None:
            labels = [x.strip() for x in match.group(1).split(",") if x.strip()]
            content = choose_label(text, labels)
            if int(request_key(messages), 16) % 1000 < 1000 * self.fickle:
                content = labels[0]
            if body.get("logprobs"):
                logprobs = {"content": label_logprobs(content, labels, certainty(text),
                                                      int(body.get("top_logprobs") or 5))}
        elif _TYPES.search(system) and text is not None:
            types = [x.strip() for x in _TYPES.search(system).group(1).split(",") if x.strip()]
            entities = choose_entities(text, types)
            if int(request_key(messages), 16) % 1000 < 1000 * self.fickle:
                entities = entities[:1]  # the first mention only, whatever the text
            content = json.dumps(entities)
            if body.get("logprobs"):
                logprobs = {"content": text_logprobs(content, certainty(text))}
        elif _SPAN_DEMO.search(last_user):
            with self._lock:
                self.demo_requests += 1
            types = [x.strip() for x in _SPAN_DEMO.search(last_user).group(1).split(",") if x.strip()]
            count = int(_DEMO_COUNT.search(last_user).group(1)) if _DEMO_COUNT.search(last_user) else 3
            seed = body.get("seed", 0)
            drugs, ills = ["lidocaine", "haloperidol", "cisplatin", "nicotine"], ["hepatitis", "anemia", "neuropathy"]
            demos = []
            for i in range(count):
                drug, ill = drugs[(seed + i) % len(drugs)], ills[(seed + i) % len(ills)]
                demos.append({"text": f"Case {seed}-{i}: {drug} given to patients caused {ill} in some.",
                              "entities": choose_entities(f"{drug} {ill}", types)})
            content = json.dumps(demos)
        elif _DEMO_LABEL.search(last_user):
            with self._lock:
                self.demo_requests += 1
            label = _DEMO_LABEL.search(last_user).group(1)
            count = int(_DEMO_COUNT.search(last_user).group(1)) if _DEMO_COUNT.search(last_user) else 3
            word = {"positive": "great", "negative": "boring"}.get(label.lower(), label)
            seed = body.get("seed", 0)
            content = "\n".join(f"a {word} film, {label} example {seed}-{i}, with a {word} story" for i in range(count))
        else:
            content = "Hello from the fake server."
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = max(1, len(content.split()))
        return {
            "id": f"chatcmpl-{request_key(messages)}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"answered": self._answered, "demo_requests": self.demo_requests,
                    "log": [r.__dict__ for r in self.log]}


class _Handler(BaseHTTPRequestHandler):
    server_owner: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        owner = self.server_owner
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": owner.model, "object": "model",
                                                              "owned_by": "fake"}]})
        elif self.path == "/_stats":
            self._send_json(200, owner.stats())
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        owner = self.server_owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": "not found"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        retry_count = int(self.headers.get("X-Stainless-Retry-Count") or 0)
        outcome, fault, record = owner._admit(body.get("messages") or [], retry_count,
                                              self.headers.get("Authorization") or "")
        if outcome == "dead":
            self._drop()
            return
        if outcome == "held":
            while not owner._released.wait(0.05):
                if owner.dead or owner._httpd is None:
                    break
            self._drop()  # a held request never gets an answer: the client must ask again
            return
        if owner.refuse_logprobs and body.get("logprobs"):  # as OpenAI's reasoning models answer
            self._send_json(400, {"error": {"message": "Unsupported parameter: 'logprobs' is not supported with "
                                            "this model.", "type": "invalid_request_error", "param": "logprobs",
                                            "code": "unsupported_parameter"}})
            return
        opts = fault.options if fault else {}
        kind = fault.kind if fault else "ok"
        if kind == "status":
            status = int(opts.get("status", 500))
            headers = {}
            if "retry_after" in opts:
                headers["Retry-After"] = str(opts["retry_after"])
            if "retry_after_ms" in opts:
                headers["retry-after-ms"] = str(opts["retry_after_ms"])
            self._send_json(status, {"error": {"message": f"injected {status}", "type": "server_error",
                                               "code": str(status)}}, headers)
            return
        if kind == "drop":
            self._drop()
            return
        if kind == "slow":
            time.sleep(float(opts.get("seconds", 5.0)))
        elif owner.serial is not None:
            with owner.serial:
                owner.served.append(record.text)
                time.sleep(owner.delay)
        elif owner.delay:
            time.sleep(owner.delay)
        if kind == "garbage":
            data = str(opts.get("body", "{\"choices\": [ this is not json")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        answer = owner.completion(body, opts.get("content") if kind == "content" else None)
        if kind == "truncated":
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
            return
        try:
            self._send_json(200, answer)
        except OSError:  # the client gave up (timeout) and closed the socket
            return
        owner._count_answer(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="deterministic OpenAI-compatible fake server (tests only)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument("--hold-after", type=int, help="answer this many requests, then hold all others")
    args = parser.parse_args(argv)
    server = FakeOpenAI(port=args.port, delay=args.delay).start()
    if args.hold_after is not None:
        server.hold_after(args.hold_after)
    print(f"PORT {server.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
