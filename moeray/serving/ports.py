"""A listening port for a server that starts a few seconds from now (tests and benchmarks).

Asking the kernel for port 0 and closing the socket is racy: the number comes from the ephemeral range
(`ip_local_port_range`, 32768-60999 on Linux), which every outgoing connection draws its local port from too, and
a Ray cluster opens hundreds of them while Serve's proxy starts. One of them taking the number makes the proxy's
bind fail and the gRPC port never answers. So the port is drawn below that range and above Ray's worker ports
(10002-19999), and checked free on both the IPv4 loopback and the IPv6 wildcard (Serve's gRPC proxy binds `[::]`).
"""

import random
import socket

LOW, HIGH = 20000, 32000  # between Ray's worker ports and the kernel's ephemeral range


def _free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host: nothing can hold the port there
            continue
        with sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(rng: random.Random = random.SystemRandom()) -> int:
    """A port nothing listens on now and nothing will be handed by the kernel for an outgoing connection."""
    for _ in range(200):
        port = rng.randrange(LOW, HIGH)
        if _free(port):
            return port
    raise RuntimeError(f"no free port found in {LOW}-{HIGH} after 200 tries")
