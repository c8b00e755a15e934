"""The DICOM node: C-ECHO and C-STORE SCP that files each received series as one job.

Each instance is written atomically (temp file, rename) into a staging folder per (calling AE, study,
series), named by its SOP Instance UID, so a resent instance replaces rather than duplicates. A series
becomes a job when no instance has arrived for ``series_timeout`` seconds, or at association release
with ``complete_on_release``. A series that fails the completeness gate is held once more for
``series_timeout`` in case the rest arrives. Handlers are bound as data (pynetdicom's style) and refuse
with real Failure codes, never a warning a sender would take as stored.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import uid as _uid
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from . import gate, jobs
from .audit import AuditLog
from .checks import is_uid
from .config import Config, Route
from .crashpoints import crash_point
from .errors import InvalidInput
from .guard import Limits
from .health import DISK_FULL, Health, Throttle, is_disk_full
from .index import Index
from .metrics import Metrics
from .nodeguard import ASSOCIATE_RQ_LIMIT, GuardedServer

log = logging.getLogger(__name__)

STATE_FILE = jobs.RECEIVING  # in a series' staging folder: who sent it, where it goes
_LEGACY_STATE_FILE = "dicom-series.json"  # what 0.1.0 called it: series in flight across an upgrade resume too
SERIES_DIR = "series-1"

# pynetdicom's storage status table: only Failure codes refuse (0xB0xx would read as stored).
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
_ROUTING_KEYWORDS = ("Modality", "SeriesDescription", "StudyDescription", "BodyPartExamined", "ProtocolName",
                     "Manufacturer", "StationName")
# The syntaxes scanners and PACS send: uncompressed, deflated, and the common compressed ones, stored as
# received. Not pynetdicom's all 45: it copies the list per association (45 ms against 6 ms a set-up).
TRANSFER_SYNTAXES = [str(getattr(_uid, name)) for name in (
    "ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian", "ExplicitVRBigEndian",
    "JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLossless", "JPEGLosslessSV1", "JPEGLSLossless",
    "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000", "RLELossless", "HTJ2KLossless",
    "HTJ2KLosslessRPCL", "HTJ2K") if hasattr(_uid, name)]


@dataclass
class _Series:
    key: tuple[str, str, str]
    job_id: str
    staging: Path
    state: dict[str, Any]
    last: float
    writing: int = 0
    instances: int = 0
    associations: set[int] = field(default_factory=set)
    held: bool = False
    verdict: list[str] = field(default_factory=list)  # the completeness gate's problems, empty when whole
    # The gate's record of every image stored, by SOP Instance UID (a resend replaces its record). None when
    # they are not all known (a series resumed after a restart, a header the record refused): then the gate
    # reads the folder.
    geometry: dict[str, gate.Geometry] | None = field(default_factory=dict)
    failures: int = 0  # commits that failed (a full disk): tried again with backoff, never dropped
    retry_at: float = 0.0

    @property
    def folder(self) -> Path:
        return self.staging / jobs.INPUT / SERIES_DIR


def route_for(config: Config, called_ae: str, calling_ae: str, attributes: dict[str, Any]) -> Route | None:
    """The first route that matches, a default one when none does, or None to ignore the series."""
    for route in config.dicom.routes:
        if route.matches(called_ae, calling_ae, attributes):
            return route
    if config.dicom.unrouted == "ignore":
        return None
    return Route(algorithm=config.default_algorithm)


# Issue 11: ``postbox selftest`` sends its phantom with this calling AE title. Its series never goes on to a
# destination unless its SeriesDescription asks for a configured one ("POSTBOX-SELFTEST send to NAME"): the
# request travels in the series itself, so no config and no called AE title has to change for a self-test.
SELFTEST_AE = "POSTBOX-SELFTEST"
_SELFTEST_SEND = f"{SELFTEST_AE} send to "


def selftest_description(destination: str | None) -> str:
    """The SeriesDescription of a self-test phantom: asks the node to send it to ``destination``, or nowhere."""
    return f"{_SELFTEST_SEND}{destination}" if destination else f"{SELFTEST_AE} phantom"


def selftest_destinations(config: Config, calling_ae: str, route: Route, attributes: dict[str, Any]) -> list[Any]:
    """Where a series' results go: the route's destinations, except for a self-test's series.

    A series from :data:`SELFTEST_AE` goes to no destination at all, unless its SeriesDescription asks for
    one by name and that name is in ``dicom.destinations`` (never an address of the sender's choosing).
    """
    if calling_ae.strip() != SELFTEST_AE:
        return list(route.destinations)
    description = str(attributes.get("SeriesDescription", ""))
    name = description[len(_SELFTEST_SEND):].strip() if description.startswith(_SELFTEST_SEND) else ""
    return [name] if name and name in config.dicom.destinations else []


_RATIO_FLOOR = 64 * 10**6  # a deflated instance may always inflate this far, whatever its ratio
_DEFER = 1 << 16  # an element longer than this is skipped, not read: none of the attributes we need is as long


class _TooLarge(Exception):
    """An instance over ``dicom.max_instance_mb``, as received or once inflated: refused with 0xA700."""


def _headers(raw: bytes, transfer_syntax: str, *, max_bytes: int, max_ratio: float = 200.0) -> Any:
    """Parse just the attributes needed to file, route and gate an instance, never the pixel data.

    Everything filing and routing need comes before SeriesInstanceUID, and the completeness gate's geometry
    ends at PixelSpacing (``gate.LAST_TAG``): one parse serves all three, so a completed series is checked
    from records kept in memory, with no file read again (issue 8). Elements longer than 64 kB before
    them (a private blob) are skipped, not read.

    A deflated instance is inflated only as far as those attributes, then the rest is inflated and counted,
    never held: a 1 MB deflate bomb was inflated whole, to 1 GiB (issue 9). Raises _TooLarge for an
    instance over ``max_bytes``, as received or inflated, or one that inflates to more than ``max_ratio``
    times its deflated size (past 64 MB), as soon as that is known: such a bomb is refused whatever the size
    limit, since every later read of it would inflate it again.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        stream = _Inflating(raw, min(max_bytes, max(_RATIO_FLOOR, int(max_ratio * len(raw)))))
        ds = read_dataset(cast(BinaryIO, stream), False, True, stop_when=gate.past_last_tag, defer_size=_DEFER)
        stream.drain()
        return ds
    if len(raw) > max_bytes:
        raise _TooLarge(f"{len(raw) / 1e6:.1f} MB; dicom.max_instance_mb is {max_bytes / 1e6:g}")
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    return read_dataset(io.BytesIO(raw), implicit, little, stop_when=gate.past_last_tag, defer_size=_DEFER)


class _Inflating:
    """A deflated data set read as a file: inflated as far as it is read, with only a window of it kept.

    pydicom reads forward, skips deferred values by seeking forward (inflated and dropped here) and steps
    back a few bytes at most. Past ``limit`` inflated bytes, any read raises _TooLarge.
    """

    _OUT = 1 << 20  # inflated per step: memory stays about this
    _IN = 1 << 14  # deflated bytes fed per step (zlib copies what a step leaves unconsumed)
    _KEEP = 1 << 16  # kept behind the position, for pydicom's steps back

    def __init__(self, data: bytes, limit: int) -> None:
        self._data = memoryview(data)
        self._fed = 0
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._start = 0  # where _buf begins in the inflated stream
        self._pos = 0
        self._ended = False
        self.limit = limit
        self.size = 0  # inflated so far

    def _more(self) -> bytes:
        """The next piece of the inflated stream; b"" at its end."""
        while not self._ended:
            if self._z.unconsumed_tail:
                data: bytes | memoryview = self._z.unconsumed_tail
            elif self._fed < len(self._data) and not self._z.eof:
                data = self._data[self._fed:self._fed + self._IN]
                self._fed += len(data)
            else:
                data = b""
            chunk = self._z.decompress(data, self._OUT)
            if chunk:
                self.size += len(chunk)
                if self.size > self.limit:
                    raise _TooLarge(f"over {self.limit / 1e6:g} MB once inflated (dicom.max_instance_mb, "
                                    f"dicom.max_deflate_ratio), from {len(self._data) / 1e6:.1f} MB deflated")
                return chunk
            self._ended = not data
        return b""

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.limit + 1
        while self._start + len(self._buf) < self._pos + size and (chunk := self._more()):
            self._buf += chunk
        i = self._pos - self._start
        out = bytes(self._buf[i:i + size])
        self._pos += len(out)
        cut = self._pos - self._KEEP - self._start
        if cut > self._OUT:
            del self._buf[:cut]
            self._start += cut
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._pos + offset
        if whence not in (0, 1) or target < self._start:
            raise OSError(f"cannot seek to {target} in a deflated data set read from {self._start}")
        while self._start + len(self._buf) < target:  # skipped, not kept
            self._start += len(self._buf)
            self._buf.clear()
            if not (chunk := self._more()):
                break
            self._buf += chunk
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    def drain(self) -> int:
        """Inflate the rest, counting it; the instance's inflated size. ValueError if the data ends early."""
        self._buf.clear()
        while self._more():
            pass
        if not self._z.eof:
            raise ValueError("the deflated data set ends before its last block")
        return self.size


class DicomNode:
    """The C-STORE/C-ECHO SCP of one Postbox; a :class:`~pipeline.doors.Door`."""

    name = "dicom"

    def __init__(self, config: Config, index: Index | None = None, health: Health | None = None,
                 audit: AuditLog | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.index = index or Index(config.database)
        self.metrics = metrics  # issue 11: associations and instances counted, when the service publishes them
        self.health = health or Health()
        self.audit = audit or AuditLog.beside(config.database)  # a line per series received (issue 9)
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._retrying: list[_Series] = []  # complete series whose commit failed: tried again, never dropped
        self._throttle = Throttle(60.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._server: Any = None
        self._timer: threading.Thread | None = None
        self.port = config.dicom.port
        # Doors waiting for a series (an HTTP dataset's SEND or MOVE input): called with the series UID, its
        # folder and the sender when it completes; the first that takes the folder (returns True) gets it
        # and no job is made of it.
        self.claimers: list[Callable[[str, Path, dict[str, Any]], bool]] = []

    # -- lifecycle --

    def start(self) -> None:
        dcfg = self.config.dicom
        ae = AE(ae_title=dcfg.ae_title)
        ae.maximum_associations = dcfg.max_associations
        ae.network_timeout = 60
        # Large PDUs: a sender that can send a slice in one PDU does (1,802 PDUs for 300 slices, not 10,202).
        # Not unlimited: a PDU over what we advertise is refused before it is read (issue 9).
        ae.maximum_pdu_size = int(dcfg.max_pdu_mb * 1e6)
        for cx in AllStoragePresentationContexts:
            # Compressed syntaxes are accepted and stored as received: the algorithm decodes if it must.
            ae.add_supported_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if dcfg.allowed_ae_titles:
            ae.require_calling_aet = [str(a) for a in dcfg.allowed_ae_titles]
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
        ]
        if self.metrics is not None:
            metrics = self.metrics
            handlers += [(evt.EVT_ACCEPTED, lambda event: metrics.association(accepted=True)),
                         (evt.EVT_REJECTED, lambda event: metrics.association(accepted=False))]
        allowed = {str(h) for h in dcfg.allowed_hosts}

        def allow(host: str) -> bool:
            # A peer not on the list is closed at accept, before any DICOM is spoken.
            if allowed and host not in allowed:
                log.warning("dicom: connection from %s refused (not in dicom.allowed_hosts)", host)
                return False
            return True

        # The guard accepts, caps connections per address and waits for each A-ASSOCIATE-RQ in its own
        # thread: a silent connection never takes an association thread or a place in max_associations.
        limits = Limits(timeout=dcfg.associate_timeout, max_bytes=ASSOCIATE_RQ_LIMIT,
                        max_per_address=dcfg.max_connections_per_address)
        # TLS goes to the guard, which makes the handshake without blocking, under associate_timeout; not as
        # pynetdicom's ssl_context, which makes it in the accepting thread (one silent client stalls them all).
        tls = self.config.tls_files()["dicom.tls"].server_context() if dcfg.tls is not None else None
        self._server = ae.make_server((dcfg.host, dcfg.port), evt_handlers=handlers, server_class=GuardedServer,
                                      limits=limits, max_pdu=ae.maximum_pdu_size, allow=allow, tls=tls)
        # Only once the port is ours: a second service on this inbox, whose port was taken, must not take
        # over the series the first one is receiving.
        self._resume()
        threading.Thread(target=self._server.serve, name="dicom-node", daemon=True).start()
        self.port = self._server.server_address[1]
        self._timer = threading.Thread(target=self._run_timer, name="dicom-series-timer", daemon=True)
        self._timer.start()
        log.info("dicom: node %s listening on %s:%d%s", dcfg.ae_title, dcfg.host, self.port,
                 "" if tls is None else " over TLS" + (", client certificates required"
                                                       if dcfg.tls.require_client_cert else ""))

    def on_job_finished(self, manifest: jobs.JobManifest) -> None:
        """Nothing: results go back by the sender, not by this node."""

    def on_ready(self) -> None:
        """Nothing: this door serves from its start."""

    def ready_info(self) -> dict[str, Any] | None:
        return {"port": self.port, "ae_title": self.config.dicom.ae_title}

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.stop()  # the guard, then the listening socket (associations under way run on)
        if self._timer is not None:
            self._timer.join(timeout=timeout)

    # -- handlers (pynetdicom turns an exception into a failure status; we choose the code ourselves) --

    def _on_echo(self, event: Any) -> int:
        log.debug("dicom: C-ECHO from %s", event.assoc.requestor.ae_title)
        return 0x0000

    def _on_store(self, event: Any) -> int:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        # The title the peer called us by (routes match on it), not our own configured one.
        primitive = getattr(assoc.requestor, "primitive", None)
        called = str(getattr(primitive, "called_ae_title", None) or assoc.acceptor.ae_title).strip()
        try:
            raw = event.encoded_dataset(include_meta=False)
            ds = _headers(raw, event.context.transfer_syntax, max_bytes=int(self.config.dicom.max_instance_mb * 1e6),
                          max_ratio=self.config.dicom.max_deflate_ratio)
            sop_uid = str(ds.get("SOPInstanceUID") or event.request.AffectedSOPInstanceUID or "")
            study_uid, series_uid = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        except _TooLarge as exc:  # never stored: every later read of it would inflate it again
            log.warning("dicom: instance from %s refused (0xA700): %s", calling, exc)
            return OUT_OF_RESOURCES
        except Exception as exc:  # any parse error: the instance cannot be understood
            log.warning("dicom: instance from %s refused: does not parse (%s)", calling, type(exc).__name__)
            return CANNOT_UNDERSTAND
        if not (sop_uid and study_uid and series_uid) or not is_uid(sop_uid):  # it becomes a file name
            log.warning("dicom: instance from %s refused: no SOP Instance, Study or Series UID to file it by",
                        calling)
            return CANNOT_UNDERSTAND
        key = (calling, study_uid, series_uid)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                attributes = {k: str(ds.get(k, "") or "") for k in _ROUTING_KEYWORDS}
                route = route_for(self.config, called, calling, attributes)
                if route is None:
                    log.info("dicom: series %s from %s matches no route; ignored (dicom.unrouted)", series_uid,
                             calling)
                    return 0x0000
                try:
                    series = self._new_series(key, assoc, called, route, attributes)
                except OSError as exc:
                    self._refused_write(series_uid, exc)
                    return OUT_OF_RESOURCES
            series.writing += 1
            series.associations.add(id(assoc))
            series.last = time.monotonic()
        try:
            geometry = gate.Geometry.from_dataset(ds, name=f"{sop_uid}.dcm")
        except InvalidInput:
            geometry = None  # the gate reads the file at completion and says what is wrong with it
            series.geometry = None
        stored = False
        target = series.folder / f"{sop_uid}.dcm"
        tmp = series.folder / f".{sop_uid}.{secrets.token_hex(3)}.tmp"
        try:
            with open(tmp, "wb") as fh:
                # The bytes as received behind a Part 10 header; the same as encoded_dataset(include_meta=True)
                # without copying half a megabyte twice more per instance.
                fh.write(b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta))
                fh.write(raw)
                fh.flush()
                if hasattr(os, "posix_fadvise"):
                    # Start writing it to disk now, so the fsync at commit finds little left to do.
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            os.replace(tmp, target)  # a resent instance replaces the earlier copy
            stored = True
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._refused_write(series_uid, exc)
            return OUT_OF_RESOURCES
        finally:
            with self._lock:
                series.writing -= 1
                series.instances += stored
                series.last = time.monotonic()
                if stored and geometry is not None and series.geometry is not None:
                    series.geometry[sop_uid] = geometry
                if not stored and series.instances == 0 and series.writing == 0 \
                        and self._series.get(key) is series:
                    # Nothing of it was acknowledged: a refused first instance leaves no staging folder.
                    del self._series[key]
                    jobs.discard(series.staging)
        crash_point("node.stored")
        if self.metrics is not None:
            self.metrics.instance()
        if self.health.has(DISK_FULL):
            self.health.clear(DISK_FULL)
        return 0x0000

    def _refused_write(self, series_uid: str, exc: OSError) -> None:
        """An instance refused with 0xA700 because it could not be written; said once a minute."""
        if is_disk_full(exc):
            self.health.report(DISK_FULL, "the DICOM node refuses instances (0xA700) until there is space")
        if self._throttle.due(f"store-{exc.errno}"):
            log.error("dicom: instances refused (0xA700): cannot store them (%s); series %s",
                      exc.strerror or type(exc).__name__, series_uid)

    def _on_end(self, event: Any) -> None:
        ident = id(event.assoc)
        complete = []
        with self._lock:
            for series in self._series.values():
                if ident in series.associations:
                    series.associations.discard(ident)
                    if self.config.dicom.complete_on_release and not series.associations:
                        complete.append(series.key)
        if complete:
            self._wake.set()
            with self._lock:
                for key in complete:
                    if key in self._series:
                        self._series[key].last = 0.0  # due now

    # -- series to jobs --

    def _new_series(self, key: tuple[str, str, str], assoc: Any, called: str, route: Route,
                    attributes: dict[str, Any]) -> _Series:
        staging = jobs.stage(self.config.inbox)
        state = {
            "sender": {"calling_ae": key[0], "called_ae": called, "address": assoc.requestor.address,
                       "port": assoc.requestor.port},
            "study_instance_uid": key[1],
            "series_instance_uid": key[2],
            "modality": attributes.get("Modality", ""),
            # ``explicit``: a rule of dicom.routes took it (not the default for unrouted series); such a series
            # is the modality's own job and is never handed to a dataset waiting for it (issue 9).
            "route": {"algorithm": route.algorithm, "settings": dict(route.settings),
                      "destinations": selftest_destinations(self.config, key[0], route, attributes),
                      "structures": dict(route.structures),
                      "explicit": any(route is rule for rule in self.config.dicom.routes)},
        }
        try:
            (staging / jobs.INPUT / SERIES_DIR).mkdir()
            jobs.atomic_write(staging / STATE_FILE, json.dumps(state).encode())
        except BaseException:
            jobs.discard(staging)
            raise
        crash_point("node.staged")
        series = _Series(key, staging.name, staging, state, time.monotonic())
        self._series[key] = series
        log.info("dicom: series %s of study %s from %s (called %s) -> job %s, algorithm %s", key[2], key[1],
                 key[0], called, staging.name, route.algorithm)
        return series

    def _resume(self) -> None:
        """Pick up series a previous run was receiving: their timers start again from now.

        A staging folder with a job.yaml is a commit a crash interrupted; ``jobs.recover`` finishes those.
        """
        staging = self.config.staging
        if not staging.is_dir():
            return
        for sdir in sorted(staging.iterdir()):
            state_file = next((sdir / n for n in (STATE_FILE, _LEGACY_STATE_FILE) if (sdir / n).is_file()), None)
            if state_file is None or (sdir / jobs.JOB_FILE).exists():
                continue
            try:
                state = json.loads(state_file.read_text())
                key = (state["sender"]["calling_ae"], state["study_instance_uid"], state["series_instance_uid"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("dicom: staging folder %s has an unreadable %s (%s); left for an operator", sdir.name,
                          state_file.name, type(exc).__name__)
                continue
            series = _Series(key, sdir.name, sdir, state, time.monotonic(), geometry=None)
            series.instances = sum(1 for _ in series.folder.glob("*.dcm")) if series.folder.is_dir() else 0
            self._series[key] = series
            log.info("dicom: resumed series %s (%d instances) as job %s", key[2], series.instances, sdir.name)

    def _run_timer(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._complete_due()
            except Exception:
                log.exception("dicom: series completion failed; trying again")
                wait = 1.0
            self._wake.wait(min(wait, 1.0))
            self._wake.clear()

    def _complete_due(self) -> float:
        timeout = self.config.dicom.series_timeout
        now = time.monotonic()
        due: list[_Series] = []
        wait = timeout
        with self._lock:
            for key, series in list(self._series.items()):
                idle = now - series.last
                if series.writing == 0 and idle >= timeout or (series.last == 0.0 and series.writing == 0):
                    del self._series[key]  # a later instance of this series starts a new job
                    due.append(series)
                else:
                    wait = min(wait, max(0.01, timeout - idle))
        for series in list(self._retrying):
            if series.retry_at <= now:
                self._retrying.remove(series)
                due.append(series)
            else:
                wait = min(wait, series.retry_at - now)
        for series in due:
            try:
                self._complete(series)
            except Exception as exc:
                # Whatever was acknowledged stays in its staging folder and is tried again, with backoff,
                # until its job exists (issue 8); a restart resumes it too.
                series.failures += 1
                delay = min(self.config.worker.disk_full_backoff_max, 0.5 * 2 ** series.failures)
                series.retry_at = time.monotonic() + delay
                self._retrying.append(series)
                wait = min(wait, delay)
                if is_disk_full(exc):
                    self.health.report(DISK_FULL, "the DICOM node cannot commit received series")
                if series.failures == 1 or self._throttle.due(f"commit-{series.job_id}"):
                    log.error("dicom: series %s could not become job %s (%s); trying again in %.1f s", series.key[2],
                              series.job_id, exc.strerror if isinstance(exc, OSError) else exc, delay)
        return wait

    def _complete(self, series: _Series) -> None:
        if series.failures == 0:
            if not self._gate_passes(series):
                return
        state = series.state
        # A series an explicit route matched is never diverted; one staged before routes were recorded so
        # (no "explicit") may be, as it could then.
        claimers = [] if state["route"].get("explicit") else self.claimers
        n = sum(1 for _ in series.folder.glob("*.dcm")) if series.folder.is_dir() else 0
        for claimer in claimers:
            try:
                taken = claimer(state["series_instance_uid"], series.folder, state["sender"])
            except Exception:
                log.exception("dicom: series %s could not be handed to a waiting dataset", series.key[2])
                taken = False
            if taken:
                self._audit_received(state, n, job_id=None)  # counted before: the dataset moved the folder
                shutil.rmtree(series.staging, ignore_errors=True)
                log.info("dicom: series %s complete; taken by a waiting dataset", series.key[2])
                return
        if n == 0:
            # Staged, but no instance was stored (and none acknowledged): there is nothing to run.
            jobs.discard(series.staging)
            log.info("dicom: series %s ended with no instance stored; nothing to do", series.key[2])
            return
        route = state["route"]
        manifest = jobs.JobManifest(
            id=series.job_id, algorithm=route["algorithm"], settings=route["settings"], source="dicom",
            sender=state["sender"],
            # The worker takes the gate's verdict from here rather than reading every file again.
            inputs=[jobs.series_input(1, SERIES_DIR, state["series_instance_uid"], n, gate=series.verdict,
                                      study_instance_uid=state["study_instance_uid"], modality=state["modality"])],
            delivery=jobs.Delivery(destinations=route["destinations"], structures=route["structures"]),
        )
        crash_point("node.complete")
        jobs.commit(self.config.inbox, series.staging, manifest, index=self.index)
        # Once the job exists, not before: a commit tried again after a failure is recorded once.
        self._audit_received(state, n, job_id=series.job_id)
        if series.failures:
            self.health.clear(DISK_FULL)
        log.info("dicom: series %s complete with %d instances -> job %s", series.key[2], n, series.job_id)

    def _audit_received(self, state: dict[str, Any], n: int, *, job_id: str | None) -> None:
        """One ``c-store-received`` line for a series, made a job (``job_id``) or taken by a waiting dataset.

        Who sent it (calling AE title, address) and its UID: never a patient's name or ID.
        """
        sender = state["sender"]
        self.audit.record("c-store-received", who=str(sender.get("calling_ae") or "?"),
                          address=sender.get("address"), job=job_id, series_uid=state["series_instance_uid"],
                          count=n)

    def _gate_passes(self, series: _Series) -> bool:
        """Run the completeness gate; False if the series is held once more for the rest to arrive."""
        try:
            if series.geometry is not None:
                series.verdict = gate.problems_of(series.geometry.values(), series_dir=series.folder)
            else:
                series.verdict = gate.problems(series.folder)
        except InvalidInput as exc:
            series.verdict = [exc.reason]
        if series.verdict and not series.held:
            # Hold once more in case the rest is still coming (a resend, a second association).
            series.held = True
            series.last = time.monotonic()
            with self._lock:
                if series.key not in self._series:
                    self._series[series.key] = series
                    log.info("dicom: series %s incomplete (%s); holding for another %.0f s", series.key[2],
                             gate.summary(series.verdict), self.config.dicom.series_timeout)
                    return False
                # Instances arrived meanwhile under a new staging folder: keep both, commit this one.
        return True
