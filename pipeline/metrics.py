"""What a running service publishes for Prometheus (issue 11): one registry per service, read at scrape time.

Counters and histograms that only the running doors can see (DICOM associations and instances, HTTP
requests, algorithm run times) are kept in this service's own :class:`~prometheus_client.CollectorRegistry`,
never the library's global default one (style: no global mutable state). What the folders and the index
already hold (jobs by state and source, the inbox's depth, pending and failed sends, free disk) is read
afresh at each scrape by a collector, so it is true across several services on one inbox and after a restart.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter as _Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .index import Index

if TYPE_CHECKING:
    from .config import Config
    from .jobs import JobManifest

log = logging.getLogger(__name__)

__all__ = ["Metrics"]

# Run times of segmentation models: seconds for a threshold, minutes for a large network on a CPU.
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"))
# Methods a route may have; anything else a client sends is counted as "other" (bounded labels).
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})


class Metrics:
    """The metrics of one service; a :class:`~pipeline.doors.Door` that observes each finished job.

    The doors count into it: the DICOM node (``association``, ``instance``) and the HTTP door (``request``).
    """

    name = "metrics"

    def __init__(self, config: Config, index: Index | None = None) -> None:
        self.config = config
        self.index = index or Index(config.database)
        self.registry = CollectorRegistry()
        self.associations = Counter("postbox_dicom_associations", "DICOM associations, by outcome "
                                    "(accepted, rejected)", ["outcome"], registry=self.registry)
        self.instances = Counter("postbox_dicom_instances_received", "DICOM instances stored and acknowledged "
                                 "(Success) by the node", registry=self.registry)
        self.requests = Counter("postbox_http_requests", "HTTP requests answered, by method, route rule "
                                "(/api/dataset/<dataset_id>, never the path) and status",
                                ["method", "route", "status"], registry=self.registry)
        self.run_seconds = Histogram("postbox_job_run_seconds", "Seconds an algorithm ran per finished job "
                                     "(algorithm_started to algorithm_ended)", ["algorithm"],
                                     buckets=RUN_BUCKETS, registry=self.registry)
        self.registry.register(_FolderCollector(config, self.index))

    # -- the doors count --

    def association(self, *, accepted: bool) -> None:
        self.associations.labels("accepted" if accepted else "rejected").inc()

    def instance(self) -> None:
        self.instances.inc()

    def request(self, method: str, route: str, status: int) -> None:
        self.requests.labels(method if method in _METHODS else "other", route, str(status)).inc()

    # -- a Door --

    def start(self) -> None:
        """Nothing to start: the registry is read by the HTTP door's ``GET /metrics``."""

    def stop(self, timeout: float = 10.0) -> None:
        """Nothing to stop."""

    def on_ready(self) -> None:
        """Nothing: counting starts with the service."""

    def on_job_finished(self, manifest: JobManifest) -> None:
        """Observe the job's run time, if its algorithm ran (a job refused at the door did not)."""
        started, ended = manifest.timings.get("algorithm_started"), manifest.timings.get("algorithm_ended")
        if started is not None and ended is not None and ended >= started:
            self.run_seconds.labels(manifest.algorithm or "").observe(ended - started)

    def ready_info(self) -> dict[str, Any] | None:
        return None


class _FolderCollector(Collector):
    """Jobs by state and source, the inbox's depth, sends per destination and free disk, at scrape time."""

    def __init__(self, config: Config, index: Index) -> None:
        self.config = config
        self.index = index

    def describe(self) -> list[Metric]:
        return []  # not read at registration: the index is read at each scrape only

    def collect(self) -> Iterator[Metric]:
        records = self.index.jobs()
        jobs = GaugeMetricFamily("postbox_jobs", "Jobs in the index, by state and source (folder, dicom, http, cli)",
                                 labels=["state", "source"])
        by_state = _Tally((r.get("status") or "", r.get("source") or "") for r in records)
        for (state, source), n in sorted(by_state.items()):
            jobs.add_metric([state, source], n)
        yield jobs
        depth = sum(1 for r in records if r.get("location") == "inbox" and r.get("status") == "pending")
        yield GaugeMetricFamily("postbox_inbox_jobs", "Jobs waiting in the inbox to be claimed", value=depth)
        sends = GaugeMetricFamily("postbox_sends", "Sends of results not delivered, by destination and state "
                                  "(pending: still tried; failed: given up)", labels=["destination", "state"])
        tally: _Tally[tuple[str, str]] = _Tally()
        for r in records:
            for destination, state in (r.get("sends") or {}).items():
                if state in ("pending", "failed"):
                    tally[(destination, state)] += 1
        for destination in self.config.dicom.destinations:  # the configured ones always, at 0 when all is well
            for state in ("pending", "failed"):
                tally.setdefault((destination, state), 0)
        for (destination, state), n in sorted(tally.items()):
            sends.add_metric([destination, state], n)
        yield sends
        try:
            usage = shutil.disk_usage(self.config.inbox)
        except OSError as exc:
            log.warning("metrics: cannot read the inbox's disk usage (%s)", exc.strerror or type(exc).__name__)
            return
        yield GaugeMetricFamily("postbox_inbox_free_bytes", "Free bytes on the inbox's filesystem (the outbox's "
                                "too: they share one)", value=usage.free)
        yield GaugeMetricFamily("postbox_inbox_size_bytes", "Size in bytes of the inbox's filesystem",
                                value=usage.total)
