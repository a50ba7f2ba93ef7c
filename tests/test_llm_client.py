"""The LLM client through the real openai client against the embedded server on 127.0.0.1."""
import math

import pytest

from freeal_backend.llm.cache import ResponseCache, cache_key
from freeal_backend.llm.client import LLMClient, label_probs_from_logprobs
from freeal_backend.llm.prompts import label_messages

LABELS = ["negative", "positive"]


def test_logprob_confidence_sums_label_prefixes_and_normalises():
    top = [[(" ", -0.01)], [("pos", math.log(0.6)), ("Positive", math.log(0.1)), ("neg", math.log(0.2)),
                            ("The", math.log(0.05))]]
    probs = label_probs_from_logprobs(top, LABELS)
    assert probs["positive"] == pytest.approx(0.7 / 0.9)
    assert probs["negative"] == pytest.approx(0.2 / 0.9)


def test_logprob_confidence_is_empty_when_no_token_names_a_label():
    assert label_probs_from_logprobs([[("The", -0.1), ("I", -2.0)]], LABELS) == {}
    assert label_probs_from_logprobs([], LABELS) == {}


def test_cache_key_depends_on_model_messages_and_params():
    msgs = [{"role": "user", "content": "x"}]
    assert cache_key("m", msgs, {"t": 0}) == cache_key("m", [dict(m) for m in msgs], {"t": 0})
    assert len({cache_key("m", msgs, {"t": 0}), cache_key("m2", msgs, {"t": 0}), cache_key("m", msgs, {"t": 1}),
                cache_key("m", [{"role": "user", "content": "y"}], {"t": 0})}) == 4


def test_real_endpoint_labels_with_confidence_and_rerun_hits_cache(llm_base_url, llm_model, tmp_path):
    texts = ["a wonderful , moving film with great acting .", "dull , tedious and far too long .",
             "i hated every minute of it .", "one of the best films of the year ."]
    requests = [label_messages(t, LABELS, task_description="Classify the sentiment of the movie review.")
                for t in texts]
    client = LLMClient(llm_base_url, llm_model, ResponseCache(tmp_path / "cache.sqlite"), concurrency=2)
    first = client.label_many(requests, LABELS)
    assert client.stats.calls == len(texts) and client.stats.cache_hits == 0
    assert client.stats.prompt_tokens > 0 and client.stats.completion_tokens > 0
    for answer in first:
        assert answer is not None and answer.error is None
        if answer.label is not None and answer.probs:  # the embedded server returns logprobs
            assert set(answer.probs) == set(LABELS)
            assert sum(answer.probs.values()) == pytest.approx(1.0)
            assert 0.0 <= answer.confidence <= 1.0
    assert any(a.probs for a in first)

    again = LLMClient(llm_base_url, llm_model, ResponseCache(tmp_path / "cache.sqlite"), concurrency=2)
    second = again.label_many(requests, LABELS)
    assert again.stats.calls == 0 and again.stats.cache_hits == len(texts)
    assert [a.label for a in second] == [a.label for a in first]
    assert [a.confidence for a in second] == [a.confidence for a in first]


def test_logprob_confidence_tells_apart_labels_that_share_leading_tokens():
    labels = ["very negative", "very positive", "neutral"]
    top = [[("very", math.log(0.7)), ("neutral", math.log(0.3))],
           [(" positive", math.log(0.8)), (" negative", math.log(0.2))]]
    probs = label_probs_from_logprobs(top, labels)
    assert probs == pytest.approx({"very positive": 0.56, "very negative": 0.14, "neutral": 0.3})


def test_logprob_confidence_counts_a_label_split_into_pieces_once():
    top = [[("pos", math.log(0.6)), ("neg", math.log(0.4))], [("itive", math.log(0.99)), ("it", math.log(0.01))]]
    assert label_probs_from_logprobs(top, LABELS) == pytest.approx({"positive": 0.6, "negative": 0.4})
