"""One writer run per cache: ``CACHE/writer.lock`` names the run that owns the cache.

    with CacheLock.acquire(url) as lock:          # refused at once if another live run holds it
        writer = open_writer(url, manifest, run_id=lock.run_id)   # commits check the lock first

The lock records the run id, the owner's pid, host, start time and the kernel's start tick of
that process (so a reused pid is not mistaken for the owner). A second run is refused in one
line naming the owner. A lock whose owner is gone is *stale*: on the same host that is
provable (no process with that pid and start tick) and the lock is taken over with a message;
on another host it cannot be proven, so the refusal says how to clear it. Processes of the same
run (``--num-procs`` ranks, writer processes, torchrun ranks) pass the run id to their writers;
before every commit a writer checks that the lock still names its run and that the run's owner
process is alive, so a writer whose run was killed can never commit into the cache.

Creation is atomic on a local file system (O_EXCL); on object stores it is a check then a put
followed by a read-back, which narrows but does not close the race between two runs started in
the same instant.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import uuid

from . import fsutil
from .errors import CacheError
from .layout import LOCK


class CacheLockedError(CacheError):
    """Another writer run owns the cache."""


def _process_start(pid: int) -> int | None:
    """The kernel's start tick of a process (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_alive(owner: dict) -> bool | None:
    """True/False for an owner on this host, None when it cannot be known (another host)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    return started is None or owner.get("proc_start") is None or started == owner["proc_start"]


def _describe(owner: dict) -> str:
    return (f"run {owner.get('run_id', '?')[:8]}, pid {owner.get('pid')} on host {owner.get('host')}, "
            f"started {owner.get('started')}")


def read_lock(fs, root: str) -> dict | None:
    path = fsutil.join(root, LOCK)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        if not isinstance(owner, dict):
            raise ValueError("not an object")
        return owner
    except ValueError:
        return {"damaged": True}


class CacheLock:
    def __init__(self, url: str, owner: dict):
        self.url = str(url)
        self.fs, self.root = fsutil.resolve(self.url)
        self.owner = owner
        self.held = True

    @property
    def run_id(self) -> str:
        return self.owner["run_id"]

    @property
    def path(self) -> str:
        return fsutil.join(self.root, LOCK)

    @classmethod
    def acquire(cls, url: str, log=None) -> "CacheLock":
        """Take the cache for a new run; ``log`` (default: stderr) hears of a stale lock taken over."""
        log = log or (lambda text: print(text, file=sys.stderr))
        fs, root = fsutil.resolve(url, write=True)
        fs.makedirs(root, exist_ok=True)
        owner = dict(run_id=uuid.uuid4().hex, pid=os.getpid(), host=socket.gethostname(),
                     proc_start=_process_start(os.getpid()),
                     started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        path = fsutil.join(root, LOCK)
        for attempt in range(3):
            if _create(fs, path, json.dumps(owner).encode()):
                if read_lock(fs, root) == owner:
                    return cls(url, owner)
                continue
            held = read_lock(fs, root)
            if held is None:
                continue                                    # released in between: try again
            if held.get("damaged") and attempt < 2:
                time.sleep(0.2)                             # being written by the other run
                continue
            if held.get("damaged"):
                raise CacheLockedError(f"{url}: the lock file {path} is unreadable; if no precompute is writing "
                                       f"this cache, remove it (rm {path}) and rerun")
            alive = owner_alive(held)
            if alive is False:
                log(f"{url}: taking over a stale lock ({_describe(held)}; that process is gone)")
                fsutil.remove(fs, path)
                continue
            if alive is None:
                raise CacheLockedError(f"{url} is locked by another writer run ({_describe(held)}) that cannot be "
                                       f"checked from this host; if that run is dead, remove {path} and rerun")
            raise CacheLockedError(f"{url} is being written by another precompute run ({_describe(held)}); "
                                   "one writer run per cache: wait for it or stop it")
        raise CacheLockedError(f"{url}: could not take the lock {path} (other runs keep taking it)")

    def release(self) -> None:
        if self.held:
            if read_lock(self.fs, self.root) == self.owner:
                fsutil.remove(self.fs, self.path)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def check_owner(fs, root: str, run_id: str, where: str) -> None:
    """Refuse (CacheError) unless the cache's lock names run ``run_id`` and its owner lives:
    called by a writer before it commits anything."""
    held = read_lock(fs, root)
    if held is None or held.get("run_id") != run_id:
        now = "no lock" if held is None else f"the lock names {_describe(held)}"
        raise CacheError(f"{where}: this writer's run {run_id[:8]} no longer owns the cache ({now}); "
                         "it stops without committing")
    if owner_alive(held) is False:
        raise CacheError(f"{where}: the run that owns this writer ({_describe(held)}) has died; "
                         "this writer stops without committing")


def _create(fs, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; False if it does."""
    if fsutil.is_local(fs):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True
