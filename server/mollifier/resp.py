"""A lean pipelined Redis connection for the gate's hot path.

Every gate decision is one EVALSHA. Through redis-py each call pays for a
pooled connection checkout, a command object, its own write and read and the
response callbacks: more CPU than the gRPC call around it. Here every call
made during one event-loop turn goes out in one ``write`` on one connection,
and hiredis parses the replies in the order they come back, each to the
future of the call that sent it (Redis answers a connection in order).

Nothing is retried blindly. A script Redis does not know (NOSCRIPT, after a
restart or SCRIPT FLUSH) is loaded and that call alone sent again; a lost
connection fails every call still waiting on it (the gate fails open) and the
next call connects again. A connection that stops answering for longer than
``stall_after`` seconds while calls wait is dropped and replaced, so a
half-open TCP connection cannot hold the gate in FAIL_OPEN for long.

Not for Redis Cluster (one connection cannot reach every slot): callers use
redis-py there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import (
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from .scripts import Scripts

__all__ = ["Batch", "DirectPipeline"]

Arg = str | bytes | int | float

# Calls waiting at once beyond which new calls fail at once: a Redis that has
# stopped answering must not make the waiting list grow without bound.
MAX_WAITING = 50_000


def _stalled_error() -> RedisConnectionError:
    return RedisConnectionError("Redis stopped answering on this connection")

# The URL's ssl_* options RedisSSLContext takes (as redis-py's SSLConnection does).
_SSL_OPTIONS = (
    "keyfile",
    "certfile",
    "cert_reqs",
    "include_verify_flags",
    "exclude_verify_flags",
    "ca_certs",
    "ca_data",
    "ca_path",
    "check_hostname",
    "min_version",
    "ciphers",
    "password",
)


class Batch:
    """What a ``build`` function queues commands on: the redis-py pipeline
    methods the gate uses, each packed straight into RESP."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Batch:
        self.chunks.append(_pack(("EVALSHA", sha, numkeys, *keys_and_args)))
        return self

    def sadd(self, key: str, *members: Arg) -> Batch:
        self.chunks.append(_pack(("SADD", key, *members)))
        return self

    def zrem(self, key: str, *members: Arg) -> Batch:
        self.chunks.append(_pack(("ZREM", key, *members)))
        return self


class _Call:
    """One submitted group of commands and the replies gathered for it.

    A call sent again after NOSCRIPT carries only the commands that met it
    (``slots``: their places among the first call's replies, ``base``).
    """

    __slots__ = ("base", "build", "chunks", "fut", "replies", "retried", "size", "slots")

    def __init__(
        self, build: Callable[[Any], object] | bytes, size: int, fut: asyncio.Future[list[Any]]
    ) -> None:
        self.build = build
        self.size = size
        self.fut = fut
        self.replies: list[Any] = []
        self.retried = False
        # The packed commands as last sent (None: ``build`` is the one command).
        self.chunks: list[bytes] | None = None
        self.slots: list[int] | None = None
        self.base: list[Any] | None = None


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (hiredis's stub types its argument as a 1-tuple)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


def _convert(reply: Any) -> Any:
    """hiredis hands error replies back as values; make them redis-py's errors."""
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        if text.startswith("NOSCRIPT"):
            return NoScriptError(text)
        return ResponseError(text)
    return reply


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: DirectPipeline) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.owner._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost(self, exc)


