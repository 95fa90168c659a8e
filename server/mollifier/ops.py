"""The operator's commands: ``status``, ``inspect`` and ``drain ...``.

They talk to a running sidecar through the bundled client (``mollifier_client``)
at ``--target`` (default: ``MOLLIFIER_LISTEN``), with ``--token`` (default:
``MOLLIFIER_AUTH_TOKEN``). Every failure ends in one line on stderr and an exit
code that says whose fault it is (see ``EXIT_*``), so scripts and on-call
humans can tell a sidecar that is down from one whose Redis is down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from google.protobuf import json_format
from mollifier_client import Client, MollifierError, RetryPolicy, UnavailableError
from mollifier_client.v1 import drain_pb2, run_pb2

__all__ = [
    "EXIT_REFUSED",
    "EXIT_STORES",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "add_commands",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_STORES = 5
EXIT_TIMEOUT = 6

# Reasons the sidecar gives when its own stores fail (errors.classify).
_STORE_REASONS = frozenset(
    {"REDIS_UNAVAILABLE", "POSTGRES_UNAVAILABLE", "STORES_UNAVAILABLE", "TIMEOUT"}
)


class CommandError(Exception):
    """Ends a command with ``message`` on stderr and ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- connecting -------------------------------------------------------------------


def _default_target() -> str:
    listen = os.environ.get("MOLLIFIER_LISTEN", "").strip() or "127.0.0.1:50051"
    host, _, port = listen.rpartition(":")
    # A sidecar listening on every interface is dialled on this machine.
    if host in ("0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=None,
        help="the sidecar's host:port [default: MOLLIFIER_LISTEN, else 127.0.0.1:50051; "
        "0.0.0.0 is dialled as 127.0.0.1]",
    )
    g.add_argument(
        "--token",
        default=None,
        help="bearer token [default: MOLLIFIER_AUTH_TOKEN]",
    )
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root CAs")
    g.add_argument("--ca-file", help="PEM CA of the sidecar's certificate (implies --tls)")
    g.add_argument("--cert-file", help="PEM client certificate, for mutual TLS")
    g.add_argument("--key-file", help="PEM client key, for mutual TLS")
    g.add_argument(
        "--deadline",
        type=float,
        default=5.0,
        help="seconds each call may take, retries included [default: 5]",
    )
    return p


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Client]:
    target = args.target or _default_target()
    token = args.token if args.token is not None else os.environ.get("MOLLIFIER_AUTH_TOKEN", "")
    args.resolved_target = target
    client = Client.connect(
        target,
        token=token or None,
        tls=bool(args.tls),
        root_certificates=args.ca_file,
        client_certificate=args.cert_file,
        client_private_key=args.key_file,
        default_timeout=args.deadline,
        # Few quick retries: an operator wants the answer "down" fast.
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.5),
    )
    try:
        yield client
    finally:
        client.close()


def _explain(err: MollifierError, target: str) -> CommandError:
    """One line, and the exit code, for a failed call."""
    what = f"{err.reason}: {err.message}" if err.reason != err.code.name else err.message
    if err.reason in _STORE_REASONS:
        return CommandError(
            f"the sidecar at {target} is up but its store is not ({what})", EXIT_STORES
        )
    if isinstance(err, UnavailableError) or err.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return CommandError(
            f"cannot reach the sidecar at {target} ({err.code.name}: {err.message.strip()}); "
            "is it running? set --target or MOLLIFIER_LISTEN",
            EXIT_UNREACHABLE,
        )
    if err.code.name == "UNAUTHENTICATED":
        return CommandError(
            f"the sidecar at {target} refused the token; set --token or MOLLIFIER_AUTH_TOKEN",
            EXIT_REFUSED,
        )
    fields = "; ".join(f"{f}: {d}" for f, d in err.field_violations)
    detail = f" ({fields})" if fields else ""
    return CommandError(f"{err.code.name}: {err.message}{detail}", EXIT_REFUSED)


