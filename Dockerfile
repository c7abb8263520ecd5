# syntax=docker/dockerfile:1
# One image for every tilerec container: `tilerec worker …` (the default command), `celery -A tasks flower …`,
# `tilerec run …`. Configured only by environment variables (celeryconfig.py); see docker-compose.yml.
#   docker build -t tilerec .                          the extras: --build-arg EXTRAS=monitor,<other extras>
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG EXTRAS=monitor
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# .dockerignore lets in only the package's own files (no .env, .git, .venv, images or models)
COPY . /src
RUN pip install "/src[${EXTRAS}]" && rm -rf /src

# not root: a worker only reads /data (images) and /models, and talks to Redis
RUN useradd --system --uid 10001 --create-home --home-dir /home/tilerec tilerec \
    && mkdir -p /data /models
USER tilerec
WORKDIR /home/tilerec
ENV TILEREC_ALLOWED_ROOTS=/data \
    TILEREC_MODEL_DIR=/models

CMD ["tilerec", "worker", "--loglevel", "INFO"]
