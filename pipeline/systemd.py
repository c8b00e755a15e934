"""sd_notify: tell systemd (``Type=notify``) that the service is ready or stopping, with no new dependency.

systemd sets ``$NOTIFY_SOCKET`` to a unix datagram socket: a path, or an abstract name written with a leading
``@``. A message is ``KEY=VALUE`` lines in one datagram (``READY=1``, ``STOPPING=1``, ``STATUS=...``); see
sd_notify(3). Without ``$NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV_VAR = "NOTIFY_SOCKET"


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=..."``) to systemd as one message.

    Parameters
    ----------
    states
        ``KEY=VALUE`` assignments, one per line of the message.

    Returns
    -------
    bool
        True when sent; False when there is no ``$NOTIFY_SOCKET`` or it cannot be reached (logged: a service
        that runs but is never reported ready is one systemd times out and restarts).
    """
    address = os.environ.get(ENV_VAR)
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]  # an abstract socket: no file, the name starts with a NUL byte
    elif address.startswith("/"):
        target = address
    else:  # vsock:... (systemd 253, for a VM's manager) is not one we are run under
        log.warning("service: cannot notify systemd: %s=%s is not a unix socket", ENV_VAR, address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall("\n".join(states).encode())
    except OSError as exc:
        log.warning("service: cannot notify systemd at %s (%s)", address, exc.strerror or exc)
        return False
    log.debug("service: told systemd %s", ", ".join(states))
    return True
