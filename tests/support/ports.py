"""TCP ports of 127.0.0.1 for the tests: one helper, however a test uses the port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now: for a server the test starts, or one where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
