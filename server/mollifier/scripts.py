"""The Lua scripts in ``lua/``: loaded once, called by SHA, reloaded on NOSCRIPT.

A script may pull shared code in with a line ``--- @include "includes/name"``;
the include is pasted in place before hashing, so each script is still one
self-contained EVAL body.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

__all__ = ["AutoPipeline", "Script", "Scripts", "load_scripts", "script_names"]

_INCLUDE = re.compile(r'^--- @include "([a-z_/]+)"\s*$', re.MULTILINE)


def script_names() -> list[str]:
    """Every top-level ``lua/*.lua`` file (includes live in ``lua/includes``)."""
    folder = resources.files("mollifier").joinpath("lua")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua"))


Arg = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script; call it with a client (or queue it on a pipeline)."""

    name: str
    source: str
    sha: str

    async def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or was flushed: load again and retry once.
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Add the call to a pipeline; ``Scripts.execute`` handles NOSCRIPT."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def _read(name: str) -> str:
    return resources.files("mollifier").joinpath("lua").joinpath(f"{name}.lua").read_text()


def _expand(source: str, seen: tuple[str, ...] = ()) -> str:
    def include(match: re.Match[str]) -> str:
        inc = match.group(1)
        if inc in seen:
            raise ValueError(f"include cycle at {inc}")
        return _expand(_read(inc), (*seen, inc))

    return _INCLUDE.sub(include, source)


class Scripts:
    """Every script by name, as attributes (``scripts.trigger``)."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.by_name: dict[str, Script] = {}
        for name in script_names() if names is None else names:
            body = _expand(_read(name))
            sha = hashlib.sha1(body.encode()).hexdigest()
            self.by_name[name] = Script(name, body, sha)

    def __getattr__(self, name: str) -> Script:
        try:
            return self.__dict__["by_name"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(name) from None

    async def load_all(self, client: Any) -> None:
        """SCRIPT LOAD every script (on every primary, for a cluster client)."""
        for script in self.by_name.values():
            await client.script_load(script.source)

    async def execute(self, client: Any, build: Any) -> list[Any]:
        """Run ``build(pipe)`` as one pipeline; on NOSCRIPT load all and send
        again just the commands that met it (see ``resend_noscript``).

        On a Redis Cluster client the commands run one by one, in order:
        redis-py refuses EVALSHA inside a cluster pipeline.
        """
        if isinstance(client, RedisCluster):
            seq = _Sequential(client, {s.sha: s for s in self.by_name.values()})
            build(seq)
            return await seq.execute()
        pipe = client.pipeline(transaction=False)
        build(pipe)
        stack = list(pipe.command_stack)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        await self.resend_noscript(client, stack, results)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    async def resend_noscript(
        self, client: Any, stack: Sequence[tuple[Any, ...]], results: list[Any]
    ) -> None:
        """Where ``results`` (the replies to a pipeline's ``command_stack``,
        ``stack``) hold NOSCRIPT: load every script and send those commands
        once more, putting their replies in place. Only those: in a large
        pipeline another client's SCRIPT LOAD or FLUSH can land between two
        commands, so some scripts may have run and others not, and a script
        that ran must not run twice (it would count a decision twice)."""
        slots = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if not slots:
            return
        await self.load_all(client)
        again = client.pipeline(transaction=False)
        for i in slots:
            args, options = stack[i]
            again.execute_command(*args, **options)
        replies = await again.execute(raise_on_error=False)
        for i, reply in zip(slots, replies, strict=True):
            results[i] = reply


class _Sequential:
    """Stands in for a pipeline on a cluster client: records the queued calls
    and runs them one at a time, each routed to its own slot's master. A
    script the node does not know (NOSCRIPT, e.g. a promoted replica) is loaded
    there and that one call is retried, so nothing that ran is run twice."""

    def __init__(self, client: Any, by_sha: dict[str, Script]) -> None:
        self._client = client
        self._by_sha = by_sha
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> _Sequential:
            self._calls.append((name, args, kwargs))
            return self

        return record

    async def execute(self) -> list[Any]:
        results: list[Any] = []
        for name, args, kwargs in self._calls:
            if name == "evalsha":
                script = self._by_sha[args[0]]
                results.append(
                    await script(self._client, args[2 : 2 + args[1]], args[2 + args[1] :])
                )
            else:
                results.append(await getattr(self._client, name)(*args, **kwargs))
        return results


_cached: Scripts | None = None


def load_scripts() -> Scripts:
    """The scripts, read from the package once per process."""
    global _cached
    if _cached is None:
        _cached = Scripts()
    return _cached


_Group = tuple[Callable[[Any], None], int, "asyncio.Future[list[Any]]"]


class AutoPipeline:
    """Coalesces concurrent callers' Redis calls into one pipeline per event-loop turn.

    Each caller submits a function that queues its commands on a pipeline and
    how many it queued; everything submitted during one turn of the loop is
    sent as one pipeline (one write, one read), and each caller gets its own
    slice of the replies. Under concurrency this trades a little latency for
    far less per-call client work, which is what the gate's hot path needs.

    Calls are only coalesced, never merged: each still runs as its own script
    in Redis, in the order submitted. A command whose script Redis does not
    know (NOSCRIPT) is sent again, with the others that failed so, after the
    scripts are loaded: nothing that ran is run twice. Not for cluster clients
    (redis-py refuses EVALSHA in a cluster pipeline); callers check ``usable``.
    """

    def __init__(
        self, client: Any, scripts: Scripts, max_batch: int = 256, max_in_flight: int = 2
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.max_batch = max_batch
        # While this many pipelines are out, new calls wait for one to come
        # back and then go together: batches grow with the load (as Nagle's
        # algorithm does), and an idle gate still sends at once.
        self.max_in_flight = max_in_flight
        self.usable = not isinstance(client, RedisCluster)
        self._queue: list[_Group] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, build: Callable[[Any], None], size: int) -> asyncio.Future[list[Any]]:
        """Queue ``build``'s ``size`` commands; the future gets their replies."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((build, size, fut))
        if not self._scheduled and len(self._tasks) < self.max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and len(self._tasks) < self.max_in_flight:
            groups, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            task = asyncio.ensure_future(self._send(groups))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, groups: list[_Group]) -> None:
        pending = [g for g in groups if not g[2].done()]
        if not pending:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for build, _, _ in pending:
                build(pipe)
            stack = list(pipe.command_stack)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            # Only the commands that met NOSCRIPT go again: nothing that ran
            # runs twice.
            await self.scripts.resend_noscript(self.client, stack, results)
        except Exception as exc:
            for _, _, fut in pending:
                if not fut.done():
                    fut.set_exception(exc)
            return
        pos = 0
        for _, size, fut in pending:
            part = results[pos : pos + size]
            pos += size
            if fut.done():  # the caller gave up (its deadline passed)
                continue
            error = next((r for r in part if isinstance(r, Exception)), None)
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(part)
