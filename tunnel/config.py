"""The router connection file (``connect.json``) and how it is found.

The format is the one rhea and skupper-proxy read::

    {"scheme": "amqps", "host": "router.example", "port": "443", "verify": false,
     "tls": {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key", "verify": false}}

Differences from rhea, all deliberate:

- ``port`` may be a number or a string, and defaults from the scheme
  (5672 for ``amqp``, 5671 for ``amqps``) rather than always 5672.
- Relative certificate paths resolve against the file's own folder first,
  then the working directory (rhea only tried the working directory).
- Unknown fields are errors instead of being ignored, so a typo such as
  ``"verfy": false`` cannot silently leave verification on or off.
- A ``tls`` object with a scheme other than ``amqps`` is an error: rhea
  would connect in cleartext and ignore the certificates.
- ``sasl_mechanisms`` (a space- or comma-separated string, or a list) is the
  set of mechanisms we may use, among EXTERNAL, PLAIN and ANONYMOUS; one we
  cannot use with the rest of the file (PLAIN without a password, EXTERNAL
  without a client certificate) is an error.

Lookup order without ``--config``: ``$MESSAGING_CONNECT_FILE`` (the only path
tried when set), then ``./connect.json``, ``~/.config/messaging/connect.json``
and ``/etc/messaging/connect.json``.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .tls_files import ReloadingContext

logger = logging.getLogger(__name__)

Port = Annotated[int, Field(ge=1, le=65535)]
#: Where a cluster mounts the router secret (skupper-proxy's deployer does).
SYSTEM_CONNECT_FILE = Path("/etc/messaging/connect.json")
NAMED_PORTS = {"amqp": 5672, "amqps": 5671}


class TlsConfig(BaseModel):
    """The ``tls`` object: PEM files for mutual TLS to the router."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    verify: bool | None = None


class ConnectionConfig(BaseModel):
    """Where and how to reach the router."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["amqp", "amqps"] = "amqp"
    host: str = ""
    port: Port | None = None
    verify: bool | None = None
    user: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls: TlsConfig | None = None
    sasl_mechanisms: str | list[str] | None = None

    @field_validator("port", mode="before")
    @classmethod
    def _port_from_text(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text in NAMED_PORTS:
                return NAMED_PORTS[text]
            if not text.isdigit():
                raise ValueError(f"port {value!r} is neither a number nor 'amqp'/'amqps'")
            return int(text)
        return value

    @property
    def effective_host(self) -> str:
        return self.host or "localhost"

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else NAMED_PORTS[self.scheme]

    @property
    def verify_peer(self) -> bool:
        """Verification is on unless either ``verify`` says false."""
        tls_verify = self.tls.verify if self.tls else None
        return not (self.verify is False or tls_verify is False)

    @property
    def url(self) -> str:
        """The router URL for logs: never carries credentials."""
        return f"{self.scheme}://{_bracket(self.effective_host)}:{self.effective_port}"

    @property
    def mechanisms(self) -> tuple[str, ...] | None:
        """The SASL mechanisms the file allows, upper case; None when it does not say."""
        value = self.sasl_mechanisms
        if value is None:
            return None
        names = value if isinstance(value, list) else re.split(r"[\s,]+", value)
        return tuple(name.strip().upper() for name in names if name.strip())

    def endpoint(self) -> RouterEndpoint:
        tls = None
        if self.scheme == "amqps":
            files = self.tls or TlsConfig()
            tls = ReloadingContext(
                self._client_context, (files.cert, files.key, files.ca), f"router {self.url}"
            )
        return RouterEndpoint(
            url=self.url,
            host=self.effective_host,
            port=self.effective_port,
            tls=tls,
            server_hostname=self.effective_host if tls is not None else None,
            hostname=self.effective_host,
            user=self.user,
            password=self.password,
            has_client_cert=tls is not None and self.tls is not None and self.tls.cert is not None,
            mechanisms=self.mechanisms,
        )

    def _client_context(self) -> ssl.SSLContext:
        ctx = self.ssl_context()
        assert ctx is not None, "amqps only"
        return ctx

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for ``amqps``, or None for plain AMQP."""
        if self.scheme != "amqps":
            return None
        tls = self.tls or TlsConfig()
        ctx = ssl.create_default_context()
        load_tls_files(
            ctx, cert=tls.cert, key=tls.key, ca=tls.ca, names=("tls.cert", "tls.key", "tls.ca")
        )
        if not self.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def load_tls_files(
    ctx: ssl.SSLContext,
    *,
    cert: Path | None,
    key: Path | None,
    ca: Path | None,
    names: tuple[str, str, str],
) -> None:
    """Load a CA and a certificate chain into ``ctx``.

    Each failure is a :class:`ConfigError` naming the field or option (from
    ``names``: cert, key, CA) and the file, not OpenSSL's ``PEM lib``.
    """
    cert_name, key_name, ca_name = names
    if ca is not None:
        _require_pem(ca, ca_name, _CERTIFICATE, "CA certificate")
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"{ca_name} {ca}: not a usable CA certificate: {exc}") from None
    if cert is None:
        return
    _require_pem(cert, cert_name, _CERTIFICATE, "certificate")
    if key is not None:
        _require_pem(key, key_name, _PRIVATE_KEY, "private key")
    elif not _PRIVATE_KEY.search(_read_pem(cert, cert_name)):
        raise ConfigError(
            f"{cert_name} {cert}: has no private key in it, and {key_name} is not given"
        )
    try:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{key_name} {key or cert}: the private key does not match the "
            f"certificate in {cert} ({exc.reason or exc})"
        ) from None


