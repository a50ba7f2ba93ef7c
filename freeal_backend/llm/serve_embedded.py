"""Run ``llama_cpp.server`` as a child that ends when the process that started it ends.

``python -m freeal_backend.llm.serve_embedded PARENT_PID <llama_cpp.server arguments>``. A run stopped by
SIGTERM or SIGKILL (``kill``, the OOM killer, a container stop) runs no cleanup, and the llama.cpp server it
started, a GB of weights on every core, would serve on with no one to ask it. A watcher thread sees the
parent go (the child is re-parented) and ends the server within a second. Portable, unlike Linux's
PR_SET_PDEATHSIG, which also fires when the *thread* that started the child ends (the Label Studio
backend starts it from a job thread).
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
import time

POLL_SECONDS = 0.5


def _end_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(0)  # the server holds nothing to save


def main() -> None:
    parent = int(sys.argv[1])
    if os.getppid() != parent:  # the parent ended before the server started
        sys.exit(0)
    threading.Thread(target=_end_with, args=(parent,), daemon=True, name="end-with-parent").start()
    sys.argv = ["llama_cpp.server", *sys.argv[2:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
