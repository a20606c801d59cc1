"""Unit locks and a clean stop on SIGTERM: one process computes a unit at a time.

A lock is a file `.lock-<unit name>` beside the unit's directory, created with
O_CREAT | O_EXCL (atomic on local filesystems and on NFSv3 and later). It holds JSON:
host, pid, the process's start time, when the lock was taken and a random token. The
holder touches it every HEARTBEAT_S seconds. A lock is stale when its process is gone:
on the same host, no process with that pid and start time; from another host (whose
processes we cannot see), a heartbeat older than STALE_AFTER_S. Only a stale lock is
broken, so only a dead process's leftovers are ever removed.

SIGTERM (`install_sigterm_handler`): the temporary output directories and locks of this
process are removed, no unit is swapped into place after that, and the process exits
within seconds even if worker threads are still computing (a Prefect flow's tasks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import CurateError

HEARTBEAT_S = 30.0
STALE_AFTER_S = float(os.environ.get("CURATE_LOCK_STALE_S", 300))
POLL_S = 0.5
EXIT_GRACE_S = 5.0


def lock_path(unit_dir: Path) -> Path:
    return unit_dir.parent / f".lock-{unit_dir.name}"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a reused pid is not mistaken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22: starttime, in clock ticks since boot


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return start is None or _process_start(pid) in (None, start)


def read_holder(path: Path) -> dict | None:
    """The holder recorded in a lock file, or None if there is no lock."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            raise ValueError
    except ValueError:
        info = {}  # being written right now, or damaged: judged by its age alone
    info["heartbeat_age_s"] = time.time() - mtime
    return info


def is_stale(info: dict) -> bool:
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _alive(info["pid"], info.get("pid_start"))
    return info["heartbeat_age_s"] > STALE_AFTER_S


def describe(info: dict) -> str:
    return f"{info.get('host', '?')} pid {info.get('pid', '?')} since {info.get('started', '?')}"


class UnitLock:
    """`with UnitLock(unit_dir, wait=False):` holds the unit's lock, or raises CurateError naming
    the holder (wait=True: polls until the holder finishes or dies)."""

    def __init__(self, unit_dir: Path, unit: str, wait: bool = False, on_wait=None):
        self.path = lock_path(unit_dir)
        self.unit = unit
        self.wait = wait
        self.on_wait = on_wait
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _try_create(self) -> bool:
        body = json.dumps({"unit": self.unit, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_start": _process_start(os.getpid()), "token": self.token,
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
        return True

    def _break(self, info: dict) -> None:
        """Move a stale lock away; if what we moved is not the lock we judged (a new holder took
        over in between), put it back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_holder(aside) or {}
        if moved.get("token") != info.get("token"):
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while not self._try_create():
            info = read_holder(self.path)
            if info is None:
                continue
            if is_stale(info):
                self._break(info)
                continue
            if not self.wait:
                raise CurateError(f"{self.unit} is being computed by {describe(info)} (lock {self.path}); "
                                  "wait for it (--wait) or stop that process")
            if not told and self.on_wait:
                self.on_wait(f"{self.unit}: waiting for {describe(info)}")
                told = True
            time.sleep(POLL_S)
        _HELD[self.path] = self.token
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"curate-lock-{self.unit}")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        _HELD.pop(self.path, None)
        _remove_if_ours(self.path, self.token)

    def __enter__(self) -> "UnitLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _remove_if_ours(path: Path, token: str) -> None:
    info = read_holder(path)
    if info is not None and info.get("token") == token:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- SIGTERM
_HELD: dict[Path, str] = {}  # lock path -> token, for every lock this process holds
_LIVE_TMP: set[Path] = set()  # temporary output directories being written
_CRITICAL = threading.RLock()
_critical_owner: int | None = None
_pending = False
_terminating = False
_previous = None  # the SIGTERM handler installed before ours
_owner_pid: int | None = None  # the process that installed it (a forked child, e.g. a DataLoader worker, inherits it)


def track_tmp(path: Path) -> None:
    _LIVE_TMP.add(path)


def untrack_tmp(path: Path) -> None:
    _LIVE_TMP.discard(path)


@contextmanager
def critical():
    """Renames that place an output run to the end: SIGTERM waits for them, and none starts
    once the process is terminating."""
    global _critical_owner
    with _CRITICAL:
        if _terminating:
            raise CurateError("stopped by SIGTERM before the output was placed")
        _critical_owner = threading.get_ident()
        try:
            yield
        finally:
            _critical_owner = None
    if _pending:
        _terminate()


def _cleanup() -> None:
    global _terminating
    with _CRITICAL:
        _terminating = True
        for tmp in list(_LIVE_TMP):
            shutil.rmtree(tmp, ignore_errors=True)
        for path, token in list(_HELD.items()):
            _remove_if_ours(path, token)
        _HELD.clear()


def _terminate() -> None:
    if _terminating:
        raise SystemExit(128 + signal.SIGTERM)
    _cleanup()
    timer = threading.Timer(EXIT_GRACE_S, os._exit, args=(128 + signal.SIGTERM,))  # worker threads may not stop
    timer.daemon = True
    timer.start()
    if callable(_previous):
        _previous(signal.SIGTERM, None)  # e.g. Prefect's handler: the flow run is marked crashed
    raise SystemExit(128 + signal.SIGTERM)


def install_sigterm_handler() -> None:
    """Stop cleanly on SIGTERM (see the module docstring); main thread only."""
    global _previous, _owner_pid
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous, _owner_pid = current, os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    global _pending
    if os.getpid() != _owner_pid:  # a forked child: it holds none of our locks; die as it would have
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _critical_owner == threading.get_ident():
        _pending = True  # interrupting our own rename: finish it, then stop
        return
    _terminate()
