"""The web dashboard (issue 11, section 1): server-rendered pages at ``/`` for people, behind a login with a key.

A person signs in with an API key once; the dashboard then knows them by a session cookie (HttpOnly,
SameSite=Strict, Secure under TLS, expiring after :data:`SESSION_HOURS`). Sessions live in memory, in the
app's own :class:`Sessions` (``app.config["postbox.sessions"]``), keyed by a random token: a restart signs
everyone out, which a dashboard can afford. Every form that changes something (sign in, sign out) carries a
CSRF token; filters and paging are GET and change nothing. What a key sees is what the API lets it read
(:func:`facade.runs.may_see_job`): a plain key the jobs it started, a site key every job. Opening a job's
page writes a ``dashboard-view`` line to the audit log; downloading an output or the preview a ``download``.

Pages are Bottle SimpleTemplates in ``facade/views`` (``{{...}}`` escapes), styled and refreshed by two small
files in ``facade/static``: no build step, no CDN. No page names a server path (``hide_paths``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bottle

from pipeline import jobs
from pipeline.audit import AuditLog
from pipeline.config import Config
from pipeline.errors import DamagedManifest
from pipeline.index import ApiKey, Index

from ._paths import hide_paths
from ._zipstream import CHUNK, zip_stream
from .runs import may_see_job

log = logging.getLogger(__name__)

__all__ = ["COOKIE", "LOGIN_COOKIE", "PAGE_SIZE", "SESSION_HOURS", "Session", "Sessions", "install"]

HERE = Path(__file__).resolve().parent
VIEWS = HERE / "views"
STATIC = HERE / "static"
COOKIE = "postbox_session"
LOGIN_COOKIE = "postbox_login"  # the pre-session token the sign-in form's CSRF token is bound to
SESSION_HOURS = 8.0
PAGE_SIZE = 50
LOG_TAIL = 200_000  # the last characters of job.log a page shows
AUDIT_TAIL = 256_000  # the last bytes of audit.log the node page reads for its recent associations
_DICOM_ACTIONS = ("c-store-received", "c-store-sent", "c-move", "c-get")
STATES = tuple(s.value for s in jobs.JobStatus)
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
# Everything from this origin, nothing inline: the templates' escaping plus this leave an injected tag inert.
_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'; "
                                       "form-action 'self'; base-uri 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@dataclass(frozen=True)
class Session:
    """One signed-in person: their key (never the key itself), when the session ends, its forms' CSRF token."""

    key: ApiKey
    expires: float
    csrf: str


