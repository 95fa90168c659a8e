"""Thin gRPC handlers for DrainService (UNIMPLEMENTED until the drainer lands)."""

from __future__ import annotations

from mollifier_client.v1 import drain_pb2_grpc

from .app import App

__all__ = ["DrainServicer"]


class DrainServicer(drain_pb2_grpc.DrainServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app
