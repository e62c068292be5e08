# The sidecar image. Build: docker build -t tunnel .
# Stage 1 builds a wheel of tunnel and of every dependency, with the compiler
# and headers python-qpid-proton needs (it publishes no Linux wheel); stage 2
# installs only those wheels, with no index and no compiler. .ci/run runs the
# same two pip commands, and proves the second one works with CC=false.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tunnel ./tunnel
RUN python -m pip wheel --quiet --wheel-dir dist/wheels .

FROM python:3.11-slim
COPY --from=build /src/dist/wheels /tmp/wheels
RUN PIP_NO_CACHE_DIR=1 python -m pip install --quiet --no-index --find-links /tmp/wheels tunnel \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --no-create-home tunnel
USER 10001
# In a cluster the bridge specs come from $ICPROXY_CONFIG and the router
# connection file from the secret mounted at /etc/messaging (connect.json),
# both read by default. The probes and metrics are served on 9090 unless the
# arguments give another --admin (the last one given wins).
ENV ICPROXY_CONFIG=""
EXPOSE 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "tunnel", "--admin", "0.0.0.0:9090"]
