"""Scratch directories and unfinished uploads that a killed process leaves, and `moie gc`.

Every scratch directory moie makes is named `moie-<task|serve|load|seed>-<pid>-...` in the system's
temporary directory, so a later `moie gc` can tell the ones whose process is gone (a task
killed with SIGKILL or force-cancelled by Ray, a server killed outright) from those in use.
An upload writes `<file>.part-<id>` first and moves it into place when whole (storage._put);
one killed mid-way leaves its part, which `moie gc` finds after an hour.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from pipeline.store import storage

SCRATCH = re.compile(r"^moie-(task|serve|load|seed)-(\d+)-")
PART_AGE_S = 3600  # an upload still running is younger than this


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A scratch directory (removed when its `with` ends, however it ends) that names this process."""
    return tempfile.TemporaryDirectory(prefix=f"moie-{kind}-{os.getpid()}-")


def scratch_path(kind: str) -> Path:
    """As scratch_dir(), for a directory its caller removes."""
    return Path(tempfile.mkdtemp(prefix=f"moie-{kind}-{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def leftovers(storage_root: str | None, temp_dir: str | None = None) -> list[tuple[str, str]]:
    """(path, why) of every scratch directory of a process that is gone, and every unfinished
    upload older than PART_AGE_S under the storage root."""
    found = []
    for path in sorted(Path(temp_dir or tempfile.gettempdir()).glob("moie-*")):
        match = SCRATCH.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(2))):
            found.append((str(path), f"scratch of process {match.group(2)}, which is gone"))
    if storage_root and storage.exists(storage_root):
        found += [(part, "an upload that never finished") for part in storage.parts_left(storage_root, PART_AGE_S)]
    return found

