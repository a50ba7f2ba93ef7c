"""FreeAL's refinement round as the paper runs it, through the real openai client and a local
OpenAI-compatible server: which texts are re-asked, human labels never, failed requests retried."""
from collections import Counter

import numpy as np
import pytest

from freeal_backend.config import Settings
from freeal_backend.dataio import rows_to_items
from freeal_backend.slm.encoder import Encoder
from freeal_backend.llm.cache import ResponseCache
from freeal_backend.llm.client import LLMClient
from freeal_backend.loop import FreeALRun
from tests.fake_openai import MODEL, FakeOpenAI
from tests.fixtures_llm import shared_rows

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def make_run(tmp_path, fake, encoder, **overrides):
    settings = Settings(slm_min_steps=0, data_dir=tmp_path, llm_base_url=fake.base_url, llm_model=MODEL, shots=4,
                        demos_per_label=3, slm_epochs=1, slm_warmup_epochs=1, slm_folds=2, slm_train_layers=1,
                        **overrides)
    client = LLMClient(fake.base_url, MODEL, ResponseCache(tmp_path / "llm_cache.sqlite"), concurrency=2,
                       max_retries=0)
    return FreeALRun(settings, LABELS, tmp_path / "run", "Sentiment?", llm=client, encoder=encoder)


def asked_texts(fake: FakeOpenAI) -> Counter:
    return Counter(r.text for r in fake.records() if r.answered and r.text is not None)


def test_refinement_reasks_every_text_outside_the_clean_pool_and_never_a_human_label(tmp_path, encoder):
    rows = shared_rows("sst2", n=80, stride=53)
    for r in rows[:4]:
        r["human_label"] = r["label"]
    items = rows_to_items(rows)
    human = {it.text for it in items if it.human_label}
    with FakeOpenAI() as fake, make_run(tmp_path, fake, encoder) as run:
        run.run(items, rounds=1)
        todo, pool_idx, _ = run.refinement_scope(items, 1)
        refined = run.store.annotations("llm_r1")
        stage = run.store.stage_done("llm_r1")
        texts = asked_texts(fake)
    kept = {i for i in range(len(items)) if i not in set(todo)} - {i for i, it in enumerate(items) if it.human_label}
    assert set(refined) == {items[i].item_id for i in todo}  # exactly the texts outside the pool were re-asked
    assert len(todo) + len(kept) + len(human) == len(items)
    assert 0 < len(kept) <= 0.25 * len(items)  # the clean agreed pool is small (top 20 % per class)
    assert set(pool_idx.tolist()) <= kept | {i for i, it in enumerate(items) if it.human_label}
    assert not human & set(texts)  # a person's label is never sent to the LLM
    assert stage == {"reannotated": len(todo), "kept": len(items) - len(todo), "demo_pool": len(pool_idx)}


def test_budget_knob_reasks_only_the_lowest_scored_share(tmp_path, encoder):
    items = rows_to_items(shared_rows("sst2", n=80, stride=53))
    with FakeOpenAI() as fake, make_run(tmp_path, fake, encoder, refine_share=0.25) as run:
        run.run(items, rounds=1)
        todo, _, _ = run.refinement_scope(items, 1)
        scores = run._judge(items, 1).scores
    outside = len(items) - int(round(len(items) * 0.2)) - 4  # about what the paper would re-ask
    assert 0.15 * outside <= len(todo) <= 0.3 * outside
    rest = np.setdiff1d(np.arange(len(items)), todo)
    assert scores[todo].max() <= np.sort(scores[rest])[len(rest) // 2]  # lower scores than most of the rest


def test_failed_refinement_requests_are_retried_on_the_next_run(tmp_path, encoder):
    items = rows_to_items(shared_rows("sst2", n=60, stride=71))
    with FakeOpenAI() as fake:
        with make_run(tmp_path, fake, encoder) as run:
            run.run(items, rounds=0)  # round 0 answered in full
            fake.inject("status", times=3, status=400)  # three refinement requests refused
            run.run(items, rounds=1)
            assert run.store.stage_done("llm_r1") is None  # not finished: three answers missing
            failed = [k for k, v in run.store.annotations("llm_r1").items() if v["error"]]
            assert len(failed) == 3
        asked_before = fake.answered()
        with make_run(tmp_path, fake, encoder) as run:
            run.run(items, rounds=1)
            assert run.store.stage_done("llm_r1") is not None
            assert not [k for k, v in run.store.annotations("llm_r1").items() if v["error"]]
        assert fake.answered() - asked_before == 3  # only the failed ones were asked again
