"""Memory: where a buffered run's Redis bytes go, layout by layout.

    .venv/bin/python bench/memory_layouts.py [--runs 50000] [--port PORT]

Without --port it starts its own redis-server (mollifier.devstack) and stops it
at the end. With --port it uses that server, which must hold no keys: it is
FLUSHALLed between layouts and at the end, and its two listpack settings are
put back afterwards (never point it at a shared Redis).

Each layout is written for every run into an emptied Redis and measured as the
INFO used_memory delta over all runs; hash-max-listpack-value and
zset-max-listpack-entries are set per layout with CONFIG SET. Snapshots are
bench/drain.py's, and the layout in use is written by the real accept.lua with
Buffer.accept_call's arguments. A second table compares codecs on the snapshot.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import struct
import sys
import tempfile
import time
import timeit
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import msgpack
import redis
from mollifier_client.v1 import run_pb2
from redis.client import Pipeline
from redis.typing import EncodableT

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "server"))

from mollifier.buffer import Buffer  # noqa: E402
from mollifier.codec import ENTRY_PACKED, full_snapshot  # noqa: E402
from mollifier.config import Settings  # noqa: E402
from mollifier.devstack import RedisProcess  # noqa: E402
from mollifier.keys import env_keys  # noqa: E402
from mollifier.scripts import Scripts  # noqa: E402

from bench.drain import ENVS, make_snapshots  # noqa: E402

HOST = "127.0.0.1"  # where RedisProcess binds

PIPE = 500  # commands per pipeline round trip while writing a layout

# The key type too: hset's mapping is a Mapping, invariant in its keys.
HashFields = dict[EncodableT, EncodableT]
Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


class Run:
    """One run as accept.lua would store it (values as the script writes them)."""

    __slots__ = ("ca", "env", "key", "org", "q", "rid", "s", "s_bare", "sc", "snap")

    def __init__(self, snap: run_pb2.RunSnapshot, ca: int, sc: int) -> None:
        k = env_keys(snap.env_id)
        self.snap = snap
        self.rid = snap.run_id
        self.env = snap.env_id
        self.org = snap.org_id
        self.key = k.old_run_prefix + snap.run_id  # the hash per run of earlier rounds
        self.q = k.queue
        self.s = snap.SerializeToString()
        bare = run_pb2.RunSnapshot()
        bare.CopyFrom(snap)
        bare.run_id = bare.env_id = bare.org_id = ""  # all three are in the key
        self.s_bare = bare.SerializeToString()
        self.ca = ca
        self.sc = sc

    def fields(self, snapshot: bytes, *, drop_empty: bool = False) -> HashFields:
        f: HashFields = {
            "s": snapshot, "st": "Q", "sc": self.sc, "ca": self.ca, "org": self.org,
            "du": 0, "ik": "", "at": 0, "v": 1,
        }  # fmt: skip
        if drop_empty:
            f = {n: v for n, v in f.items() if v not in (0, "")}
        return f

    def packed(self, snapshot: bytes, *, with_org: bool = True) -> bytes:
        """st sc ca du at v org ik, then the snapshot: one value (struct.unpack in Lua).
        With a 5-byte org id the header is 39 bytes; 34 without org (the env hash has it)."""
        org = self.org.encode() if with_org else b""
        return (
            struct.pack(">cqqqHIB", b"Q", self.sc, self.ca, 0, 0, 1, len(org)) + org
            + struct.pack(">H", 0) + snapshot
        )  # fmt: skip


Write = Callable[[Pipeline, Run], None]
Snapshot = Callable[[Run], bytes]


@dataclass(frozen=True)
class Layout:
    """One way of storing every run, and the Redis settings it is measured under."""

    name: str
    write: Write
    lp_value: int = 1024  # hash-max-listpack-value (RedisProcess's setting)
    zset_lp_entries: int = 128  # zset-max-listpack-entries (Redis's default)
    setup: Callable[[redis.Redis], None] | None = None


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def measure(r: redis.Redis, port: int, layout: Layout, runs: Sequence[Run]) -> float:
    """Mean used_memory bytes one run adds when every run is written as ``layout``."""
    r.flushall()  # synchronous: the previous layout is freed before the baseline
    r.config_set("hash-max-listpack-value", layout.lp_value)
    r.config_set("zset-max-listpack-entries", layout.zset_lp_entries)
    # A writer of its own, so closing it frees its query buffer before the
    # second reading, whereas r's buffers are in both readings.
    w = redis.Redis(host=HOST, port=port)
    w.ping()
    if layout.setup:
        layout.setup(w)
    time.sleep(0.2)  # let used_memory settle after the flush and the setup
    before = used(r)
    for i in range(0, len(runs), PIPE):
        pipe = w.pipeline(transaction=False)
        for run in runs[i : i + PIPE]:
            layout.write(pipe, run)
        pipe.execute()
    w.close()
    time.sleep(0.3)  # the server frees w's buffers when it reads the close, not at once
    return (used(r) - before) / len(runs)


def deflate(level: int, zdict: bytes = b"") -> Codec:
    """Raw deflate (no zlib header or checksum), with a preset dictionary if given."""

    # zlib.compressobj refuses zdict=None, so the argument is left out instead.
    opts: dict[str, bytes] = {"zdict": zdict} if zdict else {}

    def enc(b: bytes) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, **opts)
        return c.compress(b) + c.flush()

    def dec(b: bytes) -> bytes:
        o = zlib.decompressobj(-15, **opts)
        return o.decompress(b) + o.flush()

    return enc, dec


def zlib_level1(b: bytes) -> bytes:
    return zlib.compress(b, 1)


def us_per_item(fn: Callable[[bytes], bytes], items: Sequence[bytes]) -> float:
    """Best of 7 timings of 5 passes over ``items``, in microseconds per item."""
    best = min(timeit.repeat(lambda: [fn(b) for b in items], number=5, repeat=7))
    return best / (5 * len(items)) * 1e6


def main(n: int, port: int) -> None:
    if port:
        r = redis.Redis(host=HOST, port=port)
        try:
            on_scratch_server(r, port, n)
        finally:
            r.close()
        return
    # Its own server, so the FLUSHALLs and CONFIG SETs touch nothing else.
    folder = Path(tempfile.mkdtemp(prefix="mollifier-bench-redis-"))
    server = RedisProcess(folder)
    try:
        server.start()
        r = redis.Redis(host=HOST, port=server.port)
        try:
            run_layouts(r, server.port, n)
        finally:
            r.close()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def on_scratch_server(r: redis.Redis, port: int, n: int) -> None:
    """Run on a server given with --port: refuse one with keys (it is flushed),
    and leave it empty with its listpack settings as they were."""
    if r.info("keyspace"):
        raise SystemExit(
            f"redis on port {port} holds keys; --port needs an empty scratch server "
            "(every layout FLUSHALLs it)"
        )
    names = ("hash-max-listpack-value", "zset-max-listpack-entries")
    saved = {name: r.config_get(name)[name] for name in names}
    try:
        run_layouts(r, port, n)
    finally:
        r.flushall()
        for name, value in saved.items():
            if value is not None:  # typed optional; CONFIG GET of a known name answers
                r.config_set(name, value)


def run_layouts(r: redis.Redis, port: int, n: int) -> None:
    # One snapshot more than measured: the preset dictionary below is a run
    # that is not among those it compresses.
    snaps = make_snapshots(n + 1)
    extra = snaps.pop()
    settings = Settings.from_env({}, redis_url=f"redis://{HOST}:{port}/0")
    scripts = Scripts(["accept"])
    buf = Buffer(settings, None, scripts)
    prepared = [buf.prepare_snapshot(s) for s in snaps]
    snap_bytes = statistics.fmean(s.ByteSize() for s in snaps)

    # Scores/accept times as the script makes them: ms * 1000, increasing per env.
    now = int(time.time() * 1000)
    runs = [Run(s, now, now * 1000 + i) for i, s in enumerate(prepared)]
    bare_bytes = statistics.fmean(len(x.s_bare) for x in runs)

    # zlib on the snapshot bytes: plain, and with a preset dictionary (a sample
    # snapshot, as a deployment could ship one per version of the schema).
    extra.run_id = extra.env_id = extra.org_id = ""
    zdict = extra.SerializeToString()
    codecs: dict[str, Codec] = {
        "zlib level 1": deflate(1),
        "zlib level 6": deflate(6),
        "zlib level 6, preset dictionary": deflate(6, zdict),
        "zlib.compress(level 1), with header": (zlib_level1, zlib.decompress),
    }
    comp_rows: list[tuple[str, float, float, float]] = []
    compressed: dict[str, list[bytes]] = {}
    sample = [x.s_bare for x in runs[:: max(1, len(runs) // 2000)]]
    for codec_name, (enc, dec) in codecs.items():
        out = [enc(x.s_bare) for x in runs]
        assert all(dec(c) == x.s_bare for c, x in zip(out[:50], runs, strict=False))
        compressed[codec_name] = out
        encoded = [enc(b) for b in sample]
        comp_rows.append(
            (
                codec_name,
                statistics.fmean(map(len, out)),
                us_per_item(enc, sample),
                us_per_item(dec, encoded),
            )
        )

    accept = scripts.accept

    def load_accept(w: redis.Redis) -> None:
        # Script.queue sends EVALSHA, so the script must be loaded first.
        w.script_load(accept.source)

    def in_use(pipe: Pipeline, run: Run) -> None:
        keys, args = buf.accept_call(run.snap)
        accept.queue(pipe, keys, args)
        buf.queue_index(pipe, run.snap.org_id, run.snap.env_id)

    def zadd(pipe: Pipeline, run: Run) -> None:
        pipe.zadd(run.q, {run.rid: run.sc})

    def rpush(pipe: Pipeline, run: Run) -> None:
        pipe.rpush(run.q, run.rid)

    def hset(snapshot: Snapshot, drop: bool = False) -> Write:
        def f(pipe: Pipeline, run: Run) -> None:
            pipe.hset(run.key, mapping=run.fields(snapshot(run), drop_empty=drop))

        return f

    def set_packed(snapshot: Snapshot, org: bool = True) -> Write:
        def f(pipe: Pipeline, run: Run) -> None:
            pipe.set(run.key, run.packed(snapshot(run), with_org=org))

        return f

    def env_hash(snapshot: Snapshot, org: bool = True) -> Write:
        def f(pipe: Pipeline, run: Run) -> None:
            key = env_keys(run.env).tag + ":runs"
            pipe.hset(key, run.rid, run.packed(snapshot(run), with_org=org))

        return f

    def both(*ws: Write) -> Write:
        def f(pipe: Pipeline, run: Run) -> None:
            for w in ws:
                w(pipe, run)

        return f

    idx = {x.rid: i for i, x in enumerate(runs)}
    z1 = compressed["zlib level 1"]
    zd = compressed["zlib level 6, preset dictionary"]

    def full(run: Run) -> bytes:
        return run.s

    def bare(run: Run) -> bytes:
        return run.s_bare

    def bare_z1(run: Run) -> bytes:
        return z1[idx[run.rid]]

    def bare_zd(run: Run) -> bytes:
        return zd[idx[run.rid]]

    layouts = [
        Layout(
            "1a. in use (accept.lua), hash-max-listpack-value 64",
            in_use,
            lp_value=64,
            setup=load_accept,
        ),
        Layout("1b. in use (accept.lua), hash-max-listpack-value 1024", in_use, setup=load_accept),
        Layout("0. earlier: a hash per run + queue zset", both(hset(full), zadd)),
        Layout("2. queue zset member alone (the earlier queue)", zadd),
        Layout("3a. run hash alone, listpack-value 64 (hashtable)", hset(full), lp_value=64),
        Layout("3b. run hash alone, listpack-value 1024 (listpack)", hset(full)),
        Layout("4. run hash without empty/zero fields (no du ik at)", hset(full, True)),
        Layout("5. earlier hash + zset, snapshot without run/env/org ids", both(hset(bare), zadd)),
        Layout("6a. one string per run (fields packed) alone", set_packed(full)),
        Layout("6b. one string per run + queue zset", both(set_packed(full), zadd)),
        Layout("7a. one hash per env (field = run id) alone", env_hash(full)),
        Layout("7b. one hash per env + queue zset", both(env_hash(full), zadd)),
        Layout("8a. queue as a LIST of run ids alone", rpush),
        Layout(
            "8b. queue zset alone, listpack (zset-max-listpack-entries 8192)",
            zadd,
            zset_lp_entries=8192,
        ),
        Layout("C1. string per run + LIST queue", both(set_packed(full), rpush)),
        Layout("C2. string per run, ids cleared + LIST queue", both(set_packed(bare), rpush)),
        Layout("C3. hash per env + LIST queue", both(env_hash(full), rpush)),
        Layout("C4. hash per env, ids cleared + LIST queue", both(env_hash(bare), rpush)),
        Layout("C5. string per run, ids cleared + queue zset", both(set_packed(bare), zadd)),
        Layout("C6. hash per env, ids cleared + queue zset", both(env_hash(bare), zadd)),
        Layout(
            "C7. string per run, ids cleared, zlib 1 + queue zset",
            both(set_packed(bare_z1), zadd),
        ),
        Layout("C8. hash per env, ids cleared, zlib 1 + queue zset", both(env_hash(bare_z1), zadd)),
        Layout(
            "C9. string per run, ids cleared, zlib 1 + LIST queue",
            both(set_packed(bare_z1), rpush),
        ),
        Layout(
            "C10. hash per env, ids cleared, zlib 1 + LIST queue",
            both(env_hash(bare_z1), rpush),
        ),
        Layout(
            "C11. string per run, ids cleared, zlib 1, no org + queue zset",
            both(set_packed(bare_z1, False), zadd),
        ),
        Layout(
            "C12. string per run, ids cleared, zlib 1, no org + LIST queue",
            both(set_packed(bare_z1, False), rpush),
        ),
        Layout(
            "C13. hash per env, ids cleared, zlib 1, no org + queue zset",
            both(env_hash(bare_z1, False), zadd),
        ),
        Layout(
            "C14. hash per env, ids cleared, zlib 1, no org + LIST queue",
            both(env_hash(bare_z1, False), rpush),
        ),
        Layout(
            "C15. string per run, ids cleared, zlib+dict + queue zset",
            both(set_packed(bare_zd), zadd),
        ),
        Layout(
            "C16. hash per env, ids cleared, zlib+dict + queue zset",
            both(env_hash(bare_zd), zadd),
        ),
    ]

    # The run whose keys are inspected after a layout is written.
    mid = runs[len(runs) // 2]
    header = len(mid.packed(b""))
    header_no_org = len(mid.packed(b"", with_org=False))
    version = r.info("server")["redis_version"]
    print(
        f"runs: {n:,} over {ENVS} envs; snapshot ByteSize mean {snap_bytes:.1f}; "
        f"without run/env/org ids {bare_bytes:.1f}; packed header "
        f"{header} bytes ({header_no_org} without org); redis {version}\n"
    )
    print(f"| {'layout':<66} | bytes/run | x snapshot |")
    print(f"|{'-' * 68}|----------:|-----------:|")
    stored: dict[str, str] = {}
    for layout in layouts:
        per = measure(r, port, layout, runs)
        name = layout.name
        note = ""
        if name.startswith("1"):
            k = env_keys(mid.env)
            raw = cast(bytes, r.hget(k.runs, mid.rid))
            entry = msgpack.unpackb(raw, raw=True)
            kept = run_pb2.RunSnapshot.FromString(full_snapshot(mid.env, mid.rid, entry[0]))
            assert kept == mid.snap and r.llen(k.queue) > 0
            usage = (r.memory_usage(k.runs, samples=0) or 0) // max(1, r.hlen(k.runs))
            note = (
                f"  [runs hash {r.object('encoding', k.runs).decode()}, MEMORY USAGE per run "
                f"{usage}; queue "
                f"{r.object('encoding', k.queue).decode()}]"
            )
            if name.startswith("1b"):
                stored = {
                    n: (f"<{len(v)} bytes>" if n == "s" else repr(v))
                    for n, v in zip(ENTRY_PACKED, entry, strict=False)
                }
        elif name.startswith(("3", "4", "6a")):
            note = f"  [MEMORY USAGE {r.memory_usage(mid.key, samples=0)}]"
        print(f"| {name:<66} | {per:>9,.0f} | {per / snap_bytes:>9.2f}x |{note}")

    print("\nfields accept.lua stored (1b):", stored)
    print(
        f"\n| codec (on the snapshot without ids, {bare_bytes:.0f} B) | mean bytes "
        "| saving vs full snapshot | compress µs | decompress µs |"
    )
    print("|---|---:|---:|---:|---:|")
    for codec_name, size, te, td in comp_rows:
        saving = f"{snap_bytes - size:.0f} B ({1 - size / snap_bytes:.0%})"
        print(f"| {codec_name} | {size:.0f} | {saving} | {te:.1f} | {td:.1f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=50_000)
    p.add_argument(
        "--port", type=int, default=0, help="an empty scratch redis-server instead of its own"
    )
    a = p.parse_args()
    main(a.runs, a.port)
