"""The disk-backed lower-state cache: lossless, padded like before, nothing left behind, SLM unchanged."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from freeal_backend.slm.classifier import SLMConfig, SmallModel
from freeal_backend.slm.encoder import Encoder, LowerStates, mean_pool
from tests.fixtures_llm import shared_rows

ROOT = Path(__file__).resolve().parents[1]


class InRamStates:
    """The cache as it was before it moved to disk: one float16 tensor per text in a list."""

    def __init__(self, states: list[torch.Tensor]) -> None:
        self.states = states
        self.lengths = np.array([s.shape[0] for s in states])

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, index, device):
        rows = [self.states[i] for i in index]
        length = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), length, rows[0].shape[1], dtype=torch.float32)
        mask = torch.zeros(len(rows), length, dtype=torch.float32)
        for j, r in enumerate(rows):
            out[j, : r.shape[0]] = r.float()
            mask[j, : r.shape[0]] = 1.0
        return out.to(device), mask.to(device)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.set_num_threads(1)
    return Encoder()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [r["text"] for r in shared_rows("sst2", n=160, stride=7)]


def test_round_trip_is_exact_and_leaves_no_file(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=50)
    blocks = [rng.normal(size=(n, 8)).astype(np.float16) for n in lengths]
    lower = LowerStates(lengths, 8, directory=tmp_path)
    for i in rng.permutation(len(blocks)):  # written out of order, as length-sorted encoding does
        lower.write(int(i), blocks[i])
    assert os.listdir(tmp_path) == []  # an anonymous file: nothing to clean up after a crash
    assert len(lower) == 50
    for i in (0, 17, 49):
        np.testing.assert_array_equal(lower.read(i), blocks[i])
    states, mask = lower.batch([3, 9, 3], torch.device("cpu"))
    longest = max(lengths[3], lengths[9])
    assert states.shape == (3, longest, 8) and states.dtype == torch.float32
    for j, i in enumerate([3, 9, 3]):
        np.testing.assert_array_equal(states[j, : lengths[i]].numpy(), blocks[i].astype(np.float32))
        assert (states[j, lengths[i]:] == 0).all()
        assert mask[j].sum() == lengths[i] and (mask[j, : lengths[i]] == 1).all()
    with pytest.raises(ValueError):
        lower.write(0, blocks[1] if lengths[1] != lengths[0] else blocks[0][:-1])


def test_disk_cache_matches_the_in_ram_cache_and_the_slm_is_unchanged(encoder, texts):
    model = SmallModel(encoder, 2, train_layers=1, config=SLMConfig(epochs=2, warmup_epochs=1, folds=2, seed=3))
    lower = encoder.lower_states(texts, model.split, batch_size=32)
    ids = encoder.tokenize(texts, 128)
    ref: list[torch.Tensor | None] = [None] * len(texts)
    with torch.no_grad():  # the former in-RAM cache, filled from the same length-sorted batches
        for chunk, hidden in encoder._run(ids, model.split, 32, None):
            for j, i in enumerate(chunk):
                ref[i] = hidden[j, : len(ids[i])].to(torch.float16).clone()
    in_ram = InRamStates([r for r in ref if r is not None])
    for i in range(len(texts)):
        np.testing.assert_array_equal(lower.read(i), in_ram.states[i].numpy())
    labels = np.array([len(t) % 2 for t in texts])  # any fixed labels: the point is identical training
    disk_out = model.fit(lower, labels)
    ram_out = SmallModel(encoder, 2, train_layers=1, config=model.config).fit(in_ram, labels)
    np.testing.assert_array_equal(disk_out.oof_probs, ram_out.oof_probs)
    np.testing.assert_array_equal(disk_out.losses, ram_out.losses)
    np.testing.assert_array_equal(disk_out.clean, ram_out.clean)


def test_embed_pools_the_cached_states_of_the_whole_encoder(encoder, texts):
    emb = encoder.embed(texts[:40], batch_size=16)
    lower = encoder.lower_states(texts[:40], encoder.num_layers, batch_size=16)
    states, mask = lower.batch(range(40), torch.device("cpu"))
    ref = torch.nn.functional.normalize(mean_pool(states, mask), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-6)
    single = encoder.embed([texts[5]])[0]  # unbatched, no padding
    np.testing.assert_allclose(emb[5], single, atol=1e-3)



def test_embed_lower_continues_the_encoder_from_the_cached_states(encoder, texts):
    full = encoder.embed(texts[:40], batch_size=16)
    for split in (0, 2, encoder.num_layers):
        lower = encoder.lower_states(texts[:40], split, batch_size=16)
        seen: list[int] = []
        emb = encoder.embed_lower(lower, split, batch_size=16, on_batch=seen.append)
        assert sum(seen) == 40
        # the only difference to one whole pass: the lower states were rounded through float16
        np.testing.assert_allclose(emb, full, atol=1e-6 if split == encoder.num_layers else 2e-3)
        assert (np.argsort(-(emb @ emb.T), axis=1)[:, :5] == np.argsort(-(full @ full.T), axis=1)[:, :5]).mean() > 0.95

def test_tokenize_in_chunks_matches_one_call(encoder, texts):
    whole = encoder.tokenizer(texts, truncation=True, max_length=16)["input_ids"]
    assert encoder.tokenize(texts, 16, chunk=7) == whole
    assert any(len(x) == 16 for x in whole) and len(set(map(len, whole))) > 1  # truncated and varied



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_loading_the_encoder_caps_the_heap(encoder) -> None:
    """The encoder sets glibc's mmap threshold once (its effect on RSS is measured by benchmarks/scale.py:
    in a unit test glibc's heap layout makes the numbers swing between runs)."""
    out = subprocess.run([sys.executable, "-c", "import freeal_backend.slm.encoder as e; print(e._heap_capped, "
                          "e.cap_heap_retention(), e.cap_heap_retention())"], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"})
    assert out.stdout.split() == ["False", "True", "True"]
    from freeal_backend.slm import encoder as module
    assert module._heap_capped  # the fixture's Encoder() did it
