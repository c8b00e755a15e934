"""Sockets and memory as an attacker's tests see them: a connection from a chosen loopback address, whether the
server still holds it, and a service's RSS (the abuse tests of issue 9, over plain TCP and TLS)."""

from __future__ import annotations

import socket
from pathlib import Path

MB = 1 << 20


def rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def connect(port: int, source: str = "127.0.0.2") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def is_open(sock: socket.socket) -> bool:
    """Whether the server has neither closed nor reset the connection (nothing is consumed)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)
