"""The LLM client of a process, made once on first use: one thread starts the embedded offline server (no
``LLM_BASE_URL``) while the others wait for it, so concurrent first uses (a job and ``/predict``) start one
server, not one each."""
from __future__ import annotations

import threading

from freeal_backend.config import Settings
from freeal_backend.llm.cache import ResponseCache
from freeal_backend.llm.client import LLMClient
from freeal_backend.llm.embedded import EmbeddedLLMServer


class LLMProvider:
    """Makes the :class:`LLMClient` on the first :meth:`get` (``client`` given: that one); shared by the
    runs of a process. :meth:`close` stops the embedded server it started."""

    def __init__(self, settings: Settings, client: LLMClient | None = None) -> None:
        self.settings = settings
        self._client = client
        self._server: EmbeddedLLMServer | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> LLMClient | None:
        """The client, if one has been made (reading it starts nothing)."""
        return self._client

    def get(self) -> LLMClient:
        """The client; the first call starts the embedded server when no ``LLM_BASE_URL`` is configured
        (seconds to a minute) and later callers wait for it."""
        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is None:
                s = self.settings
                base_url = s.llm_base_url
                if not base_url:
                    server = EmbeddedLLMServer(s.llm_model, threads=s.llm_threads,
                                               log_path=s.data_dir / "embedded_llm.log")
                    server.start()
                    self._server, base_url = server, server.base_url
                cache = ResponseCache(s.data_dir / "llm_cache.sqlite")
                self._client = LLMClient(base_url, s.llm_model, cache, api_key=s.llm_api_key,
                                         concurrency=s.llm_concurrency, timeout=s.llm_timeout,
                                         max_retries=s.llm_max_retries, logprobs=s.llm_logprobs,
                                         max_tokens=s.llm_max_tokens, no_think=s.llm_no_think,
                                         embedded=self._server is not None)
            return self._client

    def close(self) -> None:
        """Stop the embedded server this provider started (a later :meth:`get` starts a new one)."""
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None
                self._client = None
