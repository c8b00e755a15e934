"""What every door of a service is to the service: something started, told when the
service is ready and of each finished job, and stopped.

The HTTP facade, the DICOM node, the result sender and the HTTP facade's retrieval of series all live as
long as the service and react to jobs that end. :class:`Door` is the whole of what ``pipeline.service``
knows of them, so that it wires each the same way and never reaches into one's parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .jobs import JobManifest

__all__ = ["Door"]


@runtime_checkable
class Door(Protocol):
    """A part of a running service with a life of its own (threads, sockets)."""

    name: str  # as in log lines and the ready file: "http", "dicom", "sender", "retrieval"

    def start(self) -> None:
        """Start serving; raise OSError when a port cannot be had (the door stays closed, the service runs)."""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop within ``timeout`` seconds; what is under way is handed back, to go on at the next start."""

    def on_ready(self) -> None:
        """Called once the worker has repaired the index and the service is ready (the ready file written)."""

    def on_job_finished(self, manifest: JobManifest) -> None:
        """Called by the worker for each job that ends (done or failed), in the worker's thread: be quick."""

    def ready_info(self) -> dict[str, Any] | None:
        """What the ready file says of this door (its port, ...), or None for a door without a socket."""