class Sessions:
    """The dashboard's sessions, in memory, by random token; each one ends ``lifetime`` seconds after sign-in.

    ``clock`` is the time source (a test moves it on to see a session expire).
    """

    def __init__(self, *, lifetime: float = SESSION_HOURS * 3600, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, key: ApiKey) -> tuple[str, Session]:
        """A new session for ``key``: its token (the cookie's value) and the session."""
        token = secrets.token_urlsafe(32)
        session = Session(key=key, expires=self.clock() + self.lifetime, csrf=secrets.token_urlsafe(32))
        with self._lock:
            self._prune()
            self._by_token[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The live session of ``token``; None for an unknown or expired one (which is dropped)."""
        if not token:
            return None
        with self._lock:
            session = self._by_token.get(token)
            if session is not None and session.expires <= self.clock():
                del self._by_token[token]
                return None
        return session

    def close(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_token)

    def _prune(self) -> None:
        now = self.clock()
        for token in [t for t, s in self._by_token.items() if s.expires <= now]:
            del self._by_token[token]


def _page(name: str, status: int = 200, **values: Any) -> bottle.HTTPResponse:
    body = bottle.template(name, template_lookup=[str(VIEWS)], **values)
    return bottle.HTTPResponse(body, status, headers={"Content-Type": "text/html; charset=utf-8", **_HEADERS})


def _secure() -> bool:
    # cheroot sets wsgi.url_scheme to https on a TLS port (http.tls): the cookie then never goes over plain HTTP.
    return bottle.request.environ.get("wsgi.url_scheme") == "https"


def _cookie(response: bottle.HTTPResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=_secure())


def _redirect(to: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse("", 303, headers={"Location": to, **_HEADERS})


def _when(value: str | None) -> str:
    """An ISO time as a person reads it: ``2026-12-01 03:17:26`` (UTC), or an empty cell."""
    return value.replace("T", " ")[:19] if value else ""


def _query(**values: Any) -> str:
    return urllib.parse.urlencode({k: v for k, v in values.items() if v not in (None, "", 1)})


def _sender_ae(manifest: jobs.JobManifest | None) -> str:
    if manifest is None:
        return ""
    return str(manifest.sender.get("calling_ae") or "")


def _send_summary(manifest: jobs.JobManifest | None) -> str:
    """One word per destination, ``TPS: sent``, or empty for a job that sends nowhere."""
    if manifest is None or not manifest.sends:
        return ""
    return ", ".join(f"{name}: {state.status.value}" for name, state in sorted(manifest.sends.items()))


def _files(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while piece := fh.read(CHUNK):
            yield piece


class Dashboard:
    """The pages of one app over one config, index and audit log; see :func:`install`."""

    def __init__(self, config: Config, index: Index, audit: AuditLog, sessions: Sessions) -> None:
        self.config = config
        self.index = index
        self.audit = audit
        self.sessions = sessions
        self._secret = secrets.token_bytes(32)  # binds the sign-in form's token to its pre-session cookie

    # -- who asks --

    def session(self) -> Session | None:
        """The request's live session whose key still exists (a key removed signs its sessions out)."""
        token = bottle.request.get_cookie(COOKIE)
        session = self.sessions.get(token)
        if session is None:
            return None
        if not any(k.id == session.key.id for k in self.index.list_keys()):
            self.sessions.close(token)
            return None
        return session

    def _login_token(self, pre: str) -> str:
        return hmac.new(self._secret, pre.encode(), hashlib.sha256).hexdigest()

    def login_page(self, *, message: str = "", status: int = 200) -> bottle.HTTPResponse:
        pre = bottle.request.get_cookie(LOGIN_COOKIE) or ""
        if len(pre) < 20:
            pre = secrets.token_urlsafe(24)
        page = _page("login", status, title="Sign in", message=message, csrf=self._login_token(pre), session=None)
        _cookie(page, LOGIN_COOKIE, pre, 3600)
        return page

    def login(self) -> bottle.HTTPResponse:
        pre = bottle.request.get_cookie(LOGIN_COOKIE) or ""
        given = bottle.request.forms.getunicode("csrf") or ""
        if not pre or not hmac.compare_digest(given, self._login_token(pre)):
            log.warning("dashboard: sign-in from %s refused: CSRF token missing or wrong", bottle.request.remote_addr)
            return self.login_page(message="The form had expired: please sign in again.", status=403)
        key = self.index.key_owner((bottle.request.forms.getunicode("key") or "").strip())
        if key is None:
            log.warning("dashboard: sign-in from %s refused: wrong key", bottle.request.remote_addr)
            return self.login_page(message="That key is not valid.", status=401)
        token, _ = self.sessions.open(key)
        log.info("dashboard: key %s signed in from %s", key.tag, bottle.request.remote_addr)
        answer = _redirect("/")
        _cookie(answer, COOKIE, token, int(self.sessions.lifetime))
        answer.delete_cookie(LOGIN_COOKIE, path="/")
        return answer

    def logout(self, session: Session) -> bottle.HTTPResponse:
        if not hmac.compare_digest(bottle.request.forms.getunicode("csrf") or "", session.csrf):
            return _page("message", 403, title="Refused", message="The form had expired: sign out again.",
                         session=session)
        self.sessions.close(bottle.request.get_cookie(COOKIE))
        answer = _redirect("/")
        answer.delete_cookie(COOKIE, path="/")
        return answer

    # -- what a key sees --

    def visible_jobs(self, key: ApiKey) -> list[dict[str, Any]]:
        """The index entries of the jobs ``key`` may see, newest first (the index, never the folders)."""
        if key.site:
            found = self.index.jobs()
        else:
            # As may_see_job: the jobs started with this key, never one older than the key itself.
            found = self.index.jobs(lambda r: r.get("owner") == key.tag
                                    and str(r.get("created") or "") >= key.created)
        found.reverse()
        return found

    def job(self, key: ApiKey, job_id: str) -> tuple[Path, jobs.JobManifest] | None:
        """The job's folder and manifest, or None if it does not exist or ``key`` may not see it (alike)."""
        job_dir = jobs.locate(self.config.inbox, self.config.outbox, job_id)
        if job_dir is None:
            return None
        try:
            manifest = jobs.read_manifest(job_dir)
        except (FileNotFoundError, DamagedManifest):
            return None
        return (job_dir, manifest) if may_see_job(key, manifest) else None

    def _manifest(self, job_id: str) -> jobs.JobManifest | None:
        job_dir = jobs.locate(self.config.inbox, self.config.outbox, job_id)
        try:
            return jobs.read_manifest(job_dir) if job_dir is not None else None
        except (FileNotFoundError, DamagedManifest, OSError):
            return None

    # -- pages --

    def overview(self, session: Session) -> bottle.HTTPResponse:
        q = bottle.request.query
        state, source = q.getunicode("state") or "", q.getunicode("source") or ""
        try:
            page = max(1, int(q.get("page") or 1))
        except ValueError:
            page = 1
        every = self.visible_jobs(session.key)
        counts = dict.fromkeys(STATES, 0)
        sources: set[str] = set()
        for r in every:
            counts[r.get("status") or "pending"] = counts.get(r.get("status") or "pending", 0) + 1
            sources.add(str(r.get("source") or ""))
        chosen = [r for r in every
                  if (not state or r.get("status") == state) and (not source or r.get("source") == source)]
        pages = max(1, -(-len(chosen) // PAGE_SIZE))
        page = min(page, pages)
        rows = []
        for r in chosen[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]:
            manifest = self._manifest(r["id"])  # a page's worth only: the sender's AE and the sends are in job.yaml
            rows.append({"id": r["id"], "source": r.get("source") or "", "algorithm": r.get("algorithm") or "",
                         "status": r.get("status") or "", "created": _when(r.get("created")),
                         "started": _when(r.get("started")), "finished": _when(r.get("finished")),
                         "sender_ae": _sender_ae(manifest), "sends": _send_summary(manifest)})
        links = {"prev": "/?" + _query(state=state, source=source, page=page - 1) if page > 1 else "",
                 "next": "/?" + _query(state=state, source=source, page=page + 1) if page < pages else ""}
        return _page("overview", title="Jobs", session=session, counts=counts, total=len(every), rows=rows,
                     states=STATES, sources=sorted(sources), state=state, source=source, page=page, pages=pages,
                     shown=len(chosen), links=links, refresh=15)

    def job_page(self, session: Session, job_id: str) -> bottle.HTTPResponse:
        found = self.job(session.key, job_id)
        if found is None:
            return _page("message", 404, title="Not found", message=f"No job {job_id} that this key may see.",
                         session=session)
        job_dir, manifest = found
        self.audit.record("dashboard-view", who=session.key.name, address=bottle.request.remote_addr,
                          job=manifest.id, dataset=manifest.dataset)
        text = ""
        log_file = job_dir / jobs.LOG
        if log_file.is_file():
            with open(log_file, "rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - LOG_TAIL))
                text = hide_paths(fh.read().decode("utf-8", errors="replace"), self.config)
        outputs = [{"n": n, "name": Path(o.path).name, "path": o.path, "type": o.type,
                    "kind": str(o.meta_data.get("kind") or ""), "exists": (job_dir / o.path).exists()}
                   for n, o in enumerate(manifest.outputs)]
        inputs = [{"id": i.id, "type": i.type, "path": i.path,
                   "series": str(i.meta_data.get("series_instance_uid") or ""),
                   "instances": i.meta_data.get("instances", "")} for i in manifest.inputs]
        checks = [(parent, name, f"{dice:.3f}") for parent, scores in sorted(manifest.checks.items())
                  for name, dice in sorted(scores.items())]
        sends = [{"name": name, "status": s.status.value, "attempts": s.attempts, "sent": _when(s.sent),
                  "error": hide_paths(s.error or "", self.config),
                  "files": f"{len(s.files) - len(s.missing)} of {len(s.files)}"}
                 for name, s in sorted(manifest.sends.items())]
        has_preview = manifest.preview is not None and (job_dir / manifest.preview).is_file()
        facts = [("State", manifest.status.value), ("Algorithm", manifest.algorithm or ""),
                 ("Source", manifest.source), ("Created", _when(manifest.created)),
                 ("Started", _when(manifest.started)),
                 ("Finished", _when(manifest.finished)), ("Attempts", str(manifest.attempts)),
                 ("Sender AE", _sender_ae(manifest)), ("Error", hide_paths(manifest.error or "", self.config))]
        return _page("job", title=f"Job {manifest.id}", session=session, job_id=manifest.id, facts=facts,
                     inputs=inputs, outputs=outputs, checks=checks, sends=sends, log=text, warnings=manifest.warnings,
                     has_preview=has_preview, refresh=0 if manifest.status.value in ("done", "failed") else 10)

    def output(self, session: Session, job_id: str, number: str) -> bottle.HTTPResponse:
        from .app import content_disposition  # app imports this module: late, to keep the import one way

        found = self.job(session.key, job_id)
        if found is None or not (number.isascii() and number.isdigit()) or int(number) >= len(found[1].outputs):
            return _page("message", 404, title="Not found", message="No such output.", session=session)
        job_dir, manifest = found
        out = manifest.outputs[int(number)]
        path = (job_dir / out.path).resolve()
        if not path.is_relative_to(job_dir.resolve()) or not path.exists():
            return _page("message", 404, title="Not found", message="That output is gone.", session=session)
        self.audit.record("download", who=session.key.name, address=bottle.request.remote_addr, job=manifest.id,
                          dataset=manifest.dataset)
        headers = {"Content-Type": "application/octet-stream", "Cache-Control": "no-store",
                   "X-Content-Type-Options": "nosniff"}
        if path.is_file():
            headers.update({"Content-Length": str(path.stat().st_size),
                            "Content-Disposition": content_disposition(path.name)})
            return bottle.HTTPResponse(_files(path), 200, headers=headers)
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        headers.update({"Content-Type": "application/zip",
                        "Content-Disposition": content_disposition(f"{path.name}.zip")})
        return bottle.HTTPResponse(zip_stream((p, p.relative_to(path).as_posix()) for p in files), 200, headers=headers)

    def preview(self, session: Session, job_id: str) -> bottle.HTTPResponse:
        found = self.job(session.key, job_id)
        path = None
        if found is not None and found[1].preview is not None:
            path = (found[0] / found[1].preview).resolve()
            if not path.is_relative_to(found[0].resolve()) or not path.is_file():
                path = None
        if found is None or path is None:
            return bottle.HTTPResponse("no preview", 404, headers={"Content-Type": "text/plain", **_HEADERS})
        self.audit.record("download", who=session.key.name, address=bottle.request.remote_addr, job=found[1].id,
                          dataset=found[1].dataset)
        return bottle.HTTPResponse(_files(path), 200, headers={"Content-Type": "image/png", **_HEADERS,
                                                                "Content-Length": str(path.stat().st_size)})

    def algorithms(self, session: Session) -> bottle.HTTPResponse:
        rows = [{"name": a.name, "kind": "command" if a.command else "function", "outputs": ", ".join(a.outputs),
                 "settings": json.dumps(a.default_settings, indent=2, sort_keys=True),
                 "default": a.name == self.config.default_algorithm} for a in self.config.algorithms]
        return _page("algorithms", title="Algorithms", session=session, rows=rows)

    def node(self, session: Session) -> bottle.HTTPResponse:
        d = self.config.dicom
        facts = [("Enabled", "yes" if d.enabled else "no"), ("AE title", d.ae_title), ("Port", str(d.port)),
                 ("TLS", "on" if d.tls is not None else "off"), ("HTTPS", "on" if self.config.http.tls else "off")]
        destinations = [{"name": n, "ae_title": x.ae_title, "host": x.host, "port": x.port,
                         "tls": "on" if x.tls is not None else "off"} for n, x in sorted(d.destinations.items())]
        pending = []
        for r in self.visible_jobs(session.key):
            if not r.get("sending"):
                continue
            manifest = self._manifest(r["id"])
            for name, s in sorted((manifest.sends if manifest else {}).items()):
                if s.status == jobs.SendStatus.PENDING:
                    pending.append({"job": r["id"], "destination": name, "attempts": s.attempts,
                                    "missing": len(s.missing), "error": hide_paths(s.error or "", self.config)})
        # Recent associations, from the audit log's DICOM lines: a site key's only (they name every door's jobs).
        recent = self.recent_associations() if session.key.site else []
        return _page("node", title="DICOM node", session=session, facts=facts, destinations=destinations,
                     pending=pending, recent=recent, site=session.key.site)

    def recent_associations(self, most: int = 20) -> list[dict[str, str]]:
        """The latest DICOM exchanges in the audit log (received, sent, C-MOVE, C-GET), newest first.

        Only the log's last :data:`AUDIT_TAIL` bytes are read: the page must not slow down as the log grows.
        """
        try:
            with open(self.audit.path, "rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - AUDIT_TAIL))
                lines = fh.read().decode("ascii", errors="replace").splitlines()[1 if size > AUDIT_TAIL else 0:]
        except FileNotFoundError:
            return []
        found = []
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("action") in _DICOM_ACTIONS:
                found.append({k: "" if entry.get(k) is None else str(entry[k])
                              for k in ("time", "action", "who", "address", "job", "count")})
                found[-1]["time"] = _when(found[-1]["time"])
                if len(found) == most:
                    break
        return found


def install(app: bottle.Bottle, config: Config, index: Index, audit: AuditLog) -> Dashboard:
    """Add the dashboard's routes to ``app`` (``/``, ``/dashboard/...``); its sessions go in the app's config.

    The routes skip the API-key check (``auth=False``): a page asks for a session instead, and a request
    without one gets the sign-in form (a page) or 401 (a file). They are marked ``dashboard=True`` in their
    route config: they are pages for people, not the API that ``/api/openapi.json`` describes.
    """
    sessions = Sessions()
    board = Dashboard(config, index, audit, sessions)
    app.config["postbox.sessions"] = sessions
    app.config["postbox.dashboard"] = board

    def page(path: str, method: str = "GET") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A route that needs a session: without one it answers the sign-in form."""

        def wrap(handler: Callable[..., Any]) -> Callable[..., Any]:
            def checked(**kwargs: Any) -> Any:
                session = board.session()
                if session is None:
                    return board.login_page(status=200 if path == "/" else 401)
                return handler(session, **kwargs)

            app.route(path, method=method, callback=checked, auth=False, dashboard=True)
            return handler

        return wrap

    page("/")(board.overview)
    page("/dashboard/job/<job_id>")(board.job_page)
    page("/dashboard/job/<job_id>/output/<number>")(board.output)
    page("/dashboard/job/<job_id>/preview.png")(board.preview)
    page("/dashboard/algorithms")(board.algorithms)
    page("/dashboard/node")(board.node)
    page("/dashboard/logout", "POST")(board.logout)
    app.route("/dashboard/login", method="POST", callback=board.login, auth=False, dashboard=True)
    app.route("/dashboard/login", method="GET", callback=lambda: _redirect("/"), auth=False, dashboard=True)

    @app.route("/dashboard/static/<name>", auth=False, dashboard=True)
    def static(name: str) -> Any:
        path = STATIC / name
        if path.suffix not in _STATIC_TYPES or path.parent != STATIC or not path.is_file():
            return bottle.HTTPResponse("not found", 404, headers={"Content-Type": "text/plain"})
        return bottle.HTTPResponse(path.read_bytes(), 200, headers={
            "Content-Type": _STATIC_TYPES[path.suffix], "Cache-Control": "max-age=3600",
            "X-Content-Type-Options": "nosniff"})

    return board
