"""The packaged encoders' install (slm/encoder_weights.py): chunks joined in order and checked, nothing left
in place unless every check passes; FREEAL_ENCODER names them or a directory."""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from freeal_backend.slm import encoder_weights
from freeal_backend.slm.encoder_weights import KEPT, MPNET, resolve_encoder, unpack


def chunked_model(tmp_path: Path, weights: bytes = b"weights") -> tuple[encoder_weights.PackagedEncoder, list[Path]]:
    """A zipped model folder cut in three chunks, and the PackagedEncoder that describes it."""
    buf = io.BytesIO()
    files = {name: name.encode() for name in KEPT} | {"model.safetensors": weights, "desktop.ini": b"x"}
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"m/{name}", data)
    blob = buf.getvalue()
    chunks = []
    for i, part in enumerate((blob[:100], blob[100:200], blob[200:])):
        chunks.append(tmp_path / f"m.zip.00{i + 1}")
        chunks[-1].write_bytes(part)
    enc = replace(MPNET, name="tiny", zip_sha256=hashlib.sha256(blob).hexdigest(), zip_size=len(blob), folder="m",
                  checked=(("model.safetensors", hashlib.sha256(b"weights").hexdigest()),))
    return enc, chunks


def test_unpack_joins_checks_and_keeps_the_models_files(tmp_path: Path) -> None:
    enc, chunks = chunked_model(tmp_path)
    target = unpack(enc, chunks, tmp_path / "out" / "tiny")
    assert sorted(p.name for p in target.iterdir()) == sorted([*KEPT, ".verified"])
    assert (target / "model.safetensors").read_bytes() == b"weights"


def test_chunks_out_of_order_or_other_weights_leave_nothing(tmp_path: Path) -> None:
    enc, chunks = chunked_model(tmp_path)
    target = tmp_path / "out" / "tiny"
    with pytest.raises(RuntimeError, match="sha256"):
        unpack(enc, [chunks[1], chunks[0], chunks[2]], target)
    assert not target.exists() and not list((tmp_path / "out").iterdir())
    (tmp_path / "other").mkdir()
    other, chunks2 = chunked_model(tmp_path / "other", b"WEIGHTS")
    with pytest.raises(RuntimeError, match="model.safetensors: sha256"):  # the zip is what it says, its weights not
        unpack(replace(other, checked=enc.checked), chunks2, target)
    assert not target.exists()


def test_freeal_encoder_names_a_packaged_encoder_or_a_directory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEAL_MODELS_DIR", str(tmp_path))
    assert resolve_encoder(None) is None and resolve_encoder("") is None  # the packaged MiniLM
    assert resolve_encoder("/some/dir") == Path("/some/dir")
    with pytest.raises(RuntimeError, match="freeal models install all-mpnet-base-v2"):
        resolve_encoder("all-mpnet-base-v2")
    (tmp_path / "encoders" / "all-mpnet-base-v2").mkdir(parents=True)
    (tmp_path / "encoders" / "all-mpnet-base-v2" / ".verified").write_text("")
    assert resolve_encoder("all-mpnet-base-v2") == tmp_path / "encoders" / "all-mpnet-base-v2"
