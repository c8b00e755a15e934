"""The API-key check: one Bottle plugin on every route but those marked ``auth=False`` (the health check)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import bottle

from pipeline.index import ApiKey, Index

log = logging.getLogger(__name__)

__all__ = ["KEY", "KeyAuth", "current_key", "owner"]

# PlatiPy's clients send the key in a header named API_KEY, with an underscore; the WSGI server must pass
# it on as HTTP_API_KEY (Werkzeug 2.3+ and gunicorn 22+ drop such headers; cheroot keeps them).
HEADER = "HTTP_API_KEY"
KEY = "postbox.key"


class KeyAuth:
    """Answer 401 unless the request's API_KEY is a key in the index; that key (its id, not its name, owns
    what the request makes) is the request's ``current_key()``.

    Keys are stored hashed (``Index.key_owner`` hashes what it is given), so nothing here ever holds a
    key longer than the request.
    """

    name = "postbox_key_auth"
    api = 2

    def __init__(self, index: Index, unauthorized: Callable[[str], Any]) -> None:
        self.index = index
        self.unauthorized = unauthorized

    def apply(self, callback: Callable[..., Any], route: bottle.Route) -> Callable[..., Any]:
        if not route.config.get("auth", True):
            return callback

        @functools.wraps(callback)
        def checked(*args: Any, **kwargs: Any) -> Any:
            key = bottle.request.environ.get(HEADER, "").strip()
            found = self.index.key_owner(key) if key else None
            if found is None:
                log.warning("http: %s %s refused: %s API_KEY", bottle.request.method, bottle.request.path,
                            "wrong" if key else "no")
                return self.unauthorized("a valid API key is needed in the API_KEY header "
                                         "(create one with: postbox manage key --add NAME)")
            bottle.request.environ[KEY] = found
            return callback(*args, **kwargs)

        return checked


def current_key() -> ApiKey:
    """The key of the current request (set by KeyAuth): its id owns, its name is for people (logs, audit)."""
    found: ApiKey = bottle.request.environ[KEY]
    return found


def owner() -> int:
    """The id of the current request's key: what its records are owned by."""
    return current_key().id
