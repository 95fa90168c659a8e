"""Settings: one frozen object read once from ``MOLLIFIER_*`` variables.

Every field has a default and a description; the README's settings table and
``mollifier --help`` are made from the same list, so they cannot disagree.
A bad value fails start-up at once with the variable's name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConfigError", "Settings", "settings_env", "settings_table"]

PREFIX = "MOLLIFIER_"


class ConfigError(ValueError):
    """A ``MOLLIFIER_*`` variable has a value that cannot be used."""


def _setting(
    default: Any, description: str, *, minimum: int | None = None, maximum: int | None = None
) -> Any:
    return field(
        default=default,
        metadata={"description": description, "minimum": minimum, "maximum": maximum},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar can be told; see the README's settings table."""

    listen: str = _setting("127.0.0.1:50051", "Address the gRPC server listens on (host:port).")
    redis_url: str = _setting(
        "",
        "Redis URL (redis://, rediss://, unix://). Empty: `mollifier dev` starts its own.",
    )
    redis_cluster: bool = _setting(False, "Treat MOLLIFIER_REDIS_URL as a Redis Cluster.")
    database_url: str = _setting(
        "", "Postgres URL (postgresql://...). Empty: `mollifier dev` starts its own."
    )
    enabled: bool = _setting(
        True, "Kill switch: false makes every gate decision PASS_THROUGH (reason DISABLED)."
    )
    shadow_mode: bool = _setting(
        False, "Evaluate the trip but answer SHADOW_LOG instead of MOLLIFY; nothing is buffered."
    )
    trip_threshold: int = _setting(
        100, "Default triggers per window above which an env trips.", minimum=1
    )
    trip_window_ms: int = _setting(1000, "Default sliding-window length in ms.", minimum=10)
    trip_hold_ms: int = _setting(
        5000, "Default time an env stays tripped after going over; re-armed while over.", minimum=0
    )
    gate_timeout_ms: int = _setting(
        50, "Bound on a gate decision's Redis call; past it the answer is FAIL_OPEN.", minimum=1
    )
    gate_direct_redis: bool = _setting(
        True,
        "Gate decisions share one pipelined Redis connection of their own (a lean RESP "
        "client) instead of redis-py's pool; ignored on Redis Cluster.",
    )
    direct_write_timeout_ms: int = _setting(
        2000,
        "Bound on a write-through Trigger's Postgres insert; past it the run is buffered.",
        minimum=1,
    )
    buffer_capacity_per_env: int = _setting(
        100_000, "Most runs one env may hold in the buffer.", minimum=1
    )
    buffer_capacity_total: int = _setting(
        1_000_000,
        "Most runs the whole buffer may hold (checked against a cached total).",
        minimum=1,
    )
    idempotency_ttl_ms: int = _setting(
        86_400_000,
        "How long a key binding lives when the run gives no expiry; also kept this long "
        "after the run is drained, so later triggers with the key still find it.",
        minimum=1000,
    )
    max_payload_bytes: int = _setting(
        1_048_576, "Largest payload accepted (at most 1 GiB).", minimum=1, maximum=1 << 30
    )
    max_metadata_bytes: int = _setting(
        262_144, "Largest metadata document accepted (at most 256 MiB).", minimum=2, maximum=1 << 28
    )
    max_tags: int = _setting(64, "Most tags one run may carry.", minimum=1)
    drain_enabled: bool = _setting(True, "Run the built-in drainer inside `mollifier serve`.")
    drain_process: bool = _setting(
        True,
        "Run the built-in drainer in a child process of `mollifier serve` (restarted if it "
        "dies), so its CPU work does not slow the gRPC gate; false: in the serving process.",
    )
    drain_sink: str = _setting(
        "postgres",
        "Where buffered runs go: `postgres` (built-in drainer) or `external` (Lease/Ack only).",
    )
    drain_concurrency: int = _setting(
        4, "Batches written to Postgres at once (each holds a write slot).", minimum=1
    )
    write_slots: int = _setting(
        0,
        "Postgres connections writing runs at once, shared by every process of every "
        "sidecar on this Redis: drain batches and write-through inserts (those take at "
        "most all but one); a write-through Trigger finding none free buffers its run "
        "(reason POSTGRES_BUSY). 0: MOLLIFIER_DRAIN_CONCURRENCY.",
        minimum=0,
    )
    # At most 1,000: a lease script moves a whole batch in one call, and Redis's
    # Lua cannot unpack many thousands of values at once.
    drain_batch_size: int = _setting(
        500, "Runs leased and written per batch (1 to 1000).", minimum=1, maximum=1000
    )
    drain_rate_per_sec: int = _setting(
        0, "Most rows written to Postgres per second; 0 means no limit.", minimum=0
    )
    drain_lease_ms: int = _setting(
        30_000, "How long a lease holds before its runs go back to the queue.", minimum=100
    )
    drain_max_attempts: int = _setting(
        5, "Retryable failures before a run is dead-lettered.", minimum=1
    )
    drain_backoff_ms: int = _setting(
        500, "First retry delay; doubles each attempt up to 60 s.", minimum=1
    )
    drain_orgs_per_tick: int = _setting(
        50, "Most orgs visited in one drain tick (round-robin carries on next tick).", minimum=1
    )
    drain_idle_ms: int = _setting(
        100, "Pause between drain ticks when nothing was found.", minimum=1
    )
    drain_linger_ms: int = _setting(
        50,
        "Pause (0 to 5000 ms) before the next drain tick when the last one leased under a "
        "quarter of a batch from every env that has runs, so a trickle gathers into "
        "batches; 0: never.",
        minimum=0,
        maximum=5000,
    )
    stale_after_ms: int = _setting(
        300_000, "A buffered run older than this counts as stale in the sweep gauge.", minimum=1000
    )
    mutation_wait_ms: int = _setting(
        5000, "How long a mutation waits for a DRAINING run's fate before UNAVAILABLE.", minimum=0
    )
    migrate_on_start: bool = _setting(True, "Apply Postgres migrations when serving.")
    auth_token: str = _setting("", "Bearer token every RPC but health must carry; empty: none.")
    tls_cert_file: str = _setting("", "PEM certificate; with the key, serve TLS.")
    tls_key_file: str = _setting("", "PEM private key for the certificate.")
    tls_client_ca_file: str = _setting("", "PEM CA bundle; when set, clients must present certs.")
    workers: int = _setting(
        1,
        "gRPC server processes sharing MOLLIFIER_LISTEN's port (SO_REUSEPORT, Linux); "
        "above 1 the port must be fixed and the drainer runs in its own process.",
        minimum=1,
    )
    metrics_listen: str = _setting(
        "", "host:port for Prometheus metrics (e.g. 127.0.0.1:9464); empty: off."
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR.")
    log_format: str = _setting("json", "`json` or `text`.")
    strict_redis: bool = _setting(
        False, "Refuse to start when Redis may evict keys or keeps nothing on disk."
    )
    shutdown_grace_ms: int = _setting(
        10_000, "On SIGTERM: time for in-flight RPCs and batches to finish.", minimum=0
    )
    dev_data_dir: str = _setting(
        ".mollifier", "Where `mollifier dev` keeps its Redis and Postgres."
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from ``MOLLIFIER_<NAME>``; keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = PREFIX + f.name.upper()
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif name in env:
                values[f.name] = _parse(name, env[name], f.default)
        settings = cls(**values)
        settings.check()
        return settings

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed, checked like the original."""
        new = dataclasses.replace(self, **changes)
        new.check()
        return new

    def check(self) -> None:
        """Fail fast on values no sidecar can run with."""
        for f in dataclasses.fields(self):
            minimum = f.metadata.get("minimum")
            value = getattr(self, f.name)
            if minimum is not None and value < minimum:
                raise ConfigError(f"{PREFIX}{f.name.upper()}={value}: must be at least {minimum}")
            maximum = f.metadata.get("maximum")
            if maximum is not None and value > maximum:
                raise ConfigError(f"{PREFIX}{f.name.upper()}={value}: must be at most {maximum}")
        _check_hostport("MOLLIFIER_LISTEN", self.listen)
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"MOLLIFIER_REDIS_URL={self.redis_url!r}: expected redis://, rediss:// or unix://"
            )
        # psycopg also takes "host=... dbname=..." conninfo; a URL must be Postgres's.
        scheme = self.database_url.partition("://")[0] if "://" in self.database_url else ""
        if scheme and scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                f"MOLLIFIER_DATABASE_URL: expected postgresql://..., not {scheme}://"
            )
        if self.workers > 1 and self.listen.rpartition(":")[2] == "0":
            raise ConfigError("MOLLIFIER_WORKERS above 1 needs a fixed port in MOLLIFIER_LISTEN")
        if self.metrics_listen:
            _check_hostport("MOLLIFIER_METRICS_LISTEN", self.metrics_listen)
        if self.drain_sink not in ("postgres", "external"):
            raise ConfigError(
                f"MOLLIFIER_DRAIN_SINK={self.drain_sink!r}: must be `postgres` or `external`"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"MOLLIFIER_LOG_LEVEL={self.log_level!r}: unknown level")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"MOLLIFIER_LOG_FORMAT={self.log_format!r}: `json` or `text`")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("MOLLIFIER_TLS_CERT_FILE and MOLLIFIER_TLS_KEY_FILE go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("MOLLIFIER_TLS_CLIENT_CA_FILE needs MOLLIFIER_TLS_CERT_FILE")
        if self.buffer_capacity_per_env > self.buffer_capacity_total:
            raise ConfigError(
                "MOLLIFIER_BUFFER_CAPACITY_PER_ENV is larger than MOLLIFIER_BUFFER_CAPACITY_TOTAL"
            )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets and credentials masked, for logs."""
        out = dataclasses.asdict(self)
        if out["auth_token"]:
            out["auth_token"] = "***"
        for key in ("redis_url", "database_url"):
            out[key] = _mask_password(out[key])
        return out


def _parse(name: str, raw: str, default: Any) -> Any:
    raw = raw.strip()
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    if isinstance(default, int):
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    return raw


def _check_hostport(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}={value!r}: expected host:port")


def _mask_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def settings_env(settings: Settings) -> dict[str, str]:
    """``MOLLIFIER_*`` variables that make ``Settings.from_env`` give ``settings`` back."""
    out = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        out[PREFIX + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, in declaration order."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        rows.append((PREFIX + f.name.upper(), shown, f.metadata["description"]))
    return rows
