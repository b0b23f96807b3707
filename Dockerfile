# Multi-stage build: compile the native hot path in a build stage, run as a non-root user (docs/deployment.md).
#
# The base is Python 3.11 on Debian bookworm, pinned by tag and digest (the multi-platform index of
# python:3.11.16-slim-bookworm as docker-library/repo-info recorded it on 2026-09-01). BASE_IMAGE replaces it,
# e.g. with an image built from Debian's packages where no registry is reachable (scripts/debian-base-image.sh):
# any Debian-based image with python3 and its venv module works.
ARG BASE_IMAGE=docker.io/library/python:3.11.16-slim-bookworm@sha256:c425d915a89a6dcd3183b1797ad9bd8878caff5a417f6371c8df93c8ea8b727f

FROM ${BASE_IMAGE} AS build
# A C compiler and zlib for the native modules, and Python's headers: the python images ship them, Debian's
# own python3 has them in python3-dev.
RUN set -eux; \
    pkgs="gcc libc6-dev zlib1g-dev"; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
        || pkgs="$pkgs python3-dev"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*
# One virtual environment, copied whole into the final stage (same base, so the same interpreter path).
RUN python3 -m venv /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
COPY native ./native
# Build against the same picows the image runs with (the broadcast loop cimports its .pxd). Fail the build,
# not the container, when a native module is missing.
RUN pip install --no-cache-dir 'setuptools>=77' wheel 'Cython>=3.0,<4' 'picows>=2.3,<2.4' \
    && pip install --no-cache-dir --no-build-isolation . \
    && pip uninstall -y Cython wheel \
    && cd / && python -c "from gateway import native; native.require_all()"

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
    && install -d -o gateway -g gateway /var/lib/gateway/data
COPY --from=build /opt/gateway /opt/gateway
USER gateway
WORKDIR /var/lib/gateway
# Inside a container both listeners face the container's network: publish (or not) what the host exposes.
ENV PATH=/opt/gateway/bin:$PATH \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_SMTP_HOST=0.0.0.0 \
    GATEWAY_SMTP_PORT=2525 \
    GATEWAY_DATA_DIR=/var/lib/gateway/data \
    GATEWAY_REQUIRE_NATIVE=1
# The embedded backend's SQLite database (mail, states, delegations) lives here: mount a volume to keep it.
VOLUME ["/var/lib/gateway/data"]
# 8080: HTTP and WebSocket; 2525: SMTP delivery into the embedded backend (GATEWAY_SMTP_PORT=0 turns it off).
EXPOSE 8080 2525
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=2).status != 200)"
# SIGTERM (the default stop signal) drains: in-flight requests finish, sockets close with 1001.
CMD ["jmap-gateway"]
