"""No server path in an answer: the service's own folders named as config.yaml names them (issue 9)."""

from __future__ import annotations

from pipeline.config import Config

__all__ = ["hide_paths"]


def hide_paths(text: str, config: Config) -> str:
    """``text`` with the absolute paths of the inbox, the outbox, the database's folder and config.yaml's folder
    made relative: ``/srv/postbox/inbox/<job>/input/ct.nii.gz`` becomes ``inbox/<job>/input/ct.nii.gz``.

    The worker already records a failure's reason relative to its job folder; this is the door's own last
    check, for messages written elsewhere (an OSError of a retrieval, a job failed by an older release).
    """
    roots: dict[str, str] = {}
    for path, name in ((config.inbox, config.inbox.name), (config.outbox, config.outbox.name),
                       (config.database.parent, "."), (config.base_dir, ".")):
        for form in (str(path), str(path.resolve())):
            if len(form) > 1:  # never "/": it would take every slash of the message
                roots.setdefault(form, name)
    for form in sorted(roots, key=len, reverse=True):  # the longest first: the inbox before config.yaml's folder
        text = text.replace(form + "/", "" if roots[form] == "." else roots[form] + "/")
        text = text.replace(form, roots[form])
    return text
