# One image for the operator and the serving pods (Ray head and workers).
#   docker build -t modelfleet:0.1.0 .
# The torch wheel from PyPI brings its CUDA libraries, so the same image runs on GPU nodes.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODELFLEET_CACHE_DIR=/var/cache/modelfleet \
    HF_HOME=/var/cache/modelfleet/huggingface \
    RAY_USAGE_STATS_ENABLED=0

RUN groupadd --gid 10001 modelfleet \
 && useradd --uid 10001 --gid 10001 --home-dir /home/modelfleet --create-home modelfleet \
 && mkdir -p /var/cache/modelfleet /run/modelfleet \
 && chown -R 10001:10001 /var/cache/modelfleet /run/modelfleet

WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelfleet ./modelfleet
RUN pip install . && rm -rf /src

USER 10001
WORKDIR /home/modelfleet
ENTRYPOINT []
CMD ["modelfleet", "--help"]
