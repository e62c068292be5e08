"""The connection file: formats accepted, lookup order, and errors that name file and field."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TunnelProcess, make_certs
from reactor_peer import free_port

from tunnel.config import (
    ConnectionConfig,
    ListenConfig,
    find_connection_file,
    load_connection_file,
)
from tunnel.errors import ConfigError
from tunnel.router import _mechanisms as router_mechanisms


def _write(folder: Path, content: object, name: str = "connect.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


def test_seed_format(tmp_path: Path) -> None:
    """The seed's file loads: string port, verify at both levels, relative certificate paths."""
    certs = make_certs(tmp_path)
    path = _write(
        tmp_path,
        {
            "scheme": "amqps",
            "host": "",
            "port": "443",
            "verify": False,
            "tls": {
                "ca": "test-ca.crt",
                "cert": "client.crt",
                "key": "client.key",
                "verify": False,
            },
        },
    )
    config = load_connection_file(path)
    assert config.effective_port == 443
    assert config.effective_host == "localhost"
    assert not config.verify_peer
    assert config.tls is not None
    assert config.tls.cert == certs.client_cert
    endpoint = config.endpoint()
    assert endpoint.ssl is not None and endpoint.ssl.verify_mode == ssl.CERT_NONE
    assert endpoint.server_hostname == "localhost"
    assert endpoint.has_client_cert


@pytest.mark.parametrize(
    ("content", "port", "verify"),
    [
        ({"scheme": "amqps", "host": "r"}, 5671, True),
        ({"scheme": "amqp", "host": "r"}, 5672, True),
        ({}, 5672, True),
        ({"port": 1234}, 1234, True),
        ({"port": "amqps"}, 5671, True),
        ({"scheme": "amqps", "tls": {"verify": False}}, 5671, False),
        ({"scheme": "amqps", "verify": False}, 5671, False),
        ({"scheme": "amqps", "verify": True, "tls": {"verify": True}}, 5671, True),
    ],
)
def test_port_defaults_and_verify(
    tmp_path: Path, content: dict[str, object], port: int, verify: bool
) -> None:
    """The port defaults from the scheme; verification is on unless a verify says false."""
    config = load_connection_file(_write(tmp_path, content))
    assert config.effective_port == port
    assert config.verify_peer is verify


def test_certificate_path_falls_back_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path missing beside the file is looked for in the working directory."""
    certs = make_certs(tmp_path / "certs")
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path / "certs")
    path = _write(conf_dir, {"scheme": "amqps", "tls": {"ca": "test-ca.crt"}})
    config = load_connection_file(path)
    assert config.tls is not None
    assert config.tls.ca is not None and config.tls.ca.samefile(certs.ca)


BAD = [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ({"scheme": "http"}, "scheme"),
    ({"port": "eighty"}, "port"),
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"verfy": False}, "verfy: unknown field"),
    ({"tls": {"ca": "missing.crt"}}, "tls.ca: file 'missing.crt' not found"),
    ({"tls": {"cert": 5}}, "tls.cert"),
    ({"tls": {"certificate": "x"}}, "tls.certificate: unknown field"),
    ({"password": "p"}, "password is set but user is not"),
    ({"verify": "maybe"}, "verify"),
]


@pytest.mark.parametrize(("content", "message"), BAD)
def test_bad_files(tmp_path: Path, content: object, message: str) -> None:
    """An invalid file is refused with its path and the offending field."""
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_connection_file(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$MESSAGING_CONNECT_FILE wins, then ./connect.json, then ~/.config/messaging/."""
    home = tmp_path / "home"
    (home / ".config" / "messaging").mkdir(parents=True)
    in_home = _write(home / ".config" / "messaging", {})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert find_connection_file({}, home=home) == in_home
    in_cwd = _write(work, {})
    assert find_connection_file({}, home=home) == work / "connect.json"
    assert in_cwd.exists()
    named = _write(tmp_path, {}, "other.json")
    assert find_connection_file({"MESSAGING_CONNECT_FILE": str(named)}, home=home) == named
    with pytest.raises(ConfigError, match="not a file"):
        find_connection_file({"MESSAGING_CONNECT_FILE": str(tmp_path / "nope")}, home=home)


