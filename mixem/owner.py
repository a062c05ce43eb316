"""One owner per output folder: a lock file naming the owner (pid, host, command), and folders of others refused.

Every command that writes a folder (`train`, `export`, `embed`, `cluster`) claims it first:
- a folder that does not exist is created; an empty one is taken; one that holds a mixem-fast folder of the
  same kind (its lock file says so, or an older version's marker file) is ours again; anything else is
  refused with the names of what is there, and nothing in it is touched;
- `.mixem.lock` holds the owner's pid, host and command, and is locked with flock(2) while the owner
  runs: the kernel drops the lock when the process dies, however it dies, so a lock left by a killed
  run is stale by construction (no guessing from pids), and a second process is refused with the
  first one's name. Ranks > 0 of a torchrun job do not lock: they join the owner of their own job;
- half-written files a killed owner left (`.NAME.tmpPID`) are removed, as nobody else can be writing;
- a folder this claim created is removed again when the command fails before writing anything worth
  keeping (a `train` refused by its checks leaves no empty --out behind).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from mixem.errors import OutputFolderError, describe_os_error

LOCK = ".mixem.lock"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(tmp|old)\d+$")  # files.temp_name and checkpoint's old copies
_HELD: dict[str, tuple[int, int]] = {}  # real path -> (thread id, depth): a nested claim by its owner is a no-op
_HELD_GUARD = threading.Lock()


def _info(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def read_lock(out: str | os.PathLike) -> dict:
    """The lock file's record ({} when there is none or it is unreadable): kind, command, pid, host, job, state."""
    return _info(Path(out) / LOCK)


def who(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {when})"


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process: alive; a garbled pid: say "alive" and let the owner's flock decide
    return True


def foreign_entries(out: Path, kind: str, legacy: Iterable[str]) -> list[str]:
    """What in an existing folder says it is not ours ([] when it is empty or a mixem-fast folder of `kind`)."""
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise OutputFolderError(f"cannot read {describe_os_error(e, out)}") from None
    if not names:
        return []
    info = read_lock(out) if LOCK in names else {}
    # A lock file without a readable record (an older version's kill between truncating and rewriting it)
    # says nothing: the folder's own files decide, as for a folder from before lock files.
    if info.get("kind") == kind or (not info.get("kind") and any((out / m).exists() for m in legacy)):
        return []
    if info.get("kind"):
        return [f"a mixem-fast {info['kind']} folder"]
    return [n for n in names if n != LOCK]


def clean_temps(folder: Path, names: Iterable[str] | None = None) -> list[str]:
    """Remove the half-written files (`.NAME.tmpPID`, `.NAME.oldPID`) of killed owners; only the owner may call it.

    names: only temporaries of these final names (None: any). Returns what was removed.
    """
    allowed = set(names) if names is not None else None
    gone = []
    if not folder.is_dir():
        return gone
    for entry in os.scandir(folder):
        name, m = entry.name, _TEMP.match(entry.name)
        while m is not None:  # a temporary of a temporary (a writer that writes atomically itself)
            name, m = m["name"], _TEMP.match(m["name"])
        if name == entry.name or (allowed is not None and name not in allowed):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        gone.append(entry.name)
    return gone


class Claim:
    """What claim() knows about the folder it gave: was it created now, and what a previous owner left."""

    def __init__(self, out: Path, created: bool, previous: dict, nested: bool = False):
        self.out, self.created, self.previous, self.nested = out, created, previous, nested

    @property
    def stale(self) -> dict | None:
        """The record of an owner that stopped without releasing the folder (killed), if the last one did."""
        return self.previous if self.previous.get("state") == "running" else None


