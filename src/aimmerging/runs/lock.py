"""The run directory's lock: an exclusive ``flock`` on ``RUN_DIR/.lock``.

A run holds it from before its config check to its end (only the main process of a
multi-process run takes it). The file holds the holder's pid, host and command line, which a
second run on the same directory names when it is refused. Only the live lock counts: the kernel
drops it when its holder dies, so a lock file left by a killed run does not block the resume. The
holder deletes the file when it is done. A ``.lock`` that is a symbolic link, a hard link or not a
regular file is refused in one line, never written through (it would truncate the file it leads
to). :class:`~aimmerging.runs.rundir.RunDirectory` takes and releases it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError, one_line
from .layout import RunLayout

log = logging.getLogger("aimmerging")

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # the lock is not inherited by programs the run starts
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a .lock that is a symbolic link is refused, not followed


def _first_missing(path: Path) -> Optional[Path]:
    """The top-most directory of ``path`` (itself included) that does not exist yet, or None."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


class RunLock:
    """The lock of the run directory ``run_dir`` (taken by :meth:`acquire`, dropped by :meth:`release`)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.file = RunLayout(run_dir).lock
        self._fd: Optional[int] = None
        self._created: Optional[Path] = None  # the top-most directory the lock created

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (creating the directory when it is new), or refuse at once with one line
        naming the run that holds it. Idempotent."""
        if self._fd is not None:
            return
        created = _first_missing(self.run_dir)
        for _ in range(20):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                # never through a link: O_NOFOLLOW refuses a symlink (ELOOP), the fstat below a hard
                # link or a device, so a planted .lock cannot make the run overwrite another file
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
            except FileNotFoundError:  # the directory was removed under us (a run releasing it): again
                continue
            except OSError as e:
                if self.file.is_symlink():
                    raise self._linked("a symbolic link") from None
                where = e.filename or self.run_dir
                raise UserError(f"{where}: cannot create the run directory's lock file ({e.strerror or e}); "
                                "choose another --output-dir") from None
            st = os.fstat(fd)
            if st.st_nlink == 0:  # deleted by the run releasing it, between our open and now: again
                os.close(fd)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise self._linked("not a regular file" if not stat.S_ISREG(st.st_mode)
                                   else f"a hard link ({st.st_nlink} names for one file)")
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                busy = self._busy(fd)
                os.close(fd)
                raise busy from None
            except (ImportError, OSError) as e:  # no flock here (some network file systems, not POSIX)
                os.close(fd)
                log.warning("cannot lock %s (%s): running without a lock; make sure no other run uses "
                            "this directory", self.file, getattr(e, "strerror", None) or e)
                return
            # the previous holder may have deleted the file between our open and our flock: then the
            # lock we hold is on a file nobody else will see; take the one at the path instead
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "command": one_line(shlex.join([sys.executable, *sys.argv]), 1000),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            except OSError as e:
                os.close(fd)
                raise UserError(f"{self.file}: cannot write the lock file ({e.strerror or e}); "
                                "choose another --output-dir") from None
            self._fd, self._created = fd, created
            return
        raise UserError(f"{self.file}: could not take the lock, other runs keep taking and releasing it; "
                        "rerun the command once they are done")

    def release(self) -> None:
        """Delete the lock file (and the directory, when the lock created it and nothing was
        written into it), then drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.file)):
                os.unlink(self.file)  # still holding the lock: a run that opened it retries
            if self._created is not None:
                for d in [self.run_dir, *self.run_dir.parents]:
                    os.rmdir(d)  # only empty ones; stops with an OSError at the first that is not
                    if d == self._created:
                        break
        except OSError:
            pass
        finally:
            os.close(fd)

    def refuse_if_busy(self) -> None:
        """Refuse when a run holds the lock; writes nothing (the lock file is only opened to read)."""
        try:
            fd = os.open(self.file, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        except OSError:
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise self._busy(fd) from None
        except (ImportError, OSError):
            pass
        finally:
            os.close(fd)

    def holder(self, fd: Optional[int] = None) -> str:
        """'pid N on HOST, started ..., command ...' from the lock file (it is written just after
        the lock is taken: wait a moment for it)."""
        text = ""
        for attempt in range(20):
            if attempt:
                time.sleep(0.05)
            try:
                if fd is not None:
                    text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                else:
                    text = self.file.read_text(encoding="utf-8", errors="replace")[:4096]
                info = json.loads(text)
                return (f"pid {int(info['pid'])} on {one_line(info.get('host'), 100)}, "
                        f"started {one_line(info.get('started'), 40)}: {one_line(info.get('command'), 200)}")
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return f"its process is unknown: {self.file} is {'empty' if not text.strip() else 'unreadable'}"

    def _busy(self, fd: int) -> UserError:
        return UserError(f"{self.run_dir} is in use by another aimmerging run ({self.holder(fd)}); wait for it to "
                         "finish, or choose another --output-dir")

    def _linked(self, what: str) -> UserError:
        return UserError(f"{self.file} is {what}; aimmerging never writes its lock through a link: "
                         "delete that file (it is not aimmerging's), then rerun the same command")
