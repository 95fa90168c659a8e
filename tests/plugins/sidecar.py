"""Fixtures for a live, in-process sidecar on a free port.

    async def test_something(stubs: Stubs) -> None:
        resp = await stubs.gate.Evaluate(gate_pb2.EvaluateRequest(...))

- ``app``: ``App.connect(settings, start_background=False)`` over the test's own
  Redis and database (the ``settings`` fixture from servers.py); closed after.
  Override ``settings`` in a test module to change any setting.
- ``sidecar``: ``start_server(app, "127.0.0.1:0")``; has ``.address``, ``.port``,
  ``.channel`` (an insecure grpc.aio channel to it) and ``.server`` (the
  ``mollifier.server.Sidecar``); stopped after.
- ``stubs``: ``.gate``, ``.buffer``, ``.mutate``, ``.drain`` stubs on that channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from mollifier.app import App
from mollifier.config import Settings
from mollifier.server import Sidecar, start_server
from mollifier_client.v1 import buffer_pb2_grpc, drain_pb2_grpc, gate_pb2_grpc, mutate_pb2_grpc

__all__ = ["LiveSidecar", "Stubs"]


@dataclass
class LiveSidecar:
    """A started sidecar and a channel to it."""

    server: Sidecar
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port


@dataclass
class Stubs:
    """One stub per service, all on the sidecar fixture's channel."""

    gate: Any
    buffer: Any
    mutate: Any
    drain: Any


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    """The App the sidecar serves, without background loops (tests drive them)."""
    application = await App.connect(settings, start_background=False)
    yield application
    await application.close()


@pytest.fixture
async def sidecar(app: App) -> AsyncIterator[LiveSidecar]:
    """An in-process server on 127.0.0.1 and a free port, with a channel to it."""
    server = await start_server(app, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(server.address)
    yield LiveSidecar(server=server, channel=channel)
    await channel.close(None)
    await server.stop(0)


@pytest.fixture
def stubs(sidecar: LiveSidecar) -> Stubs:
    """Gate, Buffer, Mutate and Drain stubs on the sidecar's channel."""
    ch = sidecar.channel
    return Stubs(
        gate=gate_pb2_grpc.GateServiceStub(ch),
        buffer=buffer_pb2_grpc.BufferServiceStub(ch),
        mutate=mutate_pb2_grpc.MutateServiceStub(ch),
        drain=drain_pb2_grpc.DrainServiceStub(ch),
    )
