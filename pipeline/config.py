"""Load config.yaml into frozen dataclasses, validating every key at load time."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .tls import TlsFiles

ENV_VAR = "POSTBOX_CONFIG"
BUNDLED_ALGORITHM = "body-lungs"
OUTPUT_KINDS = ("rtstruct", "seg")


def _check_type(key: str, value: Any, kind: Any) -> Any:
    """Coerce ``value`` to ``kind`` where that is lossless, else raise ConfigError naming ``key``."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, not {type(value).__name__}")
        return tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else str(kind)
        raise ConfigError(key, f"must be of type {name}, not {type(value).__name__} ({value!r})")
    return value


def _build(cls: Any, data: Any, prefix: str, *, also_known: tuple[str, ...] = (), **extra: Any) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"must be a mapping, not {type(data).__name__}")
    known = {f.name: f for f in fields(cls) if f.metadata.get("key", True)}
    values: dict[str, Any] = dict(extra)
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise ConfigError(full, f"unknown key (known: {', '.join(sorted([*known, *also_known]))})")
        kind = known[key].metadata.get("type")
        if kind is not None and value is not None:
            value = _check_type(full, value, kind)
        elif value is None and not known[key].metadata.get("nullable", False):
            raise ConfigError(full, "must not be empty")
        values[key] = value
    return cls(**values)


def _positive(key: str, value: float, *, zero: bool = False) -> None:
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(key, f"must be {'>= 0' if zero else '> 0'}, not {value}")


def _t(kind: Any, *, nullable: bool = False) -> Any:
    return {"type": kind, "nullable": nullable}


@dataclass(frozen=True)
class WorkerConfig:
    """How jobs are picked up and run."""

    processes: int = field(default=1, metadata=_t(int))
    job_timeout: float = field(default=3600.0, metadata=_t(float))
    max_attempts: int = field(default=3, metadata=_t(int))
    settle_seconds: float = field(default=2.0, metadata=_t(float))
    rescan_seconds: float = field(default=5.0, metadata=_t(float))
    keep_warm: bool = field(default=True, metadata=_t(bool))
    max_jobs_per_child: int = field(default=100, metadata=_t(int))
    stop_timeout: float = field(default=10.0, metadata=_t(float))
    disk_full_backoff_max: float = field(default=60.0, metadata=_t(float))

    def __post_init__(self) -> None:
        _positive("worker.processes", self.processes)
        _positive("worker.stop_timeout", self.stop_timeout)
        _positive("worker.disk_full_backoff_max", self.disk_full_backoff_max)
        _positive("worker.job_timeout", self.job_timeout)
        _positive("worker.max_attempts", self.max_attempts)
        _positive("worker.settle_seconds", self.settle_seconds, zero=True)
        _positive("worker.rescan_seconds", self.rescan_seconds)
        _positive("worker.max_jobs_per_child", self.max_jobs_per_child)


@dataclass(frozen=True)
class TlsConfig:
    """TLS of a door (``cert``, ``key``; ``ca`` and ``require_client_cert`` for client certificates) or of a
    peer we connect to (``ca`` to check it, ``cert``/``key`` to show ours). Paths are relative to config.yaml."""

    cert: str | None = field(default=None, metadata=_t(str, nullable=True))
    key: str | None = field(default=None, metadata=_t(str, nullable=True))
    ca: str | None = field(default=None, metadata=_t(str, nullable=True))
    require_client_cert: bool = field(default=False, metadata=_t(bool))

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls", "cert and key go together")
        if self.require_client_cert and self.ca is None:
            raise ConfigError("tls.require_client_cert", "needs tls.ca, the CA that client certificates come from")

    def files(self, base_dir: Path) -> TlsFiles:
        """The files as absolute paths, resolved against config.yaml's folder."""
        def resolve(value: str | None) -> Path | None:
            return None if value is None else (base_dir / value).resolve()

        return TlsFiles(cert=resolve(self.cert), key=resolve(self.key), ca=resolve(self.ca),
                        require_client_cert=self.require_client_cert)


