# The DAMA service image: API, worker and migrations share it (docker-compose.yml picks the command).
# CPU build of torch by default; for GPU workers:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t dama:cuda .
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAMA_HOME=/data \
    DAMA_ARTIFACTS_DIR=/data/artifacts \
    DAMA_MODEL_CACHE_DIR=/models \
    HF_HOME=/models/hf

# gcc: Triton builds its CUDA launcher with it the first time torch.compile runs (optim.compile on GPU workers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 dama \
    && mkdir -p /data /models && chown dama:dama /data /models

WORKDIR /app
# torch first, in its own layer: it is large and changes rarely.
RUN pip install --index-url "${TORCH_INDEX_URL}" ${TORCH_SPEC}
COPY pyproject.toml README.md alembic.ini ./
COPY api ./api
COPY worker ./worker
COPY jobstore ./jobstore
COPY dama_engine ./dama_engine
COPY dama_settings ./dama_settings
COPY dama_client ./dama_client
COPY migrations ./migrations
RUN pip install ".[engine,service,tracking]"

USER dama
EXPOSE 8000
# Health checks are per service in docker-compose.yml (the worker serves no HTTP).
CMD ["dama", "api"]
