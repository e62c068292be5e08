# The sidecar image: build in one stage, run from a slim one as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tunnel ./tunnel
RUN python -m venv /opt/tunnel \
 && /opt/tunnel/bin/pip install --quiet --disable-pip-version-check .

FROM python:3.11-slim
COPY --from=build /opt/tunnel /opt/tunnel
RUN useradd --system --uid 10001 --no-create-home tunnel
USER 10001
ENV PATH=/opt/tunnel/bin:$PATH
# In a cluster the router connection file is the secret mounted at /etc/messaging.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "tunnel"]