def _run(body: Callable[[argparse.Namespace, Client], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return body(args, client)
        except MollifierError as err:
            failure = _explain(err, getattr(args, "resolved_target", "?"))
        except CommandError as err:
            failure = err
        except OSError as err:  # e.g. an unreadable --ca-file
            failure = CommandError(str(err), EXIT_FAILED)
        print(f"mollifier: {failure}", file=sys.stderr)
        return failure.code

    return handler


# -- formatting ---------------------------------------------------------------------


def _age(seconds: float) -> str:
    if seconds < 1:
        return "0s" if seconds <= 0 else f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ts(msg: Any) -> str:
    if not msg.seconds and not msg.nanos:
        return "-"
    text: str = msg.ToJsonString()
    return text


def _opt_ts(msg: Any) -> str:
    return "" if not msg.seconds and not msg.nanos else _ts(msg)


def _until(ts: Any, now: float) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    left = ts.seconds + ts.nanos / 1e9 - now
    return f"{_ts(ts)} (in {_age(left)})" if left > 0 else "-"


def _table(headers: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def _state_name(state: int) -> str:
    return str(drain_pb2.DrainState.Name(state)).removeprefix("DRAIN_STATE_").lower()


def _json(msg: Any) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=2)


# -- status -------------------------------------------------------------------------


def _status(args: argparse.Namespace, client: Client) -> int:
    resp = client.get_status(org_id=args.org or "")
    if args.json:
        print(_json(resp))
        return EXIT_OK
    print(
        f"drainer {_state_name(resp.state)}; in flight {resp.in_flight}; "
        f"materialized {resp.materialized_total}; failed {resp.failed_total}; "
        f"stale {resp.stale_entries}; oldest {_age(resp.oldest_age.ToMilliseconds() / 1000)}"
    )
    now = time.time()
    rows = [
        [
            org.org_id,
            env.env_id,
            str(env.queued),
            _age(env.oldest_age.ToMilliseconds() / 1000),
            _until(env.tripped_until, now),
            str(env.draining),
            str(env.failed),
        ]
        for org in resp.orgs
        for env in org.envs
    ]
    if not rows:
        print("the buffer is empty")
        return EXIT_OK
    _table(
        ["ORG", "ENV", "QUEUED", "OLDEST", "TRIPPED UNTIL", "IN FLIGHT", "FAILED"],
        rows,
        sys.stdout,
    )
    return EXIT_OK


# -- inspect ------------------------------------------------------------------------


def _describe_run(run: run_pb2.Run) -> list[tuple[str, str]]:
    snap = run.snapshot
    status = str(run_pb2.RunStatus.Name(run.status)).removeprefix("RUN_STATUS_")
    source = str(run_pb2.RunSource.Name(run.source)).removeprefix("RUN_SOURCE_").lower()
    rows = [
        ("run_id", run.run_id),
        ("env_id", run.env_id),
        ("org_id", snap.org_id),
        ("task", snap.task_identifier),
        ("status", status),
        ("source", source),
        ("created_at", _ts(run.created_at)),
        ("attempts", str(run.attempts)),
    ]
    optional: list[tuple[str, str]] = [
        ("last_error", run.last_error),
        ("idempotency_key", snap.idempotency_key),
        ("idempotency_expires", _opt_ts(snap.idempotency_key_expires_at)),
        ("delay_until", _opt_ts(snap.delay_until)),
        ("ttl", f"{snap.ttl.ToMilliseconds() / 1000:g}s" if snap.HasField("ttl") else ""),
        ("queue", snap.queue),
        ("concurrency_key", snap.concurrency_key),
        ("machine_preset", snap.machine_preset),
        ("tags", ", ".join(snap.tags)),
        ("parent_run_id", snap.parent_run_id),
        ("root_run_id", snap.root_run_id),
        ("batch", f"{snap.batch_id} #{snap.batch_index}" if snap.batch_id else ""),
        ("trace_id", snap.trace_id),
        ("max_attempts", str(snap.max_attempts) if snap.max_attempts else ""),
        ("priority", str(snap.priority) if snap.priority else ""),
        (
            "payload",
            f"{len(snap.payload)} bytes {snap.payload_type}".strip() if snap.payload else "",
        ),
        ("metadata", snap.metadata.decode("utf-8", "replace") if snap.metadata else ""),
        ("extra", ", ".join(f"{k}={v}" for k, v in sorted(snap.extra.items()))),
    ]
    rows.extend((k, v) for k, v in optional if v)
    return rows


def _inspect(args: argparse.Namespace, client: Client) -> int:
    run = client.get_run(env_id=args.env, run_id=args.run_id).run
    if args.json:
        print(_json(run))
        return EXIT_OK
    rows = _describe_run(run)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


# -- drain --------------------------------------------------------------------------


def _pause(args: argparse.Namespace, client: Client) -> int:
    client.pause(reason=args.reason or "")
    print("drainers paused")
    return EXIT_OK


def _resume(args: argparse.Namespace, client: Client) -> int:
    client.resume()
    print("drainers resumed")
    return EXIT_OK


def _failed(args: argparse.Namespace, client: Client) -> int:
    runs: list[run_pb2.Run] = []
    token = ""
    while True:
        page = client.list_failed(env_id=args.env, page_size=1000, page_token=token)
        runs.extend(page.runs)
        token = page.next_page_token
        if not token or (args.limit and len(runs) >= args.limit):
            break
    if args.limit:
        runs = runs[: args.limit]
    if args.json:
        print(json.dumps([json.loads(_json(r)) for r in runs], indent=2))
        return EXIT_OK
    if not runs:
        print(f"no failed runs in {args.env}")
        return EXIT_OK
    rows = [
        [r.run_id, r.snapshot.task_identifier, str(r.attempts), _ts(r.created_at), r.last_error]
        for r in runs
    ]
    _table(["RUN", "TASK", "ATTEMPTS", "CREATED", "LAST ERROR"], rows, sys.stdout)
    return EXIT_OK


def _retry(args: argparse.Namespace, client: Client) -> int:
    # One id for the call and its client-side retries: applied once.
    resp = client.retry_failed(
        env_id=args.env, run_ids=list(args.run_ids), request_id="cli-" + uuid.uuid4().hex
    )
    print(f"requeued {resp.retried} run{'s' if resp.retried != 1 else ''}")
    return EXIT_OK


def _remaining(resp: drain_pb2.GetStatusResponse) -> int:
    return sum(env.queued + env.draining for org in resp.orgs for env in org.envs)


def _bar(done: int, total: int, width: int = 30) -> str:
    frac = 1.0 if total <= 0 else min(1.0, done / total)
    filled = int(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {frac * 100:5.1f}%"


def _wait(args: argparse.Namespace, client: Client) -> int:
    out = sys.stdout
    bar = args.progress == "bar" or (args.progress == "auto" and out.isatty())
    started = time.monotonic()
    deadline = started + args.timeout if args.timeout else None
    total = 0
    last_line = ""
    last_printed = 0.0
    first_left = -1
    while True:
        left = _remaining(client.get_status(org_id=args.org or ""))
        if first_left < 0:
            first_left = left
        # Runs keep arriving while we wait: the bar's 100% grows with them.
        total = max(total, left)
        done = total - left
        elapsed = time.monotonic() - started
        rate = (first_left - left) / elapsed if elapsed > 0 and first_left > left else 0.0
        eta = f", about {_age(left / rate)} left" if rate > 0 and left else ""
        line = f"{left} buffered, {done} drained{eta}"
        if bar:
            out.write(f"\r{_bar(done, total)} {line}\x1b[K")
            out.flush()
        elif line != last_line and (left == 0 or time.monotonic() - last_printed >= args.every):
            print(f"{time.strftime('%H:%M:%S')} {line}", file=out, flush=True)
            last_line, last_printed = line, time.monotonic()
        if left == 0:
            if bar:
                out.write("\n")
            print("the buffer is empty", file=out, flush=True)
            return EXIT_OK
        if deadline is not None and time.monotonic() >= deadline:
            if bar:
                out.write("\n")
            raise CommandError(
                f"timed out after {args.timeout:g}s with {left} runs still buffered", EXIT_TIMEOUT
            )
        time.sleep(args.interval)


# -- the parser ---------------------------------------------------------------------


def add_commands(sub: Any, exit_help: str) -> None:
    """Add ``status``, ``inspect`` and ``drain`` to the ``mollifier`` parser."""
    conn = _connection_parent()
    fmt = argparse.RawDescriptionHelpFormatter

    def add(
        parent: Any, name: str, help_: str, body: Callable[[argparse.Namespace, Client], int]
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help_,
            description=help_[0].upper() + help_[1:] + ".",
            parents=[conn],
            epilog=exit_help,
            formatter_class=fmt,
        )
        p.set_defaults(handler=_run(body))
        return p

    p = add(
        sub,
        "status",
        "show the buffer per org and env: queued, oldest age, tripped until, in flight, failed",
        _status,
    )
    p.add_argument("--org", help="only this org")
    p.add_argument("--json", action="store_true", help="print GetStatus as JSON")

    p = add(sub, "inspect", "show one run, from Postgres or the buffer", _inspect)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--env", required=True, help="the run's env id")
    p.add_argument("--json", action="store_true", help="print the Run as JSON")

    drain = sub.add_parser(
        "drain",
        help="pause, resume or wait for the drainer; list or retry dead letters",
        description="Control the drainers of every sidecar on this Redis.",
        epilog=exit_help,
        formatter_class=fmt,
    )
    dsub = drain.add_subparsers(dest="drain_command", metavar="ACTION", required=True)
    p = add(
        dsub, "pause", "stop the built-in drainers from leasing (in-flight batches finish)", _pause
    )
    p.add_argument("--reason", help="why; shown in logs")
    add(dsub, "resume", "let the built-in drainers lease again", _resume)
    p = add(dsub, "failed", "list an env's dead-lettered runs", _failed)
    p.add_argument("--env", required=True, help="env id")
    p.add_argument("--limit", type=int, default=0, help="show at most this many")
    p.add_argument("--json", action="store_true", help="print the runs as JSON")
    p = add(
        dsub,
        "retry",
        "put an env's dead-lettered runs back in its queue (all of them, or the RUN_IDs)",
        _retry,
    )
    p.add_argument("--env", required=True, help="env id")
    p.add_argument("run_ids", metavar="RUN_ID", nargs="*")
    p = add(
        dsub,
        "wait",
        "wait until nothing is queued or in flight (dead letters do not count), with a "
        "progress bar on a terminal",
        _wait,
    )
    p.add_argument("--org", help="only this org's runs")
    p.add_argument(
        "--timeout", type=float, default=0, help="give up (exit 6) after this many seconds"
    )
    p.add_argument(
        "--interval", type=float, default=0.5, help="seconds between polls [default: 0.5]"
    )
    p.add_argument(
        "--every",
        type=float,
        default=5.0,
        help="without a terminal: seconds between progress lines [default: 5]",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "lines"),
        default="auto",
        help="a live bar, plain lines, or a bar only on a terminal [default: auto]",
    )
