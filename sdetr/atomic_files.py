"""Atomic file writes: write to a temporary file beside the target, then rename it into place.

The temporary file is named ``.{target name}.{process id}.{random}.tmp``. A process killed
while writing (SIGKILL, power loss) cannot remove its own, so every later write to the same
target first removes the temporaries of processes that no longer run. Written files get the
process's default permissions (``0o666`` less the umask), as files opened with ``open(..., "w")``.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Temporaries without a process id (older versions) are removed once they are this old.
STALE_AFTER_S = 3600.0


def _temporary_name(target: Path) -> str:
    return f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that interrupted writes of ``target`` left behind; returns them.

    A temporary is stale when the process that wrote it no longer runs (or, for names without
    a process id, when it is older than :data:`STALE_AFTER_S`); a write in progress elsewhere
    is never touched.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)\.[0-9a-f]{{8}}|[^.]+)\.tmp$")
    removed: list[Path] = []
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        match = pattern.match(path.name)
        if match is None:
            continue
        pid = match.group(1)
        try:
            stale = not _process_alive(int(pid)) if pid else now - path.stat().st_mtime > STALE_AFTER_S
            if stale:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; it replaces ``path`` only if the block succeeds.

    A crash or an exception leaves the previous file (if any) untouched and no temporary behind
    (a SIGKILL's temporary is removed by the next write of the same target).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / _temporary_name(target)
    # 0o666 less the umask: the permissions open(path, "w") would give (mkstemp's are 0o600)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    default_mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, default_mode)  # some writers (safetensors) recreate the file as 0o600
        with tmp.open("rb+") as stream:  # flush to disk before the rename makes it visible
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
