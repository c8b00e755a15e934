"""What Postbox creates is the service account's alone: files 0600, folders 0700 (issue 9, ``permissions``)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import Site


def modes(root: Path, *, since: float) -> dict[str, set[int]]:
    """The modes of files and folders under ``root`` made after ``since``."""
    found: dict[str, set[int]] = {"files": set(), "folders": set()}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if st.st_ctime < since or stat.S_ISLNK(st.st_mode):
            continue
        found["folders" if stat.S_ISDIR(st.st_mode) else "files"].add(st.st_mode & 0o777)
    return found


@pytest.mark.parametrize(("permissions", "files", "folders"), [
    (None, 0o600, 0o700),
    ({"files": "0640", "folders": "0750"}, 0o640, 0o750),
])
def test_jobs_index_and_audit_get_the_configured_modes(site: Site, tmp_path: Path, permissions: dict[str, str] | None,
                                                        files: int, folders: int) -> None:
    data = site.root / "data"
    site.write_config(inbox=str(data / "inbox"), outbox=str(data / "outbox"), database=str(data / "db" / "pb.json"))
    site.inbox, site.outbox = data / "inbox", data / "outbox"  # made by the service itself, under its modes
    if permissions:
        site.write_config(permissions=permissions)
    payload = tmp_path / "payload.txt"
    payload.write_text("input")
    os.umask(0o022)  # a typical login shell's: what the service must not leave its files at
    start = data.parent.stat().st_ctime - 1
    site.start()
    site.cli("submit", str(payload))  # copied in: the copy takes the configured mode, not the source's 0644
    site.done(1)
    found = modes(data, since=start)
    wrong = [str(p.relative_to(data)) for p in [data, *data.rglob("*")]
             if p.is_dir() and p.stat().st_mode & 0o777 != folders]
    assert not wrong, wrong
    assert found["files"] == {files}, found
    assert found["folders"] == {folders}, found
