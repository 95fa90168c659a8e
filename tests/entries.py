"""Reading and writing buffered entries as the scripts keep them, for tests that
look inside the buffer or damage it on purpose (lua/includes/entry.lua and
lua/includes/queue.lua give the layout)."""

from __future__ import annotations

from typing import Any

import msgpack
from mollifier.codec import ENTRY_PACKED as ENTRY_NAMES
from mollifier.keys import env_keys

__all__ = [
    "ENTRY_NAMES",
    "env_depth",
    "pack_entry",
    "queue_ids",
    "queue_scores",
    "read_entry",
    "set_entry",
    "set_members",
]


def pack_entry(fields: dict[str, Any]) -> bytes:
    """An entry packed as the scripts pack it; a name left out is not set.
    cmsgpack reads msgpack's str type only, so bytes are packed as str too."""
    values = [fields.get(n, False) for n in ENTRY_NAMES]
    values = [False if v is None else v for v in values]
    sc = values[2] if isinstance(values[2], int) and not isinstance(values[2], bool) else 0
    if isinstance(values[7], int) and not isinstance(values[7], bool):
        values[7] -= sc  # the version is packed as its distance from the arrival score
    packed: bytes = msgpack.packb(values, use_bin_type=False)
    return packed


async def read_entry(redis: Any, env_id: str, run_id: str) -> dict[str, Any] | None:
    """The run's entry by field name (only the fields that are set), or None."""
    raw = await redis.hget(env_keys(env_id).runs, run_id)
    if raw is None:
        return None
    values = msgpack.unpackb(raw, raw=True)
    fields = {n: v for n, v in zip(ENTRY_NAMES, values, strict=False) if v is not False}
    if isinstance(fields.get("v"), int):
        sc = fields.get("sc")
        fields["v"] += sc if isinstance(sc, int) else 0
    return fields


async def set_entry(redis: Any, env_id: str, run_id: str, **changes: Any) -> None:
    """Change fields of a run's entry (None unsets one), as HSET and HDEL did
    on the hash an entry once was; an entry that is not there is made."""
    fields = await read_entry(redis, env_id, run_id) or {}
    for name, value in changes.items():
        if name not in ENTRY_NAMES:
            raise KeyError(name)
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    await redis.hset(env_keys(env_id).runs, run_id, pack_entry(fields))


async def queue_scores(redis: Any, env_id: str) -> list[tuple[str, int]]:
    """The queued runs in lease order, with their arrival scores: the back set by
    score, then the LIST."""
    k = env_keys(env_id)
    out = [(m.decode(), int(s)) for m, s in await redis.zrange(k.back, 0, -1, withscores=True)]
    for raw in await redis.lrange(k.queue, 0, -1):
        run_id = raw.decode()
        entry = await read_entry(redis, env_id, run_id)
        out.append((run_id, int(entry["sc"]) if entry and "sc" in entry else -1))
    return out


async def queue_ids(redis: Any, env_id: str) -> list[str]:
    """The queued run ids in lease order."""
    return [run_id for run_id, _ in await queue_scores(redis, env_id)]


async def env_depth(redis: Any, env_id: str) -> int:
    """Every run the env holds: queued (LIST and back set), leased, retrying, failed."""
    k = env_keys(env_id)
    total = int(await redis.llen(k.queue))
    for key in (k.back, k.lease, k.retry, k.failed):
        total += int(await redis.zcard(key))
    return total


async def set_members(redis: Any, env_id: str) -> dict[str, list[str]]:
    """run id -> the sets it is in: q (LIST), b (back), l, r, f."""
    k = env_keys(env_id)
    where: dict[str, list[str]] = {}
    for raw in await redis.lrange(k.queue, 0, -1):
        where.setdefault(raw.decode(), []).append("q")
    for name, key in (("b", k.back), ("l", k.lease), ("r", k.retry), ("f", k.failed)):
        for member in await redis.zrange(key, 0, -1):
            where.setdefault(member.decode(), []).append(name)
    return where
