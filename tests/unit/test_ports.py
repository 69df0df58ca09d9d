"""free_port: drawn outside the kernel's ephemeral range, and never one something already holds."""

import socket

from moeray.serving.ports import HIGH, LOW, free_port


def _ephemeral_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return low, high


def test_outside_the_ephemeral_range_and_bindable_on_both_families():
    low, high = _ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert LOW <= port < HIGH and not low <= port <= high, port
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", port))


class _Draws:
    """randrange answering the given ports in turn."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)

    def randrange(self, low: int, high: int) -> int:
        return self.ports.pop(0)


def test_a_port_held_on_either_family_is_skipped():
    held4, held6 = socket.socket(), socket.socket(socket.AF_INET6)
    with held4, held6:
        held4.bind(("127.0.0.1", free_port()))
        held6.bind(("::", free_port()))
        held4.listen()
        held6.listen()
        port4, port6, free = held4.getsockname()[1], held6.getsockname()[1], free_port()
        assert free_port(_Draws(port4, port6, free)) == free
