# One image for the operator and the serving pods (Ray head and workers).
#   docker build -t modelfleet:0.1.0 .
# The torch wheel from PyPI brings its CUDA libraries, so the same image runs on GPU nodes.
# e2e/image.py builds the same layout without Docker (Debian's python3, the venv at
# /opt/modelfleet, dependencies and project in separate layers) for the local test cluster.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/modelfleet \
    PATH=/opt/modelfleet/bin:$PATH \
    MODELFLEET_CACHE_DIR=/var/cache/modelfleet \
    HF_HOME=/var/cache/modelfleet/huggingface \
    RAY_USAGE_STATS_ENABLED=0

RUN groupadd --gid 10001 modelfleet \
 && useradd --uid 10001 --gid 10001 --home-dir /home/modelfleet --create-home modelfleet \
 && mkdir -p /var/cache/modelfleet /run/modelfleet \
 && chown -R 10001:10001 /var/cache/modelfleet /run/modelfleet

WORKDIR /src
COPY pyproject.toml README.md ./
# The dependencies pyproject.toml lists get their own layer: a code change does not reinstall torch.
RUN python -m venv /opt/modelfleet \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY modelfleet ./modelfleet
RUN pip install --no-deps . && rm -rf /src

USER 10001
WORKDIR /home/modelfleet
ENTRYPOINT []
CMD ["modelfleet", "--help"]
