"""TCP ports of 127.0.0.1 for the tests: one helper, however a test uses the port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now: for a server the test starts, or one where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(address: str) -> bool:
    """Whether a listening address is a loopback one (127.0.0.0/8, ::1, or IPv4-mapped 127.x); "" is every interface."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def listeners(pids: list[int]) -> set[tuple[str, int, str]]:
    """(address, port, process command) of every TCP socket listening in these processes or their descendants."""
    import psutil

    tree: dict[int, str] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in family:
            try:
                tree[p.pid] = " ".join(p.cmdline()).strip()[:120]
            except psutil.Error:
                tree[p.pid] = f"pid {p.pid}"
    return {(c.laddr.ip, c.laddr.port, tree[c.pid]) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in tree}
