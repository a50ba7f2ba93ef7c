# FreeAL Label Studio ML backend: one image (freeal-backend:local) for the services freeal, worker and
# worker-gpu of docker-compose.yml. Build: docker compose build. The context is only what .dockerignore lets in.
FROM python:3.11-slim

# A C/C++ toolchain: pip builds llama-cpp-python (the embedded offline LLM) from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt constraints.txt ./
# GGML_NATIVE=OFF: llama.cpp is compiled for a generic x86-64 with AVX2/FMA/F16C (Intel Haswell, AMD Zen or
# newer), not with -march=native for the build machine's CPU, so the image runs on other hosts too. For hosts
# with AVX-512 (prompts evaluate ~1.5x faster; benchmarks/results/llama_build_speed.md), pass what set-up uses:
#   docker compose build --build-arg LLAMA_CMAKE_ARGS="$(python3 scripts/llama_build.py | cut -d' ' -f2-)"
# torch from PyPI for Linux brings its CUDA libraries (several GB): fine on a GPU host; for a small
# CPU-only image, install a CPU build of torch==2.13.0 before this line.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
# constraints.txt pins what those packages pull in, as in the venv the tests passed with (scripts/lock_deps.py)
RUN CMAKE_ARGS="$LLAMA_CMAKE_ARGS" pip install --no-cache-dir -r requirements.txt -c constraints.txt
COPY pyproject.toml README.md NOTICE gunicorn.conf.py ./
COPY freeal_backend ./freeal_backend
COPY label_config ./label_config
RUN pip install --no-cache-dir --no-deps . \
 && freeal models install

# All state (SQLite job/run state, LLM response cache, SLM checkpoints) lives under /data: mount a volume.
ENV FREEAL_DATA_DIR=/data \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOST=0.0.0.0 \
    PORT=9090
RUN useradd --create-home --uid 1000 freeal && mkdir -p /data && chown freeal /data
USER freeal
VOLUME /data
EXPOSE 9090
# /health answers without basic auth (and without data), so this check needs no secret
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT','9090'), timeout=4)"
CMD ["gunicorn", "-c", "gunicorn.conf.py", "freeal_backend.labelstudio.wsgi:app"]
