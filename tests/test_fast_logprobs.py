"""The embedded server's model class (serve_embedded.fast_logprobs_llama) gives the library's logprobs."""
from __future__ import annotations

import llama_cpp
import pytest

from freeal_backend.llm.embedded import TEST_MODEL, model_path
from freeal_backend.llm.serve_embedded import fast_logprobs_llama

ASK = [{"role": "system", "content": "Classify the sentiment of the movie review. Answer positive or negative."},
       {"role": "user", "content": "Text: a gorgeous, witty, seductive movie.\nLabel:"}]
WRITE = [{"role": "user", "content": "Write one sentence about a film you liked."}]


@pytest.fixture(scope="module", params=[True, False], ids=["logits_all", "last_logits_only"])
def models(request) -> tuple[llama_cpp.Llama, llama_cpp.Llama]:
    """The library's class (logprobs need its ``logits_all``) and freeal's, with and without it."""
    path = str(model_path(TEST_MODEL))
    return (llama_cpp.Llama(model_path=path, n_threads=2, n_ctx=512, logits_all=True, verbose=False),
            fast_logprobs_llama()(model_path=path, n_threads=2, n_ctx=512, logits_all=request.param, verbose=False))


def _content(model: llama_cpp.Llama, messages: list[dict], **kw) -> list[dict]:
    out = model.create_chat_completion(messages=messages, temperature=0, logprobs=True, **kw)
    return out["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize(("messages", "max_tokens"), [(ASK, 16), (WRITE, 6)])  # ends itself / cut at max_tokens
def test_same_tokens_logprobs_and_alternatives_as_the_library(models, messages, max_tokens):
    library, fast = models
    want = _content(library, messages, max_tokens=max_tokens, top_logprobs=10)
    got = _content(fast, messages, max_tokens=max_tokens, top_logprobs=10)
    assert want and len(got) == len(want)
    for w, g in zip(want, got):
        assert g["token"] == w["token"] and g["logprob"] == pytest.approx(float(w["logprob"]), abs=1e-4)
        assert [t["token"] for t in g["top_logprobs"]] == [t["token"] for t in w["top_logprobs"]]
        assert [t["logprob"] for t in g["top_logprobs"]] == pytest.approx(
            [float(t["logprob"]) for t in w["top_logprobs"]], abs=1e-4)


def test_without_logprobs_or_streamed_the_library_answers(models):
    library, fast = models
    plain = fast.create_chat_completion(messages=ASK, temperature=0, max_tokens=8)
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == \
        library.create_chat_completion(messages=ASK, temperature=0, max_tokens=8)["choices"][0]["message"]["content"]
    chunks = list(fast.create_chat_completion(messages=ASK, temperature=0, max_tokens=8, stream=True))
    assert len(chunks) > 1
