"""Peers the tests control: a C-STORE destination that counts what it stores, and dcmtk's storescu."""

from __future__ import annotations

import collections
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, StoragePresentationContexts, evt

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk leaves Nagle on otherwise and crawls
SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700
HANG = -1  # an answer of the test destination: it never answers (until the test ends)


class Destination:
    """A C-STORE SCP on 127.0.0.1 (any free port) that counts what it stores, per SOPInstanceUID.

    ``answer(association, number)`` gives the status for the ``number``-th C-STORE (from 0) of the
    ``association``-th association (from 0); every Success is counted in ``stored``. ``HANG`` sets ``entered``
    and waits in the handler until ``release`` is set: a peer that accepts the association and never answers.
    """

    def __init__(self, ae_title: str = "TPS") -> None:
        self.answer: Callable[[int, int], int] = lambda association, number: SUCCESS
        self.entered = threading.Event()
        self.release = threading.Event()
        self.stored: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[int, str, int]] = []  # (association, SOPInstanceUID, status answered)
        self._associations: list[Any] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = StoragePresentationContexts
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port: int = self.server.server_address[1]

    def config(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "ae_title": "TPS"}

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            if event.assoc not in self._associations:
                self._associations.append(event.assoc)
            association = self._associations.index(event.assoc)
            number = sum(1 for a, _, _ in self.requests if a == association)
        status = self.answer(association, number)
        if status == HANG:
            self.entered.set()
            self.release.wait(60)  # the test's teardown ends it: a peer that never answers
            status = OUT_OF_RESOURCES
        with self._lock:
            self.requests.append((association, uid, status))
            if status == SUCCESS:
                self.stored[uid] += 1
        return status

    def close(self) -> None:
        self.release.set()
        self.ae.shutdown()


def storescu(port: int, folder: Path) -> None:
    proc = subprocess.run(["/usr/bin/storescu", "-aec", "POSTBOX", "+sd", "+r", "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr


