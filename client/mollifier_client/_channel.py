"""Channel settings shared by the sync and async clients: TLS, options, metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc

__all__ = ["Metadata", "auth_metadata", "channel_credentials", "channel_options"]

Metadata = Sequence[tuple[str, str]]
PathOrBytes = bytes | str | os.PathLike[str]

# Payloads are up to 1 MiB each and a page holds up to 1,000 runs.
_DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
}


def _read(value: PathOrBytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(
    *,
    tls: bool,
    root_certificates: PathOrBytes | None,
    client_certificate: PathOrBytes | None,
    client_private_key: PathOrBytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext.

    TLS is on when ``tls`` is true or any certificate is given. Certificates and
    keys are PEM, as bytes or a path to a file.
    """
    if (client_certificate is None) != (client_private_key is None):
        raise ValueError("mutual TLS needs both client_certificate and client_private_key")
    if not (tls or root_certificates or client_certificate):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(root_certificates),
        private_key=_read(client_private_key),
        certificate_chain=_read(client_certificate),
    )


def channel_options(
    options: Sequence[tuple[str, Any]] | None, tls_server_name: str | None
) -> list[tuple[str, Any]]:
    """The client's default channel options, overridden by the caller's."""
    merged = dict(_DEFAULT_OPTIONS)
    if tls_server_name:
        merged["grpc.ssl_target_name_override"] = tls_server_name
        merged["grpc.default_authority"] = tls_server_name
    merged.update(dict(options or ()))
    return list(merged.items())


def auth_metadata(token: str | None, extra: Metadata | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the bearer token, then the caller's own."""
    md: list[tuple[str, str]] = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    md.extend(extra or ())
    return tuple(md)