def _tls(key: str, value: Any) -> TlsConfig | None:
    if value is None or isinstance(value, TlsConfig):
        return value
    return _build(TlsConfig, value, key)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP facade: where it listens, how many requests at once, and the limits on uploads.

    ``port: 0`` takes any free port (the service log says which). ``max_unpacked_mb`` and
    ``max_zip_entries`` bound what a zipped DICOM series may unpack to (zip bombs); ``sweep_seconds``
    is how often expired datasets are looked for. ``site_jobs`` is how many of the latest jobs of the
    keyless doors (folder, DICOM, CLI) ``GET /api/datasets`` lists to a site key.

    ``allowed_locations`` are the hosts a DICOM location made over HTTP may name (host names, addresses or
    CIDR blocks); empty allows only the hosts of ``dicom.destinations`` (issue 9: a key must not make the
    service connect wherever it likes). An entry may be ``{host: ..., tls: {ca, cert, key}}``: a location
    on it is reached over TLS with those files. A client never names a file on the server.
    ``max_datasets_per_key`` and ``max_stored_mb_per_key`` are each key's quotas (429 past them).

    Against abuse without a key (issue 9): a connection has ``header_timeout`` seconds to send its request
    line and headers (408), which may be ``max_header_kb`` long (431), and one address may have
    ``max_connections_per_address`` connections open at once: fewer than ``threads``, so that one address
    cannot occupy every thread with requests whose bodies it sends slowly.

    A status request holds a PENDING or RUNNING answer up to ``status_wait_ms`` and answers as soon as the
    job ends (issue 10: PlatiPy's client polls once, then sleeps a second). Each waiting request holds a
    thread, so at most ``max_waiters`` wait at once (and never all of ``threads``); beyond that a status
    request answers at once. 0 for either turns the wait off.
    """

    host: str = field(default="127.0.0.1", metadata=_t(str))
    port: int = field(default=8000, metadata=_t(int))
    enabled: bool = field(default=True, metadata=_t(bool))
    max_upload_mb: float = field(default=2048.0, metadata=_t(float))
    max_unpacked_mb: float = field(default=8192.0, metadata=_t(float))
    max_zip_entries: int = field(default=10000, metadata=_t(int))
    threads: int = field(default=16, metadata=_t(int))
    sweep_seconds: float = field(default=60.0, metadata=_t(float))
    site_jobs: int = field(default=100, metadata=_t(int))
    tls: Any = field(default=None, metadata=_t(dict, nullable=True))
    allowed_locations: tuple = field(default=(), metadata=_t(tuple))
    max_datasets_per_key: int = field(default=1000, metadata=_t(int))
    max_stored_mb_per_key: float = field(default=50000.0, metadata=_t(float))
    header_timeout: float = field(default=10.0, metadata=_t(float))
    max_header_kb: float = field(default=64.0, metadata=_t(float))
    max_connections_per_address: int = field(default=12, metadata=_t(int))
    status_wait_ms: int = field(default=900, metadata=_t(int))
    max_waiters: int = field(default=8, metadata=_t(int))

    def __post_init__(self) -> None:
        _positive("http.status_wait_ms", self.status_wait_ms, zero=True)
        _positive("http.max_waiters", self.max_waiters, zero=True)
        _positive("http.header_timeout", self.header_timeout)
        _positive("http.max_header_kb", self.max_header_kb)
        _positive("http.max_connections_per_address", self.max_connections_per_address)
        object.__setattr__(self, "allowed_locations", tuple(
            _location_entry(f"http.allowed_locations[{i}]", entry) for i, entry in enumerate(self.allowed_locations)))
        _positive("http.max_datasets_per_key", self.max_datasets_per_key)
        _positive("http.max_stored_mb_per_key", self.max_stored_mb_per_key)
        object.__setattr__(self, "tls", _tls("http.tls", self.tls))
        if self.tls is not None and self.tls.cert is None:
            raise ConfigError("http.tls", "needs cert and key to serve HTTPS")
        _positive("http.site_jobs", self.site_jobs, zero=True)
        if not 0 <= self.port < 65536:
            raise ConfigError("http.port", f"must be a TCP port (0 for any free one), not {self.port}")
        _positive("http.max_upload_mb", self.max_upload_mb)
        _positive("http.max_unpacked_mb", self.max_unpacked_mb)
        _positive("http.max_zip_entries", self.max_zip_entries)
        _positive("http.threads", self.threads)
        _positive("http.sweep_seconds", self.sweep_seconds)

    def allows_location(self, host: str, *, destinations: Iterable[str] = ()) -> bool:
        """Whether a DICOM location may name ``host``: it is on ``allowed_locations``, or, when that is
        empty, one of ``destinations`` (the hosts of ``dicom.destinations``).

        An address matches an address or CIDR entry; a host name matches the same name only. A name is never
        resolved to match an address entry: what it resolves to may change between this check and the
        connection, so ``localhost`` is refused unless named.
        """
        if not self.allowed_locations:
            return _matches(host, [_host_form(h) for h in destinations]) is not None
        return self.location_entry(host) is not None

    def location_entry(self, host: str) -> AllowedLocation | None:
        """The first entry of ``allowed_locations`` that ``host`` matches, or None."""
        found = _matches(host, [e.host for e in self.allowed_locations])
        return None if found is None else self.allowed_locations[found]


@dataclass(frozen=True)
class AllowedLocation:
    """One ``http.allowed_locations`` entry: an address, a CIDR block or a host name, and how to reach it."""

    host: str
    tls: TlsConfig | None = None


def _matches(host: str, entries: list[str]) -> int | None:
    """The index of the first entry ``host`` matches: an address in an address or CIDR entry, a name by name."""
    wanted = _host_form(host)
    try:
        address = ipaddress.ip_address(wanted)
    except ValueError:
        return entries.index(wanted) if wanted in entries else None
    for i, entry in enumerate(entries):
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return i
        except ValueError:
            continue  # a host name entry
    return None


_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _host_form(host: str) -> str:
    """A host as compared: lower case, without a trailing dot or the brackets of an IPv6 literal."""
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def _location_entry(key: str, value: Any) -> AllowedLocation:
    """One ``http.allowed_locations`` entry, checked: a host, or ``{host: ..., tls: {...}}``."""
    if isinstance(value, AllowedLocation):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"host", "tls"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "is not a key of an allowed location (host, tls)")
        tls = _tls(f"{key}.tls", value.get("tls"))
        if tls is not None and tls.require_client_cert:
            raise ConfigError(f"{key}.tls.require_client_cert", "is for a door; a location is a peer we connect to")
        return AllowedLocation(_location_host(f"{key}.host", value.get("host")), tls)
    return AllowedLocation(_location_host(key, value))


def _location_host(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"must be a host name, an address or a CIDR block, not {value!r}")
    entry = _host_form(value)
    try:
        return str(ipaddress.ip_network(entry, strict=False))
    except ValueError:
        pass
    labels = entry.split(".")
    if "/" in entry or ":" in entry or len(entry) > 253 or not all(_HOST_LABEL.match(x) for x in labels) \
            or labels[-1].isdigit():
        # A name whose last label is a number is a mistyped address (10.0.0.300), not a host name.
        raise ConfigError(key, f"{value!r} is not a host name, an address or a CIDR block (such as 10.1.0.0/16)")
    return entry


@dataclass(frozen=True)
class Destination:
    """A DICOM peer results are sent to (C-STORE SCP)."""

    host: str = field(metadata=_t(str))
    port: int = field(metadata=_t(int))
    ae_title: str = field(metadata=_t(str))
    tls: Any = field(default=None, metadata=_t(dict, nullable=True))

    def __post_init__(self) -> None:
        object.__setattr__(self, "tls", _tls("dicom.destinations.tls", self.tls))
        if not 0 < self.port < 65536:
            raise ConfigError("dicom.destinations.port", f"must be a TCP port, not {self.port}")
        if not 0 < len(self.ae_title.strip()) <= 16:
            raise ConfigError("dicom.destinations.ae_title", f"must be 1 to 16 characters, not {self.ae_title!r}")


@dataclass(frozen=True)
class Route:
    """Which algorithm a received series runs, and where its results go; the first match wins.

    ``called_ae``, ``calling_ae`` and the values of ``match`` (DICOM keyword -> pattern) are shell-style
    patterns, compared without regard to case.
    """

    algorithm: str = field(metadata=_t(str))
    called_ae: str | None = field(default=None, metadata=_t(str, nullable=True))
    calling_ae: str | None = field(default=None, metadata=_t(str, nullable=True))
    match: dict = field(default_factory=dict, metadata=_t(dict))
    settings: dict = field(default_factory=dict, metadata=_t(dict))
    destinations: tuple = field(default=(), metadata=_t(tuple))
    structures: dict = field(default_factory=dict, metadata=_t(dict))

    def matches(self, called_ae: str, calling_ae: str, attributes: Mapping[str, Any]) -> bool:
        """Whether a series with these AE titles and attributes takes this route."""
        if self.called_ae is not None and not fnmatch.fnmatchcase(called_ae.upper(), self.called_ae.upper()):
            return False
        if self.calling_ae is not None and not fnmatch.fnmatchcase(calling_ae.upper(), self.calling_ae.upper()):
            return False
        for keyword, pattern in self.match.items():
            value = str(attributes.get(keyword, "") or "")
            if not fnmatch.fnmatchcase(value.upper(), str(pattern).upper()):
                return False
        return True


@dataclass(frozen=True)
class DicomConfig:
    """The DICOM node, its routes and the destinations results are sent to.

    Against abuse without a key (issue 9): a connection has ``associate_timeout`` seconds to send its
    A-ASSOCIATE-RQ, one address may have ``max_connections_per_address`` connections open at once (fewer than
    ``max_associations``, so that one address cannot take every association), a PDU may
    be ``max_pdu_mb`` long (our advertised maximum; a longer one aborts the association before it is read),
    and an instance ``max_instance_mb``, as received or once inflated (0xA700 past it); a deflated one may
    inflate to at most ``max_deflate_ratio`` times its size once past 64 MB (a deflate bomb).
    """

    ae_title: str = field(default="POSTBOX", metadata=_t(str))
    port: int = field(default=7777, metadata=_t(int))
    host: str = field(default="0.0.0.0", metadata=_t(str))
    enabled: bool = field(default=True, metadata=_t(bool))
    series_timeout: float = field(default=10.0, metadata=_t(float))
    complete_on_release: bool = field(default=False, metadata=_t(bool))
    incomplete: str = field(default="fail", metadata=_t(str))
    allowed_ae_titles: tuple = field(default=(), metadata=_t(tuple))
    allowed_hosts: tuple = field(default=(), metadata=_t(tuple))
    routes: tuple = field(default=(), metadata=_t(tuple))
    unrouted: str = field(default="run", metadata=_t(str))
    destinations: dict = field(default_factory=dict, metadata=_t(dict))
    send_retry_seconds: float = field(default=3600.0, metadata=_t(float))
    send_backoff_max: float = field(default=60.0, metadata=_t(float))
    send_early: bool = field(default=True, metadata=_t(bool))
    max_associations: int = field(default=10, metadata=_t(int))
    tls: Any = field(default=None, metadata=_t(dict, nullable=True))
    associate_timeout: float = field(default=10.0, metadata=_t(float))
    max_connections_per_address: int = field(default=8, metadata=_t(int))
    max_pdu_mb: float = field(default=16.0, metadata=_t(float))
    max_instance_mb: float = field(default=2048.0, metadata=_t(float))
    max_deflate_ratio: float = field(default=200.0, metadata=_t(float))

    def __post_init__(self) -> None:
        object.__setattr__(self, "tls", _tls("dicom.tls", self.tls))
        if self.tls is not None and self.tls.cert is None:
            raise ConfigError("dicom.tls", "needs cert and key to serve DICOM over TLS")
        if self.incomplete not in ("fail", "run"):
            raise ConfigError("dicom.incomplete", f"must be 'fail' or 'run', not {self.incomplete!r}")
        if self.unrouted not in ("run", "ignore"):
            raise ConfigError("dicom.unrouted", f"must be 'run' or 'ignore', not {self.unrouted!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError("dicom.port", f"must be a TCP port (0 for any free one), not {self.port}")
        if not 0 < len(self.ae_title.strip()) <= 16:
            raise ConfigError("dicom.ae_title", f"must be 1 to 16 characters, not {self.ae_title!r}")
        _positive("dicom.series_timeout", self.series_timeout)
        _positive("dicom.send_retry_seconds", self.send_retry_seconds)
        _positive("dicom.send_backoff_max", self.send_backoff_max)
        _positive("dicom.max_associations", self.max_associations)
        _positive("dicom.associate_timeout", self.associate_timeout)
        _positive("dicom.max_connections_per_address", self.max_connections_per_address)
        _positive("dicom.max_pdu_mb", self.max_pdu_mb)
        _positive("dicom.max_instance_mb", self.max_instance_mb)
        _positive("dicom.max_deflate_ratio", self.max_deflate_ratio)
        dests = {}
        for name, spec in self.destinations.items():
            dests[str(name)] = spec if isinstance(spec, Destination) else _build(Destination, spec,
                                                                                 f"dicom.destinations.{name}")
        object.__setattr__(self, "destinations", dests)
        routes = []
        for i, spec in enumerate(self.routes):
            route = spec if isinstance(spec, Route) else _build(Route, spec, f"dicom.routes[{i}]")
            for dest in route.destinations:
                if dest not in dests:
                    raise ConfigError(f"dicom.routes[{i}].destinations",
                                      f"'{dest}' is not in dicom.destinations ({', '.join(dests) or 'none'})")
            routes.append(route)
        object.__setattr__(self, "routes", tuple(routes))


@dataclass(frozen=True)
class PermissionsConfig:
    """Modes of what Postbox creates: patient data and the index are the service account's alone by default.

    Applied as the process's umask at start (issue 9), so the algorithm's own files, made in its child
    process, get them too. A umask can only take bits away: files and folders must differ only in the
    execute bits (``0640`` with ``0750``, not ``0600`` with ``0755``).
    """

    files: str = field(default="0600", metadata=_t(str))
    folders: str = field(default="0700", metadata=_t(str))

    def __post_init__(self) -> None:
        for key in ("files", "folders"):
            value = getattr(self, key)
            if not (isinstance(value, str) and len(value) in (3, 4) and all(c in "01234567" for c in value)):
                raise ConfigError(f"permissions.{key}", f"must be an octal mode in quotes such as \"0600\", "
                                                        f"not {value!r}")
        if 0o666 & ~self.umask != int(self.files, 8):
            raise ConfigError("permissions.files", f"{self.files} and folders {self.folders} must differ only in the "
                                                   "execute bits (a umask can only take bits away)")

    @property
    def umask(self) -> int:
        """The process umask that gives these modes."""
        return 0o777 & ~int(self.folders, 8)


@dataclass(frozen=True)
class RetentionConfig:
    """How long finished jobs stay in the outbox (issue 11); by default every job is kept.

    A job ``done`` (``failed``) is removed once its recorded finish is ``done_days`` (``failed_days``) days old,
    with its index entries, its lock files and its HTTP records; a job whose sends are pending stays. Unset
    (null) keeps that state forever. The service looks every ``sweep_minutes``.
    """

    done_days: float | None = field(default=None, metadata=_t(float, nullable=True))
    failed_days: float | None = field(default=None, metadata=_t(float, nullable=True))
    sweep_minutes: float = field(default=60.0, metadata=_t(float))

    def __post_init__(self) -> None:
        for key in ("done_days", "failed_days"):
            if getattr(self, key) is not None:
                _positive(f"retention.{key}", getattr(self, key), zero=True)
        _positive("retention.sweep_minutes", self.sweep_minutes)

    @property
    def rules(self) -> dict[str, float]:
        """Days to keep, by job status (``done``, ``failed``), for the states that are not kept forever."""
        return {k: v for k, v in (("done", self.done_days), ("failed", self.failed_days)) if v is not None}


@dataclass(frozen=True)
class MetricsConfig:
    """Who may read ``GET /metrics`` without a key (issue 11): addresses or CIDR blocks, matched against the
    connection's own address (never a forwarded header). Anyone else needs a site key."""

    allowed_hosts: tuple = field(default=(), metadata=_t(tuple))

    def __post_init__(self) -> None:
        networks = []
        for i, entry in enumerate(self.allowed_hosts):
            try:
                networks.append(str(ipaddress.ip_network(_host_form(str(entry)), strict=False)))
            except ValueError:
                raise ConfigError(f"metrics.allowed_hosts[{i}]", f"must be an address or a CIDR block (such as "
                                                                 f"10.1.0.0/16), not {entry!r}") from None
        object.__setattr__(self, "allowed_hosts", tuple(networks))

    def allows(self, address: str) -> bool:
        """Whether a connection from ``address`` may read the metrics without a key."""
        return bool(address) and _matches(address, list(self.allowed_hosts)) is not None


_LOOPBACK = ("127.", "::1", "localhost", "[::1]")


@dataclass(frozen=True)
class DaskConfig:
    """Where the Dask scheduler is, and what each attempt asks of a GPU node (issue 12)."""

    scheduler: str | None = field(default=None, metadata=_t(str, nullable=True))
    tls: TlsConfig | None = field(default=None, metadata=_t(dict, nullable=True))
    resources: dict = field(default_factory=lambda: {"GPU": 1}, metadata=_t(dict))
    slots: Any = field(default="auto", metadata={"type": None})
    transfer: str = field(default="shared", metadata=_t(str))
    grace: float = field(default=60.0, metadata=_t(float))
    reconnect_max: float = field(default=30.0, metadata=_t(float))
    refresh_seconds: float = field(default=2.0, metadata=_t(float))

    def __post_init__(self) -> None:
        object.__setattr__(self, "tls", _tls("engine.dask.tls", self.tls))
        _check_resources("engine.dask.resources", self.resources)
        if not (self.slots == "auto" or (isinstance(self.slots, int) and not isinstance(self.slots, bool)
                                         and self.slots > 0)):
            raise ConfigError("engine.dask.slots", f"must be auto or a whole number > 0, not {self.slots!r}")
        if self.transfer != "shared":
            raise ConfigError("engine.dask.transfer", "must be shared (job folders on a filesystem mounted at the "
                                                      f"same path on every node), not {self.transfer!r}")
        _positive("engine.dask.grace", self.grace, zero=True)
        _positive("engine.dask.reconnect_max", self.reconnect_max)
        _positive("engine.dask.refresh_seconds", self.refresh_seconds)
        if self.scheduler is None:
            return
        scheme, sep, rest = self.scheduler.partition("://")
        if not sep or scheme not in ("tcp", "tls") or not rest:
            raise ConfigError("engine.dask.scheduler", "must look like tls://HOST:PORT (or tcp://127.0.0.1:PORT), "
                                                       f"not {self.scheduler!r}")
        if scheme == "tls" and (self.tls is None or self.tls.cert is None):
            raise ConfigError("engine.dask.tls", "a tls:// scheduler needs tls with ca, cert and key")
        if scheme == "tcp" and not rest.startswith(_LOOPBACK):
            # A scheduler runs whatever code its clients send: on a network it must check who they are.
            raise ConfigError("engine.dask.scheduler", "a scheduler off this machine needs tls:// and "
                                                       "engine.dask.tls (a Dask scheduler runs any code a client "
                                                       "sends); plain tcp:// is for 127.0.0.1 only")

    @property
    def security(self) -> bool:
        return self.scheduler is not None and self.scheduler.startswith("tls://")


@dataclass(frozen=True)
class EngineConfig:
    """Where algorithms run: ``local`` child processes (the default) or the GPU nodes of a Dask cluster."""

    kind: str = field(default="local", metadata=_t(str))
    dask: DaskConfig = field(default_factory=DaskConfig, metadata=_t(dict))

    def __post_init__(self) -> None:
        if isinstance(self.dask, Mapping):
            object.__setattr__(self, "dask", _build(DaskConfig, self.dask, "engine.dask"))
        if self.kind not in ("local", "dask"):
            raise ConfigError("engine.kind", f"must be local or dask, not {self.kind!r}")
        if self.kind == "dask" and self.dask.scheduler is None:
            raise ConfigError("engine.dask.scheduler", "engine.kind dask needs the scheduler's address")


def _check_resources(key: str, value: Any) -> None:
    for name, amount in value.items():
        if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                or amount <= 0:
            raise ConfigError(f"{key}.{name}", f"must be a positive number, not {amount!r}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """One algorithm: a Python callable (``function``) or a command line (``command``).

    ``module``/``attr``/``search_path`` say where the child process finds a Python callable;
    ``registered`` marks one added by ``app.register`` rather than named in config.yaml.
    """

    name: str = field(metadata=_t(str))
    default_settings: dict = field(default_factory=dict, metadata=_t(dict))
    function: str | None = field(default=None, metadata=_t(str, nullable=True))
    command: tuple | None = field(default=None, metadata=_t(tuple, nullable=True))
    max_parallel: int = field(default=0, metadata=_t(int))
    timeout: float | None = field(default=None, metadata=_t(float, nullable=True))
    outputs: tuple = field(default=("rtstruct",), metadata=_t(tuple))
    structures: dict = field(default_factory=dict, metadata=_t(dict))
    min_dice: float = field(default=0.95, metadata=_t(float))
    resources: dict | None = field(default=None, metadata=_t(dict, nullable=True))
    search_path: str = field(default="", metadata={"key": False})

    def __post_init__(self) -> None:
        key = f"algorithms[{self.name}]"
        if not self.name.strip():
            raise ConfigError("algorithms[].name", "must not be empty")
        if (self.function is None) == (self.command is None):
            raise ConfigError(key, "needs exactly one of 'function' (module:callable) or 'command' (argv list)")
        if self.function is not None and (":" not in self.function or self.function.count(":") != 1):
            raise ConfigError(f"{key}.function", f"must look like 'module:callable', not {self.function!r}")
        if self.command is not None:
            if not self.command or not all(isinstance(a, str) for a in self.command):
                raise ConfigError(f"{key}.command", "must be a non-empty list of strings")
        _positive(f"{key}.max_parallel", self.max_parallel, zero=True)
        if self.timeout is not None:
            _positive(f"{key}.timeout", self.timeout)
        for kind in self.outputs:
            if kind not in OUTPUT_KINDS:
                raise ConfigError(f"{key}.outputs", f"unknown output {kind!r} (known: {', '.join(OUTPUT_KINDS)})")
        if self.resources is not None:
            _check_resources(f"{key}.resources", self.resources)
        for sname, spec in self.structures.items():
            if not isinstance(spec, Mapping) or set(spec) - {"name", "color", "type"}:
                raise ConfigError(f"{key}.structures.{sname}", "must be a mapping of name, color, type")

    @property
    def module(self) -> str:
        return self.function.split(":")[0] if self.function else ""

    @property
    def attr(self) -> str:
        return self.function.split(":")[1] if self.function else ""


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration; every path is absolute."""

    base_dir: Path = field(metadata={"key": False})
    source: Path | None = field(default=None, metadata={"key": False})
    inbox: Path = field(default=Path("inbox"), metadata=_t(str))
    outbox: Path = field(default=Path("outbox"), metadata=_t(str))
    database: Path = field(default=Path("postbox.db.json"), metadata=_t(str))
    log_level: str = field(default="INFO", metadata=_t(str))
    log_format: str = field(default="text", metadata=_t(str))
    default_algorithm: str = field(default=BUNDLED_ALGORITHM, metadata=_t(str))
    worker: WorkerConfig = field(default_factory=WorkerConfig, metadata=_t(dict))
    http: HttpConfig = field(default_factory=HttpConfig, metadata=_t(dict))
    dicom: DicomConfig = field(default_factory=DicomConfig, metadata=_t(dict))
    permissions: PermissionsConfig = field(default_factory=lambda: PermissionsConfig(), metadata=_t(dict))
    retention: RetentionConfig = field(default_factory=RetentionConfig, metadata=_t(dict))
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=_t(dict))
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=_t(dict))
    algorithms: tuple[AlgorithmConfig, ...] = field(default=(), metadata=_t(tuple))

    def algorithm(self, name: str) -> AlgorithmConfig | None:
        """The algorithm called ``name``, or None."""
        for alg in self.algorithms:
            if alg.name == name:
                return alg
        return None

    @property
    def staging(self) -> Path:
        return self.inbox / ".staging"

    @property
    def locks(self) -> Path:
        return self.inbox / ".locks"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None = None, *, check_folders: bool = True) -> Config:
        """Load ``path``, else ``$POSTBOX_CONFIG``, else ``./config.yaml``, else the embedded defaults.

        Raises
        ------
        ConfigError
            Naming the key and the problem.
        """
        if path is None:
            path = os.environ.get(ENV_VAR) or None
            if path is None and Path("config.yaml").is_file():
                path = "config.yaml"
        if path is None:
            return cls.from_dict({}, base_dir=Path.cwd(), check_folders=check_folders)
        path = Path(path).resolve()
        if not path.is_file():
            raise ConfigError("--config", f"no such file: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"is not valid YAML: {exc}") from None
        return cls.from_dict(data or {}, base_dir=path.parent, source=path, check_folders=check_folders)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: Path,
        source: Path | None = None,
        check_folders: bool = True,
        registered: tuple[AlgorithmConfig, ...] = (),
    ) -> Config:
        """Validate a config mapping; relative paths resolve against ``base_dir``."""
        if not isinstance(data, Mapping):
            raise ConfigError("(top level)", "must be a mapping of keys")
        data = dict(data)
        base_dir = base_dir.resolve()
        sections = {
            "worker": (WorkerConfig, data.pop("worker", None)),
            "http": (HttpConfig, data.pop("http", None)),
            "dicom": (DicomConfig, data.pop("dicom", None)),
            "permissions": (PermissionsConfig, data.pop("permissions", None)),
            "retention": (RetentionConfig, data.pop("retention", None)),
            "metrics": (MetricsConfig, data.pop("metrics", None)),
            "engine": (EngineConfig, data.pop("engine", None)),
        }
        raw_algorithms = data.pop("algorithms", None)
        top = _build(_Top, data, "", also_known=("algorithms", *sections))
        built = {name: _build(kind, raw, name) for name, (kind, raw) in sections.items()}
        algorithms = list(registered) + _load_algorithms(raw_algorithms, base_dir)
        names = [a.name for a in algorithms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("algorithms", f"duplicate name(s): {', '.join(dupes)}")
        default = top.default_algorithm or (names[0] if names else BUNDLED_ALGORITHM)
        if default not in names:
            raise ConfigError("default_algorithm", f"'{default}' is not a configured algorithm ({', '.join(names)})")
        for i, route in enumerate(built["dicom"].routes):
            if route.algorithm not in names:
                raise ConfigError(f"dicom.routes[{i}].algorithm", f"'{route.algorithm}' is not a configured algorithm")
        if top.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level", f"must be DEBUG, INFO, WARNING or ERROR, not {top.log_level!r}")
        if top.log_format not in ("text", "json"):
            raise ConfigError("log_format", "must be text (one line per event) or json (one JSON object per line, "
                                            f"for a log collector), not {top.log_format!r}")
        cfg = cls(
            base_dir=base_dir,
            source=source,
            inbox=(base_dir / top.inbox).resolve(),
            outbox=(base_dir / top.outbox).resolve(),
            database=(base_dir / top.database).resolve(),
            log_level=top.log_level.upper(),
            log_format=top.log_format,
            default_algorithm=default,
            algorithms=tuple(algorithms),
            **built,
        )
        if check_folders:
            cfg.check_folders()
        return cfg

    def tls_files(self) -> dict[str, TlsFiles]:
        """Every TLS end configured, by its key (``http.tls``, ``dicom.tls``, ``dicom.destinations.NAME.tls``)."""
        found = {"http.tls": self.http.tls, "dicom.tls": self.dicom.tls}
        found.update({f"dicom.destinations.{n}.tls": d.tls for n, d in self.dicom.destinations.items()})
        found.update({f"http.allowed_locations[{i}].tls": e.tls for i, e in enumerate(self.http.allowed_locations)})
        found["engine.dask.tls"] = self.engine.dask.tls
        return {k: v.files(self.base_dir) for k, v in found.items() if v is not None}

    def location_tls(self, host: str) -> TlsFiles | None:
        """The TLS files to reach a DICOM location made over HTTP on ``host``: its ``http.allowed_locations``
        entry's, or None (plain DICOM)."""
        entry = self.http.location_entry(host)
        return entry.tls.files(self.base_dir) if entry is not None and entry.tls is not None else None

    def resources(self, alg: AlgorithmConfig) -> dict[str, float]:
        """What one attempt of ``alg`` takes from a Dask worker: its own ``resources``, else the engine's."""
        return dict(alg.resources if alg.resources is not None else self.engine.dask.resources)

    def check_folders(self) -> None:
        """Create the runtime folders if missing and make sure they are writable (and TLS files readable)."""
        for key, files in self.tls_files().items():
            for name in ("cert", "key", "ca"):
                path = getattr(files, name)
                if path is not None and not os.access(path, os.R_OK):
                    raise ConfigError(f"{key}.{name}", f"cannot read {path.name} (relative to config.yaml's folder)")
        for key in ("inbox", "outbox"):
            _writable_dir(key, getattr(self, key), int(self.permissions.folders, 8))
        _writable_dir("database", self.database.parent, int(self.permissions.folders, 8))
        if self.inbox.stat().st_dev != self.outbox.stat().st_dev:
            # design.md: a finished job moves by one atomic rename, which needs one filesystem.
            raise ConfigError("outbox", f"must be on the same filesystem as the inbox ({self.inbox})")


@dataclass(frozen=True)
class _Top:
    inbox: str = field(default="inbox", metadata=_t(str))
    outbox: str = field(default="outbox", metadata=_t(str))
    database: str = field(default="postbox.db.json", metadata=_t(str))
    log_level: str = field(default="INFO", metadata=_t(str))
    log_format: str = field(default="text", metadata=_t(str))
    default_algorithm: str = field(default="", metadata=_t(str))


def _writable_dir(key: str, path: Path, mode: int = 0o700) -> None:
    try:
        # The mode of every folder made here, parents included (mkdir's parents get the default mode), even
        # before the process's umask is set from permissions.
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                folder.mkdir(mode=mode, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create folder {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, f"folder {path} is not writable")


def bundled_algorithm() -> AlgorithmConfig:
    """The CT body and lung segmentation that ships with Postbox."""
    from .bodylungs import DEFAULT_SETTINGS

    return AlgorithmConfig(
        name=BUNDLED_ALGORITHM,
        function="pipeline.bodylungs:segment",
        default_settings=dict(DEFAULT_SETTINGS),
        outputs=("rtstruct", "seg"),
    )


def _load_algorithms(raw: Any, base_dir: Path) -> list[AlgorithmConfig]:
    if raw is None:
        return [bundled_algorithm()]
    if not isinstance(raw, (list, tuple)):
        raise ConfigError("algorithms", f"must be a list, not {type(raw).__name__}")
    result = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"algorithms[{i}]", "must be a mapping with a 'name'")
        alg = _build(AlgorithmConfig, entry, f"algorithms[{entry['name']}]", search_path=str(base_dir))
        if alg.function is not None:
            _check_callable(alg, base_dir)
        result.append(alg)
    return result


def _check_callable(alg: AlgorithmConfig, base_dir: Path) -> None:
    """Check that ``module:callable`` exists without importing it.

    Importing would load the model into the service process; the child process loads it instead.
    """
    key = f"algorithms[{alg.name}].function"
    sys.path.insert(0, str(base_dir))
    try:
        spec = importlib.util.find_spec(alg.module)
    except (ImportError, ValueError) as exc:
        raise ConfigError(key, f"module '{alg.module}' cannot be found: {exc}") from None
    finally:
        sys.path.remove(str(base_dir))
    if spec is None:
        raise ConfigError(key, f"module '{alg.module}' not found (looked in {base_dir} and the installed packages)")
    origin = spec.origin
    if not origin or not origin.endswith(".py"):
        return  # compiled or namespace module: checked when the child imports it
    try:
        tree = ast.parse(Path(origin).read_text(encoding="utf-8"), origin)
    except (OSError, SyntaxError) as exc:
        raise ConfigError(key, f"module '{alg.module}' cannot be read: {exc}") from None
    if alg.attr not in _top_level_names(tree):
        raise ConfigError(key, f"module '{alg.module}' ({origin}) has no callable '{alg.attr}'")


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            names |= _top_level_names(ast.Module(body=list(ast.iter_child_nodes(node)), type_ignores=[]))  # type: ignore[arg-type]
    return names
