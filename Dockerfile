# The sidecar image. Build: docker build -t tunnel .
# Stage 1 builds the wheel, stage 2 installs it into a slim runtime; both
# pip commands are the ones .ci/run runs, so CI exercises this install.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tunnel ./tunnel
RUN python -m pip wheel --quiet --no-deps --wheel-dir dist/wheels .

FROM python:3.11-slim
COPY --from=build /src/dist/wheels /tmp/wheels
RUN python -m pip install --quiet --no-cache-dir /tmp/wheels/tunnel-*.whl \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --no-create-home tunnel
USER 10001
# In a cluster the bridge specs come from $ICPROXY_CONFIG and the router
# connection file from the secret mounted at /etc/messaging (connect.json),
# both read by default; the admin endpoint serves the probes and metrics.
ENV ICPROXY_CONFIG=""
EXPOSE 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "tunnel"]
