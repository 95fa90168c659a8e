"""Mollifier: a gRPC sidecar that buffers bursts of task triggers in Redis and
drains them into Postgres, fairly across tenants, exactly once."""

from __future__ import annotations

from .config import ConfigError, Settings

__all__ = ["ConfigError", "Settings", "__version__"]

__version__ = "0.1.0"