class DirectPipeline:
    """Submit groups of commands; all submitted in one loop turn share one write.

    ``submit(build, size)`` is the same interface as ``scripts.AutoPipeline``:
    ``build(batch)`` queues ``size`` commands on a :class:`Batch`, and the
    returned future gets their replies, in order, or the first error.
    """

    usable = True

    def __init__(
        self,
        url: str,
        scripts: Scripts,
        *,
        connect_timeout: float = 2.0,
        stall_after: float = 2.0,
        retry_connect_after: float = 0.1,
        max_in_flight: int = 1,
        timeout: float,
    ) -> None:
        self.url = url
        self.scripts = scripts
        self.connect_timeout = connect_timeout
        self.stall_after = stall_after
        self.retry_connect_after = retry_connect_after
        # While this many writes wait for their replies, new calls wait too and
        # then go out together: batches grow with the load (as Nagle's
        # algorithm does), and an idle gate still sends at once. gRPC hands
        # each RPC to its own loop turn, so without this every call would be a
        # write and a read of its own.
        self.max_in_flight = max_in_flight
        # Every call fails with TimeoutError ``timeout`` seconds after it was
        # submitted. One timeout for all calls keeps their deadlines in submit
        # order, so one timer (armed for the oldest) serves them all, instead
        # of a timer handle and a context manager per call. It is required:
        # the timer is also what notices a connection gone silent when no new
        # call comes, so without it a call could wait forever.
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.timeout = timeout
        self._deadlines: collections.deque[tuple[float, asyncio.Future[list[Any]]]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None
        # Per write still being answered: how many of its calls are unanswered.
        self._writes: collections.deque[int] = collections.deque()
        self._target = self._parse(url)
        self._proto: _Protocol | None = None
        self._reader: Any = None
        self._connecting: asyncio.Task[None] | None = None
        self._failed_at = -1e9
        self._last_error: BaseException | None = None
        self._queued: list[_Call] = []
        self._waiting: collections.deque[_Call] = collections.deque()
        self._scheduled = False
        self._progress_at = 0.0
        self._connected_at = 0.0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running(self) -> asyncio.AbstractEventLoop:
        """The loop the connection lives on, looked up once: on Python 3.11
        asyncio.get_running_loop() makes a getpid() system call every time,
        and a gate decision needed several."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # -- the public surface ----------------------------------------------------

    def submit(
        self, build: Callable[[Any], object] | bytes, size: int
    ) -> asyncio.Future[list[Any]]:
        """Queue ``build``'s ``size`` commands; the future gets their replies.

        ``build`` may also be one command already packed (bytes, size 1).
        """
        # Replies are matched to calls by count: a wrong count would hand
        # every later caller someone else's reply.
        if size < 1 or (type(build) is bytes and size != 1):
            raise ValueError(f"a call of {size} commands cannot be matched to its replies")
        loop = self._running()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        if self._closed:
            fut.set_exception(RedisConnectionError("the connection is closed"))
            return fut
        if len(self._waiting) + len(self._queued) >= MAX_WAITING:
            # Calls that timed out still sit in the lists until sent or answered.
            self._queued = [c for c in self._queued if not c.fut.done()]
            if self._stalled(loop.time()):
                # Full behind a silent connection: replace it now (see _flush).
                self._abort(_stalled_error())
            if len(self._waiting) + len(self._queued) >= MAX_WAITING:
                fut.set_exception(RedisConnectionError("too many calls waiting for Redis"))
                return fut
        self._queued.append(_Call(build, size, fut))
        deadline = loop.time() + self.timeout
        self._deadlines.append((deadline, fut))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        if len(self._writes) < self.max_in_flight or self._stalled(loop.time()):
            # Held back behind unanswered writes unless they look dead, in
            # which case _flush replaces the connection first.
            self._schedule(loop)
        return fut

    def _stalled(self, now: float) -> bool:
        """Calls wait on a connection that has answered nothing for too long."""
        return bool(self._waiting) and now - self._progress_at > self.stall_after

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run _flush on the next loop turn (once, however often asked)."""
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _fail_queued(self, error: BaseException) -> None:
        """Fail every call not yet sent."""
        calls, self._queued = self._queued, []
        for call in calls:
            if not call.fut.done():
                call.fut.set_exception(error)

    def _expire(self) -> None:
        """Fail the calls whose deadline has passed; re-arm for the next one."""
        self._timer = None
        loop = self._running()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines:
            deadline, fut = deadlines[0]
            if fut.done():
                deadlines.popleft()
            elif deadline <= now:
                deadlines.popleft()
                fut.set_exception(TimeoutError("no answer from Redis in time"))
            else:
                self._timer = loop.call_at(deadline, self._expire)
                break
        # Callers timing out is how a silent connection shows itself even
        # when no new call comes to notice it.
        if self._stalled(now):
            self._schedule(loop)

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        closed = RedisConnectionError("the connection is closed")
        self._drop(closed)
        self._fail_queued(closed)

    # -- sending ---------------------------------------------------------------

    def _flush(self) -> None:
        self._scheduled = False
        loop = self._running()
        now = loop.time()
        proto = self._proto
        if proto is not None and self._stalled(now):
            # Calls have waited too long with nothing coming back: drop the
            # connection (its calls fail) and send the new ones on a fresh one.
            self._abort(_stalled_error())
            proto = None
        if not self._queued:
            return
        if self._connecting is not None:
            # Nothing goes out before the handshake is answered: behind a
            # failed AUTH or SELECT a call would run unauthenticated or in the
            # wrong database. _connect sends the queue when it is done.
            return
        if proto is None or proto.transport is None:
            self._connect_soon(loop, now)
            return
        if len(self._writes) >= self.max_in_flight:
            return  # sent when a write's replies are in (see _on_data)
        calls, self._queued = self._queued, []
        self._send(proto, calls, now)

    def _send(self, proto: _Protocol, calls: Sequence[_Call], now: float) -> None:
        batch = Batch()
        sent = 0
        for call in calls:
            if call.fut.done():  # its caller gave up before it went out
                continue
            build = call.build
            if type(build) is bytes:  # one command, packed by the caller
                batch.chunks.append(build)
            else:
                before = len(batch.chunks)
                try:
                    build(batch)  # type: ignore[operator]
                    queued = len(batch.chunks) - before
                    if queued != call.size:
                        raise AssertionError(f"queued {queued} commands, not {call.size}")
                except Exception as exc:
                    del batch.chunks[before:]
                    call.fut.set_exception(exc)
                    continue
                call.chunks = batch.chunks[before:]
            call.replies = []
            self._waiting.append(call)
            sent += 1
        if not sent:
            return
        self._writes.append(sent)
        if len(self._waiting) == sent:
            # Nothing was outstanding: the stall clock starts now.
            self._progress_at = now
        assert proto.transport is not None
        proto.transport.write(b"".join(batch.chunks))

    # -- receiving -------------------------------------------------------------

    def _on_data(self, proto: _Protocol, data: bytes) -> None:
        if proto is not self._proto:
            return
        self._progress_at = self._running().time()
        reader = self._reader
        reader.feed(data)
        resend: list[_Call] = []
        waiting = self._waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                # Not Redis, or a corrupt stream: fail everything, back off.
                self._stream_broken(resend, RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                break
            if not waiting:
                # A reply nobody asked for: the stream is out of step; start over.
                self._stream_broken(resend, RedisConnectionError("unexpected reply from Redis"))
                return
            call = waiting[0]
            call.replies.append(_convert(reply))
            if len(call.replies) < call.size:
                continue
            waiting.popleft()
            writes = self._writes
            writes[0] -= 1
            if not writes[0]:
                writes.popleft()
            self._settle(call, resend)
        if resend:
            self._resend(proto, resend)
        if self._queued and not self._scheduled and len(self._writes) < self.max_in_flight:
            # A write is answered: what queued up behind it goes out now, as one.
            self._flush()

    def _stream_broken(self, resend: list[_Call], error: BaseException) -> None:
        loop = self._running()
        for call in resend:
            if not call.fut.done():
                call.fut.set_exception(error)
        self._failed_at = loop.time()
        self._last_error = error
        self._abort(error)
        if self._queued:
            self._schedule(loop)

    def _settle(self, call: _Call, resend: list[_Call]) -> None:
        replies = call.replies
        if not call.retried and any(isinstance(r, NoScriptError) for r in replies):
            resend.append(call)
            return
        if call.slots is not None:
            # A resend's replies go back to their places among the first ones.
            assert call.base is not None
            merged = call.base
            for i, reply in zip(call.slots, replies, strict=True):
                merged[i] = reply
            replies = merged
        if call.fut.done():  # the caller's deadline passed; the reply is dropped
            return
        error = next((r for r in replies if isinstance(r, Exception)), None)
        if error is not None:
            call.fut.set_exception(error)
        else:
            call.fut.set_result(replies)

    def _resend(self, proto: _Protocol, calls: list[_Call]) -> None:
        """Load every script, then send again, on the same connection, just the
        commands that met NOSCRIPT: Redis runs the loads first, so the second
        EVALSHA finds its script. A command that ran is never sent twice (in a
        large call, another client's SCRIPT LOAD or FLUSH can land between two
        of its commands, so some may have run and others not)."""
        loads = [s.source for s in self.scripts.by_name.values()]

        def load(batch: Any) -> None:
            for source in loads:
                batch.chunks.append(_pack(("SCRIPT", "LOAD", source)))

        loop = self._running()
        ignored: asyncio.Future[list[Any]] = loop.create_future()
        ignored.add_done_callback(_consume)
        again = [_Call(load, len(loads), ignored)]
        for call in calls:
            if call.fut.done():
                continue
            if call.chunks is not None:
                sent = call.chunks
            else:
                assert isinstance(call.build, bytes)
                sent = [call.build]
            slots = [i for i, r in enumerate(call.replies) if isinstance(r, NoScriptError)]
            chunks = [sent[i] for i in slots]

            def build(batch: Any, chunks: list[bytes] = chunks) -> None:
                batch.chunks.extend(chunks)

            retry = _Call(build, len(slots), call.fut)
            retry.retried = True
            retry.slots = slots
            retry.base = call.replies
            again.append(retry)
        self._send(proto, again, loop.time())

    # -- connecting ------------------------------------------------------------

    def _connect_soon(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        if self._connecting is not None:
            return  # the calls go out when it is up
        if now - self._failed_at < self.retry_connect_after:
            # Redis refused a moment ago: fail fast instead of queueing
            # behind a connect that is likely to fail again.
            self._fail_queued(self._last_error or RedisConnectionError("Redis is unreachable"))
            return
        self._connecting = loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = self._running()
        try:
            async with asyncio.timeout(self.connect_timeout):
                proto = await self._open(loop)
                self._proto = proto
                self._reader = hiredis.Reader()
                self._connected_at = loop.time()
                hello = self._handshake()
                if hello:
                    fut: asyncio.Future[list[Any]] = loop.create_future()
                    chunks = hello

                    def build(batch: Any) -> None:
                        batch.chunks.extend(chunks)

                    self._send(proto, [_Call(build, len(hello), fut)], loop.time())
                    await fut
        except BaseException as exc:
            self._failed_at = loop.time()
            self._last_error = (
                exc
                if isinstance(exc, RedisConnectionError | ResponseError)
                else RedisConnectionError(f"cannot connect to Redis: {exc!r}")
            )
            # Calls already sent behind a failed handshake fail with it.
            self._abort(self._last_error)
            self._fail_queued(self._last_error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self._connecting = None
        if self._queued:
            self._schedule(loop)

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        t = self._target
        proto = _Protocol(self)
        if t["path"]:
            await loop.create_unix_connection(lambda: proto, t["path"])
        else:
            await loop.create_connection(
                lambda: proto,
                t["host"],
                t["port"],
                ssl=t["ssl"],
                server_hostname=t["host"] if t["ssl"] else None,
            )
        return proto

    def _handshake(self) -> list[bytes]:
        t = self._target
        out: list[bytes] = []
        if t["password"] is not None:
            if t["username"]:
                out.append(_pack(("AUTH", t["username"], t["password"])))
            else:
                out.append(_pack(("AUTH", t["password"])))
        if t["db"]:
            out.append(_pack(("SELECT", t["db"])))
        return out

    @staticmethod
    def _parse(url: str) -> dict[str, Any]:
        kw: dict[str, Any] = dict(parse_url(url))
        cls = kw.get("connection_class")
        target: dict[str, Any] = {
            "host": kw.get("host", "localhost"),
            "port": int(kw.get("port") or 6379),
            "path": kw.get("path") if cls is UnixDomainSocketConnection else None,
            "db": int(kw.get("db") or 0),
            "username": kw.get("username"),
            "password": kw.get("password"),
            "ssl": None,
        }
        if cls is SSLConnection:
            # redis-py's own builder, from the same URL options, so the gate's
            # connection is made exactly as the rest of the sidecar's.
            # The same defaults as SSLConnection: verify the certificate and host.
            options: dict[str, Any] = {"cert_reqs": "required", "check_hostname": True}
            options.update(
                (name, kw[f"ssl_{name}"]) for name in _SSL_OPTIONS if f"ssl_{name}" in kw
            )
            target["ssl"] = RedisSSLContext(**options).get()
        return target

    # -- losing the connection -------------------------------------------------

    def _on_lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        now = self._running().time()
        if now - self._connected_at < 1.0:
            # Accepted, then closed at once (maxclients, a proxy without its
            # backend): back off like a refused connect, not a connect per turn.
            self._failed_at = now
            self._last_error = RedisConnectionError(f"Redis closed the connection: {exc!r}")
        self._drop(RedisConnectionError(f"connection to Redis lost: {exc!r}"))
        if self._queued and not self._closed:
            self._schedule(self._running())

    def _abort(self, error: BaseException) -> None:
        proto = self._proto
        self._proto = None
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        self._drop(error)

    def _drop(self, error: BaseException) -> None:
        self._writes.clear()
        waiting, self._waiting = self._waiting, collections.deque()
        for call in waiting:
            if not call.fut.done():
                call.fut.set_exception(error)


def _consume(fut: asyncio.Future[list[Any]]) -> None:
    # The script loads' replies matter to nobody; read an error so asyncio
    # does not log it as never retrieved.
    if not fut.cancelled():
        fut.exception()
