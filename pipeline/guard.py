"""Guard a door's listening socket: a new connection waits in one selector thread until its opening is whole.

cheroot gives every accepted socket a worker thread, and pynetdicom gives each an association thread that
counts toward ``max_associations``, so a connection that says nothing, or trickles, held a thread or a place
for as long as it liked (issue 9). Here a connection costs one selector entry until its opening (HTTP: the
request line and headers; DICOM: the A-ASSOCIATE-RQ) has arrived whole, within a deadline and a size limit;
only then is it handed to the door, with the bytes read so far. Connections are counted per address from
accept to close, and capped. A TLS handshake, for a door that serves TLS, is made here too, non-blocking and
under the same deadline, never in an accept thread (where one silent client would stall every accept).

A door subclasses :class:`Guard` and says three things: how long its opening is (:meth:`Guard.opening_length`),
what to answer one that is refused or late, and what to do with a connection whose opening is whole
(:meth:`Guard.hand_off`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import ssl
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .health import Throttle

log = logging.getLogger(__name__)

__all__ = ["Guard", "Limits", "Refusal"]

_TICK = 0.25  # the longest the loop sleeps: deadlines are kept to within this, closed sockets found as often
_ACCEPTS_PER_WAKE = 64
_RECV = 1 << 16
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class Limits:
    """What a door allows a connection before it is handed on.

    ``timeout`` is the seconds a connection has, from its accept (or from being handed back idle, an HTTP
    keep-alive), to make its TLS handshake and send its whole opening; ``max_bytes`` is how long that
    opening may be; ``max_per_address`` is how many connections one address may have open at once, held
    here or already handed on; ``max_waiting`` is how many may wait here for their opening at once, from
    all addresses: past it the one waiting longest is closed, so that many addresses (a botnet, an IPv6
    block) cannot fill the descriptors with silent connections and stop the door accepting at all.
    """

    timeout: float
    max_bytes: int
    max_per_address: int
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.max_bytes <= 0 or self.max_per_address <= 0 or self.max_waiting <= 0:
            raise ValueError(f"guard limits must be positive, not {self}")


class Refusal(Exception):
    """An opening the door will not take: ``answer`` is sent (as far as the socket takes it), then it is closed."""

    def __init__(self, reason: str, answer: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    peer: Any  # the address tuple accept() gave
    key: int  # in Guard._open
    deadline: float
    token: Any = None  # the door's own object for a connection handed back (cheroot's HTTPConnection)
    data: bytearray = field(default_factory=bytearray)
    seen: int = 0  # bytes of ``data`` the door has already looked at
    handshaking: bool = False

    @property
    def host(self) -> str:
        return str(self.peer[0]) if isinstance(self.peer, tuple) else str(self.peer)


class Guard:
    """One selector thread in front of a door: accept, count, time and read each opening, then hand it on.

    Parameters
    ----------
    listener
        The door's bound, listening socket (the guard accepts from it; nothing else may).
    limits
        The deadline, opening size and connections per address.
    tls
        A server-side context when the door serves TLS: the handshake is made in this thread.
    allow
        Called with each new peer's address; False closes it at once (``dicom.allowed_hosts``).
    """

    door = "guard"  # names the door in log lines

    def __init__(self, listener: socket.socket, limits: Limits, *, tls: ssl.SSLContext | None = None,
                 allow: Callable[[str], bool] | None = None) -> None:
        self.listener = listener
        self.limits = limits
        self.tls = tls
        self.allow = allow
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._returned: deque[tuple[socket.socket, Any, bytes, Any]] = deque()  # watch() from other threads
        self._closed_ids: list[int] = []  # closed() from other threads: id() of sockets the door closed
        self._pending: dict[int, _Pending] = {}  # by file descriptor: connections whose opening is awaited
        # Every connection admitted and not yet seen closed, held here or handed on, with its address: a
        # weak reference, so a socket the door drops without closing is still found gone.
        self._open: dict[int, tuple[weakref.ref[socket.socket], str, int]] = {}
        self._key_of: dict[int, int] = {}  # id() of an open socket -> its key in _open
        self._next_key = 0
        self._per_address: Counter[str] = Counter()
        self._next_deadline = float("inf")
        self._paused_until = 0.0
        self._stopping = threading.Event()
        self._idle = threading.Event()  # set while run() is not running
        self._idle.set()
        self._throttle = Throttle(60.0)

    # -- what a door says --

    def opening_length(self, data: bytearray, seen: int) -> int | None:
        """How many bytes of ``data`` make the whole opening, or None while it is incomplete.

        ``seen`` bytes were already looked at by an earlier call. Raise :class:`Refusal` for an opening
        the door will not take, as soon as that is known.
        """
        raise NotImplementedError

    def too_long(self, data: bytearray) -> Refusal:
        """The refusal of an opening still incomplete at ``limits.max_bytes``."""
        return Refusal(f"an opening over {self.limits.max_bytes} bytes")

    def late(self, data: bytearray) -> bytes:
        """The answer to a connection whose opening did not come in time (``data`` is what did)."""
        return b""

    def plain_answer(self) -> bytes:
        """What to answer, unencrypted, a plain HTTP request made to a door that serves TLS (b"": nothing)."""
        return b""

    def hand_off(self, sock: socket.socket, peer: Any, data: bytes, token: Any) -> None:
        """Give the door a connection whose opening is whole: ``data`` is every byte read from it so far.

        ``sock`` is non-blocking: set the timeout the door reads with. ``token`` is what :meth:`watch` was
        given, None for a new connection.
        """
        raise NotImplementedError

    # -- public --

    def watch(self, sock: socket.socket, peer: Any, data: bytes = b"", token: Any = None) -> None:
        """Wait again for an opening on a connection already admitted (an idle HTTP keep-alive); any thread.

        ``data`` is what was read from it beyond the last request. A connection given after :meth:`stop`
        is closed.
        """
        with self._lock:
            self._returned.append((sock, peer, bytes(data), token))
        self._wake()

    def run(self) -> None:
        """Serve until :meth:`stop`; never raises (a failure with one connection closes that connection)."""
        self._idle.clear()
        try:
            self.listener.setblocking(False)
            self._selector.register(self.listener, selectors.EVENT_READ, "accept")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            sweep_at = 0.0
            while not self._stopping.is_set():
                now = time.monotonic()
                if self._paused_until and now >= self._paused_until:
                    self._paused_until = 0.0
                    self._selector.register(self.listener, selectors.EVENT_READ, "accept")
                wait = min(_TICK, max(0.0, self._next_deadline - now))
                for key, _ in self._selector.select(wait):
                    try:
                        if key.data == "accept":
                            self._accept()
                        elif key.data == "wake":
                            self._take_returned()
                        else:
                            self._advance(key.data)
                    except Exception:
                        log.exception("%s: guard failed on a connection; closing it", self.door)
                        if isinstance(key.data, _Pending):
                            self._drop(key.data)
                now = time.monotonic()
                if now >= self._next_deadline:
                    self._expire(now)
                if now >= sweep_at:
                    self._sweep()
                    sweep_at = now + _TICK
        finally:
            for fileobj in (self.listener, self._wake_r):
                try:
                    self._selector.unregister(fileobj)
                except (KeyError, ValueError):
                    pass
            self._idle.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop :meth:`run` and wait for it (up to ``timeout``); then :meth:`close` closes what it held."""
        self._stopping.set()
        self._wake()
        self._idle.wait(timeout)

    def close(self) -> None:
        """Close every connection still waiting for its opening (after :meth:`stop`)."""
        for p in list(self._pending.values()):
            self._drop(p)
        with self._lock:
            returned, self._returned = list(self._returned), deque()
        for sock, _, _, _ in returned:
            _close(sock)
        self._sweep()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def closed(self, sock: socket.socket) -> None:
        """The door has closed ``sock``, one it was handed; any thread. Its address's count goes down at once,
        not when the socket's last reference goes (the next request from a client that closes and connects
        again, one after another, must not meet the cap)."""
        with self._lock:
            self._closed_ids.append(id(sock))

    def connections(self, host: str) -> int:
        """Connections open from ``host`` (for the tests and the log)."""
        return self._per_address.get(host, 0)

    # -- the loop --

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (the loop will wake anyway) or closed (stopped)
            pass

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    # Leave the backlog alone a moment rather than spin on a listener that stays readable.
                    if self._throttle.due("descriptors"):
                        log.error("%s: cannot accept connections (%s); pausing accepts", self.door, exc.strerror)
                    self._selector.unregister(self.listener)
                    self._paused_until = time.monotonic() + 0.1
                return
            host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            if self.allow is not None and not self.allow(host):
                _close(sock)
                continue
            if self._per_address[host] >= self.limits.max_per_address:
                # The door closes connections without telling us, and the sweep runs only every _TICK: a
                # client making short requests one after another must not be refused for ones already closed.
                self._sweep()
            if self._per_address[host] >= self.limits.max_per_address:
                if self._throttle.due("cap"):  # once a minute per kind, not per host: an attacker has many
                    log.warning("%s: connections from %s refused: %d are open from that address, the limit",
                                self.door, host, self._per_address[host])
                _close(sock)
                continue
            self._per_address[host] += 1
            key = self._next_key
            self._next_key += 1
            handshaking = False
            try:
                sock.setblocking(False)
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    handshaking = True
            except (OSError, ValueError):
                _close(sock)
                self._release(host)
                continue
            if len(self._pending) >= self.limits.max_waiting:
                self._evict_oldest()
            self._open[key] = (weakref.ref(sock), host, id(sock))
            self._key_of[id(sock)] = key
            p = _Pending(sock, peer, key, time.monotonic() + self.limits.timeout, handshaking=handshaking)
            self._wait_for(p)
            if handshaking:
                self._advance(p)  # a ClientHello may be there already

    def _evict_oldest(self) -> None:
        """Close the connection that has waited longest for its opening (the earliest deadline)."""
        oldest = min(self._pending.values(), key=lambda q: q.deadline)
        if self._throttle.due("evicted"):
            log.warning("%s: %d connections wait for their request at once (the limit); the oldest, from %s, "
                        "is closed for a new one", self.door, len(self._pending), oldest.host)
        if not oldest.handshaking:
            self._answer(oldest, self.late(oldest.data))
        self._drop(oldest)

    def _wait_for(self, p: _Pending) -> None:
        self._pending[p.sock.fileno()] = p
        self._selector.register(p.sock, selectors.EVENT_READ, p)
        self._next_deadline = min(self._next_deadline, p.deadline)

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            returned, self._returned = list(self._returned), deque()
        for sock, peer, data, token in returned:
            key = self._key_of.get(id(sock))
            if key is None or self._open[key][0]() is not sock:  # not ours, or seen closed: nothing to count
                _close(sock)
                continue
            try:
                sock.setblocking(False)
            except OSError:
                self._forget(key)
                _close(sock)
                continue
            p = _Pending(sock, peer, key, time.monotonic() + self.limits.timeout, token=token, data=bytearray(data))
            if data and self._check(p):
                continue  # whole already (a pipelined request), refused, or handed on
            self._wait_for(p)
            # What came meanwhile may sit decrypted in a TLS socket, where the selector does not see it.
            self._advance(p)

    def _advance(self, p: _Pending) -> None:
        if p.handshaking:
            try:
                p.sock.do_handshake()  # type: ignore[attr-defined]
            except ssl.SSLWantReadError:
                self._selector.modify(p.sock, selectors.EVENT_READ, p)
                return
            except ssl.SSLWantWriteError:
                self._selector.modify(p.sock, selectors.EVENT_WRITE, p)
                return
            except (ssl.SSLError, OSError) as exc:
                # Said once a minute: a peer whose certificate is refused (a modality given the wrong one)
                # must show in the log, a scanner's many must not flood it.
                level = logging.WARNING if self._throttle.due("handshake") else logging.DEBUG
                log.log(level, "%s: connection from %s refused: TLS handshake failed (%s)", self.door, p.host,
                        getattr(exc, "reason", None) or type(exc).__name__)
                if getattr(exc, "reason", None) == "HTTP_REQUEST" and (answer := self.plain_answer()):
                    # A plain request on a TLS port (OpenSSL knows one): say so in plain text, as nginx does.
                    with contextlib.suppress(OSError):
                        # The rest of the request read first: a close with unread bytes is a reset, which
                        # may reach the client before the answer does.
                        while os.read(p.sock.fileno(), _RECV):
                            pass
                    with contextlib.suppress(OSError):
                        os.write(p.sock.fileno(), answer)
                self._drop(p)
                return
            p.handshaking = False
            self._selector.modify(p.sock, selectors.EVENT_READ, p)
        while True:
            room = self.limits.max_bytes + 1 - len(p.data)
            try:
                chunk = p.sock.recv(min(room, _RECV))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                self._drop(p)
                return
            if not chunk:  # gone before its opening was whole
                self._drop(p)
                return
            p.data += chunk
            if self._check(p):
                return

    def _check(self, p: _Pending) -> bool:
        """Whether ``p`` is dealt with: its opening whole (handed on), refused, or too long."""
        try:
            end = self.opening_length(p.data, p.seen)
        except Refusal as refusal:
            self._refuse(p, refusal)
            return True
        p.seen = len(p.data)
        if end is not None:
            self._hand(p)
            return True
        if len(p.data) > self.limits.max_bytes:
            self._refuse(p, self.too_long(p.data))
            return True
        return False

    def _hand(self, p: _Pending) -> None:
        self._unwatch(p)
        try:
            self.hand_off(p.sock, p.peer, bytes(p.data), p.token)
        except Exception:
            log.exception("%s: a connection from %s could not be handed on; closed", self.door, p.host)
            self._forget(p.key)
            _close(p.sock)

    def _refuse(self, p: _Pending, refusal: Refusal) -> None:
        if self._throttle.due("refused"):
            log.warning("%s: connection from %s refused: %s", self.door, p.host, refusal.reason)
        self._answer(p, refusal.answer)
        self._drop(p)

    def _expire(self, now: float) -> None:
        self._next_deadline = float("inf")
        for p in list(self._pending.values()):
            if p.deadline <= now:
                if self._throttle.due("late"):
                    log.warning("%s: connection from %s closed: %s within %g s", self.door, p.host,
                                "its opening was not whole" if p.data.strip() else "nothing was sent",
                                self.limits.timeout)
                if not p.handshaking:
                    self._answer(p, self.late(p.data))
                self._drop(p)
            else:
                self._next_deadline = min(self._next_deadline, p.deadline)

    def _sweep(self) -> None:
        """Release the count of every connection the door has closed (or dropped) since the last look."""
        with self._lock:
            closed, self._closed_ids = self._closed_ids, []
        for sid in closed:
            key = self._key_of.get(sid)
            if key is not None and (sock := self._open[key][0]()) is not None and id(sock) == sid:
                self._forget(key)
        for key, (ref, _, _) in list(self._open.items()):
            sock = ref()
            if sock is None or sock.fileno() < 0:
                self._forget(key)

    def _answer(self, p: _Pending, answer: bytes) -> None:
        if answer:
            try:
                p.sock.send(answer)
            except (OSError, ValueError):
                pass

    def _unwatch(self, p: _Pending) -> None:
        self._pending.pop(p.sock.fileno(), None)
        try:
            self._selector.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, p: _Pending) -> None:
        self._unwatch(p)
        _close(p.sock)
        self._forget(p.key)

    def _forget(self, key: int) -> None:
        entry = self._open.pop(key, None)
        if entry is not None:
            if self._key_of.get(entry[2]) == key:
                del self._key_of[entry[2]]
            self._release(entry[1])

    def _release(self, host: str) -> None:
        self._per_address[host] -= 1
        if self._per_address[host] <= 0:
            del self._per_address[host]


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
