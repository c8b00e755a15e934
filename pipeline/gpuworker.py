"""``postbox gpu-worker``: a Dask worker for one GPU, with Postbox's plugin as its preload (issue 12).

It is ``dask worker ADDR --no-nanny --preload pipeline.gpuworker --postbox-config PATH`` in one command: the
preload adds :class:`~pipeline.remote.PostboxPlugin`, which warms each algorithm's child at start. The process
exits 0 when it loses its scheduler (systemd's ``Restart=always`` starts it again) and on SIGTERM, after
killing its children; a child dies with it in any case (it watches its parent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Any

import click
from distributed import Worker

from .config import Config
from .dask_engine import security
from .remote import PostboxPlugin

log = logging.getLogger(__name__)


def default_name() -> str:
    """The host's name, with the GPU it was given when there is one (names must be unique on a scheduler)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    host = socket.gethostname()
    return f"{host}-gpu{gpu}" if gpu and "," not in gpu else host


@click.command()
@click.option("--postbox-config", "config_path", required=True, help="Postbox's config.yaml")
def dask_setup(worker: Any, config_path: str) -> None:
    """The preload: ``dask worker --preload pipeline.gpuworker --postbox-config PATH`` gets the plugin."""
    config = Config.from_file(config_path, check_folders=False)
    worker.plugins[PostboxPlugin.name] = plugin = PostboxPlugin(config)
    plugin.setup(worker)


def serve(scheduler: str, config: Config, *, resources: dict[str, float], nthreads: int, name: str) -> int:
    """Run the worker until its scheduler is gone or it is told to stop; returns the exit code (0)."""

    async def main() -> None:
        worker = Worker(scheduler, nthreads=nthreads, resources=resources, name=name, security=security(config),
                        preload=["pipeline.gpuworker"], preload_argv=[["--postbox-config", str(config.source)]],
                        dashboard=False, memory_limit=0, host=_host(scheduler))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(worker.close(reason="signal")))
        await worker
        log.info("gpu-worker %s: serving %s with %s", name, scheduler,
                 ", ".join(f"{k}={v:g}" for k, v in resources.items()) or "no resources")
        await worker.finished()

    asyncio.run(main())
    log.info("gpu-worker %s: stopped (its scheduler is gone, or it was told to stop)", name)
    return 0


def _host(scheduler: str) -> str | None:
    """Listen on loopback when the scheduler is there (tests, one machine); else on the default interface."""
    rest = scheduler.split("://", 1)[-1]
    return "127.0.0.1" if rest.startswith(("127.", "localhost")) else None
