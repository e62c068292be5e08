"""The shipped artefacts agree with the code: manifests, Dockerfile and CI script."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tunnel import admin
from tunnel.__main__ import build_parser
from tunnel.config import SYSTEM_CONNECT_FILE
from tunnel.spec import IngressSpec, parse_specs

ROOT = Path(__file__).resolve().parent.parent


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _deployment() -> dict[str, Any]:
    [deployment] = [d for d in _documents() if d["kind"] == "Deployment"]
    return deployment


def _container() -> dict[str, Any]:
    [container] = _deployment()["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def test_every_manifest_loads() -> None:
    """Each document under deploy/ is valid YAML with a kind and a name."""
    docs = _documents()
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    assert all(d["metadata"]["name"] for d in docs)


def test_probes_use_what_the_admin_endpoint_serves() -> None:
    """Probes target the --admin port and the paths the admin server answers."""
    container = _container()
    args = build_parser().parse_args(container["args"])
    admin_port = int(args.admin.rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == admin.HEALTH_PATH
    assert ready["path"] == admin.READY_PATH
    assert ports[live["port"]] == ports[ready["port"]] == admin_port


def test_environment_and_mounts_match_what_the_code_reads() -> None:
    """ICPROXY_CONFIG holds valid specs, the secret is where the connection file is looked for."""
    container = _container()
    env = {e["name"]: e.get("value") for e in container["env"]}
    [spec] = parse_specs([], {"ICPROXY_CONFIG": env["ICPROXY_CONFIG"]})
    assert isinstance(spec, IngressSpec) and str(spec) == "tcp:2000=>amqp:echo"
    [mount] = container["volumeMounts"]
    assert Path(mount["mountPath"]) == SYSTEM_CONNECT_FILE.parent
    volumes = {v["name"]: v for v in _deployment()["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["secret"]["secretName"] == "skupper"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [service] = [d for d in _documents() if d["kind"] == "Service"]
    [service_port] = service["spec"]["ports"]
    assert ports[service_port["targetPort"]] == spec.port == service_port["port"]


def test_termination_grace_covers_the_tunnels_grace() -> None:
    """Kubernetes waits for the tunnel's --grace plus a little to reset what is left."""
    grace = build_parser().parse_args(_container()["args"]).grace
    period = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace + 2 <= period <= grace + 10


def test_memory_limits_fit_the_measured_figures() -> None:
    """The limit is above the benchmark's peaks (README, Performance), the request above idle."""
    resources = _container()["resources"]
    assert _mebibytes(resources["limits"]["memory"]) >= 200
    assert _mebibytes(resources["requests"]["memory"]) >= 64


def _mebibytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


def test_dockerfile_installs_as_ci_does() -> None:
    """The image's pip commands are the ones CI runs, and it runs as a non-root user."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    build = "python -m pip wheel --quiet --wheel-dir dist/wheels ."
    assert build in dockerfile
    assert build in ci
    runtime = "python -m pip install --quiet --no-index --find-links"
    assert re.search(rf"{runtime} dist/wheels tunnel$", ci, re.MULTILINE)
    assert re.search(rf"{runtime} /tmp/wheels tunnel", dockerfile)
    assert "CC=false" in ci
    assert dockerfile.startswith("# ") and "FROM python:3.11-slim\n" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "tunnel", "--admin", "0.0.0.0:9090"]' in dockerfile
    assert "EXPOSE 9090" in dockerfile
    assert "STOPSIGNAL SIGTERM" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    assert dockerfile.count("FROM ") == 2
