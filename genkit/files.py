"""Writing files so that nothing the user had is lost or half-written, and one writer per
output folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from genkit.errors import OutputError

#: The temporary name :func:`replaced_atomically` writes to: ``.NAME.HOST-PID.HEX.tmp``, so
#: that a later write can tell a dead process's leftover from a live writer's file.
_TMP = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``folder`` (those of
    processes on this host that no longer run); returns what was deleted."""
    removed = []
    host = _host()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TMP.match(entry.name)
            if m and m["host"] == host and not _alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without an
    exception, rename it onto ``path`` (:func:`os.replace`). ``path`` is then either its old
    self or complete, never half-written, and two processes writing it race safely (the last
    rename wins). The temporary file never outlives the block, and the leftovers of writers
    killed in that folder earlier are removed first (:func:`remove_leftovers`)."""
    path = Path(path)
    remove_leftovers(path.parent)
    tmp = path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


class FolderLockedError(OutputError):
    """Another process holds the output folder's lock (:func:`output_lock`)."""


#: The lock file in a locked output folder, and the file naming its holder.
LOCK_NAME = ".genkit.lock"
HOLDER_NAME = ".genkit.lock.json"


@contextlib.contextmanager
def output_lock(folder: Path, what: str = "genkit") -> Iterator[Path]:
    """Hold the advisory lock of ``folder`` (created if needed) for the block: one writer per
    output folder. A second process gets :class:`FolderLockedError` at once, naming the
    holder's PID and command. The lock is the operating system's (``filelock``: ``flock`` on
    POSIX), so it dies with its process: a killed run leaves no lock that blocks the next."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLockedError(
            f"{folder} is being written by another process ({_holder(folder)}); wait for it to "
            "finish or choose another output folder"
        ) from None
    except OSError as exc:
        raise OutputError(f"cannot lock output folder {folder}: {exc.strerror or exc}") from None
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
            "what": what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with contextlib.suppress(OSError):
            text = json.dumps(holder) + "\n"
            with replaced_atomically(folder / HOLDER_NAME) as tmp:
                tmp.write_text(text)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            (folder / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()


def _holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, in words, as its holder file says."""
    try:
        holder = json.loads((folder / HOLDER_NAME).read_text())
        return (
            f"PID {holder['pid']} on {holder['host']}, `{holder['command']}`, "
            f"since {holder['since']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "its PID is not recorded yet"