def test_url_never_shows_the_password() -> None:
    """The URL logged at startup carries no credentials."""
    config = ConnectionConfig(host="r", user="u", password="secret")  # noqa: S106
    assert "secret" not in config.url
    assert "secret" not in repr(config)
    assert "secret" not in repr(config.endpoint())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("tcp://127.0.0.1:1", "expected amqp://HOST:PORT"),
        ("amqp://127.0.0.1", "expected HOST:PORT"),
        ("amqp://:5672", "expected HOST:PORT"),
        ("amqps://127.0.0.1:5671", "amqps needs --listen-cert"),
    ],
)
def test_bad_listen_urls(url: str, message: str) -> None:
    """A bad --listen URL is refused with what was expected."""
    with pytest.raises(ConfigError) as info:
        ListenConfig.parse(url)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tcp:1=>amqp:a", "udp:2=>amqp:b"], "unsupported scheme 'udp'"),
        (["--config", "/nonexistent/connect.json", "tcp:1=>amqp:a"], "/nonexistent/connect.json"),
        (["--listen", "amqp://x", "tcp:1=>amqp:a"], "--listen"),
        (["--listen-ca", "ca.pem", "tcp:1=>amqp:a"], "need --listen"),
        (["--window", "0", "tcp:1=>amqp:a"], "--window"),
        (["--max-frame-size", "100", "tcp:1=>amqp:a"], "--max-frame-size 100"),
        (["--session-window", "1000", "tcp:1=>amqp:a"], "--session-window 1000"),
        (["--max-connections", "0", "tcp:1=>amqp:a"], "--max-connections 0"),
        (["--max-links-per-connection", "0", "tcp:1=>amqp:a"], "--max-links-per-connection 0"),
        (["--max-connections-per-peer", "0", "tcp:1=>amqp:a"], "--max-connections-per-peer 0"),
        (["--silent-timeout", "-1", "tcp:1=>amqp:a"], "--silent-timeout -1: must be 0 or more"),
        (["--http-max-held", "0", "amqp:a=>http:1"], "--http-max-held 0: must be at least 1"),
        (["--hold-timeout", "-1", "tcp:1=>amqp:a"], "--hold-timeout -1: must be 0 or more"),
        (["--open-timeout", "0", "tcp:1=>amqp:a"], "--open-timeout 0: must be above 0"),
        (["--idle-timeout", "-1", "tcp:1=>amqp:a"], "--idle-timeout"),
        (["--admin", "nowhere", "tcp:1=>amqp:a"], "--admin 'nowhere'"),
        (["--http-timeout", "0", "http:1=>amqp:a"], "--http-timeout 0: must be above 0"),
        (["--http-max-body", "0", "http:1=>amqp:a"], "--http-max-body 0: must be at least 1"),
        (["--http-window", "-3", "amqp:a=>http:1"], "--http-window -3: must be at least 1"),
        (["--handshake-timeout", "nan", "tcp:1=>amqp:a"], "--handshake-timeout nan: must be"),
        (["--open-timeout", "nan", "tcp:1=>amqp:a"], "--open-timeout nan: must be"),
        (["--grace", "nan", "tcp:1=>amqp:a"], "--grace nan: must be"),
        (["--hold-timeout", "inf", "tcp:1=>amqp:a"], "--hold-timeout inf: must be"),
        (["--idle-timeout=-inf", "tcp:1=>amqp:a"], "--idle-timeout -inf: must be"),
        (["--half-closed-timeout", "nan", "tcp:1=>amqp:a"], "--half-closed-timeout nan"),
        (["--http-timeout", "1e9", "http:1=>amqp:a"], "--http-timeout 1e+09: must be at most"),
        (["--window", "100000", "tcp:1=>amqp:a"], "--window 100000: must be at most 64"),
        (["--http-window", "5000", "amqp:a=>http:1"], "--http-window 5000: must be at most"),
        (["--max-connections", "10000000", "tcp:1=>amqp:a"], "--max-connections 10000000"),
        (["--http-max-body", "99999999999", "http:1=>amqp:a"], "--http-max-body 99999999999"),
        (["--session-window", str(1 << 40), "tcp:1=>amqp:a"], "--session-window"),
    ],
)
def test_cli_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """The command exits with status 2 and names what was wrong."""
    result = subprocess.run(
        [sys.executable, "-m", "tunnel", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_cli_bad_connection_file_names_file_and_field(tmp_path: Path) -> None:
    """An invalid connection file stops startup with exit 2, naming the file and the field."""
    path = _write(tmp_path, {"scheme": "amqps", "port": "many"})
    result = subprocess.run(
        [sys.executable, "-m", "tunnel", "--config", str(path), "tcp:1=>amqp:a"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert str(path) in result.stderr and "port" in result.stderr


def test_version() -> None:
    """--version prints the version."""
    result = subprocess.run(
        [sys.executable, "-m", "tunnel", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("tunnel ")


async def test_secrets_never_reach_the_log(tmp_path: Path) -> None:
    """A password in the connection file is used but never written to the log, even at DEBUG."""
    dead = free_port()
    path = _write(
        tmp_path, {"host": "127.0.0.1", "port": dead, "user": "u", "password": "s3cret-Passw0rd"}
    )
    process = TunnelProcess(
        ["--config", str(path), "tcp:127.0.0.1:0=>amqp:a"], tmp_path / "tunnel.log"
    )
    try:
        await process.wait_for("unreachable")
        assert process.stop() == 0
    finally:
        process.kill()
    log = process.log()
    assert "PLAIN password without TLS" in log
    assert "s3cret-Passw0rd" not in log


async def test_listening_beyond_loopback_without_tls_warns(tmp_path: Path) -> None:
    """--listen amqp:// on a non-loopback address logs a warning; on loopback it does not."""
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        process = TunnelProcess(
            ["--listen", f"amqp://{host}:0", "amqp:a=>tcp:127.0.0.1:9"], tmp_path / f"{host}.log"
        )
        try:
            await process.wait_for("accepting AMQP")
            assert process.stop() == 0
        finally:
            process.kill()
        assert ("without TLS" in process.log()) is warned, process.log()


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )


#: (what is wrong, the files by role: ca/cert/key, the field named, the file named)
BAD_TLS = [
    ("empty CA", {"ca": "empty", "cert": "cert", "key": "key"}, "ca", "empty"),
    ("CA not PEM", {"ca": "junk", "cert": "cert", "key": "key"}, "ca", "junk"),
    ("cert and key swapped", {"ca": "ca", "cert": "key", "key": "cert"}, "cert", "key"),
    ("key of another cert", {"ca": "ca", "cert": "cert", "key": "other_key"}, "key", "other_key"),
    ("cert without key", {"ca": "ca", "cert": "cert"}, "cert", "cert"),
]


def _tls_files(folder: Path) -> dict[str, Path]:
    certs = make_certs(folder)
    (folder / "empty.pem").write_text("")
    (folder / "junk.pem").write_text("not a certificate\n")
    return {
        "ca": certs.ca,
        "cert": certs.server_cert,
        "key": certs.server_key,
        "other_key": certs.client_key,
        "empty": folder / "empty.pem",
        "junk": folder / "junk.pem",
    }


@pytest.mark.parametrize(("case", "roles", "field", "named"), BAD_TLS, ids=[c[0] for c in BAD_TLS])
def test_bad_tls_files_in_the_connection_file(
    tmp_path: Path, case: str, roles: dict[str, str], field: str, named: str
) -> None:
    """One line naming the field and the file, exit 2, no traceback."""
    files = _tls_files(tmp_path / "certs")
    tls = {role: str(files[which]) for role, which in roles.items()}
    path = _write(tmp_path, {"scheme": "amqps", "host": "localhost", "tls": tls})
    result = _run(["--config", str(path), "tcp:1=>amqp:a"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line, line
    assert f"tls.{field} {files[named]}" in line
    assert str(path) in line


@pytest.mark.parametrize(("case", "roles", "field", "named"), BAD_TLS, ids=[c[0] for c in BAD_TLS])
def test_bad_listen_tls_files(
    tmp_path: Path, case: str, roles: dict[str, str], field: str, named: str
) -> None:
    """The same for --listen-cert, --listen-key and --listen-ca."""
    files = _tls_files(tmp_path / "certs")
    flags = [
        arg for role, which in roles.items() for arg in (f"--listen-{role}", str(files[which]))
    ]
    result = _run(["--listen", "amqps://127.0.0.1:0", *flags, "amqp:a=>tcp:1"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line, line
    assert f"--listen-{field} {files[named]}" in line


async def test_amqps_to_a_plain_port_says_so(tmp_path: Path) -> None:
    """TLS towards a plain AMQP listener is named as such, not as an empty 'unreachable'."""
    plain = TunnelProcess(
        ["--listen", "amqp://127.0.0.1:0", "amqp:a=>tcp:127.0.0.1:1"], tmp_path / "plain.log"
    )
    client = None
    try:
        port = await plain.amqp_port()
        path = _write(tmp_path, {"scheme": "amqps", "host": "127.0.0.1", "port": port})
        client = TunnelProcess(
            ["--config", str(path), "tcp:127.0.0.1:0=>amqp:a"], tmp_path / "client.log"
        )
        match = await client.wait_for(r"router amqps://127\.0\.0\.1:\d+ (.*); retrying")
        assert "is it a plain AMQP port" in match.group(1), match.group(0)
        assert client.stop() == 0
    finally:
        plain.kill()
        if client is not None:
            client.kill()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--admin", "127.0.0.1:{port}", "tcp:127.0.0.1:0=>amqp:a"], "--admin 127.0.0.1:{port}"),
        (["--listen", "amqp://127.0.0.1:{port}", "amqp:a=>tcp:1"], "--listen amqp://127.0.0.1:"),
        (["tcp:127.0.0.1:{port}=>amqp:a"], "bridge tcp:127.0.0.1:{port}=>amqp:a"),
        (["http:127.0.0.1:{port}=>amqp:a"], "bridge http:127.0.0.1:{port}=>amqp:a"),
    ],
)
def test_a_busy_port_names_who_wanted_it(tmp_path: Path, args: list[str], named: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run([arg.format(port=port) for arg in args], tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert named.format(port=port) in result.stderr
    assert "address already in use" in result.stderr


def test_a_user_without_a_password_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, {"host": "127.0.0.1", "user": "u"})
    with pytest.raises(ConfigError, match="user is set but password is not"):
        load_connection_file(path)


def test_a_bad_spec_from_the_environment_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tunnel"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ICPROXY_CONFIG": "udp:1=>amqp:a"},
    )
    assert result.returncode == 2
    assert "$ICPROXY_CONFIG: unsupported scheme 'udp'" in result.stderr


@pytest.mark.parametrize("tool", ["tunnel.bench", "tunnel.soak"])
def test_tool_help_has_no_markup(tool: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", tool, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "``" not in result.stdout


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("distrusting", "does it trust this listener's certificate?"),
        ("without a certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ],
)
async def test_a_failed_direct_mode_handshake_is_logged_at_once(
    tmp_path: Path, client: str, reason: str
) -> None:
    """Not seen later as a handshake timeout: the listener says why, as it happens."""
    certs = make_certs(tmp_path / "certs")
    listener = TunnelProcess(
        [
            "--listen", "amqps://127.0.0.1:0", "--handshake-timeout", "600",
            "--listen-cert", str(certs.server_cert), "--listen-key", str(certs.server_key),
            "--listen-ca", str(certs.ca), "amqp:a=>tcp:127.0.0.1:1",
        ],
        tmp_path / "listener.log",
    )  # fmt: skip
    try:
        port = await listener.amqp_port()
        ctx = ssl.create_default_context(cafile=None if client == "distrusting" else str(certs.ca))
        # The client sees the refusal at its handshake or, under TLS 1.3, at its first read.
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        match = await listener.wait_for(r"TLS handshake with 127\.0\.0\.1:\d+ failed: (.*)", 10)
        assert reason in match.group(1)
        assert listener.stop() == 0
    finally:
        listener.kill()


def test_a_tls_block_without_amqps_is_an_error(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    path = _write(tmp_path, {"host": "localhost", "tls": {"ca": str(certs.ca)}})
    with pytest.raises(ConfigError, match='scheme is "amqp": the connection would be cleartext'):
        load_connection_file(path)


@pytest.mark.parametrize(
    ("mechanisms", "expected"),
    [("PLAIN", ("PLAIN",)), ("plain anonymous", ("PLAIN", "ANONYMOUS")), (["PLAIN"], ("PLAIN",))],
)
def test_sasl_mechanisms_in_connect_json_are_honoured(
    tmp_path: Path, mechanisms: object, expected: tuple[str, ...]
) -> None:
    path = _write(
        tmp_path, {"user": "u", "password": "p", "sasl_mechanisms": mechanisms, "host": "h"}
    )
    endpoint = load_connection_file(path).endpoint()
    assert endpoint.mechanisms == expected
    assert router_mechanisms(endpoint) == " ".join(expected)  # what proton is allowed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"sasl_mechanisms": "GSSAPI"}, "'GSSAPI' is not supported"),
        ({"sasl_mechanisms": ""}, "sasl_mechanisms is empty"),
        ({"sasl_mechanisms": "PLAIN"}, "PLAIN but no user and password"),
        ({"sasl_mechanisms": "EXTERNAL"}, "EXTERNAL but tls.cert is not set"),
    ],
)
def test_sasl_mechanisms_we_cannot_use_are_refused(
    tmp_path: Path, content: object, message: str
) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError, match=message):
        load_connection_file(path)


def test_a_key_file_readable_by_others_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = make_certs(tmp_path / "certs")
    certs.client_key.chmod(0o644)
    tls = {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)}
    path = _write(tmp_path, {"scheme": "amqps", "host": "localhost", "tls": tls})
    load_connection_file(path)
    assert "can be read by every user" in caplog.text
    assert "tls.key" in caplog.text
    caplog.clear()
    certs.client_key.chmod(0o600)
    load_connection_file(path)
    assert "can be read by every user" not in caplog.text
