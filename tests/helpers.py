"""Shared test parts: tunnel processes, loopback servers, certificates made at test time."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


async def eventually(
    check: Callable[[], T],
    what: str,
    timeout: float = 10.0,
    detail: Callable[[], object] | None = None,
) -> T:
    """``check()``'s first true result, polled until ``timeout``; fails naming ``what``.

    ``detail``, if given, is called on failure and its result added to the message.
    """
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            extra = "" if detail is None else f": {detail()}"
            raise AssertionError(f"{what}: not within {timeout}s{extra}")
        await asyncio.sleep(0.01)
    return result


class TunnelProcess:
    """``python -m tunnel ...`` as a real subprocess, with its log in a file."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MESSAGING_", "ICPROXY_"))
        }
        full_env.update(env or {})
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunnel", "--log-level", "DEBUG", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=full_env,
            cwd=cwd,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for(self, pattern: str, timeout: float = 15.0, after: int = 0) -> re.Match[str]:
        """Wait until the log (from offset ``after``) matches ``pattern``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.log()[after:])
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"tunnel exited with {self.proc.returncode} before {pattern!r}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the log within {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.02)

    async def listen_port(self) -> int:
        match = await self.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        return int(match.group(1))

    async def amqp_port(self) -> int:
        match = await self.wait_for(r"accepting AMQP on amqps?://[^:]+:(\d+)")
        return int(match.group(1))

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match, status
        return int(match.group(1))

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, and the exit status (killed and failed if it does not stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"tunnel ignored SIGTERM:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class EchoProtocol(asyncio.Protocol):
    """Echoes bytes; a FIN is echoed as a FIN once the echo is written."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.accepted += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > 1 << 20:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.01, self._resume)

    def _resume(self) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() > 1 << 20:
            asyncio.get_running_loop().call_later(0.01, self._resume)
        else:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        assert self.transport is not None
        # Both directions are done once the echo is flushed: close cleanly.
        self.transport.write_eof()
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.lost.append(exc)


@dataclass
class EchoServer:
    port: int = 0
    accepted: int = 0

    def __post_init__(self) -> None:
        self.lost: list[Exception | None] = []


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    state = EchoServer()
    server = await asyncio.get_running_loop().create_server(
        lambda: EchoProtocol(state), LOOPBACK, 0
    )
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)  # as a key should be; anything looser is warned about


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    server: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # As real CAs make them: Python 3.13's strict verification requires both.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                    ]
                ),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


def make_certs(folder: Path) -> Certs:
    """A CA with a server and a client certificate, and an unrelated CA with its own client."""
    folder.mkdir(parents=True, exist_ok=True)

    def authority(name: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey, Path]:
        key = _key()
        dn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = _issue(name, key, dn, key, ca=True, server=False)
        path = folder / f"{name}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return dn, key, path

    def leaf(
        name: str, ca: tuple[x509.Name, ec.EllipticCurvePrivateKey, Path], server: bool
    ) -> tuple[Path, Path]:
        key = _key()
        cert = _issue(name, key, ca[0], ca[1], ca=False, server=server)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path

    ca = authority("test-ca")
    other = authority("other-ca")
    server_cert, server_key = leaf("localhost", ca, server=True)
    client_cert, client_key = leaf("client", ca, server=False)
    other_cert, other_key = leaf("intruder", other, server=False)
    return Certs(
        ca[2], server_cert, server_key, client_cert, client_key, other[2], other_cert, other_key
    )


def write_connect_json(path: Path, content: dict[str, object]) -> Path:
    path.write_text(json.dumps(content))
    return path


async def echo_exact(port: int, payload: bytes, chunk: int = 1024 * 1024) -> tuple[int, str]:
    """Send ``payload`` in chunks, half-close, and read to EOF: (bytes back, their SHA-256)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(view), chunk):
            writer.write(view[offset : offset + chunk])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    digest = hashlib.sha256()
    received = 0
    while data := await asyncio.wait_for(reader.read(chunk), 30):
        digest.update(data)
        received += len(data)
    await sending
    writer.close()
    return received, digest.hexdigest()


async def round_trip(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read everything until EOF."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send())
    data = await asyncio.wait_for(reader.read(), 30)
    await sending
    writer.close()
    return data


def send_then_shutdown(port: int, payload: bytes) -> bytes:
    """What ``printf hello | nc -q1`` does: send, shut down the write side, read to EOF."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


async def expect_reset(port: int) -> None:
    """Connect, send, and expect the tunnel to reset the connection, not close it."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"anyone there?")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 20)
    writer.close()


# -- the admin endpoint ---------------------------------------------------------------
def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def get(base: str, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, base + path)


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``base``'s /metrics, read now (blocking, for :func:`eventually`)."""
    status, text = _get(base + "/metrics")
    assert status == 200, text
    return samples(text)


async def admin_base(process: TunnelProcess) -> str:
    """The admin endpoint's base URL, once the process has logged it."""
    match = await process.wait_for(r"admin endpoint on (http://127\.0\.0\.1:\d+)")
    return match.group(1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found