_CERTIFICATE = re.compile(r"^-----BEGIN CERTIFICATE-----$", re.MULTILINE)
_PRIVATE_KEY = re.compile(r"^-----BEGIN [A-Z ]*PRIVATE KEY-----$", re.MULTILINE)


def _read_pem(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read: {exc.strerror or exc}") from None


def _require_pem(path: Path, name: str, block: re.Pattern[str], what: str) -> None:
    if not block.search(_read_pem(path, name)):
        raise ConfigError(f"{name} {path}: not a PEM {what}")


def _resolve(path: Path | None, base: Path, field: str, source: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    candidates = [path] if path.is_absolute() else [base / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{source}: tls.{field}: file {str(path)!r} not found (tried {tried})")


def load_connection_file(path: Path) -> ConnectionConfig:
    """Read and validate a connection file; errors name the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read connection file: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        config = ConnectionConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc
    if config.tls is not None:
        base = path.resolve().parent
        tls = config.tls.model_copy(
            update={
                name: _resolve(getattr(config.tls, name), base, name, path)
                for name in ("ca", "cert", "key")
            }
        )
        if tls.key is not None and tls.cert is None:
            raise ConfigError(f"{path}: tls.key is set but tls.cert is not")
        config = config.model_copy(update={"tls": tls})
    if config.tls is not None and config.scheme != "amqps":
        raise ConfigError(
            f'{path}: tls is set but scheme is "{config.scheme}": the connection would be '
            'cleartext; set "scheme": "amqps"'
        )
    _check_mechanisms(config, path)
    if config.tls is not None and config.tls.key is not None:
        warn_if_readable(config.tls.key, f"{path}: tls.key")
    if config.password is not None and config.user is None:
        raise ConfigError(f"{path}: password is set but user is not")
    if config.user is not None and config.password is None:
        raise ConfigError(f"{path}: user is set but password is not")
    return config


#: The SASL mechanisms proton offers without Cyrus SASL.
SASL_MECHANISMS = ("EXTERNAL", "PLAIN", "ANONYMOUS")


def _check_mechanisms(config: ConnectionConfig, path: Path) -> None:
    names = config.mechanisms
    if names is None:
        return
    if not names:
        raise ConfigError(f"{path}: sasl_mechanisms is empty")
    for name in names:
        if name not in SASL_MECHANISMS:
            raise ConfigError(
                f"{path}: sasl_mechanisms: {name!r} is not supported "
                f"(expected some of {', '.join(SASL_MECHANISMS)})"
            )
    if "PLAIN" in names and config.password is None:
        raise ConfigError(f"{path}: sasl_mechanisms has PLAIN but no user and password are set")
    if "EXTERNAL" in names and (config.tls is None or config.tls.cert is None):
        raise ConfigError(f"{path}: sasl_mechanisms has EXTERNAL but tls.cert is not set")


def warn_if_readable(key: Path, name: str) -> None:
    """Warn when a private key file can be read by every user of the machine."""
    try:
        mode = key.stat().st_mode
        holds_key = _PRIVATE_KEY.search(key.read_text(encoding="ascii", errors="replace"))
    except OSError:
        return  # reading it fails later, with its own error
    if mode & stat.S_IROTH and holds_key:
        logger.warning(
            "%s %s can be read by every user on this machine (mode %o): "
            "make it readable by its owner only (chmod 600, or defaultMode 0400 "
            "for a Kubernetes secret)",
            name,
            key,
            stat.S_IMODE(mode),
        )


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(file)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def find_connection_file(env: Mapping[str, str], home: Path | None = None) -> Path | None:
    """The first connection file in the lookup order, or None."""
    explicit = env.get("MESSAGING_CONNECT_FILE")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"$MESSAGING_CONNECT_FILE names {explicit!r}, which is not a file")
        return path
    home = home if home is not None else Path.home()
    for candidate in (
        Path.cwd() / "connect.json",
        home / ".config" / "messaging" / "connect.json",
        SYSTEM_CONNECT_FILE,
    ):
        if candidate.is_file():
            return candidate
    return None


class ListenConfig(BaseModel):
    """Direct mode: the AMQP listener this process serves itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["amqp", "amqps"]
    host: str
    port: Annotated[int, Field(ge=0, le=65535)]
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def parse(
        cls, url: str, cert: str | None = None, key: str | None = None, ca: str | None = None
    ) -> ListenConfig:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("amqp", "amqps"):
            raise ConfigError(f"--listen {url!r}: expected amqp://HOST:PORT or amqps://HOST:PORT")
        host, colon, port_text = rest.rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"--listen {url!r}: expected HOST:PORT after {scheme}://")
        if scheme == "amqps" and not cert:
            raise ConfigError(f"--listen {url!r}: amqps needs --listen-cert and --listen-key")
        if scheme == "amqp" and (cert or ca):
            raise ConfigError(f"--listen {url!r}: --listen-cert/--listen-ca need amqps://")
        paths = {}
        for flag, value in (("--listen-cert", cert), ("--listen-key", key), ("--listen-ca", ca)):
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{flag}: file {value!r} not found")
            paths[flag] = Path(value) if value else None
        config = cls(
            scheme=scheme,  # type: ignore[arg-type]
            host=host,
            port=int(port_text),
            cert=paths["--listen-cert"],
            key=paths["--listen-key"],
            ca=paths["--listen-ca"],
        )
        config.ssl_context()  # every file checked now, not when the listener starts
        if config.key is not None:
            warn_if_readable(config.key, "--listen-key")
        elif config.cert is not None:
            warn_if_readable(config.cert, "--listen-cert (it holds the private key)")
        return config

    @property
    def url(self) -> str:
        return f"{self.scheme}://{_bracket(self.host)}:{self.port}"

    def reloading_context(self) -> ReloadingContext | None:
        """The server TLS context, following its files (None for plain AMQP)."""
        if self.scheme != "amqps" or self.cert is None:
            return None
        return ReloadingContext(
            self._server_context, (self.cert, self.key, self.ca), f"the listener {self.url}"
        )

    def _server_context(self) -> ssl.SSLContext:
        ctx = self.ssl_context()
        assert ctx is not None, "amqps with a certificate only"
        return ctx

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.scheme != "amqps" or self.cert is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_tls_files(
            ctx,
            cert=self.cert,
            key=self.key,
            ca=self.ca,
            names=("--listen-cert", "--listen-key", "--listen-ca"),
        )
        if self.ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def self_endpoint(self, port: int) -> RouterEndpoint:
        """How this process's own ingress bridges reach its own listener.

        Over TLS the server certificate is pinned: it is trusted as its own
        anchor, so no CA or hostname is needed for a loopback connection to
        ourselves, and verification stays on.
        """
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        tls = None
        if self.scheme == "amqps" and self.cert is not None:
            tls = ReloadingContext(
                self._pinned_context, (self.cert, self.key), f"this listener {self.url}, pinned"
            )
        return RouterEndpoint(
            url=f"{self.scheme}://{_bracket(host)}:{port}",
            host=host,
            port=port,
            tls=tls,
            server_hostname=None,
            hostname=host,
            user=None,
            password=None,
            has_client_cert=tls is not None and self.ca is not None,
        )

    def _pinned_context(self) -> ssl.SSLContext:
        assert self.cert is not None
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.check_hostname = False
        if self.ca is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class RouterEndpoint:
    """Everything needed to open the AMQP connection to a router."""

    url: str
    host: str
    port: int
    #: The TLS context, rebuilt when its files change; None for plain AMQP.
    tls: ReloadingContext | None
    server_hostname: str | None
    hostname: str
    user: str | None
    password: str | None = field(repr=False)
    has_client_cert: bool
    #: SASL mechanisms the connection file restricts us to; None: chosen from the credentials.
    mechanisms: tuple[str, ...] | None = None

    @property
    def ssl(self) -> ssl.SSLContext | None:
        """The TLS context for a new connection: the files' current contents."""
        return None if self.tls is None else self.tls.current()
