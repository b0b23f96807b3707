# Multi-stage build: compile the native hot path in a build stage, run as a non-root user.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
COPY native ./native
# Build against the same picows the image runs with (the broadcast loop cimports its .pxd).
RUN pip install --no-cache-dir 'setuptools>=77' wheel 'Cython>=3.0,<4' 'picows>=2.3,<2.4' \
    && pip wheel --no-cache-dir --no-build-isolation --wheel-dir /wheels .
# Fail the build, not the container, when a native module is missing from the wheel.
RUN pip install --no-cache-dir /wheels/jmap_push_gateway-*.whl \
    && cd / && python -c "from gateway import native; native.require_all()"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER gateway
WORKDIR /var/lib/gateway
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_DATA_DIR=/var/lib/gateway/data \
    GATEWAY_REQUIRE_NATIVE=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
CMD ["jmap-gateway"]
