"""TLS from settings: the server side of REST and gRPC, the client side of Triton's gRPC.

Both front doors serve one certificate (`server.tls_cert_file`, `server.tls_key_file`); with
`server.tls_client_ca_file` they also require a client certificate signed by that CA (mTLS).
Certificate paths are read when the process starts, so a missing or unreadable file stops
the start with a ConfigError instead of a listener that fails every handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from gateway.config import ConfigError, ServerSettings, TritonSettings


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from exc


def _pair(cert: Path | None, key: Path | None, where: str) -> tuple[Path, Path] | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"{where}.tls_cert_file and {where}.tls_key_file go together")
    return cert, key


def server_tls_enabled(s: ServerSettings) -> bool:
    return _pair(s.tls_cert_file, s.tls_key_file, "server") is not None


def rest_ssl_context(s: ServerSettings) -> ssl.SSLContext | None:
    """aiohttp's ``ssl_context`` for the REST listener; None: plaintext."""
    pair = _pair(s.tls_cert_file, s.tls_key_file, "server")
    if pair is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(*pair)
        if s.tls_client_ca_file is not None:
            ctx.load_verify_locations(cafile=s.tls_client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (*pair, s.tls_client_ca_file) if p is not None)
        raise ConfigError(f"server TLS ({files}): {exc}") from exc
    return ctx


def grpc_server_credentials(s: ServerSettings) -> grpc.ServerCredentials | None:
    """Credentials for ``server.add_secure_port``; None: plaintext."""
    pair = _pair(s.tls_cert_file, s.tls_key_file, "server")
    if pair is None:
        return None
    cert, key = (_read(p, "server TLS file") for p in pair)
    ca = s.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=_read(ca, "server.tls_client_ca_file") if ca is not None else None,
        require_client_auth=ca is not None,
    )


def triton_channel_credentials(t: TritonSettings) -> grpc.ChannelCredentials | None:
    """Credentials for the channels to Triton; None (no `triton.tls_ca_file`): plaintext."""
    if t.tls_ca_file is None:
        if t.tls_cert_file is not None or t.tls_key_file is not None:
            raise ConfigError("triton.tls_cert_file/tls_key_file need triton.tls_ca_file")
        return None
    pair = _pair(t.tls_cert_file, t.tls_key_file, "triton")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(t.tls_ca_file, "triton.tls_ca_file"),
        private_key=_read(pair[1], "triton.tls_key_file") if pair else None,
        certificate_chain=_read(pair[0], "triton.tls_cert_file") if pair else None,
    )