def _prepare(out: Path, kind: str, legacy: Iterable[str], option: str) -> bool:
    """Create out or check that an existing one may be ours; True when it was created now."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out}: is a file, not a folder; choose a folder for {option}")
    if not out.exists():
        try:
            out.mkdir(parents=True)
        except FileExistsError:
            return _prepare(out, kind, legacy, option)  # another process created it in between
        except OSError as e:
            raise OutputFolderError(f"cannot create {describe_os_error(e, out)} (for {option})") from None
        return True
    foreign = foreign_entries(out, kind, legacy)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputFolderError(
            f"{out}: holds files that are not from a mixem-fast {kind} run ({shown}); nothing was changed: "
            f"choose a new or empty folder for {option}"
        )
    return False


def _lock(out: Path, record: dict) -> tuple[int, dict]:
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputFolderError(f"cannot write {describe_os_error(e, path)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputFolderError(
            f"{out}: in use by {who(_info(path))}; wait for it to finish, or choose another folder"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        _check_without_flock(path)  # a file system without flock (old NFS): the record alone decides
    previous = _info(path)
    _write_record(fd, record)
    return fd, previous


def _check_without_flock(path: Path):
    info = _info(path)
    if info.get("state") != "running":
        return
    if info.get("host") == socket.gethostname() and not pid_alive(info.get("pid")):
        return
    raise OutputFolderError(
        f"{path.parent}: in use by {who(info)} (this file system cannot lock files, so a killed owner cannot be "
        f"told from a running one); if that process is gone, delete {path} and rerun"
    )


def _write_record(fd: int, record: dict):
    """Overwrite the record in place, never shorter than the file: no instant at which a kill leaves it empty
    (truncating first did: a folder whose lock file is empty is no longer known as ours). A record shorter
    than the last one is padded with spaces, which JSON allows after a value; a write of a few hundred bytes
    to a regular file is not cut short by a signal."""
    data = (json.dumps(record, indent=1) + "\n").encode()
    size = os.fstat(fd).st_size
    os.pwrite(fd, data + b" " * max(0, size - len(data)), 0)
    os.fsync(fd)


@contextlib.contextmanager
def claim(
    out: str | os.PathLike,
    kind: str,
    *,
    command: str,
    legacy: Iterable[str] = (),
    keep: Iterable[str] = (),
    job: str = "",
    option: str = "--out",
):
    """Own `out` for the body of a with-block (see the module docstring); yields a Claim.

    kind: the folder's kind ("embed", "train", "export"); a folder of another kind is refused.
    legacy: files whose presence marks a folder written by an older mixem-fast of this kind.
    keep: files whose presence means a folder created by this claim holds work worth keeping on failure.
    job: the torchrun job, for ranks > 0 to find their owner (join()).
    """
    out = Path(out).absolute()
    key = os.path.realpath(out) if out.exists() else str(out)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[0] == me:
            _HELD[key] = (me, held[1] + 1)
    if held is not None and held[0] == me:
        try:
            yield Claim(out, False, {}, nested=True)
        finally:
            with _HELD_GUARD:
                _HELD[key] = (me, _HELD[key][1] - 1)
        return
    if held is not None:
        raise OutputFolderError(f"{out}: in use by another thread of this process; choose another folder")
    legacy, keep = tuple(legacy), tuple(keep)
    created = _prepare(out, kind, legacy, option)
    key = os.path.realpath(out)
    record = dict(kind=kind, command=command, pid=os.getpid(), host=socket.gethostname(), job=job, started=time.time())
    fd, previous = _lock(out, {**record, "state": "running"})
    with _HELD_GUARD:
        _HELD[key] = (me, 1)
    ok = False
    try:
        yield Claim(out, created, previous)
        ok = True
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        _release(out, fd, {**record, "state": "done" if ok else "failed"}, created and not ok, keep)


def _release(out: Path, fd: int, record: dict, undo: bool, keep: tuple[str, ...]):
    try:
        if undo and not any((out / k).exists() for k in keep):
            shutil.rmtree(out, ignore_errors=True)  # created by this claim and nothing worth keeping in it
        else:
            with contextlib.suppress(OSError):
                _write_record(fd, record)
    finally:
        os.close(fd)  # drops the flock


def join(out: str | os.PathLike, kind: str, job: str, timeout_s: float, poll_s: float = 0.2) -> dict:
    """Ranks > 0: wait until rank 0 of the same torchrun job owns `out` (or has owned it: a fast rank 0 may be done).

    Never a second owner: a rank of another job finds another job id in the lock and waits, then gives up.
    """
    out = Path(out)
    deadline = time.monotonic() + timeout_s
    while True:
        info = read_lock(out)
        here = info.get("host") == socket.gethostname()
        mine = info.get("kind") == kind and info.get("job") == job and info.get("state") in ("running", "done")
        if mine and not (here and info["state"] == "running" and not pid_alive(info.get("pid"))):
            return info
        if time.monotonic() > deadline:
            raise OutputFolderError(
                f"{out}: rank 0 of this job did not take the folder within {timeout_s:.0f} s"
                + (f" (it is held by {who(info)})" if info else "")
                + "; check that rank 0 runs and that no other run uses this --out"
            )
        time.sleep(poll_s)
