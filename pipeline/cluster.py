"""``postbox cluster status`` and ``postbox cluster drain NODE`` (issue 12): the GPU nodes as the scheduler sees them.

The drain list lives on the scheduler (its metadata, ``dask_engine.DRAINED``), so every Postbox service
sharing the cluster stops sending to a drained node. A drain waits for the node's running attempts to end
rather than retiring the worker: Dask's retire and a SIGTERM would interrupt them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from distributed import Client

from . import remote
from .config import Config
from .dask_engine import DRAINED, connect, named_by, slots_of
from .errors import PostboxError

#: Seconds the nodes have to say what they run.
ANSWER_TIMEOUT = 4.0


class NoSuchNode(PostboxError):
    """No worker of the cluster goes by that name, address or host."""


@dataclass(frozen=True)
class WorkerRow:
    """One GPU node's worker, as ``cluster status`` prints it."""

    address: str
    name: str
    resources: dict[str, float] = field(default_factory=dict)
    slots: int = 0
    running: list[str] = field(default_factory=list)
    drained: bool = False
    answered: bool = True  # False: the node did not say what it runs (hung, or busy past ANSWER_TIMEOUT)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rows(config: Config, client: Client) -> list[WorkerRow]:
    """Every worker of the cluster with its slots, the jobs running on it and whether it is drained."""
    info = client.scheduler_info(n_workers=-1).get("workers", {})
    drained = list(client.get_metadata(list(DRAINED), default=[]))
    running = _running(client, list(info))
    needs = dict(config.engine.dask.resources)
    found = []
    for address, w in sorted(info.items()):
        jobs_here = running.get(address)
        found.append(WorkerRow(address=address, name=str(w.get("name")), resources=dict(w.get("resources") or {}),
                               slots=slots_of(w.get("resources") or {}, needs),
                               running=list(jobs_here) if isinstance(jobs_here, list) else [],
                               drained=named_by(w, drained), answered=isinstance(jobs_here, list)))
    return found


def _running(client: Client, addresses: list[str]) -> dict[str, Any]:
    """The jobs each node runs, asked of all at once; if one does not answer in time (a hung node holds the
    whole broadcast), each is asked alone, and the silent ones are left out."""
    try:
        return dict(client.run(remote.running_jobs, on_error="return", callback_timeout=ANSWER_TIMEOUT))
    except TimeoutError:
        pass
    found: dict[str, Any] = {}
    for address in addresses:
        try:
            found.update(client.run(remote.running_jobs, workers=[address], on_error="return",
                                    callback_timeout=ANSWER_TIMEOUT / 2))
        except TimeoutError:
            continue
    return found


def status(config: Config) -> list[WorkerRow]:
    with connect(config) as client:
        return rows(config, client)


def _match(config: Config, client: Client, node: str) -> list[WorkerRow]:
    matched = [r for r in rows(config, client) if named_by({"name": r.name, "id": r.address}, [node])]
    if not matched:
        raise NoSuchNode(f"no worker of the cluster is named {node!r} (by name, address or host); "
                         "`postbox cluster status` lists them")
    return matched


def drain(config: Config, node: str, *, timeout: float | None = None, poll: float = 0.5,
          stopped: threading.Event | None = None) -> list[WorkerRow]:
    """Stop sending attempts to ``node`` (a worker's name, address or host) and wait until it runs none.

    Returns the node's rows once idle; TimeoutError if ``timeout`` passes first (it stays drained).
    """
    with connect(config) as client:
        _match(config, client, node)
        drained = list(client.get_metadata(list(DRAINED), default=[]))
        if node not in drained:
            client.set_metadata(list(DRAINED), [*drained, node])
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = stopped or threading.Event()
        while True:
            matched = _match(config, client, node)
            if not any(r.running or not r.answered for r in matched):
                return matched
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{node} still runs {sum(len(r.running) for r in matched)} job(s)")
            wait.wait(poll)  # not a wait for a result: the node's running jobs are asked again


def resume(config: Config, node: str) -> list[WorkerRow]:
    """Send attempts to a drained node again."""
    with connect(config) as client:
        drained = [n for n in client.get_metadata(list(DRAINED), default=[]) if n != node]
        client.set_metadata(list(DRAINED), drained)
        return _match(config, client, node)
