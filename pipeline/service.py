"""The PlatiPy-compatible ``app`` object: ``@app.register(...)`` and ``app.run(...)`` in a service.py."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from . import algorithms
from .config import Config
from .doors import Door
from .errors import PostboxError
from .health import Health
from .index import Index
from .logs import configure_logging
from .systemd import notify

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """config.yaml (``--config``, ``$POSTBOX_CONFIG``, ``./config.yaml``) plus the registered algorithms."""
    import yaml

    from .config import ENV_VAR

    registered = algorithms.registered()
    if path is None:
        path = os.environ.get(ENV_VAR) or ("config.yaml" if Path("config.yaml").is_file() else None)
    if path is None:
        data: dict[str, Any] = {}
        base, source = Path.cwd(), None
    else:
        source = Path(path).resolve()
        cfg = Config.from_file(source, check_folders=False)  # validates the file on its own first
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        base = cfg.base_dir
    if registered:
        # A PlatiPy-style service.py serves what it registers; config.yaml may add more.
        data.setdefault("algorithms", [])
        data.setdefault("default_algorithm", registered[0].name)
    cfg = Config.from_dict(data, base_dir=base, source=source, registered=registered, check_folders=False)
    for section, values in overrides.items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    cfg.check_folders()
    return cfg


class Service:
    """Runs the doors and the worker of one Postbox until SIGINT or SIGTERM."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def register(self, name: str, default_settings: Mapping[str, Any] | None = None,
                 **options: Any) -> Callable[[F], F]:
        """PlatiPy's ``@app.register(name, default_settings=...)``."""
        return algorithms.register(name, default_settings, **options)

    def run(self, host: str | None = None, port: int | None = None, dicom_listener_port: int | None = None,
            dicom_listener_aetitle: str | None = None, debug: bool = False,
            config: str | os.PathLike[str] | None = None) -> int:
        """Start everything configured and block until SIGINT/SIGTERM (PlatiPy's ``app.run``)."""
        http: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        dicom: dict[str, Any] = {}
        if dicom_listener_port is not None:
            dicom.update(port=dicom_listener_port, enabled=True)
        if dicom_listener_aetitle is not None:
            dicom["ae_title"] = dicom_listener_aetitle
        cfg = load_config(config, http=http, dicom=dicom)
        configure_logging("DEBUG" if debug else cfg.log_level, cfg.log_format)
        return self.serve(cfg)

    def serve(self, cfg: Config) -> int:
        """Run the worker and every configured door on ``cfg`` until stopped; returns the exit code.

        A door whose port is taken stays closed, loudly, and the rest runs (several services may share one
        inbox and one config.yaml). What keeps the service from starting at all ends it with exit code 1.
        """
        from .worker import Worker  # the CLI loads configs through this module without needing the worker

        os.umask(cfg.permissions.umask)  # patient data and the index: the service account's alone by default
        _raise_descriptor_limit()
        for warning in exposure_warnings(cfg):
            log.warning("service: %s", warning)
        index = Index(cfg.database)
        index.check()  # IndexDamaged (exit 2) before anything runs: the keys cannot be rebuilt from the folders
        health = Health()
        worker = Worker(cfg, index, health)
        self._stop.clear()
        doors = self._start_doors(cfg, index, health)
        for door in doors:
            worker.finished_hooks.append(door.on_job_finished)
        by_name = {door.name: door for door in doors}
        node, http = by_name.get("dicom"), by_name.get("http")
        if node is not None and http is not None:
            # A series an HTTP dataset waits for (dicom_retrieve SEND or MOVE) goes to that dataset.
            node.claimers.append(http.attach_series)  # type: ignore[attr-defined]
        retention = by_name.get("retention")
        if retention is not None and http is not None:
            # Jobs removed by retention take their HTTP records (site datasets, output data objects) with them.
            retention.forgetters.append(http.forget_jobs)  # type: ignore[attr-defined]
        ports = {door.name: info for door in doors if (info := door.ready_info()) is not None}

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("service: %s received, stopping", signal.Signals(signum).name)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
        failure: list[BaseException] = []

        def run_worker() -> None:
            try:
                worker.run()
            except BaseException as exc:
                failure.append(exc)
                log.error("service: the worker cannot run: %s", exc, exc_info=not isinstance(exc, PostboxError))
                self.stop()

        thread = threading.Thread(target=run_worker, name="worker")
        thread.start()
        ready = None
        try:
            while not self._stop.wait(0.05):
                if ready is None and worker.ready.is_set():
                    ready = ReadyFile.write(cfg.inbox, ports)
                    for door in doors:
                        door.on_ready()
                    # Type=notify (contrib/postbox.service): systemd counts the service started from here on.
                    notify("READY=1", "STATUS=serving: " + (", ".join(f"{k} port {v['port']}" for k, v in ports.items())
                                                            or "the inbox only"))
                if not thread.is_alive():
                    break
        finally:
            notify("STOPPING=1")
            # Stop claiming first, so nothing new starts while the doors close; then the doors (a hung send is
            # aborted, its state stays pending); each within what is left of worker.stop_timeout.
            deadline = time.monotonic() + cfg.worker.stop_timeout
            worker.stop()
            for door in doors:
                try:
                    door.stop(timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # one door failing to stop must not keep the worker running
                    log.exception("service: %s did not stop cleanly", type(door).__name__)
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
            if ready is not None:
                ready.remove()
        if thread.is_alive():
            log.error("service: jobs did not stop within worker.stop_timeout (%.0f s); exiting anyway; they run "
                      "again at the next start", cfg.worker.stop_timeout)
            return 1
        log.info("service: stopped")
        return 1 if failure else 0

    @staticmethod
    def _start_doors(cfg: Config, index: Index, health: Health) -> list[Door]:
        """Make and start every door configured; the ones that started, in the order to stop them.

        A taken address closes only that door, loudly: several services may share one inbox (and one
        config.yaml) on one machine, and the second one's worker must still run. The sender runs whenever
        DICOM is on, port or not: it delivers what this service's worker finishes, and a lock per send
        keeps two services from delivering one file twice.
        """
        from .metrics import Metrics  # issue 11: this service's own registry, counted into by the doors

        metrics = Metrics(cfg, index)
        made: list[tuple[Door, str]] = [(metrics, "")]
        if cfg.dicom.enabled:
            from .node import DicomNode
            from .sender import Sender

            made.append((DicomNode(cfg, index, health, metrics=metrics), f"{cfg.dicom.host}:{cfg.dicom.port}"))
            made.append((Sender(cfg, index), ""))
        if cfg.http.enabled:
            from facade.server import HttpServer  # the outer layer, imported only by a service that serves it

            made.append((HttpServer(cfg, index, health, metrics=metrics), f"{cfg.http.host}:{cfg.http.port}"))
        if cfg.retention.rules:  # issue 11: without a rule every job is kept, and nothing sweeps
            from .retention import Retention

            made.append((Retention(cfg, index), ""))
        from .preview import PreviewMaker  # issue 11: each finished job's contour preview, after its sends

        made.append((PreviewMaker(cfg, index), ""))
        started: list[Door] = []
        for door, address in made:
            try:
                door.start()
            except OSError as exc:
                log.error("%s: cannot listen on %s (%s); the %s door stays closed in this process", door.name,
                          address, exc.strerror or exc, door.name.upper())
                continue
            started.append(door)
        return started

    def stop(self) -> None:
        self._stop.set()


app = Service()


def _raise_descriptor_limit() -> None:
    """Take the hard limit on open files as the soft one (1,024 by default on many systems).

    Each connection a door's guard holds while it waits for a request costs a descriptor; at the limit the
    guard pauses accepting, for everyone. The hard limit is the operator's to set (systemd's LimitNOFILE).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("service: open files stay limited to %d (%s)", soft, exc)
            return
    log.debug("service: up to %s open files", wanted)


def exposure_warnings(cfg: Config) -> list[str]:
    """Each door open to the network without TLS, or without an allow-list of who may connect (issue 9)."""
    found = []
    if cfg.http.enabled and not _loopback(cfg.http.host) and cfg.http.tls is None:
        found.append(f"the HTTP door listens on {cfg.http.host} without TLS (http.tls): API keys and patient data "
                     "cross the network in clear")
    if cfg.dicom.enabled and not _loopback(cfg.dicom.host):
        if cfg.dicom.tls is None:
            found.append(f"the DICOM door listens on {cfg.dicom.host} without TLS (dicom.tls): images cross the "
                         "network in clear")
        if not cfg.dicom.allowed_ae_titles and not cfg.dicom.allowed_hosts:
            found.append(f"the DICOM door listens on {cfg.dicom.host} for anyone (no dicom.allowed_ae_titles or "
                         "dicom.allowed_hosts)")
    return found


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReadyFile:
    """``inbox/.services/<host>-<pid>.json``: this process serves, with these doors on these ports.

    Written once the worker watches the inbox and the doors listen; removed at a clean stop. Tests and
    operators' scripts learn from it that a service is ready and where, instead of reading its log. Each
    service of several on one inbox writes its own.
    """

    FOLDER = ".services"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def path_for(cls, inbox: Path, pid: int | None = None) -> Path:
        return inbox / cls.FOLDER / f"{socket.gethostname()}-{pid or os.getpid()}.json"

    @classmethod
    def write(cls, inbox: Path, doors: dict[str, Any]) -> ReadyFile:
        from .jobs import atomic_write, now_iso

        path = cls.path_for(inbox)
        path.parent.mkdir(exist_ok=True)
        data = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "doors": doors}
        atomic_write(path, json.dumps(data).encode(), durable=False)
        log.info("service: ready (%s)", ", ".join(f"{k} port {v['port']}" for k, v in doors.items()) or "no doors")
        return cls(path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
