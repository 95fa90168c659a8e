"""Settings: defaults, parsing, fail-fast messages, and the docs made from them."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import pytest
from mollifier.config import ConfigError, Settings, settings_table
from mollifier.logs import setup_logging

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.listen == "127.0.0.1:50051"
    assert s.enabled is True
    assert s.shadow_mode is False
    assert s.trip_threshold == 100
    assert s.trip_window_ms == 1000
    assert s.gate_timeout_ms == 50
    assert s.auth_token == ""
    assert s.log_format == "json"


def test_parsing() -> None:
    s = Settings.from_env(
        {
            "MOLLIFIER_ENABLED": "off",
            "MOLLIFIER_SHADOW_MODE": "YES",
            "MOLLIFIER_TRIP_THRESHOLD": " 2_000 ",
            "MOLLIFIER_LISTEN": "0.0.0.0:6000",
            "MOLLIFIER_DRAIN_SINK": "external",
            "UNRELATED": "x",
        }
    )
    assert s.enabled is False
    assert s.shadow_mode is True
    assert s.trip_threshold == 2000
    assert s.listen == "0.0.0.0:6000"
    assert s.drain_sink == "external"


def test_overrides_win_over_environment() -> None:
    s = Settings.from_env({"MOLLIFIER_TRIP_THRESHOLD": "5"}, trip_threshold=7)
    assert s.trip_threshold == 7


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MOLLIFIER_TRIP_THRESHOLD": "lots"}, "MOLLIFIER_TRIP_THRESHOLD"),
        ({"MOLLIFIER_TRIP_THRESHOLD": "0"}, "MOLLIFIER_TRIP_THRESHOLD"),
        ({"MOLLIFIER_ENABLED": "maybe"}, "MOLLIFIER_ENABLED"),
        ({"MOLLIFIER_LISTEN": "nowhere"}, "MOLLIFIER_LISTEN"),
        ({"MOLLIFIER_LISTEN": "127.0.0.1:99999"}, "MOLLIFIER_LISTEN"),
        ({"MOLLIFIER_DRAIN_SINK": "s3"}, "MOLLIFIER_DRAIN_SINK"),
        ({"MOLLIFIER_LOG_LEVEL": "LOUD"}, "MOLLIFIER_LOG_LEVEL"),
        ({"MOLLIFIER_LOG_FORMAT": "xml"}, "MOLLIFIER_LOG_FORMAT"),
        ({"MOLLIFIER_TLS_CERT_FILE": "/c.pem"}, "MOLLIFIER_TLS_KEY_FILE"),
        ({"MOLLIFIER_DRAIN_LEASE_MS": "5"}, "MOLLIFIER_DRAIN_LEASE_MS"),
        ({"MOLLIFIER_METRICS_LISTEN": "9464"}, "MOLLIFIER_METRICS_LISTEN"),
        ({"MOLLIFIER_REDIS_URL": "http://127.0.0.1:6379"}, "MOLLIFIER_REDIS_URL"),
        ({"MOLLIFIER_REDIS_URL": "notaurl"}, "MOLLIFIER_REDIS_URL"),
        ({"MOLLIFIER_DATABASE_URL": "mysql://db/x"}, "MOLLIFIER_DATABASE_URL"),
        ({"MOLLIFIER_MAX_PAYLOAD_BYTES": "99999999999"}, "MOLLIFIER_MAX_PAYLOAD_BYTES"),
        ({"MOLLIFIER_MAX_METADATA_BYTES": "99999999999"}, "MOLLIFIER_MAX_METADATA_BYTES"),
    ],
)
def test_bad_values_fail_fast_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert named in str(caught.value)


def test_replace_is_checked() -> None:
    with pytest.raises(ConfigError, match="MOLLIFIER_TRIP_WINDOW_MS"):
        Settings.from_env({}).replace(trip_window_ms=1)


def test_redacted_hides_secrets() -> None:
    s = Settings.from_env(
        {},
        auth_token="hunter2",
        redis_url="redis://:rpass@localhost:6379/0",
        database_url="postgresql://app:pgpass@db/app",
    )
    shown = json.dumps(s.redacted())
    assert "hunter2" not in shown
    assert "rpass" not in shown
    assert "pgpass" not in shown


def test_settings_table_covers_every_field() -> None:
    names = [name for name, _, _ in settings_table()]
    assert names == [f"MOLLIFIER_{f.name.upper()}" for f in dataclasses.fields(Settings)]
    assert all(description for _, _, description in settings_table())


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `(MOLLIFIER_[A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    missing = [name for name, _, _ in settings_table() if name not in rows]
    assert not missing, f"README settings table lacks {missing}"


def test_json_logs_carry_fields_and_drop_secrets() -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    try:
        logging.getLogger("mollifier.test").info(
            "decided",
            extra={"env_id": "env_1", "decision": "MOLLIFY", "auth_token": "t0p", "payload": "p"},
        )
        logging.getLogger("mollifier.test").debug("not shown")
    finally:
        setup_logging("WARNING", "text")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["msg"] == "decided"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "mollifier.test"
    assert entry["env_id"] == "env_1"
    assert entry["decision"] == "MOLLIFY"
    assert "ts" in entry
    assert "t0p" not in lines[0]
    assert "payload" not in entry


def test_drain_batch_size_has_a_ceiling() -> None:
    # A lease moves a whole batch in one Lua call; thousands would overflow it.
    with pytest.raises(ConfigError, match="MOLLIFIER_DRAIN_BATCH_SIZE=5000: must be at most 1000"):
        Settings.from_env({"MOLLIFIER_DRAIN_BATCH_SIZE": "5000"})
