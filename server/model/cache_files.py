"""Files and folders Loom caches (converted tokenizers, quantized weights, kernel plans, the extracted encoder) are
written beside their final name and renamed into place, so a process killed at any moment leaves either the whole
entry or none of it. The half-written temporary it leaves behind carries the writer's pid; the next writer of the
same entry removes temporaries whose process is gone."""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("loom.model")
TEMP_SUFFIX = re.compile(r"\.tmp(\d+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> int:
    """Delete `<target name>.tmp<pid>` siblings left by writers that died; returns how many."""
    if not target.parent.is_dir():
        return 0
    removed = 0
    for path in target.parent.glob(f"{glob.escape(target.name)}.tmp*"):
        match = TEMP_SUFFIX.search(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            _remove(path)
            removed += 1
    if removed:
        log.warning("removed unfinished cache entries left by a stopped process",
                    extra={"entry": str(target), "count": removed})
    return removed


def temporary_for(target: Path) -> Path:
    """A fresh temporary path beside `target` owned by this process (stale ones of dead writers removed first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    _remove(tmp)
    return tmp


def write_file_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file, which then replaces `target` in one rename."""
    tmp = temporary_for(target)
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def publish_directory(tmp: Path, target: Path) -> None:
    """Rename a finished directory into place; a concurrent writer that won the race keeps its copy."""
    try:
        tmp.replace(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
