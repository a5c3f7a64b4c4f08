"""One run per output folder: an exclusive lock on `<output_dir>/.lock`.

Two runs writing one folder corrupt each other: one deletes the other's staging folder, and a
second run started later resumes from the first one's live checkpoint, so both write the same
steps. The run's main process holds an exclusive `flock` on `.lock` for as long as it runs and
writes `pid@host` into it; a second run reads that and stops with one line naming the holder.
The other ranks of a multi-process run share the folder and take no lock.

The lock belongs to the process, not to the file: it goes away when the process exits however
it exits (even SIGKILL), so a stale `.lock` left behind never blocks a later run. Forked
children (DataLoader workers) close their inherited copy at once, so a killed main process
frees the folder without waiting for its workers to notice. On NFS, `flock` is carried by the
NFS lock manager (Linux >= 2.6.12) and holds across machines only where that works; some
parallel filesystems (Lustre without the `flock` mount option) refuse it, and the run then
continues unlocked after a warning.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from vlp.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "WORLD_RANK")
"""Where launchers (torchrun / accelerate launch, MPI) put the global rank, as accelerate reads
it; the lock is taken before the `Accelerator` exists."""

_held_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunFolderInUseError(ConfigError):
    """Another run holds the lock of this output_dir."""


def is_main_rank() -> bool:
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name]) == 0
    return True


class RunLock:
    """`with RunLock(run_dir): ...` holds the run folder's lock (main process only)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool | None = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.enabled = is_main_rank() if enabled is None else enabled
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderInUseError(in_use_message(self.path, holder)) from None
            log.warning("could not lock %s (%s); running without a lock: make sure no other "
                        "run uses this output_dir", self.path, os.strerror(e.errno or 0))
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        _held_fds.add(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        _held_fds.discard(self.fd)
        os.ftruncate(self.fd, 0)  # no stale pid@host for someone reading it later
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def in_use_message(lock_path: Path, holder: str) -> str:
    run_dir = lock_path.parent
    pid, _, host = holder.partition("@")
    who = f"pid {pid} on host {host}" if pid and host else "another process"
    return (f"output_dir {run_dir} is in use by {who} (lock file {lock_path}); wait for that "
            "run to end or stop it, or choose another output_dir")
