"""How token batches move between a router and its expert workers (see ``moeray.transport.base``); the wire format
every path shares is ``moeray.transport.wire``."""

from moeray.transport.base import TRANSPORTS, Sent, Transport, make_transport
from moeray.transport.wire import WireTensor, WorkerCall, pack, unpack

__all__ = ["TRANSPORTS", "Sent", "Transport", "WireTensor", "WorkerCall", "make_transport", "pack", "unpack"]
