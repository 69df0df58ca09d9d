"""How token batches move between a router and its expert workers (see ``moeray.transport.base``)."""

from moeray.transport.base import TRANSPORTS, Sent, Transport, WireTensor, WorkerCall, make_transport

__all__ = ["TRANSPORTS", "Sent", "Transport", "WireTensor", "WorkerCall", "make_transport"]
