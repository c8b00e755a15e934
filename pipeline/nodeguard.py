"""The DICOM node's socket server: the guard in front of pynetdicom, and a limit on every PDU's length.

pynetdicom starts an association thread for each accepted socket, and that thread counts toward
``max_associations`` before the peer has said a word: 10 silent connections refused everyone, allowed AE
titles included, until the ARTIM timer closed them (issue 9). It also reads whatever PDU length a peer
declares into memory, before the AE title is checked; ``maximum_pdu_size`` only sets what we advertise.
So here:

- :class:`AssociationGuard` (a :class:`~pipeline.guard.Guard`) accepts, caps connections per address, and
  waits for the A-ASSOCIATE-RQ in one selector thread, within ``dicom.associate_timeout``; only a whole
  request of at most :data:`ASSOCIATE_RQ_LIMIT` bytes reaches pynetdicom. A first PDU of another type, or
  longer, is answered with an A-ABORT before it is read.
- :class:`GuardedServer` subclasses pynetdicom's ``ThreadedAssociationServer``: the guard accepts for it
  (``serve`` runs the guard instead of socketserver's loop) and its request handler gives each association
  a :class:`_GuardedSocket`, which reads the request the guard already took off the socket first and aborts
  the association at a PDU longer than ``dicom.max_pdu_mb``, from its 6-byte header, before reading it.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Callable
from contextlib import suppress
from typing import Any, cast

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from .guard import Guard, Limits, Refusal

log = logging.getLogger(__name__)

__all__ = ["ASSOCIATE_RQ_LIMIT", "AssociationGuard", "GuardedServer"]

# An A-ASSOCIATE-RQ proposing all 128 presentation contexts with a few transfer syntaxes each is ~40 kB.
ASSOCIATE_RQ_LIMIT = 256 * 1024
_ASSOCIATE_RQ = 0x01
_PDU_HEADER = 6  # type, reserved, length (PS3.8 9.3.1)


def _abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (PS3.8 9.3.8): 1 unrecognized PDU, 6 invalid parameter value."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, reason)


class AssociationGuard(Guard):
    """The guard in front of the node: a connection reaches pynetdicom once its A-ASSOCIATE-RQ is whole."""

    door = "dicom"

    def __init__(self, server: GuardedServer, limits: Limits, *, tls: ssl.SSLContext | None = None,
                 allow: Callable[[str], bool] | None = None) -> None:
        super().__init__(cast(socket.socket, server.socket), limits, tls=tls, allow=allow)
        self.server = server

    def opening_length(self, data: bytearray, seen: int) -> int | None:
        if len(data) < 6:
            return None
        pdu_type, _, length = struct.unpack_from(">BBL", data)
        if pdu_type != _ASSOCIATE_RQ:
            raise Refusal(f"its first PDU is of type 0x{pdu_type:02X}, not an association request", _abort(1))
        if 6 + length > self.limits.max_bytes:
            raise Refusal(f"it declares an association request of {length} bytes (the limit is "
                          f"{self.limits.max_bytes})", _abort(6))
        return 6 + length if len(data) >= 6 + length else None

    def hand_off(self, sock: socket.socket, peer: Any, data: bytes, token: Any) -> None:
        # pynetdicom reads and writes blocking: a peer that stalls inside a PDU, or stops reading, is dropped
        # after the network timeout. The kernel's timeouts, not Python's: those poll before each 4 kB read.
        sock.setblocking(True)
        seconds = int(self.server.ae.network_timeout or 0)
        if isinstance(sock, ssl.SSLSocket):
            # Not the kernel's for TLS: a read they time out is SSL_ERROR_WANT_READ, which Python's blocking
            # SSLSocket answers by reading again, so a stalled peer held its thread for ever.
            sock.settimeout(seconds or None)
        else:
            timeval = struct.pack("ll", seconds, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.server.openings[sock] = data
        self.server.process_request(sock, peer)


class _GuardedSocket(AssociationSocket):
    """pynetdicom's AssociationSocket, reading first what the guard read, and refusing over-long PDUs."""

    opening: bytes = b""  # the A-ASSOCIATE-RQ the guard took off the socket
    max_pdu = 0

    @property
    def ready(self) -> bool:
        return bool(self.opening) or bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        if self.opening:
            data = bytearray(self.opening[:nr_bytes])
            self.opening = self.opening[nr_bytes:]
            if len(data) < nr_bytes:
                data += super().recv(nr_bytes - len(data))
            return data
        if nr_bytes == _PDU_HEADER:
            # The DUL reads a PDU's 6-byte header, then asks for the length it declares: refuse it from the
            # header, before a byte of it is buffered. An empty header ends the association as a closed
            # connection, quietly (an empty body would have pynetdicom log an ERROR for each attack).
            header = super().recv(nr_bytes)
            if len(header) == _PDU_HEADER and (length := struct.unpack_from(">L", header, 2)[0]) > self.max_pdu:
                self._refuse(length)  # the length a PDU declares is of what follows its header
                return bytearray()
            return header
        if nr_bytes > self.max_pdu:  # not reached through the header check; kept should pynetdicom read otherwise
            self._refuse(nr_bytes)
            return bytearray()
        return super().recv(nr_bytes)

    def _refuse(self, length: int) -> None:
        log.warning("dicom: association from %s aborted: a PDU of %d bytes, over dicom.max_pdu_mb (%d bytes)",
                    self.assoc.requestor.ae_title, length, self.max_pdu)
        with suppress(OSError):
            if self.socket is not None:
                self.socket.sendall(_abort(6))

    def _shutdown_socket(self) -> None:
        # pynetdicom's skips close() when shutdown() fails (a peer already gone), leaving the descriptor
        # open until a garbage collection, and the guard's count of the address with it.
        sock = self.socket
        if sock is None:
            return
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with suppress(OSError):
            sock.close()


class _Handler(RequestHandler):
    server: GuardedServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # The socket pynetdicom made (its transport-connection event already queued) becomes ours in place:
        # making another would queue that event twice.
        assoc.dul.socket.__class__ = _GuardedSocket
        sock = cast(_GuardedSocket, assoc.dul.socket)
        sock.opening = self.server.openings.pop(self.request, b"")
        sock.max_pdu = self.server.max_pdu
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, fed by an :class:`AssociationGuard` instead of ``accept``.

    Made by ``AE.make_server(..., server_class=GuardedServer, limits=..., max_pdu=..., allow=...)``; run
    :meth:`serve` in a thread and end it with :meth:`stop`. For DICOM over TLS, give the context as ``tls``
    (the guard makes the handshake), not as pynetdicom's ``ssl_context``, which would make it in the thread
    that accepts.
    """

    request_queue_size = 128  # the listen backlog: the guard accepts at once, but a burst may come first

    def __init__(self, *args: Any, limits: Limits, max_pdu: int, tls: ssl.SSLContext | None = None,
                 allow: Callable[[str], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "request_handler": _Handler})
        self.max_pdu = max_pdu
        self.openings: dict[socket.socket, bytes] = {}  # handed on by the guard, taken by the handler
        self.guard = AssociationGuard(self, limits, tls=tls, allow=allow)

    def serve(self) -> None:
        """Accept and serve until :meth:`stop` (socketserver's ``serve_forever`` is not used)."""
        self.guard.run()

    def stop(self) -> None:
        """Stop accepting, close what waits for its request, and close the listening socket."""
        self.guard.stop()
        self.guard.close()
        self.server_close()
