"""The PlatiPy-compatible ``app`` object: ``@app.register(...)`` and ``app.run(...)`` in a service.py."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from . import algorithms
from .config import Config
from .errors import ConfigError
from .index import Index
from .logs import configure_logging

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
            config: str | os.PathLike[str] | None = None) -> None:
        """Start everything configured and block until SIGINT/SIGTERM (PlatiPy's ``app.run``)."""
        http: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        dicom: dict[str, Any] = {}
        if dicom_listener_port is not None:
            dicom.update(port=dicom_listener_port, enabled=True)
        if dicom_listener_aetitle is not None:
            dicom["ae_title"] = dicom_listener_aetitle
        cfg = load_config(config, http=http, dicom=dicom)
        configure_logging("DEBUG" if debug else cfg.log_level)
        self.serve(cfg)

    def serve(self, cfg: Config) -> None:
        """Run the worker and every configured door (DICOM node and sender, HTTP) on ``cfg`` until stopped."""
        from .worker import Worker  # the CLI loads configs through this module without needing the worker

        index = Index(cfg.database)
        worker = Worker(cfg, index)
        self._stop.clear()
        doors: list[Any] = []
        if cfg.dicom.enabled:
            from .node import DicomNode
            from .sender import Sender

            sender = Sender(cfg, index)
            worker.finished_hooks.append(sender.notify)
            node = DicomNode(cfg, index)
            try:
                node.start()
            except OSError as exc:
                raise ConfigError("dicom.port", f"cannot listen on {cfg.dicom.host}:{cfg.dicom.port}: "
                                                f"{exc.strerror or exc}") from None
            sender.start()
            doors += [node, sender]
        http = self._start_http(cfg, index)
        if http is not None:
            doors.append(http)
            # A run's outputs become its dataset's data objects as it finishes, not on the client's next read.
            worker.finished_hooks.append(http.datasets.job_finished)
            if cfg.dicom.enabled:
                # A series an HTTP dataset waits for (dicom_retrieve SEND or MOVE) goes to that dataset.
                node.claimers.append(http.datasets.attach_series)

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("service: %s received, stopping", signal.Signals(signum).name)
            self.stop()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
        thread = threading.Thread(target=worker.run, name="worker")
        thread.start()
        try:
            while not self._stop.wait(0.5):
                if not thread.is_alive():
                    break
        finally:
            for door in doors:
                try:
                    door.stop()
                except Exception:  # one door failing to stop must not keep the worker running
                    log.exception("service: %s did not stop cleanly", type(door).__name__)
            worker.stop()
            thread.join()
        log.info("service: stopped")

    @staticmethod
    def _start_http(cfg: Config, index: Index) -> Any:
        """Start the HTTP facade if configured; None if disabled or its address is taken.

        A taken address closes only this door, loudly: several services may share one inbox (and one
        config.yaml) on one machine, and the second one's worker must still run.
        """
        if not cfg.http.enabled:
            return None
        from facade.server import HttpServer  # the outer layer, imported only by a service that serves it

        http = HttpServer(cfg, index)
        try:
            http.start()
        except OSError as exc:
            log.error("http: cannot listen on %s:%d (%s); the HTTP door stays closed in this process",
                      cfg.http.host, cfg.http.port, exc.strerror or exc)
            return None
        return http

    def stop(self) -> None:
        self._stop.set()


app = Service()
