# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target fleet -t edgepack-fleet .   # fleet server (FastAPI, SQLAlchemy, MQTT bridge)
#   docker build --target agent -t edgepack-agent .   # device agent (paho-mqtt, onnxruntime; nothing else)
# Both are python:3.11-slim with the edgepack wheel and one extra in /opt/venv, run as uid 10001, and carry
# no compiler, no wheel files and no pip cache.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------
# builder: only builds the edgepack wheel (pure Python); nothing of this stage reaches the final images
# except /wheels, which the final stages bind-mount for the install and never copy.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgepack ./edgepack
COPY builder ./builder
COPY fleet ./fleet
COPY device_agent ./device_agent
COPY hardware_profiles ./hardware_profiles
COPY testbeds ./testbeds
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------------
# base: what both images share: the runtime user, a pip-less venv on PATH, no bytecode litter.
FROM ${PYTHON_IMAGE} AS base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.vendor="edgepack" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 edgepack \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/edgepack --create-home \
            --shell /usr/sbin/nologin edgepack \
 && python -m venv --without-pip /opt/venv

# ---------------------------------------------------------------------------------------------------------
# fleet: `edgepack fleet serve`. Without --mqtt-url/--db-url (the default CMD) it runs an embedded broker
# and SQLite under /data; deploy/compose.yaml points it at Mosquitto and PostgreSQL instead. Give it
# --public-url when devices download bundles from it.
FROM base AS fleet
LABEL org.opencontainers.image.title="edgepack-fleet" \
      org.opencontainers.image.description="edgepack fleet server: bundle registry, device enrollment, rollouts over MQTT"
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -eu; wheel="$(ls /wheels/edgepack-*.whl)"; \
    pip --python /opt/venv/bin/python install "${wheel}[fleet]" \
 && mkdir -p /data \
 && chown edgepack:edgepack /data
USER edgepack
WORKDIR /data
VOLUME ["/data"]
# 8080: the API; 1883: the embedded broker, used only when no --mqtt-url is given.
EXPOSE 8080 1883
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["edgepack"]
CMD ["fleet", "serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]

# ---------------------------------------------------------------------------------------------------------
# agent: `edgepack agent run`. Mount the config at /etc/edgepack/agent.yaml (see deploy/agent.example.yaml)
# with the trusted keys beside it; slots, credential and journal live in the /var/lib/edgepack-agent volume.
# Healthy = the state dir is writable and the agent touched <state_dir>/agent.heartbeat in the last 90 s.
FROM base AS agent
LABEL org.opencontainers.image.title="edgepack-agent" \
      org.opencontainers.image.description="edgepack device agent: verified A/B installs of signed bundles"
ENV EDGEPACK_AGENT_CONFIG=/etc/edgepack/agent.yaml
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -eu; wheel="$(ls /wheels/edgepack-*.whl)"; \
    pip --python /opt/venv/bin/python install "${wheel}[agent]" \
 && mkdir -p /var/lib/edgepack-agent /etc/edgepack \
 && chown edgepack:edgepack /var/lib/edgepack-agent
USER edgepack
WORKDIR /var/lib/edgepack-agent
VOLUME ["/var/lib/edgepack-agent"]
EXPOSE 8700
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, sys, time; from device_agent.config import AgentConfig; d = AgentConfig.from_yaml(os.environ.get('EDGEPACK_AGENT_CONFIG', '/etc/edgepack/agent.yaml')).state_dir; h = d / 'agent.heartbeat'; sys.exit(0 if os.access(d, os.W_OK) and h.is_file() and time.time() - h.stat().st_mtime < 90 else 1)"]
ENTRYPOINT ["edgepack"]
CMD ["agent", "run", "--config", "/etc/edgepack/agent.yaml"]
