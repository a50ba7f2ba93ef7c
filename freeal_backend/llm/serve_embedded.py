"""Run ``llama_cpp.server`` as a child that ends when the process that started it ends.

``python -m freeal_backend.llm.serve_embedded PARENT_PID <llama_cpp.server arguments>``. A run stopped by
SIGTERM or SIGKILL (``kill``, the OOM killer, a container stop) runs no cleanup, and the llama.cpp server it
started, a GB of weights on every core, would serve on with no one to ask it. A watcher thread sees the
parent go (the child is re-parented) and ends the server within a second. Portable, unlike Linux's
PR_SET_PDEATHSIG, which also fires when the *thread* that started the child ends (the Label Studio
backend starts it from a job thread).

The server runs :func:`fast_logprobs_llama`'s model class: llama-cpp-python 0.3.36 gives logprobs only with
``logits_all`` (the output layer at every prompt position) and builds them by a log-softmax over every
evaluated position and a Python sort of the whole vocabulary (152k entries for Qwen) per answer token, about
half a second a request on 2 cores, as long as the labelling itself (``benchmarks/results/llama_build_speed.md``);
the subclass computes the same numbers from the logits each answer token was drawn from, without ``logits_all``.
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
import time
from collections.abc import Sequence

POLL_SECONDS = 0.5


def fast_logprobs_llama() -> type:
    """``llama_cpp.Llama`` whose non-streamed completions compute their logprobs only at the answer's
    positions, with a partial sort (the public ``create_completion``, which the chat handler calls, asks the
    library for none and adds them in its format: the same tokens, values and order). It gives them without
    ``logits_all`` too, which spares every prompt position its output layer (152k logits each)."""
    import llama_cpp
    import numpy as np

    class FastLogprobsLlama(llama_cpp.Llama):
        _generated: list[int] | None = None  # set only while a completion with logprobs runs
        _rows: list[np.ndarray] | None = None

        def generate(self, tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
            """The library's generator; while ``create_completion`` wants logprobs, the tokens it yields are
            kept, and without ``logits_all`` the logits each was drawn from (the context's last output)."""
            for token in super().generate(tokens, *args, **kwargs):
                if self._generated is not None:
                    self._generated.append(token)
                    if not self._logits_all:
                        self._rows.append(np.ctypeslib.as_array(self._ctx.get_logits(),
                                                                shape=(self._n_vocab,)).copy())
                yield token

        def create_completion(self, prompt, *args, **kwargs):  # type: ignore[no-untyped-def]
            top = kwargs.get("logprobs")
            if args or not top or kwargs.get("stream") or kwargs.get("echo"):
                return super().create_completion(prompt, *args, **kwargs)
            self._generated, self._rows = [], []
            try:
                out = super().create_completion(prompt, **{**kwargs, "logprobs": None})
            finally:
                generated, rows = self._generated, self._rows
                self._generated = self._rows = None
            usage = out["usage"]
            tokens = generated[:usage["completion_tokens"]]
            if self._logits_all:  # the library kept every position's logits: the answer's start after the prompt
                rows = self.scores[usage["prompt_tokens"] - 1:self.n_tokens]
            out["choices"][0]["logprobs"] = self._answer_logprobs(tokens, rows, int(top), len(prompt))
            return out

        def _answer_logprobs(self, tokens: list[int], rows: Sequence[np.ndarray], top: int, text_offset: int) -> dict:
            """The completion format's logprobs of ``tokens``, each drawn from the logits in ``rows``."""
            out: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
            bos = self.token_bos()

            def text(ids: list[int], prev: list[int] | None = None) -> str:
                return self.detokenize(ids, prev_tokens=prev).decode("utf-8", errors="ignore")

            for i, (token, row) in enumerate(zip(tokens, rows)):
                if token == bos:
                    continue
                lp = llama_cpp.Llama.logits_to_logprobs(row)
                best = np.argpartition(-lp, min(top, len(lp) - 1))[:top]
                alts = {text([int(j)], tokens[:i]): float(v) for v, j in sorted(zip(lp[best], best), reverse=True)}
                token_text, token_lp = text([token], tokens[:i]), float(lp[token])
                alts[token_text] = token_lp
                out["tokens"].append(token_text)
                out["text_offset"].append(text_offset + len(text(tokens[:i])))
                out["token_logprobs"].append(token_lp)
                out["top_logprobs"].append(alts)
            return out

    return FastLogprobsLlama


def _end_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(0)  # the server holds nothing to save


def main() -> None:
    parent = int(sys.argv[1])
    if os.getppid() != parent:  # the parent ended before the server started
        sys.exit(0)
    threading.Thread(target=_end_with, args=(parent,), daemon=True, name="end-with-parent").start()
    import llama_cpp
    llama_cpp.Llama = fast_logprobs_llama()  # what llama_cpp.server's model loader instantiates
    sys.argv = ["llama_cpp.server", *sys.argv[2:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
