"""``GET /metrics`` for Prometheus, and the count of HTTP requests by route rule and status (issue 11).

A metrics scraper is an operator: it needs a site key in the ``API_KEY`` header, or a connection from an
address on ``metrics.allowed_hosts`` (Prometheus scrapes without headers unless told). The address is the
connection's own, never ``X-Forwarded-For``, which any client may write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import bottle
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.config import Config
from pipeline.index import Index
from pipeline.metrics import Metrics

from .auth import HEADER

__all__ = ["CountRequests", "exposition"]

UNMATCHED = "(unmatched)"  # a request no route took (404, 405, or refused before routing): one label for all


def exposition(config: Config, index: Index, metrics: Metrics | None,
               refuse: Callable[[int, str], bottle.HTTPResponse]) -> bottle.HTTPResponse:
    """The service's registry in Prometheus' text format, to a site key or an allowed address.

    Parameters
    ----------
    refuse
        Makes the JSON error answer (401 without a valid key, 403 for a key that is not a site key).
    """
    if not config.metrics.allows(bottle.request.environ.get("REMOTE_ADDR", "")):
        key = bottle.request.environ.get(HEADER, "").strip()
        found = index.key_owner(key) if key else None
        if found is None:
            return refuse(401, "a site key is needed in the API_KEY header (postbox manage key --add NAME --site), "
                               "or a connection from an address on metrics.allowed_hosts")
        if not found.site:
            return refuse(403, f"the key '{found.name}' is not a site key: metrics are for operators "
                               "(postbox manage key --add NAME --site)")
    if metrics is None:
        return refuse(404, "this service publishes no metrics")
    return bottle.HTTPResponse(generate_latest(metrics.registry), 200,
                               headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-cache"})


class CountRequests:
    """WSGI middleware: each answer counted by method, route rule (``/api/dataset/<dataset_id>``, never the raw
    path, so the labels stay few whatever clients ask for) and status."""

    def __init__(self, app: Callable[..., Any], metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def counted(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            route = environ.get("bottle.route")  # set by Bottle once it has matched a route
            code = int(status.split(" ", 1)[0]) if status[:3].isdigit() else 0
            self.metrics.request(environ.get("REQUEST_METHOD", ""), route.rule if route is not None else UNMATCHED,
                                 code)
            return start_response(status, headers, exc_info) if exc_info is not None \
                else start_response(status, headers)

        return self.app(environ, counted)
